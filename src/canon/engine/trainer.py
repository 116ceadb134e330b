"""The training loop: a recipe in, a run directory with checkpoints, metrics and weights out.

Plain PyTorch: cross-entropy (plus GoogLeNet's auxiliary losses weighted by
`train.aux_loss_weight`), SGD with momentum, the recipe's lr schedule applied every step,
gradient accumulation, autocast. Distribution (canon.engine.distributed) and precision
(canon.engine.precision) stay behind small calls at the edges. Read it as `_set_up` (data,
model, optimizer, schedule, resumed state), `_train_epoch` (with `_optimizer_step`) and
`_end_epoch` (validate, schedule, checkpoint, log).

Exact resumption. Every training image is augmented under its own random seed, derived from
(seed, epoch, index): the augmentation a sample gets does not depend on which worker process
loads it, how many there are, or whether the run was interrupted. The epoch's sample order is a
permutation fixed by (seed, epoch). A checkpoint records the optimizer step reached inside the
epoch and every rank's random generator states and partial epoch sums, so a resumed run
skips the samples already seen and continues bit-identically on the CPU (GPU kernels may not
be deterministic). Resumed with another number of processes, each rank's generator is reseeded
from (seed, rank, step) instead: the run goes on, but not bit-identically (and from a
mid-epoch checkpoint it skips as many steps of the epoch, which now hold other images).

Ctrl-C finishes the optimizer step in progress, saves checkpoints/interrupted.pt and stops; a
second Ctrl-C stops at once.

Also worth knowing:
- With `train.ema_decay` > 0 the averaged weights are the ones validated, kept as best and
  exported (GoogLeNet's Polyak averaging); the raw weights stay in the checkpoints.
- The loss is checked for NaN/inf every LOSS_CHECK_STEPS steps (one device sync each), and
  before any checkpoint is written, so a diverged state is never saved.
- A cosine schedule spans the run's length: resuming with more epochs changes its shape.
- Iteration counts (milestones, warmup_iterations, train.iterations) are stated for
  optimizer.base_batch_size images per step and converted to the run's global batch
  (canon.engine.schedules.scale_iteration_counts); the log says so when it changes them.
- Under torchrun each machine's first process builds the datasets (and caches the training
  set's statistics) before the others, which then read the cache.
- Undecodable training files are skipped (one warning per file, from canon.data) and counted
  per epoch in metrics.csv (skipped_images); `train.strict_data` stops at the first instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset, Sampler

from canon.data import build_datasets, build_loader
from canon.data.loaders import ShuffleSampler
from canon.engine import checkpoint as ckpt
from canon.engine import distributed as dist
from canon.engine.logs import (
    epoch_summary,
    event_writer,
    format_postfix,
    plot_curves,
    progress_bar,
    write_epoch_events,
    write_metrics_csv,
)
from canon.engine.model_parallel import parallelize
from canon.engine.precision import Precision
from canon.engine.schedules import (
    LearningRateSchedule,
    linear_scaled_lr,
    scale_iteration_counts,
)
from canon.errors import CanonError, ConfigError
from canon.evaluation import score_loader
from canon.recipes.schema import OptimizerSection, Recipe, ScheduleSection, TrainSection
from canon.registry import create_model

LOSS_CHECK_STEPS = 10  # loss values are checked for NaN/inf (one device sync) this often
IMAGENET_PLACEHOLDER = "imagenet"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the state at the last finished optimizer step is saved at `checkpoint`."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; state saved to {checkpoint}")
        self.checkpoint = checkpoint


class NonFiniteLossError(CanonError, ArithmeticError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    best_val_top1_error: float


class _SeededSamples(Dataset):
    """Index `epoch * n + i` -> sample i, augmented under a seed fixed by (seed, epoch, i).

    canon's transforms draw from torch's global generator only (canon.data.transforms), so
    seeding that one around each sample is enough; the caller's generator state is restored.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.size = dataset, seed, len(dataset)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int):
        epoch, index = divmod(key, self.size)
        sample_seed = ((self.seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


class _EpochKeys(Sampler[int]):
    """The dataset keys the training loader reads this epoch, set before each epoch."""

    def __init__(self) -> None:
        self.keys: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class _WithAux(nn.Module):
    """Makes `forward_with_aux` the module's forward, so DDP and torch.compile see it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.forward_with_aux(images)


class _InterruptFlag:
    """The first SIGINT sets the flag (the loop stops at the next step); the second raises."""

    def __init__(self) -> None:
        self.raised = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")


def _ignore_sigint_in_worker(worker_init: Callable | None) -> Callable[[int], None]:
    def init(worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
        if worker_init is not None:
            worker_init(worker_id)

    return init


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list[dict]:
    """One group, or two when BN weights and biases (every 1-d parameter) skip weight decay."""
    if not no_decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, config: OptimizerSection, global_batch_size: int
) -> tuple[torch.optim.SGD, float]:
    """SGD with momentum and weight decay, and its peak lr for this global batch."""
    peak_lr = config.lr
    if config.scale_lr:
        peak_lr = linear_scaled_lr(config.lr, global_batch_size, config.base_batch_size)
    optimizer = torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.no_decay_bn_bias),
        lr=peak_lr, momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    return optimizer, peak_lr


@torch.no_grad()
def clamp_filter_rms(model: nn.Module, radius: float) -> None:
    """ZFNet s3: scale conv filters whose RMS exceeds `radius` back onto that radius."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            weight = module.weight
            rms = weight.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            weight.mul_(torch.clamp(radius / rms, max=1.0))


def validate(
    model: nn.Module, loader: Any, ctx: dist.DistributedContext, precision: Precision
) -> tuple[float, float]:
    """Exact top-1 and top-5 error (%) over the whole validation set, all ranks together."""
    with precision.autocast():
        errors = score_loader(model, loader, None, ctx.device)
    errors.counts = dist.all_reduce_sum(errors.counts, ctx).cpu()
    result = errors.result()
    return result["top1_error"], result["top5_error"]


def train(
    recipe: Recipe,
    output_dir: str | Path,
    *,
    resume: str | Path | dict[str, Any] | None = None,
    device: str = "auto",
    model: nn.Module | None = None,
    datasets: tuple[Dataset, Dataset] | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train as `recipe` says, writing checkpoints and logs to `output_dir`.

    `resume`: a run directory or checkpoint file to continue from (the newest readable
    checkpoint; an unreadable one is reported and the previous one used), or a checkpoint
    state already loaded with `checkpoint.load_for_resume`. `model`: a CanonModel to train
    instead of building `recipe.model.name`. `datasets`: (train, validation) to use instead of
    `build_datasets(recipe.data)`; items (image tensor, label), `.classes` on the training set
    unless the recipe sets model.num_classes. `on_step(step)` runs after every optimizer step.
    """
    if datasets is None and recipe.data.dataset == IMAGENET_PLACEHOLDER:
        raise ConfigError(
            f"recipe {recipe.name} trains on ImageNet: pass --data /path/to/imagenet, a folder "
            "holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        )
    ctx = dist.init_distributed(device)
    try:
        return _train(recipe, Path(output_dir), ctx, resume, model, datasets, progress, on_step)
    except torch.cuda.OutOfMemoryError:
        raise ConfigError(
            f"out of GPU memory at --batch-size {recipe.train.batch_size} per device: lower "
            "--batch-size and raise --accum by the same factor to keep the global batch (and "
            "the learning rate) unchanged"
        ) from None
    finally:
        dist.shutdown_distributed(ctx)


def _train(
    recipe: Recipe,
    run_dir: Path,
    ctx: dist.DistributedContext,
    resume: str | Path | dict[str, Any] | None,
    model: nn.Module | None,
    datasets: tuple[Dataset, Dataset] | None,
    progress: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    state = resume if isinstance(resume, dict) or resume is None else None
    if state is None and resume is not None:
        _, state = ckpt.load_for_resume(resume)
    if state is not None and ctx.is_main:
        print(f"resuming at epoch {state['epoch']} + {state['step_in_epoch']} steps")
    run = _set_up(recipe, run_dir, ctx, model, datasets, state)
    interrupt = _InterruptFlag()
    try:
        with interrupt.installed():
            while run.epoch < run.epochs:
                train_seconds = _train_epoch(run, interrupt, progress, on_step)
                _end_epoch(run, train_seconds)
    finally:
        if run.events is not None:
            run.events.close()
    if ctx.is_main:
        _export(run)
    return TrainResult(run_dir, run.metrics, run.best_error)


def _new_totals() -> dict[str, Any]:
    """The running sums of an epoch on this rank (all-reduced when it ends)."""
    return {"loss": 0.0, "correct": 0.0, "images": 0, "skipped": 0, "seconds": 0.0}


@dataclass(eq=False)
class _Run:
    """One training run: what `_set_up` builds and the epoch functions share."""

    recipe: Recipe
    ctx: dist.DistributedContext
    run_dir: Path
    train_size: int
    classes: list[str]
    num_classes: int
    normalization: dict[str, torch.Tensor | None] | None
    order_sampler: Any  # this rank's sample order, a permutation fixed by (seed, epoch)
    train_keys: _EpochKeys
    train_loader: Any
    val_loader: Any
    model: nn.Module  # the plain model, whose state dict the checkpoints hold
    train_module: nn.Module  # the model as trained: in DDP and torch.compile wrappers
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule
    precision: Precision
    criterion: nn.Module
    steps_per_epoch: int
    total_steps: int
    commit: str | None
    epochs: int = 0  # epochs this run reaches (an iteration limit may end it early)
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    step_in_epoch: int = 0
    epoch_started: float = 0.0  # time.perf_counter() when this epoch's training started
    metrics: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=_new_totals)
    best_error: float = math.inf
    events: Any = None  # TensorBoard writer (rank 0, train.tensorboard)


# ---- setting up -----------------------------------------------------------------------------


def _set_up(
    recipe: Recipe,
    run_dir: Path,
    ctx: dist.DistributedContext,
    model: nn.Module | None,
    datasets: tuple[Dataset, Dataset] | None,
    state: dict[str, Any] | None,
) -> _Run:
    config = recipe.train
    train_set, val_set = datasets or _build_datasets(recipe, ctx)
    classes = [str(c) for c in getattr(train_set, "classes", [])]
    num_classes = recipe.model.num_classes or len(classes)
    if not num_classes:
        raise ConfigError("the training set has no .classes: set model.num_classes")
    preprocess = getattr(val_set, "preprocess", None)
    normalization = {
        "mean": preprocess.normalize.mean, "std": preprocess.normalize.std,
    } if preprocess is not None else None
    steps_per_epoch = len(train_set) // (config.batch_size * ctx.world_size) // config.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_set)} training images make no full step of batch {config.batch_size} "
            f"x accum {config.accum_steps} x {ctx.world_size} device(s); lower --batch-size"
        )
    global_batch_size = config.batch_size * config.accum_steps * ctx.world_size
    schedule_config, iterations = scale_iteration_counts(
        recipe.schedule, config.iterations, recipe.optimizer.base_batch_size, global_batch_size
    )
    total_steps = config.epochs * steps_per_epoch
    if iterations is not None:
        total_steps = min(total_steps, iterations)

    train_keys, train_loader, val_loader = _loaders(train_set, val_set, config, ctx)
    model = _placed_model(recipe, model, num_classes, ctx)
    optimizer, peak_lr = make_optimizer(model, recipe.optimizer, global_batch_size)
    ema = None
    if config.ema_decay > 0:
        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    train_module: nn.Module = dist.wrap_model(
        _WithAux(model), ctx, sync_batchnorm=config.sync_batchnorm
    )
    if config.compile:
        train_module = torch.compile(train_module)
    run = _Run(
        recipe=recipe, ctx=ctx, run_dir=run_dir, train_size=len(train_set), classes=classes,
        num_classes=num_classes, normalization=normalization,
        order_sampler=dist.train_sampler(train_set, ctx, seed=config.seed)
        or ShuffleSampler(train_set, config.seed),
        train_keys=train_keys, train_loader=train_loader, val_loader=val_loader, model=model,
        train_module=train_module, ema=ema, optimizer=optimizer,
        schedule=LearningRateSchedule(
            optimizer, schedule_config, peak_lr=peak_lr, steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        ),
        precision=Precision(config.amp, ctx.device),
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, commit=ckpt.git_commit(),
    )
    if state is not None:
        _restore(run, state)
    else:
        torch.manual_seed(config.seed + ctx.rank)  # dropout differs between ranks
    # An iteration limit may end an epoch early; a resumed run with a higher limit goes on
    # with the next epoch.
    steps_left = total_steps - run.step + run.step_in_epoch  # from the current epoch's start
    run.epochs = min(config.epochs, run.epoch + max(0, math.ceil(steps_left / steps_per_epoch)))
    run.best_error = min((row["val_top1_error"] for row in run.metrics), default=math.inf)

    if ctx.is_main:
        _open_run_dir(run, len(val_set), iterations)
    return run


def _open_run_dir(run: _Run, val_size: int, iterations: int | None) -> None:
    """Rank 0: the run directory with its resolved recipe, the events file, the run's plan."""
    recipe, config, ctx = run.recipe, run.recipe.train, run.ctx
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if config.tensorboard:
        run.events = event_writer(run.run_dir)
    global_batch_size = config.batch_size * config.accum_steps * ctx.world_size
    print(
        f"{recipe.name}: {recipe.model.name} on {recipe.data.dataset} "
        f"({run.train_size} train / {val_size} val images, {run.num_classes} classes), "
        f"global batch {global_batch_size} = {config.batch_size} x {config.accum_steps} "
        f"accum x {ctx.world_size} device(s), peak lr {run.schedule.peak_lr:.4g}, {run.epochs} "
        f"epochs of {run.steps_per_epoch} steps, "
        f"{config.amp if config.amp != 'none' else 'fp32'} on {ctx.device}; writing {run.run_dir}"
    )
    if run.schedule.config != recipe.schedule or iterations != config.iterations:
        print(_scaled_counts_note(recipe, run.schedule.config, iterations, global_batch_size))


def _loaders(
    train_set: Dataset, val_set: Dataset, config: TrainSection, ctx: dist.DistributedContext
) -> tuple[_EpochKeys, Any, Any]:
    """The training loader reads the keys set before each epoch (augmentation seeded per
    sample by _SeededSamples); the validation loader reads this rank's shard."""
    train_keys = _EpochKeys()
    train_loader = build_loader(
        _SeededSamples(train_set, config.seed), config.batch_size, train=True,
        workers=config.workers, sampler=train_keys, seed=config.seed, drop_last=True,
    )
    train_loader.worker_init_fn = _ignore_sigint_in_worker(train_loader.worker_init_fn)
    val_loader = build_loader(
        val_set, config.batch_size, train=False, workers=config.workers,
        sampler=dist.eval_sampler(val_set, ctx),
    )
    return train_keys, train_loader, val_loader


def _build_datasets(recipe: Recipe, ctx: dist.DistributedContext) -> tuple[Dataset, Dataset]:
    """build_datasets, first by each machine's first process, which computes and caches the
    training-set statistics the recipe needs; the machine's other processes wait for it and
    then read them from the cache instead of computing them at the same time."""
    build = functools.partial(
        build_datasets, recipe.data, strict=recipe.train.strict_data, workers=recipe.train.workers
    )
    if ctx.local_rank != 0:
        dist.barrier(ctx)
        return build()
    try:
        return build()
    finally:
        dist.barrier(ctx)  # also on failure: the others then fail the same way, not hang


def _placed_model(
    recipe: Recipe, model: nn.Module | None, num_classes: int, ctx: dist.DistributedContext
) -> nn.Module:
    """The model built (same initial weights on every rank) and put on its device(s)."""
    config = recipe.train
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest conv kernels (GPU runs are not bitwise)
    torch.manual_seed(config.seed)
    if model is None:
        model = create_model(recipe.model.name, num_classes)
    if config.model_parallel is not None:
        if ctx.world_size > 1 or config.compile:
            raise ConfigError(
                "--model-parallel runs one process without torch.compile: launch it with "
                "plain `canon train` (not torchrun) and drop --compile"
            )
        model = parallelize(model, config.model_parallel, ctx.device)  # pieces on their devices
    else:
        model = model.to(ctx.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _scaled_counts_note(
    recipe: Recipe, schedule: ScheduleSection, iterations: int | None, global_batch_size: int
) -> str:
    """What scale_iteration_counts changed, for the run's log."""
    changes = [
        f"schedule.{key} {getattr(recipe.schedule, key)} -> {getattr(schedule, key)}"
        for key in ("milestones", "step_size", "warmup_iterations")
        if getattr(recipe.schedule, key) != getattr(schedule, key)
    ]
    if iterations != recipe.train.iterations:
        changes.append(f"train.iterations {recipe.train.iterations} -> {iterations}")
    return (
        f"iteration counts are stated for a global batch of {recipe.optimizer.base_batch_size}; "
        f"at {global_batch_size} (the same images seen): " + ", ".join(changes)
    )


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, progress, random streams."""
    ctx = run.ctx
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.precision.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.epoch, run.step, run.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
    run.metrics = list(state["metrics"])  # the caller's state stays as it was
    saved_ranks = len(state["rng"])  # one RNG state and one set of epoch totals per rank
    if saved_ranks == ctx.world_size:
        ckpt.restore_rng_state(state["rng"][ctx.rank])
        run.totals = dict(state["epoch_totals"][ctx.rank])
        return
    # Another number of processes: there is no saved stream for this rank, so each rank's is
    # reseeded from (seed, rank, step), and rank 0 carries the epoch's totals so far.
    if ctx.is_main:
        print(f"the checkpoint was written by {saved_ranks} process(es), this run has "
              f"{ctx.world_size}: random streams reseeded from (seed, rank, step)")
    seed = (run.recipe.train.seed * 1_000_003 + run.step) * 10_007 + ctx.rank
    torch.manual_seed(seed % 2**63)
    run.totals = _new_totals()
    if ctx.is_main:
        for key in ("loss", "correct", "images", "skipped"):
            run.totals[key] = sum(totals[key] for totals in state["epoch_totals"])
        run.totals["seconds"] = state["epoch_totals"][0]["seconds"]


# ---- one epoch of training ------------------------------------------------------------------


def _train_epoch(
    run: _Run, interrupt: _InterruptFlag, progress: bool, on_step: Callable[[int], None] | None
) -> float:
    """Train until the epoch (or the iteration limit) ends; returns its training seconds."""
    config, ctx = run.recipe.train, run.ctx
    run.order_sampler.set_epoch(run.epoch)
    order = list(run.order_sampler)
    seen = run.step_in_epoch * config.accum_steps * config.batch_size
    run.train_keys.keys = [run.epoch * run.train_size + i for i in order[seen:]]
    epoch_steps = min(run.steps_per_epoch, run.step_in_epoch + run.total_steps - run.step)
    run.epoch_started, pending_losses = time.perf_counter(), []
    batches = iter(run.train_loader)
    run.train_module.train()
    with progress_bar(epoch_steps, run.epoch + 1, run.epochs, initial=run.step_in_epoch,
                      enabled=progress and ctx.is_main) as bar:  # closed on errors too
        while run.step_in_epoch < epoch_steps:
            pending_losses.append((run.step, _optimizer_step(run, batches)))  # step just taken
            bar.update()
            if on_step is not None:
                on_step(run.step)
            stop = _agreed(interrupt.raised, ctx)
            at_check = run.step_in_epoch % LOSS_CHECK_STEPS == 0 or run.step_in_epoch == epoch_steps
            if stop or at_check:
                _check_losses(pending_losses, run)
                pending_losses = []
                elapsed = run.totals["seconds"] + time.perf_counter() - run.epoch_started
                bar.set_postfix(format_postfix(
                    float(run.totals["loss"]) / max(run.totals["images"], 1),
                    run.schedule.lr_at(run.step - 1), run.totals["images"] / max(elapsed, 1e-9),
                ))
            if stop:
                run.totals["seconds"] += time.perf_counter() - run.epoch_started
                _save_interrupted(run)
    return run.totals["seconds"] + time.perf_counter() - run.epoch_started


def _optimizer_step(run: _Run, batches: Iterator) -> torch.Tensor:
    """One optimizer step over accum_steps micro-batches; returns its mean loss (on device)."""
    config, ctx = run.recipe.train, run.ctx
    run.schedule.apply(run.step)
    loss_sum = torch.zeros((), device=ctx.device)
    correct, images_seen = torch.zeros((), device=ctx.device), 0
    for micro in range(config.accum_steps):
        images, targets = next(batches)
        run.totals["skipped"] += config.batch_size - len(targets)  # undecodable files
        if not len(targets):
            continue
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with dist.sync_context(run.train_module, sync=micro == config.accum_steps - 1):
            with run.precision.autocast():
                logits, aux_logits = run.train_module(images)
                loss = run.criterion(logits, targets)
                for aux in aux_logits:
                    loss = loss + config.aux_loss_weight * run.criterion(aux, targets)
            run.precision.backward(loss / config.accum_steps)
        loss_sum = loss_sum + loss.detach() * len(targets)
        correct = correct + (logits.argmax(1) == targets).sum()
        images_seen += len(targets)
    run.precision.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    if config.filter_rms_radius is not None:
        clamp_filter_rms(run.model, config.filter_rms_radius)
    run.step += 1
    run.step_in_epoch += 1
    run.totals["loss"] = run.totals["loss"] + loss_sum
    run.totals["correct"] = run.totals["correct"] + correct
    run.totals["images"] += images_seen
    return loss_sum / max(images_seen, 1)


def _agreed(flag: bool, ctx: dist.DistributedContext) -> bool:
    """True on every rank if it is on any: all ranks must stop after the same step."""
    if ctx.world_size == 1:
        return flag
    return bool(dist.all_reduce_sum(torch.tensor([float(flag)]), ctx).item())


def _check_losses(pending: list[tuple[int, torch.Tensor]], run: _Run) -> None:
    """Stop on a NaN/inf loss (one device sync for all pending steps); log them otherwise."""
    if not pending:
        return
    values = torch.stack([loss for _, loss in pending]).float().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        step = pending[int(bad[0])][0]
        raise NonFiniteLossError(
            f"the loss became {values[int(bad[0])].item()} at optimizer step {step}; stopping. "
            f"The last good checkpoint is kept in {run.run_dir / ckpt.CHECKPOINT_DIR}. Lower "
            "the learning rate (--lr), use --amp bf16 instead of fp16, or add warmup "
            "(--set schedule.warmup_epochs=5)"
        )
    if run.events is not None:
        for (step, _), value in zip(pending, values.tolist(), strict=True):
            run.events.add_scalar("train/loss", value, step)
            run.events.add_scalar("train/lr", run.schedule.lr_at(step - 1), step)


def _save_interrupted(run: _Run) -> NoReturn:
    path = ckpt.interrupted_checkpoint(run.run_dir)
    state = _snapshot(run)  # every rank takes part: it gathers their random states
    if run.ctx.is_main:
        ckpt.save_checkpoint(state, path)
    dist.barrier(run.ctx)
    raise TrainingInterrupted(path)


# ---- end of an epoch: validate, schedule, checkpoint, log ----------------------------------


def _end_epoch(run: _Run, train_seconds: float) -> None:
    ctx, totals = run.ctx, run.totals
    # Rank 0's batch-norm statistics (and EMA) on every rank: each rank then scores its shard
    # with the model that rank 0 saves (see canon.engine.distributed).
    dist.broadcast_buffers(run.model, ctx)
    if run.ema is not None:
        dist.broadcast_buffers(run.ema, ctx)
    val_top1, val_top5 = validate(
        run.ema.module if run.ema is not None else run.model, run.val_loader, ctx, run.precision
    )
    run.schedule.end_epoch(val_top1)
    loss, correct, images, skipped = dist.all_reduce_sum(torch.tensor(
        [float(totals["loss"]), float(totals["correct"]), totals["images"], totals["skipped"]],
        dtype=torch.float64,
    ), ctx).tolist()
    run.epoch += 1
    row = {
        "epoch": run.epoch, "lr": run.schedule.lr_at(run.step - 1),
        "train_loss": loss / images, "train_top1_error": 100.0 * (1 - correct / images),
        "val_top1_error": val_top1, "val_top5_error": val_top5,
        "images_per_second": images / max(train_seconds, 1e-9),
        "seconds": totals["seconds"] + time.perf_counter() - run.epoch_started,
        "skipped_images": int(skipped),
    }
    run.metrics.append(row)
    run.step_in_epoch = 0
    run.totals = _new_totals()
    state = _snapshot(run)
    if ctx.is_main:
        _save_epoch(run.run_dir, state, row, val_top1 < run.best_error,
                    run.recipe.train.keep_checkpoints)
        write_metrics_csv(run.run_dir / "metrics.csv", run.metrics)
        plot_curves(run.run_dir / "curves.png", run.metrics,
                    f"{run.recipe.name}: {run.recipe.model.name}")
        if run.events is not None:
            write_epoch_events(run.events, row, run.step)
        print(epoch_summary(row, run.epochs), flush=True)
    run.best_error = min(run.best_error, val_top1)
    dist.barrier(ctx)


def _snapshot(run: _Run) -> dict[str, Any]:
    """The complete training state. Every rank must call it: it gathers each rank's random
    generator states and epoch totals so far (a resumed run restores them rank by rank)."""
    per_rank = dist.all_gather_object(
        {"rng": ckpt.capture_rng_state(), "totals": _plain(run.totals)}, run.ctx
    )
    return {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(), "scaler": run.precision.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "epoch": run.epoch, "step": run.step, "step_in_epoch": run.step_in_epoch,
        "epoch_totals": [rank["totals"] for rank in per_rank],
        "rng": [rank["rng"] for rank in per_rank],
        "metrics": list(run.metrics), "recipe": run.recipe.to_dict(), "commit": run.commit,
        "model_name": run.recipe.model.name, "classes": run.classes,
        "eval_config": run.model.eval_config.to_dict(), "normalization": run.normalization,
        "torch_version": str(torch.__version__),
    }


def _plain(totals: dict[str, Any]) -> dict[str, Any]:
    return {key: float(value) if torch.is_tensor(value) else value for key, value in totals.items()}


def _save_epoch(
    run_dir: Path, state: dict[str, Any], row: dict[str, Any], is_best: bool, keep: int
) -> None:
    path = ckpt.epoch_checkpoint(run_dir, row["epoch"])
    ckpt.save_checkpoint(state, path)
    ckpt.interrupted_checkpoint(run_dir).unlink(missing_ok=True)
    if is_best:
        ckpt.copy_checkpoint(path, ckpt.best_checkpoint(run_dir))
    ckpt.prune_epoch_checkpoints(run_dir, keep)


def _export(run: _Run) -> None:
    """model.safetensors (the EMA weights when EMA is on), normalization, eval_config.json."""
    final = run.ema.module if run.ema is not None else run.model
    recipe = run.recipe.to_dict()
    last = run.metrics[-1] if run.metrics else {}
    ckpt.export_model(run.run_dir, final, run.normalization, {
        "model": run.recipe.model.name, "num_classes": run.num_classes, "classes": run.classes,
        "eval_config": final.eval_config.to_dict(), "data": recipe["data"],
        "recipe": run.recipe.name, "commit": run.commit, "epochs": run.epoch, "steps": run.step,
        "val_top1_error": last.get("val_top1_error"), "val_top5_error": last.get("val_top5_error"),
        "reported": recipe["reported"],
    })


__all__ = ["NonFiniteLossError", "TrainResult", "TrainingInterrupted", "train", "validate"]
