"""The training loop: a recipe in, a run directory with checkpoints, metrics and weights out.

One page of plain PyTorch: cross-entropy (plus GoogLeNet's auxiliary losses weighted by
`train.aux_loss_weight`), SGD with momentum, the recipe's lr schedule applied every step,
gradient accumulation, autocast. Distribution (canon.engine.distributed) and precision
(canon.engine.precision) stay behind small calls at the edges.

Exact resumption. Every training image is augmented under its own random seed, derived from
(seed, epoch, index): the augmentation a sample gets does not depend on which worker process
loads it, how many there are, or whether the run was interrupted. The epoch's sample order is a
permutation fixed by (seed, epoch). A checkpoint records the optimizer step reached inside the
epoch and the random generators' state, so a resumed run skips the samples already seen and
continues bit-identically on the CPU (GPU kernels may not be deterministic).

Ctrl-C finishes the optimizer step in progress, saves checkpoints/interrupted.pt and stops; a
second Ctrl-C stops at once.

Also worth knowing:
- With `train.ema_decay` > 0 the averaged weights are the ones validated, kept as best and
  exported (GoogLeNet's Polyak averaging); the raw weights stay in the checkpoints.
- The loss is checked for NaN/inf every LOSS_CHECK_STEPS steps (one device sync each), and
  before any checkpoint is written, so a diverged state is never saved.
- A cosine schedule spans the run's length: resuming with more epochs changes its shape.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    format_postfix,
    plot_curves,
    progress_bar,
    write_metrics_csv,
)
from canon.engine.model_parallel import parallelize
from canon.engine.precision import Precision
from canon.engine.schedules import LearningRateSchedule, linear_scaled_lr
from canon.errors import CanonError, ConfigError
from canon.evaluation import score_loader
from canon.recipes.schema import OptimizerSection, Recipe
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


def _detach_from_global_rng(loader: Any) -> None:
    # A DataLoader draws its workers' base seed from the global generator each time it is
    # iterated; with a private one, a resumed run's global RNG sequence (dropout) is unchanged.
    # (Augmentation does not use that seed: _SeededSamples seeds every sample itself.)
    loader.generator = torch.Generator().manual_seed(0)


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
    config = recipe.train
    state = resume if isinstance(resume, dict) or resume is None else None
    if state is None and resume is not None:
        _, state = ckpt.load_for_resume(resume)
    if state is not None and ctx.is_main:
        print(f"resuming at epoch {state['epoch']} + {state['step_in_epoch']} steps")

    # Data: augmentation seeded per sample; the sample order is fixed per epoch below.
    train_set, val_set = datasets or build_datasets(recipe.data)
    classes = [str(c) for c in getattr(train_set, "classes", [])]
    num_classes = recipe.model.num_classes or len(classes)
    if not num_classes:
        raise ConfigError("the training set has no .classes: set model.num_classes")
    preprocess = getattr(val_set, "preprocess", None)
    normalization = {
        "mean": preprocess.normalize.mean, "std": preprocess.normalize.std,
    } if preprocess is not None else None
    seeded_train = _SeededSamples(train_set, config.seed)
    micro_batches = len(train_set) // (config.batch_size * ctx.world_size)
    steps_per_epoch = micro_batches // config.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_set)} training images make no full step of batch {config.batch_size} "
            f"x accum {config.accum_steps} x {ctx.world_size} device(s); lower --batch-size"
        )
    total_steps = config.epochs * steps_per_epoch
    if config.iterations is not None:
        total_steps = min(total_steps, config.iterations)
    # This rank's sample order: a permutation fixed by (seed, epoch), sharded across ranks.
    order_sampler = dist.train_sampler(train_set, ctx, seed=config.seed) or ShuffleSampler(
        train_set, config.seed
    )
    train_keys = _EpochKeys()
    train_loader = build_loader(
        seeded_train, config.batch_size, train=True, workers=config.workers,
        sampler=train_keys, seed=config.seed, drop_last=True,
    )
    _detach_from_global_rng(train_loader)
    train_loader.worker_init_fn = _ignore_sigint_in_worker(train_loader.worker_init_fn)
    val_loader = build_loader(
        val_set, config.batch_size, train=False, workers=config.workers,
        sampler=dist.eval_sampler(val_set, ctx),
    )
    _detach_from_global_rng(val_loader)

    # Model, optimizer, schedule, precision.
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
    global_batch_size = config.batch_size * config.accum_steps * ctx.world_size
    optimizer, peak_lr = make_optimizer(model, recipe.optimizer, global_batch_size)
    schedule = LearningRateSchedule(
        optimizer, recipe.schedule, peak_lr=peak_lr, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    precision = Precision(config.amp, ctx.device)
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
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    epoch, step, step_in_epoch, metrics = 0, 0, 0, []
    totals = {"loss": 0.0, "correct": 0.0, "images": 0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        precision.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        metrics, totals = state["metrics"], state["epoch_totals"]
        ckpt.restore_rng_state(state["rng"])
    else:
        torch.manual_seed(config.seed + ctx.rank)  # dropout differs between ranks
    # An iteration limit may end an epoch early; a resumed run with a higher limit goes on
    # with the next epoch.
    steps_left = total_steps - step + step_in_epoch  # counted from the current epoch's start
    epochs = min(config.epochs, epoch + max(0, math.ceil(steps_left / steps_per_epoch)))

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        print(
            f"{recipe.name}: {recipe.model.name} on {recipe.data.dataset} "
            f"({len(train_set)} train / {len(val_set)} val images, {num_classes} classes), "
            f"global batch {global_batch_size} = {config.batch_size} x {config.accum_steps} "
            f"accum x {ctx.world_size} device(s), peak lr {peak_lr:.4g}, {epochs} epochs of "
            f"{steps_per_epoch} steps, {config.amp if config.amp != 'none' else 'fp32'} "
            f"on {ctx.device}; writing {run_dir}"
        )

    commit = ckpt.git_commit()
    best_error = min((row["val_top1_error"] for row in metrics), default=math.inf)
    interrupt = _InterruptFlag()

    def snapshot(rng: dict[str, Any], epoch_totals: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": precision.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch,
            "epoch_totals": dict(epoch_totals), "metrics": list(metrics), "rng": rng,
            "recipe": recipe.to_dict(), "commit": commit, "model_name": recipe.model.name,
            "classes": classes, "eval_config": model.eval_config.to_dict(),
            "normalization": normalization, "torch_version": str(torch.__version__),
        }

    with interrupt.installed():
        while epoch < epochs:
            # ---- one epoch of training --------------------------------------------------
            order_sampler.set_epoch(epoch)
            order = list(order_sampler)
            seen = step_in_epoch * config.accum_steps * config.batch_size
            train_keys.keys = [epoch * len(train_set) + i for i in order[seen:]]
            epoch_steps = min(steps_per_epoch, step_in_epoch + total_steps - step)
            bar = progress_bar(epoch_steps, epoch + 1, epochs, initial=step_in_epoch,
                               enabled=progress and ctx.is_main)
            started, pending_losses = time.perf_counter(), []
            batches = iter(train_loader)
            train_module.train()
            while step_in_epoch < epoch_steps:
                schedule.apply(step)
                loss_sum = torch.zeros((), device=ctx.device)
                correct, images_seen = torch.zeros((), device=ctx.device), 0
                for micro in range(config.accum_steps):
                    images, targets = next(batches)
                    if not len(targets):  # every file of this batch was undecodable
                        continue
                    images = images.to(ctx.device, non_blocking=True)
                    targets = targets.to(ctx.device, non_blocking=True)
                    if config.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    last_micro = micro == config.accum_steps - 1
                    with dist.sync_context(train_module, sync=last_micro):
                        with precision.autocast():
                            logits, aux_logits = train_module(images)
                            loss = criterion(logits, targets)
                            for aux in aux_logits:
                                loss = loss + config.aux_loss_weight * criterion(aux, targets)
                        precision.backward(loss / config.accum_steps)
                    loss_sum = loss_sum + loss.detach() * len(targets)
                    correct = correct + (logits.argmax(1) == targets).sum()
                    images_seen += len(targets)
                precision.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
                if config.filter_rms_radius is not None:
                    clamp_filter_rms(model, config.filter_rms_radius)
                step += 1
                step_in_epoch += 1
                pending_losses.append((step, loss_sum / max(images_seen, 1)))
                totals["loss"] = totals["loss"] + loss_sum
                totals["correct"] = totals["correct"] + correct
                totals["images"] += images_seen
                bar.update()
                if on_step is not None:
                    on_step(step)
                stop = _agreed(interrupt.raised, ctx)
                at_check = step_in_epoch % LOSS_CHECK_STEPS == 0 or step_in_epoch == epoch_steps
                if at_check or stop:
                    _check_losses(pending_losses, run_dir)
                    pending_losses = []
                    elapsed = totals["seconds"] + time.perf_counter() - started
                    bar.set_postfix(format_postfix(
                        float(totals["loss"]) / totals["images"], schedule.lr_at(step - 1),
                        totals["images"] / max(elapsed, 1e-9),
                    ))
                if stop:
                    bar.close()
                    totals["seconds"] += time.perf_counter() - started
                    path = ckpt.interrupted_checkpoint(run_dir)
                    if ctx.is_main:
                        ckpt.save_checkpoint(
                            snapshot(ckpt.capture_rng_state(), _plain(totals)), path
                        )
                    dist.barrier(ctx)
                    raise TrainingInterrupted(path)
            bar.close()
            train_seconds = totals["seconds"] + time.perf_counter() - started

            # ---- validate, schedule, log, checkpoint ---------------------------------------
            eval_model = ema.module if ema is not None else model
            val_top1, val_top5 = validate(eval_model, val_loader, ctx, precision)
            schedule.end_epoch(val_top1)
            reduced = dist.all_reduce_sum(
                torch.tensor([float(totals["loss"]), float(totals["correct"]), totals["images"]],
                             dtype=torch.float64), ctx,
            ).tolist()
            epoch += 1
            row = {
                "epoch": epoch, "lr": schedule.lr_at(step - 1),
                "train_loss": reduced[0] / reduced[2],
                "train_top1_error": 100.0 * (1 - reduced[1] / reduced[2]),
                "val_top1_error": val_top1, "val_top5_error": val_top5,
                "images_per_second": reduced[2] / max(train_seconds, 1e-9),
                "seconds": totals["seconds"] + time.perf_counter() - started,
            }
            metrics.append(row)
            step_in_epoch = 0
            totals = {"loss": 0.0, "correct": 0.0, "images": 0, "seconds": 0.0}
            if ctx.is_main:
                _save_epoch(run_dir, snapshot(ckpt.capture_rng_state(), totals), row,
                            val_top1 < best_error, config.keep_checkpoints)
                write_metrics_csv(run_dir / "metrics.csv", metrics)
                plot_curves(run_dir / "curves.png", metrics, f"{recipe.name}: {recipe.model.name}")
                print(epoch_summary(row, epochs), flush=True)
            best_error = min(best_error, val_top1)
            dist.barrier(ctx)

    if ctx.is_main:
        final = ema.module if ema is not None else model
        ckpt.export_model(run_dir, final, normalization, {
            "model": recipe.model.name, "num_classes": num_classes, "classes": classes,
            "eval_config": final.eval_config.to_dict(), "data": recipe.to_dict()["data"],
            "recipe": recipe.name, "commit": commit, "epochs": epoch, "steps": step,
            "val_top1_error": metrics[-1]["val_top1_error"] if metrics else None,
            "val_top5_error": metrics[-1]["val_top5_error"] if metrics else None,
            "reported": recipe.to_dict()["reported"],
        })
    return TrainResult(run_dir, metrics, best_error)


def _agreed(flag: bool, ctx: dist.DistributedContext) -> bool:
    """True on every rank if it is on any: all ranks must stop after the same step."""
    if ctx.world_size == 1:
        return flag
    return bool(dist.all_reduce_sum(torch.tensor([float(flag)]), ctx).item())


def _plain(totals: dict[str, Any]) -> dict[str, Any]:
    return {key: float(value) if torch.is_tensor(value) else value for key, value in totals.items()}


def _check_losses(pending: list[tuple[int, torch.Tensor]], run_dir: Path) -> None:
    if not pending:
        return
    values = torch.stack([loss for _, loss in pending]).float().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        step = pending[int(bad[0])][0]
        raise NonFiniteLossError(
            f"the loss became {values[int(bad[0])].item()} at optimizer step {step}; stopping. "
            f"The last good checkpoint is kept in {run_dir / ckpt.CHECKPOINT_DIR}. Lower the "
            "learning rate (--lr), use --amp bf16 instead of fp16, or add warmup "
            "(--set schedule.warmup_epochs=5)"
        )


def _save_epoch(
    run_dir: Path, state: dict[str, Any], row: dict[str, Any], is_best: bool, keep: int
) -> None:
    path = ckpt.epoch_checkpoint(run_dir, row["epoch"])
    ckpt.save_checkpoint(state, path)
    ckpt.interrupted_checkpoint(run_dir).unlink(missing_ok=True)
    if is_best:
        ckpt.copy_checkpoint(path, ckpt.best_checkpoint(run_dir))
    ckpt.prune_epoch_checkpoints(run_dir, keep)


__all__ = ["NonFiniteLossError", "TrainResult", "TrainingInterrupted", "train", "validate"]
