"""Starting a model from another's weights (recipe `model.init_from`, `--init-from`): VGG's
staged training (Simonyan & Zisserman s3.1: configuration D started from a trained A), training
at a new scale from a model trained at another, and transfer learning.

Tensors are copied by name where the shapes agree. `model.init_layers` (fnmatch patterns of
layer names, e.g. `features.conv1.*` or `head.fc6`) limits the copy to those layers; a layer
asked for that the source lacks or holds in another shape is an error, while with no patterns
such a tensor keeps its fresh initialisation. A source of which nothing would be copied (a
network of another kind, a wrong path) is an error too. The classifier (GoogLeNet's auxiliary
ones too) is copied only when the source was trained on the same classes (class ids, in order)
as the new run. What was copied and what was not, and why, and the source's tensors that have
no place in the model (the blocks of a deeper net, say) go to the log and to init_from.json in
the run directory, with the source's model name.
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from canon.engine.trained import load_trained
from canon.errors import ConfigError
from canon.files import atomic_write
from canon.models.base import class_layers_of

INIT_REPORT = "init_from.json"


@dataclass
class InitReport:
    """Which of the model's tensors came from the source and which kept their fresh values."""

    source: str
    source_model: str | None = None  # its registered model name, where known
    copied: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # tensor name -> why it was not copied
    unused: list[str] = field(default_factory=list)  # the source's tensors the model lacks

    def summary(self) -> str:
        kind = f" (a {self.source_model})" if self.source_model else ""
        unused = (f"; {len(self.unused)} of the source's have no place here" if self.unused
                  else "")
        lines = [f"init_from {self.source}{kind}: copied {len(self.copied)} tensors, "
                 f"{len(self.kept)} keep their fresh initialisation{unused}"]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)

    def write(self, run_dir: Path) -> None:
        text = json.dumps(
            {"source": self.source, "source_model": self.source_model, "copied": self.copied,
             "kept": self.kept, "unused": self.unused}, indent=2
        )
        atomic_write(run_dir / INIT_REPORT, lambda target: target.write_text(text))


def initialize_from(
    model: nn.Module, source: str, layers: tuple[str, ...] = (), class_ids: list[str] | None = None
) -> InitReport:
    """Copy into `model`, whose outputs are `class_ids`, the tensors of `source` (a run,
    checkpoint, model.safetensors or torchvision:NAME, read by canon.engine.trained.load_trained)
    that `layers` select (all when empty)."""
    trained = load_trained(source)
    same_classes = class_ids is None or trained.class_ids == class_ids
    return copy_matching(model, trained.model.state_dict(), source, layers, same_classes,
                         trained.name)


def copy_matching(
    model: nn.Module, weights: dict[str, torch.Tensor], source: str,
    layers: tuple[str, ...] = (), same_classes: bool = True, source_model: str | None = None,
) -> InitReport:
    """Copy `weights` into `model` by name and shape; see the module docstring."""
    report = InitReport(source, source_model)
    own = model.state_dict()
    unmatched = [p for p in layers if not any(_selects(p, name) for name in own)]
    if unmatched:
        raise ConfigError(
            f"model.init_layers {unmatched} name no layer of {type(model).__name__}; its "
            f"layers: {', '.join(sorted({n.rpartition('.')[0] for n in own}))}"
        )
    class_layers = _class_layer_prefixes(model)
    for name, tensor in own.items():
        asked = any(_selects(p, name) for p in layers)
        if layers and not asked:
            report.kept[name] = "not in model.init_layers"
        elif name not in weights:
            if asked:
                raise ConfigError(f"model.init_layers asks for {name}, which {source} does "
                                  "not hold; leave it out of init_layers")
            report.kept[name] = "absent from the source"
        elif name.startswith(class_layers) and not same_classes:
            report.kept[name] = "the classifier of other classes"
        elif weights[name].shape != tensor.shape:
            theirs, ours = tuple(weights[name].shape), tuple(tensor.shape)
            if asked:
                raise ConfigError(
                    f"model.init_layers asks for {name}, but it is {theirs} in {source} and "
                    f"{ours} in {type(model).__name__}; leave it out of init_layers"
                )
            why = "the classifier of another class count" if name.startswith(class_layers) else (
                "another shape")
            report.kept[name] = f"{why}: {theirs} in the source, {ours} here"
        else:
            report.copied.append(name)
    if not report.copied:
        reasons = Counter(why.partition(":")[0] for why in report.kept.values())
        raise ConfigError(
            f"init_from {source} copies nothing into {type(model).__name__} (tensors "
            + ", ".join(f"{why}: {count}" for why, count in reasons.items())
            + "): is it a network of another kind? Check model.init_from and init_layers")
    report.unused = [name for name in weights if name not in own]
    with torch.no_grad():
        for name in report.copied:
            own[name].copy_(weights[name])
    return report


def _selects(pattern: str, tensor_name: str) -> bool:
    """A pattern names a layer (all its tensors) or, with wildcards, tensors or layers."""
    layer = tensor_name.rpartition(".")[0]
    return any(
        fnmatch.fnmatchcase(candidate, pattern) or candidate.startswith(pattern + ".")
        for candidate in (tensor_name, layer)
    )


def _class_layer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The tensor-name prefixes of the layers whose outputs are the classes."""
    layers = class_layers_of(model)
    return tuple(name + "." for name, module in model.named_modules()
                 if any(module is layer for layer in layers))
