"""Training-step speed of a canon model against torchvision's same architecture, in one process.

A step is the same work for both models: forward (GoogLeNet with its auxiliary heads, their
losses weighted as the recipes weight them), cross-entropy, backward, SGD with momentum and
weight decay, zero_grad; on synthetic data already on the device, so the input pipeline is not
in it, nor canon's trainer's bookkeeping (its loss and accuracy sums, the lr schedule, a loss
check every few steps): a model against a model. The two models take turns, one timed repeat
each, and each reports the median repeat.

FLOPs are canon's convention (canon.models.summary): multiply-adds of the convolutions and
fully connected layers; a training step counts 3x the forward pass (the backward pass costs
two forwards), auxiliary heads not counted. Model FLOP utilisation (MFU) divides the achieved
multiply-adds per second by those of the fastest large matrix product measured in the same run:
in the autocast dtype with --amp, else float32 (TF32 on CUDA when cuDNN convolutions use it,
PyTorch's default), with the current torch thread count on a CPU. A CPU's figure is relative
to that product only: oneDNN's 3x3 convolutions (Winograd) can outrun it, so it may pass 100%.

Peak memory is the model's own: the bytes of its weights, buffers and optimizer state, plus the
largest rise in memory use during a timed repeat (gradients, activations, workspaces). The rise
is torch.cuda's allocated bytes on CUDA; on CPU the process's resident set size (Linux /proc;
None elsewhere), which allocator caching blurs: approximate, and lower for the model prepared
second (torchvision's), whose step reuses memory the first one's made the allocator keep.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from canon.devices import cudnn_autotuning, resolve_device
from canon.engine.graphed import GraphedStep
from canon.engine.optimization import classification_loss, fused_sgd, sgd
from canon.engine.precision import DTYPES, Precision
from canon.errors import ConfigError
from canon.models.factory import create_model
from canon.models.summary import summarize
from canon.recipes.schema import AMP_MODES, TrainSection
from canon.transfer.torchvision import CANON_NAMES

# canon name -> torchvision's; the paper's bottleneck ResNets have no exact twin.
PAPER_RESNETS = {f"resnet{depth}": f"resnet{depth}" for depth in (50, 101, 152)}
TWINS = {canon: tv for tv, canon in CANON_NAMES.items()} | PAPER_RESNETS
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
_PROC = Path("/proc/self")


@dataclass(frozen=True)
class ModelSpeed:
    """One model's figures; memory_mib is None where it cannot be measured."""

    model: str  # "canon resnet18", "torchvision resnet18"
    images_per_s: float
    ms_per_step: float
    memory_mib: float | None
    train_gflops: float  # per image: 3 x the forward multiply-adds
    mfu: float  # achieved multiply-adds per second / matmul_peak


@dataclass(frozen=True)
class TrainBench:
    """What `bench_train` measured, and under which settings."""

    settings: dict
    peak_gmacs: float  # the matrix product's billions of multiply-adds per second
    peak_dtype: str
    canon: ModelSpeed
    torchvision: ModelSpeed
    note: str  # what the comparison is not

    @property
    def ratio(self) -> float:
        """canon images/s over torchvision's."""
        return self.canon.images_per_s / self.torchvision.images_per_s

    def to_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def torchvision_twin(model: str) -> str:
    """torchvision's architecture for the canon model `model` (resnet50_v1_5 -> resnet50)."""
    if model not in TWINS:
        raise ConfigError(f"{model!r} has no torchvision twin; canon bench train compares "
                          f"{', '.join(sorted(TWINS))}")
    return TWINS[model]


def training_gflops(model: str | nn.Module, image_size: int) -> float:
    """Billions of multiply-adds of one image's training step: 3 x canon's forward count."""
    return 3 * summarize(model, input_size=image_size).gflops


class TrainingForward(nn.Module):
    """A model's training forward as (logits, auxiliary logits) for either library: canon's
    explicit forward_with_aux, torchvision's GoogLeNetOutputs in training mode. One module, so
    torch.compile sees the whole of it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.canon = hasattr(model, "forward_with_aux")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.canon:
            return self.model.forward_with_aux(images)
        out = self.model(images)
        if isinstance(out, torch.Tensor):
            return out, []
        return out.logits, [aux for aux in (out.aux_logits1, out.aux_logits2) if aux is not None]


def update(
    forward: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
    images: torch.Tensor, targets: torch.Tensor,
) -> torch.Tensor:
    """Forward, loss, backward and optimizer step (as GraphedStep captures it); the loss."""
    with precision.autocast():
        loss = classification_loss(F.cross_entropy, *forward(images), targets,
                                   TrainSection.aux_loss_weight)
    precision.backward(loss)
    precision.step(optimizer)
    return loss.detach()


def train_step(
    forward: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
    images: torch.Tensor, targets: torch.Tensor,
) -> None:
    update(forward, optimizer, precision, images, targets)
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step`, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
    iterations: int = 10, tf32: bool = False,
) -> float:
    """Multiply-adds per second of the fastest of `iterations` size x size matrix products
    (size: 8192 on CUDA, 1024 on CPU); `tf32` lets float32 products use TF32."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        torch.mm(a, b)  # the first call picks the kernel
        best = min(timed(partial(torch.mm, a, b), 1, device) for _ in range(iterations))
    finally:
        torch.set_float32_matmul_precision(precision)
    return size**3 / best


