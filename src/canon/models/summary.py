"""What a model costs, counted from its real modules: depth, parameters, multiply-adds, memory,
per image and in the papers' conventions (`summarize`), and the table `canon summary` prints.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from canon.errors import ConfigError, InputSizeError
from canon.models.factory import create_model, list_models

_DEPTH = "_canon_summary_depth"
_MIB = 2**20


@dataclass(frozen=True)
class ModelSummary:
    """One row of the table: what one image costs, as `summarize` counts it.

    - layers: the depth as the papers count it, the longest chain of weight layers
      (convolutions and fully connected layers) from the input to the logits. Each tensor
      carries the depth of the chain that produced it; a weight layer adds one, every other
      operation keeps the largest depth of its inputs. Branches side by side (Inception modules,
      projection shortcuts) so do not add: AlexNet 8, VGG-16 16, GoogLeNet 22, ResNet-50 50,
      CIFAR ResNet-20 20.
    - weight_layers: how many convolutions and fully connected layers the forward pass runs
      (ResNet-50: 53 convolutions, 4 of them projection shortcuts, plus the classifier = 54).
      A grouped convolution (AlexNet's two towers) is one layer, as in the paper.
    - params: the parameters the forward pass reads, exactly. Weights used only by another path,
      such as GoogLeNet's auxiliary classifiers (training only), are not counted.
    - gflops: billions of multiply-adds of the convolutions and matrix products (fully connected
      layers), the convention of the ResNet paper and of torchvision's published GFLOPS. Bias
      additions, normalisation, activations and pooling are not counted: with them the figures
      would no longer match the papers' (VGG-19 19.6, ResNet-50 3.8).
    - activation_mb: mebibytes (2**20 bytes) of the tensors autograd keeps for the backward
      pass of one image, parameters and buffers excluded: the input image, layer inputs and
      outputs, max-pooling indices, each storage once however many operations keep it. This is
      the memory a training batch needs per image on top of the weights, gradients and optimizer
      state, but for two small terms: the pass runs in eval mode (batch-norm statistics in
      training mode take PyTorch's meta kernels 20 times longer), so dropout masks and
      per-channel batch statistics are left out; they add under 0.1 MiB to any model here.
    - name ends in " (dense)" where the model was counted in its `fully_convolutional()` form.
    """

    name: str
    layers: int
    params: int
    gflops: float
    activation_mb: float
    input_size: int
    weight_layers: int


def _conv_multiply_adds(args: Sequence, out: torch.Tensor) -> int:
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, ...):
    # every output element (every input element, when transposed) is a dot product over one
    # weight slice of size in_channels / groups x kernel.
    source, weight, transposed = args[0], args[1], args[6]
    per_element = weight[0].numel()
    return (source if transposed else out).numel() * per_element


def _matmul_multiply_adds(args: Sequence, out: torch.Tensor) -> int:
    # mm(a, b), bmm, mv, dot and their add- forms (bias first): each output element is a dot
    # product over the first factor's last dimension, k.
    first = args[-2]
    return out.numel() * first.shape[-1]


def _summed_bmm_multiply_adds(args: Sequence, out: torch.Tensor) -> int:
    # addbmm(bias, a, b): the batch of products is summed into one n x m output.
    first = args[-2]
    return out.numel() * first.shape[0] * first.shape[-1]


_WEIGHT_OPS: dict[object, Callable[[Sequence, torch.Tensor], int]] = {
    torch.ops.aten.convolution: _conv_multiply_adds,
    **dict.fromkeys((torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                     torch.ops.aten.baddbmm, torch.ops.aten.mv, torch.ops.aten.addmv,
                     torch.ops.aten.dot), _matmul_multiply_adds),
    torch.ops.aten.addbmm: _summed_bmm_multiply_adds,
}


@dataclass
class _Counts:
    multiply_adds: int = 0
    weight_layers: int = 0
    used_storages: set[int] = field(default_factory=set)


class _CountingMode(TorchDispatchMode):
    """Tags every activation with its weight-layer depth and adds up the weight layers' cost.

    Activations are the tensors computed from the input (they carry a depth); parameters and
    buffers carry none, which is how a convolution or matrix product is told to have a weight.
    """

    def __init__(self, state_storages: dict[int, torch.UntypedStorage]) -> None:
        super().__init__()
        self.state_storages = state_storages
        self.counts = _Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        depths = [getattr(t, _DEPTH) for t in inputs if hasattr(t, _DEPTH)]
        if not depths:
            return out
        for tensor in inputs:
            storage = id(tensor.untyped_storage())
            if storage in self.state_storages:
                self.counts.used_storages.add(storage)
        step = 0
        cost = _WEIGHT_OPS.get(func.overloadpacket)
        if cost is not None and len(depths) < len(inputs):
            self.counts.multiply_adds += cost(args, out)
            self.counts.weight_layers += 1
            step = 1
        depth = max(depths) + step
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                setattr(tensor, _DEPTH, depth)
        return out


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for the model's parameters and buffers (the model is untouched)."""
    state = {}
    for name, parameter in model.named_parameters():
        state[name] = torch.empty_like(parameter, device="meta").requires_grad_()
    for name, buffer in model.named_buffers():
        state[name] = torch.empty_like(buffer, device="meta")
    return state


def _default_input_size(model: nn.Module) -> int:
    config = getattr(model, "eval_config", None)
    return config.input_size if config is not None else 224


def _meta_copy(model: nn.Module) -> nn.Module:
    """The model with shape-only parameters and buffers: its weights are never copied."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for p in model.parameters()
    }
    memo.update((id(b), torch.empty_like(b, device="meta")) for b in model.buffers())
    return copy.deepcopy(model, memo)


def _build(name: str, num_classes: int | None) -> nn.Module:
    # On the meta device the weights are never allocated nor initialised.
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes)


def summarize(
    model_or_name: nn.Module | str,
    input_size: int | None = None,
    num_classes: int | None = None,
    in_channels: int = 3,
) -> ModelSummary:
    """Count layers, parameters, multiply-adds and activation memory for one image.

    One forward pass of a single image runs through the model on PyTorch's meta device (shapes
    only, no arithmetic, so VGG-19 and ResNet-152 take milliseconds) while every ATen operation
    it dispatches is watched; `ModelSummary` defines each count.

    A model whose fully connected head takes one input size (AlexNet 227, the papers' VGG) is
    counted, at any other size, in its `fully_convolutional()` form, the network dense
    evaluation runs there; its name then ends in " (dense)".

    `model_or_name` is a registered name or any module taking N x C x H x W inputs (it is not
    modified); `in_channels` is C, 3 for images, more to summarize a single block.
    `input_size` defaults to the model's `eval_config.input_size` (224 without one);
    `num_classes` (for a name) to its builder's default, 10 for the CIFAR nets, else 1000.
    """
    if isinstance(model_or_name, str):
        name, model = model_or_name, _build(model_or_name, num_classes)
    else:
        name, model = type(model_or_name).__name__, model_or_name
    size = _default_input_size(model) if input_size is None else input_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputSizeError(f"input size must be a positive number of pixels, got {size!r}")
    fixed = getattr(model, "fixed_input_size", None)
    if fixed not in (None, size):
        # An FC head takes one size; at any other the net runs as dense evaluation runs it.
        dense = _meta_copy(model).fully_convolutional()
        least = getattr(dense, "min_input_size", 1)
        if size < least:
            raise InputSizeError(
                f"{name} takes {fixed}x{fixed} inputs (its fully connected head reads one size); "
                f"other sizes are counted in its fully convolutional form, as dense evaluation "
                f"runs it, which needs at least {least}x{least}, not {size}x{size}")
        name, model = f"{name} (dense)", dense

    state = _meta_state(model)
    parameter_names = {key for key, _ in model.named_parameters()}
    # Storages are told apart by identity; holding them keeps each id unique.
    state_storages = {id(s): s for s in (tensor.untyped_storage() for tensor in state.values())}
    image = torch.empty(1, in_channels, size, size, device="meta")
    setattr(image, _DEPTH, 0)

    kept: dict[int, torch.UntypedStorage] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in state_storages:
            kept[id(storage)] = storage
        return tensor

    modes = {module: module.training for module in model.modules()}
    model.eval()
    counter = _CountingMode(state_storages)
    try:
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor),
            counter,
        ):
            logits = functional_call(model, state, (image,), strict=True)
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}'s forward returned {type(logits).__name__}, not one tensor")

    used = counter.counts.used_storages
    params = sum(
        tensor.numel()
        for key, tensor in state.items()
        if key in parameter_names and id(tensor.untyped_storage()) in used
    )
    return ModelSummary(
        name=name,
        layers=getattr(logits, _DEPTH),
        params=params,
        gflops=counter.counts.multiply_adds / 1e9,
        activation_mb=sum(s.nbytes() for s in kept.values()) / _MIB,
        input_size=size,
        weight_layers=counter.counts.weight_layers,
    )


_COLUMNS = (
    ("model", "<"),
    ("input (px)", ">"),
    ("layers (depth)", ">"),
    ("conv+fc layers", ">"),
    ("params", ">"),
    ("GFLOPs (mult-adds)", ">"),
    ("activations (MiB/image)", ">"),
)


def _cells(summary: ModelSummary) -> tuple[str, ...]:
    return (
        summary.name,
        str(summary.input_size),
        str(summary.layers),
        str(summary.weight_layers),
        f"{summary.params:,}",
        f"{summary.gflops:.2f}",
        f"{summary.activation_mb:.1f}",
    )


def summarize_requested(
    requested: Sequence[str], input_size: int | None = None
) -> tuple[list[ModelSummary], list[tuple[str, str]]]:
    """`canon summary`: the summaries of the named models and of every model matching each
    shell-style pattern ('resnet*'; none: all). Models that do not fit `input_size` are
    returned as (name, reason) pairs, for the table of the others; when none fits, that is an
    error (an empty table would read as success)."""
    if input_size is not None and input_size < 1:  # not a model that does not fit: all don't
        raise InputSizeError(f"input size must be a positive number of pixels, got {input_size}")
    summaries, skipped, named = [], [], []
    for pattern in requested or ["*"]:
        matches = list_models(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ConfigError(f"no registered model matches {pattern!r} (see `canon models`)")
        named += matches
    for name in dict.fromkeys(named):  # named and matched, or matched twice: one row
        try:
            summaries.append(summarize(name, input_size=input_size))
        except InputSizeError as error:
            skipped.append((name, str(error)))
    if not summaries:
        raise InputSizeError("; ".join(reason for _, reason in skipped))
    return summaries, skipped


def format_table(summaries: Iterable[ModelSummary], markdown: bool = False) -> str:
    """The summaries as an aligned text table, or a GitHub markdown table."""
    rows = [tuple(title for title, _ in _COLUMNS), *(_cells(s) for s in summaries)]
    layout = [(align, max(len(row[i]) for row in rows)) for i, (_, align) in enumerate(_COLUMNS)]

    def line(cells: Sequence[str], separator: str) -> str:
        pairs = zip(cells, layout, strict=True)
        return separator.join(f"{cell:{align}{width}}" for cell, (align, width) in pairs)

    if not markdown:
        return "\n".join(line(row, "  ").rstrip() for row in rows)
    rule = ["-" * (width - 1) + ":" if align == ">" else "-" * width for align, width in layout]
    return "\n".join(f"| {line(row, ' | ')} |" for row in [rows[0], rule, *rows[1:]])
