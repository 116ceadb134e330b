"""A recipe: YAML validated into frozen dataclasses, one per section.

```
name, description, source     what it is and which paper (and section) it follows
model:      ModelSection      which registered model, how many classes
data:       DataConfig        dataset and the paper's preprocessing (canon.data.config)
optimizer:  OptimizerSection  SGD with momentum; lr stated for base_batch_size images
schedule:   ScheduleSection   lr schedule and warmup (canon.engine.schedules)
train:      TrainSection      epochs, batch, precision, weight averaging, seed, ...
reported:   ReportedSection   the paper's error for this setting, to set results beside
```

Every section's keys are checked: an unknown key is a ConfigError naming the file and listing
the valid keys; a value of the wrong type names the key and the type expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from canon.data.config import DataConfig
from canon.errors import ConfigError
from canon.validation import build_dataclass, plain

SCHEDULE_KINDS = ("plateau", "step", "multistep", "cosine", "constant")
# The schedule keys that only some kinds read (canon.engine.schedules); the others (the
# warm-up's) every kind reads.
SCHEDULE_KIND_KEYS = {
    "unit": ("step", "multistep"), "milestones": ("multistep",), "step_size": ("step",),
    "gamma": ("plateau", "step", "multistep"), "patience": ("plateau",),
    "threshold": ("plateau",), "max_reductions": ("plateau",), "min_lr": ("cosine",),
}
SCHEDULE_UNITS = ("epoch", "iteration")
WARMUP_MODES = ("linear", "constant")
# Where a warm-up starts: warmup_start_factor x the peak lr, or optimizer.lr itself (the rate
# stated for base_batch_size images, before linear scaling: Goyal et al. 2017 s2.2).
WARMUP_STARTS = ("factor", "base_lr")
AMP_MODES = ("none", "bf16", "fp16")  # autocast precision (canon.engine.precision)
MODEL_PARALLEL_SPEC = re.compile(r"^(towers|stages:(\d+)(?::(\d+))?)$")


@dataclass(frozen=True)
class ModelParallelPlan:
    """What `train.model_parallel` asks for: the split kind, device count and micro-batches
    (carried out by canon.engine.model_parallel)."""

    kind: str  # "towers" or "stages"
    num_devices: int
    micro_batches: int = 1


def parse_model_parallel(spec: str) -> ModelParallelPlan:
    """Parse "towers", "stages:K" or "stages:K:M" (K devices, M micro-batches)."""
    match = MODEL_PARALLEL_SPEC.match(spec)
    if match is None:
        raise ConfigError(
            f"train.model_parallel (--model-parallel) {spec!r} is not understood; use towers "
            "(AlexNet's two GPUs), stages:K (K devices) or stages:K:M (K devices, M "
            "micro-batches)"
        )
    if match.group(1) == "towers":
        return ModelParallelPlan("towers", 2)
    num_devices = int(match.group(2))
    micro_batches = int(match.group(3)) if match.group(3) else 4 * num_devices
    if num_devices < 1 or micro_batches < 1:
        raise ConfigError(f"train.model_parallel (--model-parallel) {spec!r}: K and M must be "
                          "at least 1")
    return ModelParallelPlan("stages", num_devices, micro_batches)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSection:
    name: str
    num_classes: int | None = None  # None: as many as the dataset has
    # Every residual block's last BN gamma starts at 0, so each block starts as its shortcut
    # (Goyal et al. 2017 s5.1); ResNets only (canon.models.resnet, resnet_cifar).
    zero_init_residual: bool = False
    # Start from another model's weights (canon.engine.initialize): a run directory, a
    # checkpoint (.pt), an exported model.safetensors or torchvision:NAME. Tensors are copied
    # by name where shapes agree; `init_layers` (layer-name patterns, fnmatch) limits the copy
    # to those layers, and a layer there that the source lacks or holds in another shape is
    # an error, as is a source of which nothing would be copied. A resumed run keeps its own.
    init_from: str | None = None
    init_layers: tuple[str, ...] = ()
    # Fine-tuning: the first this many of the model's stages start frozen (no updates, BN in
    # eval mode); train.unfreeze_every_epochs unfreezes them one by one, the last first. The
    # stages are the model's `stages` (e.g. a ResNet's conv1, conv2_x, ...); GoogLeNet's
    # include its max pools, which hold nothing to freeze.
    frozen_stages: int = 0
    # The builder's own options beyond the class count, as canon.create_model takes them: a
    # ResNet's shortcut (He et al. 2015 Table 3's "A", "B", "C"), a VGG's batch_norm, a
    # GoogLeNet's aux_logits. A fine-tuning run carries its source's.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.options, dict) and all(isinstance(k, str) for k in self.options),
            f"model.options must map option names to values, got {self.options!r}",
        )
        _check(
            self.num_classes is None or self.num_classes >= 1,
            f"model.num_classes must be a positive integer, got {self.num_classes}",
        )
        _check(
            not self.init_layers or self.init_from is not None,
            "model.init_layers names layers to copy from model.init_from; set init_from too",
        )
        _check(self.frozen_stages >= 0, "model.frozen_stages must be >= 0")

    def labelled(self, name: str) -> str:
        """`name` (the model's, or a report's label for it) with the builder options:
        'resnet34 (stem=deep, avg_down=True)'."""
        options = ", ".join(f"{key}={value}" for key, value in self.options.items())
        return f"{name} ({options})" if options else name


@dataclass(frozen=True)
class OptimizerSection:
    """SGD with momentum, as every paper of the canon trained."""

    lr: float = 0.1
    # The global batch (all devices, all accumulation steps) at which `lr` and every iteration
    # count (schedule milestones/step_size/warmup_iterations, train.iterations) are stated. A
    # run with another global batch scales lr linearly (Goyal et al. 2017) when scale_lr is
    # true, and always converts the iteration counts to see the same number of images.
    base_batch_size: int = 256
    scale_lr: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    # Exempt BatchNorm weights and all biases from weight decay (He et al. 2019, s3.1).
    no_decay_bn_bias: bool = False
    # Fine-tuning: every layer but the classifier (and GoogLeNet's auxiliary ones) learns at
    # lr x this (1: one rate for all).
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _check(self.base_batch_size >= 1, "optimizer.base_batch_size must be >= 1")
        _check(0 <= self.momentum < 1, f"optimizer.momentum must lie in [0, 1): {self.momentum}")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(not self.nesterov or self.momentum > 0, "optimizer.nesterov needs momentum > 0")
        _check(self.backbone_lr_scale >= 0, "optimizer.backbone_lr_scale must be >= 0")


@dataclass(frozen=True)
class ScheduleSection:
    kind: str = "constant"
    unit: str = "epoch"  # what milestones and step_size count
    milestones: tuple[int, ...] = ()
    step_size: int = 30
    gamma: float = 0.1
    # plateau: epochs without improvement let pass; the next one cuts the lr (as torch's
    # ReduceLROnPlateau: patience 4 cuts after the 5th epoch without improvement)
    patience: int = 5
    threshold: float = 0.0  # plateau: improvement (in error points) that counts
    max_reductions: int | None = None  # plateau: cut at most this many times (>= 0)
    min_lr: float = 0.0  # cosine: floor, at optimizer.base_batch_size (scaled as lr is)
    warmup_epochs: float = 0.0
    warmup_iterations: int = 0  # takes precedence over warmup_epochs when > 0
    warmup_mode: str = "linear"
    warmup_start: str = "factor"  # factor: warmup_start_factor x peak lr; base_lr: optimizer.lr
    warmup_start_factor: float = 0.1
    # Constant warm-up that ends once the training top-1 error (%, over the last steps) falls
    # below this, or at the end of the warm-up's iterations/epochs at the latest (He et al.
    # 2015 s4.2, ResNet-110: 0.01 "until the training error is below 80%"); None: the count only.
    warmup_until_train_error: float | None = None

    def __post_init__(self) -> None:
        _choice("schedule.kind", self.kind, SCHEDULE_KINDS)
        _choice("schedule.unit", self.unit, SCHEDULE_UNITS)
        _choice("schedule.warmup_mode", self.warmup_mode, WARMUP_MODES)
        _choice("schedule.warmup_start", self.warmup_start, WARMUP_STARTS)
        _check(0 < self.gamma <= 1, f"schedule.gamma must lie in (0, 1], got {self.gamma}")
        _check(self.step_size >= 1, "schedule.step_size must be >= 1")
        _check(self.patience >= 0, "schedule.patience must be >= 0")
        _check(self.threshold >= 0, "schedule.threshold must be >= 0 (error points)")
        _check(self.max_reductions is None or self.max_reductions >= 0,
               "schedule.max_reductions must be >= 0 (or null: no limit)")
        _check(
            all(a < b for a, b in zip((0, *self.milestones), self.milestones, strict=False)),
            f"schedule.milestones must be increasing and positive, got {list(self.milestones)}",
        )
        _check(self.min_lr >= 0, f"schedule.min_lr must be >= 0, got {self.min_lr}")
        _check(self.warmup_epochs >= 0 and self.warmup_iterations >= 0, "warmup must be >= 0")
        _check(
            0 <= self.warmup_start_factor <= 1,
            "schedule.warmup_start_factor must lie in [0, 1]",
        )
        _check(
            self.kind != "multistep" or bool(self.milestones),
            "schedule.kind multistep needs schedule.milestones",
        )
        if self.warmup_until_train_error is not None:
            _check(
                0 < self.warmup_until_train_error <= 100,
                "schedule.warmup_until_train_error is a top-1 error in percent, in (0, 100]",
            )
            _check(
                self.warmup_mode == "constant"
                and (self.warmup_iterations > 0 or self.warmup_epochs > 0),
                "schedule.warmup_until_train_error needs warmup_mode constant and a limit "
                "(warmup_iterations or warmup_epochs) at which the warm-up ends at the latest",
            )


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 90
    # Run this many optimizer steps of optimizer.base_batch_size images instead, whatever
    # `epochs` says (ResNet CIFAR s4.2: 64k, whether on 50k or 45k images, on one GPU or
    # eight); the last epoch is cut short there and still validated and checkpointed.
    iterations: int | None = None
    batch_size: int = 256  # per device, per accumulation micro-step
    accum_steps: int = 1  # micro-steps per optimizer step
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.3  # GoogLeNet s5: auxiliary classifier losses weighted 0.3
    amp: str = "none"  # none | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the training forward
    # Capture the whole training step in a CUDA graph and replay it (canon.engine.graphed):
    # for small nets that leave a big GPU waiting on kernel launches (the CIFAR ResNets). One
    # process, full batches of one shape; on a CPU the same step runs uncaptured. With
    # train.compile it captures the compiled kernels (compiled in the warm-up before capture).
    cuda_graph: bool = False
    # Weight averaging; the averaged weights are the ones validated, checkpointed as the
    # model to evaluate, and exported. ema_decay > 0: an exponential moving average of the
    # weights after every optimizer step (avg = d avg + (1 - d) w).
    ema_decay: float = 0.0
    # Polyak(-Ruppert) averaging (Polyak & Juditsky 1992): the uniform mean of the weights
    # after every optimizer step from the moment this many epochs are done (0: from the
    # first step); until then the raw weights are validated. None: off.
    polyak_after_epochs: int | None = None
    sync_batchnorm: bool = False  # several GPUs: batch statistics over the global batch
    # One model over several devices of one process: "towers" (AlexNet 2012's two GPUs),
    # "stages:K" or "stages:K:M" (pipeline over K devices, M micro-batches); None = off.
    model_parallel: str | None = None
    # ZFNet s3: conv filters whose RMS exceeds this radius are scaled back to it; None = off.
    filter_rms_radius: float | None = None
    seed: int = 0
    # Data loader processes per device; None: this machine's cores shared among its training
    # processes, at most 8 (canon.engine.setup.loader_workers).
    workers: int | None = None
    # An in-memory training set (CIFAR, the sample) whose augmentation has a batched form is
    # held on the training device and augmented a batch at a time there (canon.data.batched);
    # false: per-image transforms in `workers` loader processes.
    data_on_device: bool = True
    # An image folder's JPEGs are decoded and augmented a batch at a time on the training
    # device (nvJPEG on a GPU; canon.data.device_jpeg), the loader processes only reading
    # bytes. For GPUs: on a CPU it moves the work into the main process. Pipelines without an
    # on-device form (AlexNet's, a mean image, GoogLeNet's photometric distortions) stay on
    # the CPU.
    decode_on_device: bool = False
    keep_checkpoints: int = 2  # epoch checkpoints kept besides best.pt
    # Epochs whose checkpoints are kept for good, beyond keep_checkpoints (canon visualize
    # evolution shows features at them, as Zeiler & Fergus's Fig. 4 at epochs 1, 2, 5, 10, ...).
    keep_epochs: tuple[int, ...] = ()
    # Fine-tuning with model.frozen_stages: one more stage unfrozen every this many epochs,
    # the deepest frozen one first (0: they stay frozen).
    unfreeze_every_epochs: int = 0
    # An undecodable image file stops the run (DataError naming it) instead of being skipped.
    strict_data: bool = False
    tensorboard: bool = False  # also write TensorBoard events (needs `pip install tensorboard`)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(
            self.iterations is None or self.iterations >= 1, "train.iterations must be >= 1"
        )
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.accum_steps >= 1, f"train.accum_steps must be >= 1, got {self.accum_steps}")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing must lie in [0, 1)")
        _check(self.aux_loss_weight >= 0, "train.aux_loss_weight must be >= 0")
        _choice("train.amp", self.amp, AMP_MODES)
        _check(0 <= self.ema_decay < 1, f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        _check(
            self.polyak_after_epochs is None or self.polyak_after_epochs >= 0,
            "train.polyak_after_epochs must be >= 0",
        )
        _check(
            self.polyak_after_epochs is None or self.ema_decay == 0,
            "train.ema_decay and train.polyak_after_epochs are two kinds of weight averaging; "
            "set one of them",
        )
        _check(
            self.filter_rms_radius is None or self.filter_rms_radius > 0,
            "train.filter_rms_radius must be > 0",
        )
        # numpy's seed range, so that spread and offset (canon.data.sampling) a seed stays
        # within the 64 bits torch's generators take
        _check(0 <= self.seed < 2**32, f"train.seed must lie in [0, 2**32), got {self.seed}")
        _check(self.workers is None or self.workers >= 0, "train.workers must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(all(e >= 1 for e in self.keep_epochs), "train.keep_epochs must be epochs >= 1")
        _check(self.unfreeze_every_epochs >= 0, "train.unfreeze_every_epochs must be >= 0")
        if self.cuda_graph:
            clashes = [name for name, clash in [
                ("train.accum_steps > 1", self.accum_steps > 1),
                ("train.amp fp16 (the warm-up before capture would move the loss scaler's "
                 "scale, which is not restored after it)", self.amp == "fp16"),
                ("train.ema_decay", self.ema_decay > 0),
                ("train.polyak_after_epochs", self.polyak_after_epochs is not None),
                ("train.model_parallel", self.model_parallel is not None),
                ("train.filter_rms_radius", self.filter_rms_radius is not None),
                ("train.unfreeze_every_epochs", self.unfreeze_every_epochs > 0),
            ] if clash]
            _check(not clashes, "train.cuda_graph captures a plain step; it does not combine "
                                f"with {', '.join(clashes)}")
        if self.model_parallel is not None:
            parse_model_parallel(self.model_parallel)  # a ConfigError naming the valid forms


@dataclass(frozen=True)
class ReportedSection:
    """The paper's own result for this setting (percent error), so reports can sit beside it."""

    top1_error: float | None = None
    top5_error: float | None = None
    protocol: str = ""  # how the paper tested: canon's protocol name first, then detail
    where: str = ""  # table or section

    def __post_init__(self) -> None:
        for key in ("top1_error", "top5_error"):
            value = getattr(self, key)
            _check(value is None or 0 <= value <= 100,
                   f"reported.{key} is a percent error, in [0, 100]; got {value}")
        _check(self.top1_error is None or self.top5_error is None
               or self.top5_error <= self.top1_error,
               f"reported.top5_error {self.top5_error} is above top1_error {self.top1_error}: "
               "a top-5 error is at most the top-1 error")


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSection
    description: str = ""
    source: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    reported: ReportedSection = field(default_factory=ReportedSection)

    def __post_init__(self) -> None:
        # It names the run's folder (runs/NAME): a path there would write elsewhere.
        _check(re.fullmatch(r"[A-Za-z0-9._-]+", self.name) is not None
               and self.name not in (".", ".."),
               f"name must be letters, digits, '.', '_' or '-' (it names the run's folder), "
               f"got {self.name!r}")
        _check(self.schedule.min_lr <= self.optimizer.lr,
               f"schedule.min_lr {self.schedule.min_lr} is above optimizer.lr "
               f"{self.optimizer.lr}: a cosine schedule would rise to it, not decay")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able values (tuples become lists); `from_dict` inverts it."""
        return plain(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "recipe") -> Recipe:
        """Validate a recipe mapping; `where` (a file name, "--set") prefixes every error."""
        try:
            return build_dataclass(cls, values, "recipe")
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


# Keys that change how fast a run trains, not what it computes: a run is the same run with
# them either way (a GPU may go on with a run a CPU began).
SPEED_ONLY_KEYS = frozenset({"train.cuda_graph", "train.compile"})

SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataConfig,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "reported": ReportedSection,
}


def valid_keys(section: str | None = None) -> list[str]:
    """The keys a recipe (or one of its sections) accepts."""
    cls = Recipe if section is None else SECTIONS[section]
    return [f.name for f in fields(cls)]


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key} must be one of {', '.join(allowed)}; got {value!r}")