def _proc_bytes(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", (_PROC / "status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found[1]) * 1024 if found else None


def memory_level(device: torch.device) -> int | None:
    """Bytes in use now: allocated on CUDA, resident on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_bytes("VmRSS")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak; False where the CPU's peak cannot be reset (no Linux /proc)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        (_PROC / "clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
    except OSError:
        return False
    return True


def memory_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_bytes("VmHWM")


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the weights, buffers and optimizer state (momentum) the model keeps."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    train_gflops: float
    seconds: list[float] = field(default_factory=list)
    peak: int | None = None


def _prepare(
    name: str, model: nn.Module, flops_model: str | None, *, device: torch.device, amp: str,
    channels_last: bool, compile: bool, images: torch.Tensor, targets: torch.Tensor,
    warmup: int, cuda_graph: bool = False,
) -> _Contender:
    """Count the model's FLOPs, move it to the device, run the warm-up (compiling, or
    capturing the step in a CUDA graph)."""
    gflops = training_gflops(flops_model or model, images.shape[-1])
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = TrainingForward(model)
    if compile:
        forward = torch.compile(forward)
    optimizer = sgd(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                    fused=fused_sgd(model))
    precision = Precision(amp, device, cache=not cuda_graph)
    captured = cuda_graph and device.type == "cuda"
    if cuda_graph:
        graphed = GraphedStep(partial(update, forward, optimizer, precision), model, optimizer,
                              len(targets), capture=captured)
        step = partial(graphed, images, targets)
    else:
        step = partial(train_step, forward, optimizer, precision, images, targets)
    contender = _Contender(name, model, optimizer, step, gflops)
    if not captured:
        timed(step, warmup, device)
        return contender
    # A replay allocates nothing: the graph's memory is taken at capture, in the warm-up. So
    # do the capture's transients (restored_after's copy of the weights, cuDNN's first
    # autotuning of these shapes): an upper bound, which format_train says. (The momentum is
    # not among them: fused SGD's buffers exist before, and `own` counts them.)
    own = state_bytes(model, optimizer)
    _, rise = _memory_rise(lambda: timed(step, warmup, device), device)
    if rise is not None:
        contender.peak = own + rise
    return contender


def _memory_rise(action: Callable[[], float], device: torch.device) -> tuple[float, int | None]:
    """`action()`, and the largest rise of the device's (or process's) memory over the level
    at its start (None where the peak cannot be reset)."""
    start = memory_level(device)
    resettable = reset_peak(device)
    result = action()
    peak = memory_peak(device)
    if resettable and start is not None and peak is not None:
        return result, peak - start
    return result, None


def _run_repeat(contender: _Contender, steps: int, device: torch.device) -> None:
    """One timed repeat. Its peak memory: the model's state, plus the largest rise of memory
    over the level at the start, where the other model sits."""
    own = state_bytes(contender.model, contender.optimizer)
    seconds, rise = _memory_rise(lambda: timed(contender.step, steps, device), device)
    contender.seconds.append(seconds)
    if rise is not None:
        contender.peak = max(own + rise, contender.peak or 0)


def _check_counts(**counts: tuple[int, int]) -> None:
    for name, (value, least) in counts.items():
        if value < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def bench_train(
    model: str, *, batch_size: int | None = None, steps: int | None = None,
    warmup: int | None = None, amp: str = "none", channels_last: bool | None = None,
    compile: bool = False, device: str = "auto", image_size: int | None = None,
    repeats: int = 5, cuda_graph: bool = False,
) -> TrainBench:
    """Time canon's `model` and torchvision's twin (`torchvision_twin`), repeats alternating.
    `cuda_graph`: canon's step captured in a CUDA graph (train.cuda_graph), torchvision's as
    it is (uncaptured on a CPU).

    Defaults: on CUDA batch 256, 50 steps after 10 warm-up steps, channels-last; on CPU batch
    16, 5 steps after 2, contiguous; image_size the model's own input size (224).
    """
    twin = torchvision_twin(model)
    dev = torch.device(resolve_device(device))
    cuda = dev.type == "cuda"
    batch_size = (256 if cuda else 16) if batch_size is None else batch_size
    steps = (50 if cuda else 5) if steps is None else steps
    warmup = (10 if cuda else 2) if warmup is None else warmup
    channels_last = cuda if channels_last is None else channels_last
    size = summarize(model, input_size=image_size).input_size
    # Compiling and capturing happen in the warm-up, which must then hold a step at least.
    _check_counts(batch_size=(batch_size, 1), steps=(steps, 1),
                  warmup=(warmup, 1 if compile or cuda_graph else 0), repeats=(repeats, 1))
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    if cuda_graph and amp == "fp16":
        raise ConfigError("--cuda-graph captures a step without fp16's loss scaler (it syncs "
                          "with the host): use --amp bf16 or none")

    images = torch.randn(batch_size, 3, size, size, device=dev)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch_size,), device=dev)
    options = {"device": dev, "amp": amp, "channels_last": channels_last, "compile": compile,
               "images": images, "targets": targets, "warmup": warmup}
    # torchvision's GoogLeNet warns that it will stop initialising its weights unless asked.
    tv_options = {"init_weights": True} if twin == "googlenet" else {}
    with cudnn_autotuning(dev):
        contenders = [
            _prepare(f"canon {model}", create_model(model, num_classes=1000), model, **options,
                     cuda_graph=cuda_graph),
            _prepare(f"torchvision {twin}",
                     tvm.get_model(twin, weights=None, num_classes=1000, **tv_options), None,
                     **options),
        ]
        for repeat in range(repeats):  # in turns, so that neither always runs first
            for contender in contenders[repeat % 2:] + contenders[:repeat % 2]:
                _run_repeat(contender, steps, dev)
    # The peak of the precision the step computes in, on a CPU too: a CPU with avx512_bf16
    # multiplies bf16 matrices 2.2 (a Zen 4 VM) to 4.4 (a Zen 5 VM) times as fast as float32.
    low_precision = amp != "none"
    tf32 = cuda and amp == "none" and torch.backends.cudnn.allow_tf32
    peak = matmul_peak(dev, DTYPES[amp] if low_precision else torch.float32, tf32=tf32)
    peak_dtype = amp if low_precision else "tf32" if tf32 else "float32"

    def speed(contender: _Contender) -> ModelSpeed:
        seconds = statistics.median(contender.seconds) / steps
        rate = batch_size / seconds
        memory = None if contender.peak is None else contender.peak / 2**20
        mfu = rate * contender.train_gflops * 1e9 / peak
        return ModelSpeed(contender.name, rate, seconds * 1e3, memory,
                          contender.train_gflops, mfu)

    note = "same architecture"
    if model in PAPER_RESNETS:
        note = (f"canon's {model} is the paper's (stride in the first 1x1); torchvision has "
                f"only v1.5 (stride in the 3x3, canon's {model}_v1_5)")
    settings = {
        "model": model, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "threads": torch.get_num_threads(), "batch_size": batch_size, "image_size": size,
        "steps": steps, "warmup": warmup, "repeats": repeats, "amp": amp,
        "channels_last": channels_last, "compile": compile, "cuda_graph": cuda_graph,
        "torch": torch.__version__,
        "memory": "CUDA allocated" if cuda else "resident set size (approximate)",
    }
    return TrainBench(settings, peak / 1e9, peak_dtype, speed(contenders[0]),
                      speed(contenders[1]), note)


def format_train(bench: TrainBench) -> str:
    """The figures as the command prints them."""
    s = bench.settings
    compiled = "torch.compile" if s["compile"] else "eager"
    if s.get("cuda_graph"):
        compiled += ", canon's step in a CUDA graph"
    layout = "channels-last" if s["channels_last"] else "contiguous"
    lines = [
        f"{s['model']} on {s['device']} ({s['threads']} threads), batch {s['batch_size']}, "
        f"{s['image_size']} px, amp {s['amp']}, {layout}, {compiled}; median of "
        f"{s['repeats']} repeats of {s['steps']} steps after {s['warmup']} warm-up",
        f"matmul peak ({bench.peak_dtype}): {bench.peak_gmacs:,.1f} G multiply-adds/s",
        f"{'':<28}{'images/s':>10}{'ms/step':>10}{'peak MiB':>10}{'GFLOPs/img':>12}{'MFU':>8}",
    ]
    for speed in (bench.canon, bench.torchvision):
        memory = "n/a" if speed.memory_mib is None else f"{speed.memory_mib:,.0f}"
        lines.append(f"{speed.model:<28}{speed.images_per_s:>10,.1f}{speed.ms_per_step:>10,.1f}"
                     f"{memory:>10}{speed.train_gflops:>12.2f}{speed.mfu:>8.1%}")
    lines += [
        f"canon / torchvision images/s: {bench.ratio:.3f} ({bench.note})",
        f"GFLOPs/img: training multiply-adds, 3x forward; peak memory: {s['memory']}",
    ]
    if s.get("cuda_graph") and s["device"] != "cpu":  # captured only on a GPU
        lines.append("canon's peak memory: its warm-up's, capture included (a copy of the "
                     "weights, cuDNN's first autotuning): an upper bound")
    if s["device"] == "cpu":
        lines.append("MFU on a CPU: relative to the matmul above; oneDNN's 3x3 convolutions "
                     "(Winograd) can outrun it, so it may pass 100%")
    return "\n".join(lines)
