"""Model parallelism, one model over several devices of one process: AlexNet's original
two-tower split (Krizhevsky et al. 2012, s3.2 and Fig. 2), and a GPipe-style pipeline of any
model's stages (Huang et al. 2019). Both run in a single process; combining them with
torchrun's data parallelism is not done."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from canon.errors import ConfigError
from canon.models.base import CanonModel
from canon.models.layers import LocalResponseNorm
from canon.recipes.schema import parse_model_parallel


def model_parallel_devices(num_devices: int, first: torch.device) -> list[torch.device]:
    """`num_devices` consecutive devices from `first`: cuda:i, cuda:i+1, ... or cpu repeated."""
    if first.type == "cpu":
        return [first] * num_devices
    start = first.index or 0
    available = torch.cuda.device_count()
    if start + num_devices > available:
        raise ConfigError(
            f"model parallelism over {num_devices} GPUs from cuda:{start} needs "
            f"{start + num_devices} GPUs, this machine shows {available}"
        )
    return [torch.device("cuda", start + i) for i in range(num_devices)]


def parallelize(model: nn.Module, spec: str, device: torch.device) -> nn.Module:
    """`model` split as `spec` says over devices starting at `device`; outputs land on `device`."""
    plan = parse_model_parallel(spec)
    devices = model_parallel_devices(plan.num_devices, device)
    if plan.kind == "towers":
        return TwoTowerAlexNet(model, devices)
    return PipelineParallel(model, devices, plan.micro_batches)


# --- AlexNet's two towers --------------------------------------------------------------------


def _slice_layer(layer: nn.Conv2d | nn.Linear, rows: slice, device: torch.device) -> nn.Module:
    """A copy of `layer` computing only output channels/features `rows`, on `device`.

    A grouped convolution with two groups becomes the plain convolution of one group: its
    weight is already stored per group (out x in/groups x k x k).
    """
    weight = layer.weight[rows]
    if isinstance(layer, nn.Conv2d):
        piece = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride,
                          layer.padding, bias=layer.bias is not None, device=device)
    else:
        piece = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None,
                          device=device)
    with torch.no_grad():
        piece.weight.copy_(weight)
        if layer.bias is not None:
            piece.bias.copy_(layer.bias[rows])
    return piece


def _halves(size: int) -> list[slice]:
    first = (size + 1) // 2
    return [slice(0, first), slice(first, size)]


def _exchange(maps: Sequence[torch.Tensor], devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """Every tower receives all towers' maps, concatenated along channels in tower order."""
    return [torch.cat([m.to(device) for m in maps], dim=1) for device in devices]


