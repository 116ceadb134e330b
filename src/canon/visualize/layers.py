"""Naming a network's layers, reading their outputs, and the input pixels a position of their
output sees: a layer is a module's dotted path in `model.named_modules()` (e.g.
`features.conv5` for ZFNet); an unknown name's error lists them all."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from canon.errors import ConfigError

Box = tuple[int, int, int, int]  # top, left, bottom, right (inclusive), in input pixels


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`; an unknown name is a ConfigError listing the layers."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        known = ", ".join(n for n in modules if n)
        raise ConfigError(f"{type(model).__name__} has no layer {name!r}; its layers: {known}")
    return modules[name]


def stages_hint(model: nn.Module) -> str:
    """For messages that ask for another layer: ", e.g. a stage: " and the layer names of the
    model's stages (conv1, conv2_x, ...; features.conv1, ... for AlexNet, ZFNet and VGG), or ""
    for a model without them."""
    stages = {id(module) for _, module in getattr(model, "stages", ())}
    names = [name for name, module in model.named_modules() if id(module) in stages]
    return f", e.g. a stage: {', '.join(names)}" if names else ""


@contextmanager
def capture_outputs(
    model: nn.Module, names: Sequence[str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward pass of `model` stores the output of every layer in
    `names` (detached) in the yielded dict under its name. A copy, not the tensor itself: an
    in-place ReLU after the layer would otherwise change the stored value. Reading a layer
    the pass did not run is a ConfigError."""
    outputs: dict[str, torch.Tensor] = _LayerOutputs(hint=stages_hint(model))
    handles = [
        find_layer(model, name).register_forward_hook(
            lambda _module, _inputs, output, name=name: outputs.__setitem__(
                name, output.detach().clone()
            )
        )
        for name in names
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class _LayerOutputs(dict):
    def __init__(self, hint: str) -> None:
        super().__init__()
        self.hint = hint

    def __missing__(self, name: str) -> torch.Tensor:
        raise ConfigError(
            f"layer {name} did not run in the model's forward pass (auxiliary heads run only in "
            f"training); choose a layer on the main path{self.hint}"
        )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The zeros `conv` pads each side with, per dimension (padding="valid" and "same"
    included); None where it has no such form, for the deconvnet's transpose and the
    receptive field: another padding mode, or "same" padding one more on one side than on the
    other (an even kernel)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding != "same":
        return conv.padding
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)


def receptive_field(layers: list[nn.Module], row: int, column: int) -> Box:
    """The input pixels that position (row, column) of the last layer's map sees, from each
    convolution's and pool's kernel, stride, padding and dilation; it may reach outside the
    image (padding, ceil-mode pools): `clip` it."""
    top, bottom, left, right = row, row, column, column
    for layer in reversed(layers):
        if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
            (k_y, k_x), (s_y, s_x) = _pair(layer.kernel_size), _pair(layer.stride)
            padding = conv_padding(layer) if isinstance(layer, nn.Conv2d) else layer.padding
            (p_y, p_x), (d_y, d_x) = _pair(padding), _pair(layer.dilation)
            top, bottom = top * s_y - p_y, bottom * s_y - p_y + d_y * (k_y - 1)
            left, right = left * s_x - p_x, right * s_x - p_x + d_x * (k_x - 1)
    return top, left, bottom, right


def clip(box: Box, height: int, width: int) -> Box:
    top, left, bottom, right = box
    return max(top, 0), max(left, 0), min(bottom, height - 1), min(right, width - 1)
