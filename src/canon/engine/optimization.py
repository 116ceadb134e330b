"""What a training step optimizes and how, as the recipe says: the loss (with GoogLeNet's
auxiliary classifiers), SGD's parameter groups, peak lr and fused kernel, and the running
average of the weights."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from canon.engine.schedules import linear_scaled_lr
from canon.errors import ConfigError
from canon.models.base import class_layers_of
from canon.recipes.schema import OptimizerSection, TrainSection


def parameter_groups(model: nn.Module, config: OptimizerSection) -> list[dict]:
    """The trainable parameters in groups by weight decay (BN weights and biases, every 1-d
    parameter, skip it under no_decay_bn_bias) and by `lr_scale`, the factor on the schedule's
    lr (backbone_lr_scale for every parameter outside the class layers: the classifier, and
    GoogLeNet's auxiliary ones)."""
    scaled = config.backbone_lr_scale != 1
    if scaled and not isinstance(getattr(model, "classifier", None), nn.Module):
        raise ConfigError(
            f"optimizer.backbone_lr_scale needs a canon model with a classifier; "
            f"{type(model).__name__} has none"
        )
    layers = class_layers_of(model) if scaled else []
    head = {id(p) for layer in layers for p in layer.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            no_decay = config.no_decay_bn_bias and parameter.ndim <= 1
            lr_scale = 1.0 if id(parameter) in head or not scaled else config.backbone_lr_scale
            key = (0.0 if no_decay else config.weight_decay, lr_scale)
            groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay, "lr_scale": lr_scale}
        for (weight_decay, lr_scale), params in groups.items()
    ]


def make_optimizer(
    model: nn.Module, config: OptimizerSection, global_batch_size: int, frozen_stages: int = 0
) -> tuple[torch.optim.SGD, float]:
    """SGD with momentum and weight decay, and its peak lr for this global batch."""
    peak_lr = config.lr
    if config.scale_lr:
        peak_lr = linear_scaled_lr(config.lr, global_batch_size, config.base_batch_size)
    optimizer = sgd(
        parameter_groups(model, config), lr=peak_lr, momentum=config.momentum,
        nesterov=config.nesterov, weight_decay=config.weight_decay,
        fused=fused_sgd(model, frozen_stages),
    )
    return optimizer, peak_lr


def sgd(params: Iterable[Any], *, fused: bool | None, momentum: float,
        **options: Any) -> torch.optim.SGD:
    """torch.optim.SGD, whose fused kernel's momentum buffers start at zero. Fused SGD makes
    them with empty_like on a first step and fills them in its kernel, which skips a step
    GradScaler finds inf in (fp16 overflow, common on the first): the next step would add
    uninitialised memory. Zeros from the start compute what a first step does (no
    dampening: momentum x 0 + g)."""
    optimizer = torch.optim.SGD(params, momentum=momentum, fused=fused, **options)
    if optimizer.defaults.get("fused") and momentum:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return optimizer


def classification_loss(
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
    aux_logits: Sequence[torch.Tensor], targets: torch.Tensor, aux_weight: float,
) -> torch.Tensor:
    """The training loss: `criterion` on the logits, plus `aux_weight` times it on each of
    GoogLeNet's auxiliary classifiers' (s5: weighted 0.3)."""
    loss = criterion(logits, targets)
    for aux in aux_logits:
        loss = loss + aux_weight * criterion(aux, targets)
    return loss


def fused_sgd(model: nn.Module, frozen_stages: int = 0) -> bool | None:
    """SGD's `fused` for `model`: on GPUs, one fused kernel for the whole update instead of a
    few per tensor, which keeps small nets (the CIFAR ResNets) from being bound by kernel
    launches; None (torch's default) elsewhere, and where stages start frozen: a stage
    unfrozen later leaves its group with momentum buffers for some parameters only, which
    the fused kernel fails on (the per-tensor update creates the missing ones)."""
    return (not frozen_stages and all_on_cuda(model)) or None


def all_on_cuda(model: nn.Module) -> bool:
    return all(parameter.is_cuda for parameter in model.parameters())


def make_average(model: nn.Module, config: TrainSection) -> AveragedModel | None:
    """The running average of the weights (and BN statistics) that train.ema_decay or
    train.polyak_after_epochs ask for: exponential, or AveragedModel's default, the uniform
    mean of every weight vector it is given (Polyak & Juditsky 1992)."""
    if config.ema_decay > 0:
        ema = get_ema_multi_avg_fn(config.ema_decay)
        return AveragedModel(model, multi_avg_fn=ema, use_buffers=True)
    if config.polyak_after_epochs is not None:
        return AveragedModel(model, multi_avg_fn=_uniform_mean, use_buffers=True)
    return None


_float_mean = get_swa_multi_avg_fn()


def _uniform_mean(averaged: list[torch.Tensor], current: list[torch.Tensor],
                  count: torch.Tensor) -> None:
    """AveragedModel's uniform mean of one device's and dtype's tensors, integer buffers
    included: torch's own, which AveragedModel picks on GPUs, divides BN's num_batches_tracked
    with an integer addcdiv and fails. A counter is not averaged: it takes the model's value."""
    if averaged[0].is_floating_point() or averaged[0].is_complex():
        _float_mean(averaged, current, count)
    else:
        torch._foreach_copy_(averaged, current)