class TwoTowerAlexNet(nn.Module):
    """AlexNet as the paper ran it (`--model-parallel towers`): each tower holds half the
    kernels of every layer on its own device; conv2, conv4 and conv5 read only their own
    tower's maps and each tower normalises (LRN) only its own, while conv3, fc6, fc7 and fc8
    read both towers': the only places the towers exchange activations. The towers are sliced
    from an `alexnet` model's (grouped) weights along the output dimension, so this computes
    exactly what the model computes, and its state dict is the model's (same keys and shapes):
    checkpoints load either way."""

    def __init__(self, model: nn.Module, devices: Sequence[torch.device]) -> None:
        super().__init__()
        from canon.models.alexnet import AlexNet

        if not isinstance(model, AlexNet):
            raise ConfigError(
                f"--model-parallel towers is the 2012 AlexNet's two-GPU split and needs the "
                f"`alexnet` model, not {type(model).__name__}; use stages:K for other models"
            )
        if len(devices) != 2:
            raise ConfigError(f"AlexNet has two towers, got {len(devices)} devices")
        self.devices = list(devices)
        # The options, not the bound method: that would keep the whole unsplit model alive.
        self.eval_config, self._build_options = model.eval_config, model.build_options()
        self.min_input_size, self.fixed_input_size = model.min_input_size, model.fixed_input_size
        self.towers = nn.ModuleList(nn.ModuleDict() for _ in devices)
        # Parameter-free layers (ReLU, LRN, pooling, dropout) both towers apply.
        self.shared = nn.ModuleDict()
        # Original parameter name -> the two tower parameter names holding its halves.
        self.split_names: dict[str, tuple[str, str]] = {}
        self.steps: list[tuple[str, str]] = []  # (kind, key in towers or shared)
        self._build_features(model)
        self._build_head(model)
        self.register_state_dict_post_hook(_merge_towers_state)
        self.register_load_state_dict_pre_hook(_split_towers_state)

    def build_options(self) -> dict[str, Any]:
        return dict(self._build_options)

    def _add_split(self, original: str, layer: nn.Conv2d | nn.Linear) -> None:
        key = original.replace(".", "_")
        rows = _halves(layer.weight.shape[0])
        for tower, device, part in zip(self.towers, self.devices, rows, strict=True):
            tower[key] = _slice_layer(layer, part, device)
        for suffix in ("weight", "bias") if layer.bias is not None else ("weight",):
            names = tuple(f"towers.{t}.{key}.{suffix}" for t in range(2))
            self.split_names[f"{original}.{suffix}"] = names
        self.steps.append(("split", key))

    def _add_shared(self, key: str, layer: nn.Module) -> None:
        self.shared[key] = layer
        self.steps.append(("shared", key))

    def _build_features(self, model: nn.Module) -> None:
        for stage_name, stage in model.stages:
            for layer_name, layer in stage.named_children():
                if isinstance(layer, nn.Conv2d):
                    # A full (ungrouped) layer reads both towers' maps: the paper's exchange.
                    if layer.groups == 1 and self.steps:
                        self.steps.append(("exchange", stage_name))
                    self._add_split(f"features.{stage_name}.{layer_name}", layer)
                elif isinstance(layer, LocalResponseNorm):
                    # The model's LRN has a channel group per tower; a tower holds one group.
                    self._add_shared(f"{stage_name}_{layer_name}", LocalResponseNorm(
                        layer.size, layer.alpha, layer.beta, layer.k))
                else:
                    self._add_shared(f"{stage_name}_{layer_name}", layer)

    def _build_head(self, model: nn.Module) -> None:
        head = model.head
        self._add_shared("flatten", nn.Flatten())
        for name in ("fc6", "fc7", "fc8"):
            self.steps.append(("exchange", name))
            self._add_split(f"head.{name}", getattr(head, name))
            if name != "fc8":
                for layer in ("relu", "drop"):
                    key = f"{layer}{name[-1]}"
                    self._add_shared(key, getattr(head, key))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CanonModel.check_input(self, x)  # the wrapped AlexNet's size rules
        maps = [x.to(device) for device in self.devices]
        for kind, key in self.steps:
            if kind == "split":
                maps = [tower[key](m) for tower, m in zip(self.towers, maps, strict=True)]
            elif kind == "exchange":
                maps = _exchange(maps, self.devices)
            else:
                maps = [self.shared[key](m) for m in maps]
        return torch.cat([m.to(x.device) for m in maps], dim=1)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self(x), []


def _merge_towers_state(module: TwoTowerAlexNet, state: dict, prefix: str, _meta) -> None:
    """state_dict hook: each pair of tower halves becomes the model's tensor (on device 0)."""
    for original, names in module.split_names.items():
        halves = [state.pop(prefix + name) for name in names]
        state[prefix + original] = torch.cat([h.to(halves[0].device) for h in halves])


def _split_towers_state(
    module: TwoTowerAlexNet, state: dict, prefix: str, *_args
) -> None:
    """load_state_dict pre-hook: the model's tensors are cut into the towers' halves."""
    for original, names in module.split_names.items():
        if prefix + original not in state:
            continue  # left for strict loading to report as missing
        full = state.pop(prefix + original)
        for name, rows in zip(names, _halves(full.shape[0]), strict=True):
            state[prefix + name] = full[rows]


# --- Pipeline over stages ----------------------------------------------------------------------


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balance_stages(costs: Sequence[int], head_cost: int, num_groups: int) -> list[int]:
    """Group index of each stage: contiguous groups minimising the largest group's cost.

    The head's cost counts towards the last group, which always holds at least one stage.
    """
    count = len(costs)
    if not 1 <= num_groups <= count:
        raise ConfigError(
            f"cannot split {count} stages over {num_groups} devices; use at most {count}"
        )
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[g][i]: smallest max cost splitting stages[:i] into g groups; cut[g][i]: last group start
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(num_groups + 1)]
    cut = [[0] * (count + 1) for _ in range(num_groups + 1)]
    best[0][0] = 0
    for groups in range(1, num_groups + 1):
        for end in range(groups, count + 1):
            extra = head_cost if end == count and groups == num_groups else 0
            for start in range(groups - 1, end):
                value = max(best[groups - 1][start], prefix[end] - prefix[start] + extra)
                if value < best[groups][end]:
                    best[groups][end], cut[groups][end] = value, start
    assignment, end = [0] * count, count
    for groups in range(num_groups, 0, -1):
        start = cut[groups][end]
        assignment[start:end] = [groups - 1] * (end - start)
        end = start
    return assignment


