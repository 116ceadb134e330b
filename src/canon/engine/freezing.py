"""Fine-tuning with frozen stages (recipe model.frozen_stages, train.unfreeze_every_epochs):
the first stages of a transferred network learn nothing at first, then are unfrozen one by
one, the deepest first, as in gradual unfreezing (Howard & Ruder 2018).

Frozen parameters keep requires_grad, so that DistributedDataParallel, which fixes the set
of parameters it reduces when it wraps the model, sees the same set throughout; their
gradients are dropped before each optimizer step instead (SGD then skips them, weight decay
and momentum included), and their BatchNorm layers stay in eval mode, their statistics fixed.
"""

from __future__ import annotations

import torch.nn as nn

from canon.errors import ConfigError
from canon.recipes.schema import Recipe


def frozen_stage_count(recipe: Recipe, epoch: int) -> int:
    """How many leading stages are frozen during epoch `epoch` (0-based)."""
    frozen, every = recipe.model.frozen_stages, recipe.train.unfreeze_every_epochs
    return max(0, frozen - epoch // every) if every else frozen


def freeze_stages(model: nn.Module, count: int) -> list[nn.Parameter]:
    """Put the first `count` stages' modules in eval mode (after model.train()) and return
    their parameters, whose gradients the training step drops."""
    if not count:
        return []
    check_frozen_stages(model, count)
    frozen = []
    for _, stage in model.stages[:count]:
        stage.eval()
        frozen += list(stage.parameters())
    return frozen


def check_frozen_stages(model: nn.Module, count: int) -> None:
    """A ConfigError unless `model` has at least `count` stages to freeze (a run checks it
    as it builds the model, before it copies weights in or reads data)."""
    stages = getattr(model, "stages", None)
    if count and (stages is None or count > len(stages)):
        have = "no stages" if stages is None else f"{len(stages)} stages"
        raise ConfigError(f"model.frozen_stages is {count}, but {type(model).__name__} has {have}")