class PipelineParallel(nn.Module):
    """A CanonModel's stages on consecutive devices, run with micro-batches (GPipe-style,
    `--model-parallel stages:K[:M]`).

    Consecutive stages sit on K devices, balanced by parameter count, the head on the last;
    each batch splits into M micro-batches (default 4K, as GPipe advises) that flow through the
    devices in a wavefront, so device k works on micro-batch m while device k+1 works on m-1
    (on GPUs launches and copies are asynchronous, so the devices overlap; CPU "devices" run in
    turn). Backward is plain autograd across devices. As in GPipe, batch norm sees
    micro-batches (statistics over batch/M images, M updates per step; `stages:K:1` keeps
    whole-batch statistics). Auxiliary heads (GoogLeNet) hang off intermediate stages and are
    not pipelined: such a model is refused rather than trained without them.

    `module` is the model itself, its layers moved to their devices. The pipeline's state dict
    is the model's (same keys, no `module.` prefix), so checkpoints load either way.
    """

    def __init__(
        self, model: CanonModel, devices: Sequence[torch.device], micro_batches: int
    ) -> None:
        super().__init__()
        if not isinstance(model, CanonModel):
            raise ConfigError(f"stages:K needs a canon model, got {type(model).__name__}")
        if getattr(model, "aux_classifiers", list)():
            raise ConfigError(
                f"{type(model).__name__} trains with auxiliary heads, which the stages:K "
                "pipeline does not carry; build it with aux_logits=False or train it without "
                "--model-parallel"
            )
        stages = model.stages
        costs = [_parameter_count(stage) for _, stage in stages]
        head_cost = _parameter_count(model) - sum(costs)
        assignment = balance_stages(costs, head_cost, len(devices))
        self.groups: list[tuple[torch.device, list[nn.Module]]] = [(d, []) for d in devices]
        self.group_names: list[list[str]] = [[] for _ in devices]
        placement: dict[nn.Module, torch.device] = {}
        for (name, stage), group in zip(stages, assignment, strict=True):
            placement[stage] = devices[group]
            self.groups[group][1].append(stage)
            self.group_names[group].append(name)
        # Each piece goes straight to its device: the whole model never sits on one GPU.
        _place(model, placement, devices[-1])
        self.module = model
        self.micro_batches = micro_batches
        self.register_state_dict_post_hook(_strip_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    @property
    def eval_config(self):
        return self.module.eval_config

    def build_options(self) -> dict:
        return self.module.build_options()

    def _run_group(self, index: int, x: torch.Tensor) -> torch.Tensor:
        device, stages = self.groups[index]
        x = x.to(device)
        for stage in stages:
            x = stage(x)
        if index == len(self.groups) - 1:
            x = self.module.forward_head(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.module.check_input(x)
        chunks = list(torch.tensor_split(x, min(self.micro_batches, x.shape[0])))
        # Wavefront: at clock t, group k runs micro-batch t - k.
        for clock in range(len(chunks) + len(self.groups) - 1):
            for index in range(len(self.groups)):
                micro = clock - index
                if 0 <= micro < len(chunks):
                    chunks[micro] = self._run_group(index, chunks[micro])
        return torch.cat([c.to(x.device) for c in chunks])

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self(x), []

    def extra_repr(self) -> str:
        placed = ", ".join(
            f"{device}: {'+'.join(names)}"
            for (device, _), names in zip(self.groups, self.group_names, strict=True)
        )
        return f"micro_batches={self.micro_batches}, stages=[{placed}] (+head on last)"


def _place(module: nn.Module, placement: dict[nn.Module, torch.device], rest: torch.device) -> None:
    """Move each stage to its device and every other submodule (the head) to `rest`."""
    for child in module.children():
        if child in placement:
            child.to(placement[child])
        elif any(inner in placement for inner in child.modules()):
            _place(child, placement, rest)
        else:
            child.to(rest)


def _strip_module_prefix(_pipeline: PipelineParallel, state: dict, prefix: str, _meta) -> None:
    """state_dict hook: `module.conv1...` -> `conv1...`, keeping the order."""
    inner = prefix + "module."
    for key in [k for k in state if k.startswith(prefix)]:
        value = state.pop(key)
        state[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _add_module_prefix(_pipeline: PipelineParallel, state: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook: the model's keys are found under `module.`."""
    for key in [k for k in state if k.startswith(prefix)]:
        state[prefix + "module." + key[len(prefix):]] = state.pop(key)
