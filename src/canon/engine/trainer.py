"""The training loop, a readable page of plain PyTorch: `train` sets a run up
(canon.engine.setup), then `_train_epoch` (cross-entropy plus GoogLeNet's auxiliary losses, SGD
with momentum, the lr schedule every step, gradient accumulation, autocast) and `_end_epoch`
(validate, schedule, checkpoint, log) until the recipe's epochs or iterations are done."""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn

from canon.data.loaders import Datasets
from canon.devices import cudnn_autotuning
from canon.engine import checkpoint as ckpt
from canon.engine import distributed as dist
from canon.engine.freezing import freeze_stages, frozen_stage_count
from canon.engine.graphed import GraphedStep
from canon.engine.logs import (
    epoch_summary,
    format_postfix,
    plot_curves,
    progress_bar,
    write_epoch_events,
    write_metrics_csv,
)
from canon.engine.optimization import classification_loss
from canon.engine.precision import Precision
from canon.engine.rundir import (
    anchored_recipe,
    check_continuation,
    check_source_outside,
    claim_run_dir,
    continues_elsewhere,
    set_reports_aside,
)
from canon.engine.saving import (
    check_weights,
    divergence_remedy,
    export,
    keep_best,
    newest_checkpoint_note,
    save_epoch,
    snapshot,
    validated_model,
)
from canon.engine.setup import Run, check_recipe, new_totals, open_run_dir, set_up
from canon.engine.stopping import StopFlag, shut_down_workers
from canon.errors import ConfigError, DataError, NonFiniteError, canon_message, first_line
from canon.evaluation import score_loader
from canon.evaluation.metrics import error_percent
from canon.recipes import load_recipe
from canon.recipes.schema import Recipe

# Loss values are checked for NaN/inf (one device sync) this often; GPU ranks agree on a stop
# then.
LOSS_CHECK_STEPS = 10


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the state at the last finished optimizer step is at `checkpoint`."""

    def __init__(self, checkpoint: Path, signal_number: int = signal.SIGINT) -> None:
        super().__init__(f"interrupted; state saved to {checkpoint}")
        self.checkpoint = checkpoint
        self.signal_number = signal_number


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    # The lowest validation top-1 error of a whole epoch (the one checkpoints/best.pt holds);
    # None when the validation set is the test set (nothing is chosen on it, metrics[-1], the
    # final model, is the result) or when the iteration limit cut the only epoch short.
    best_val_top1_error: float | None
    validated_on_test_set: bool


@torch.no_grad()
def clamp_filter_rms(model: nn.Module, radius: float, frozen: Sequence[nn.Parameter] = ()
                     ) -> None:
    """ZFNet s3: scale conv filters whose RMS exceeds `radius` back onto that radius; `frozen`
    ones (fine-tuning's first stages) learn nothing, and nothing else changes them either."""
    fixed = {id(parameter) for parameter in frozen}
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and id(module.weight) not in fixed:
            weight = module.weight
            rms = weight.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            weight.mul_(torch.clamp(radius / rms, max=1.0))


def validate(
    model: nn.Module, loader: Any, ctx: dist.DistributedContext, precision: Precision
) -> tuple[float, float, int]:
    """Exact top-1 and top-5 error (%) over the whole validation set, all ranks together,
    and the number of images scored (undecodable ones are skipped)."""
    with precision.scoring():
        errors = score_loader(model, loader, None, ctx.device)
    errors.counts = dist.all_reduce_sum(errors.counts, ctx).cpu()
    result = errors.result()
    return result["top1_error"], result["top5_error"], result["images"]


def train(
    recipe: Recipe | str | Path,
    output_dir: str | Path,
    *,
    resume: str | Path | dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    model: nn.Module | None = None,
    datasets: Datasets | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train as `recipe` says (a Recipe, or what load_recipe takes: a bundled recipe's name
    or a YAML file), writing checkpoints and logs to `output_dir`.

    Resuming is exact: a checkpoint records the step reached inside the epoch and every rank's
    random generator states and partial epoch sums, so a resumed run continues bit-identically
    on the CPU (see canon.engine.setup for what a resume on another number of processes
    changes). Ctrl-C or SIGTERM finishes the step in progress (under torchrun on GPUs, the
    steps up to the next loss check, where the ranks agree) on every rank, saves
    checkpoints/interrupted.pt and raises TrainingInterrupted; a second signal stops at once.
    A file that stops a one-process run mid-epoch or in its validation (a DataError) leaves
    interrupted.pt too. A run the iteration limit ended inside an epoch, resumed with the same
    limit, has finished: it trains and validates nothing, and exports its model again.
    A NaN/inf loss (checked every LOSS_CHECK_STEPS steps, one device sync) or non-finite
    weights (checked before every checkpoint) raise NonFiniteError: nothing diverged is ever
    saved. With weight averaging (train.ema_decay, train.polyak_after_epochs) the averaged
    weights, once averaging has begun, are the ones validated, kept as best and exported (the
    raw ones stay in the checkpoints). checkpoints/best.pt holds the epoch of lowest
    validation error, unless the validation set is the dataset's test set (CIFAR, the sample,
    without data.val_split): then nothing is chosen on it and the final model is the result.
    Undecodable files are skipped and counted (metrics.csv skipped_images, in training, and
    val_skipped_images), or stop the run with train.strict_data.

    `resume`: a run directory or checkpoint file to continue from (the newest readable
    checkpoint; an unreadable one is reported and the previous one used), or a checkpoint
    state already loaded with `checkpoint.load_for_resume`. Without it, an `output_dir` that
    holds another run is refused unless `overwrite` (which deletes that run's files); a run
    directory is locked while a run writes to it. `model`: a CanonModel to train instead of
    building `recipe.model.name`. `datasets`: the sets to use instead of
    `build_datasets(recipe.data)`; items (image tensor, label), `.classes` on the training set
    unless the recipe sets model.num_classes. `on_step(step)` runs after every optimizer step.
    """
    if isinstance(recipe, str | Path):
        recipe = load_recipe(recipe)
    if not (resume is None or isinstance(resume, str | Path | dict)) or resume == "latest":
        raise ConfigError(f"resume={resume!r}: give the run directory or checkpoint file to "
                          "go on from (or a state load_for_resume read)")
    check_recipe(recipe, model_given=model is not None, datasets_given=datasets is not None,
                 fresh=resume is None)
    recipe = anchored_recipe(recipe)  # a relative data folder recorded as it is found now
    if resume is None:  # the run directory is claimed (an --overwrite's set aside) first
        check_source_outside(output_dir, recipe.model.init_from, "model.init_from")
        check_source_outside(output_dir, recipe.data.normalization_from,
                             "data.normalization_from")
    ctx = dist.init_distributed(device)
    try:
        with cudnn_autotuning(ctx.device):
            result = _train(recipe, Path(output_dir), ctx, resume, overwrite, model, datasets,
                            progress, on_step)
    except torch.cuda.OutOfMemoryError:
        dist.shutdown_distributed(ctx, together=False)
        raise ConfigError(
            f"out of GPU memory at --batch-size {recipe.train.batch_size} per device: lower "
            "--batch-size and raise --accum (train.batch_size, train.accum_steps) by the same "
            "factor to keep the global batch (and the learning rate) unchanged"
        ) from None
    except BaseException:
        dist.shutdown_distributed(ctx, together=False)
        raise
    dist.shutdown_distributed(ctx)
    return result


def _train(
    recipe: Recipe,
    run_dir: Path,
    ctx: dist.DistributedContext,
    resume: str | Path | dict[str, Any] | None,
    overwrite: bool,
    model: nn.Module | None,
    datasets: Datasets | None,
    progress: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    state = resume if isinstance(resume, dict) or resume is None else None
    if state is None and resume is not None:
        loaded, state = ckpt.load_for_resume(resume)
        check_continuation(loaded, state, Path(resume).is_file(), run_dir)
    if state is not None and ctx.is_main:
        print(f"resuming at epoch {state['epoch']} + {state['step_in_epoch']} steps")
    in_place = state is not None and not continues_elsewhere(state, run_dir)
    # Claimed before set_up's dataset scan and statistics pass: a taken directory is refused
    # at once, not minutes later.
    with _claimed(run_dir, ctx, resuming=in_place, overwrite=overwrite):
        run = set_up(recipe, run_dir, ctx, model, datasets, state)
        if recipe.train.cuda_graph:
            run.graphed_step = graphed_step(run)
            if ctx.device.type != "cuda" and ctx.is_main:
                print(f"train.cuda_graph: nothing to capture on {ctx.device}; the same step "
                      "runs uncaptured")
        _by_rank_0(ctx, lambda: open_run_dir(run),
                   f"rank 0 could not open the run directory {run_dir}")
        stop = StopFlag(announce=ctx.is_main)
        with stop.installed():
            _train_run(run, in_place, stop, progress, on_step)
    best = None if run.validates_on_test_set or math.isinf(run.best_error) else run.best_error
    return TrainResult(run_dir, run.metrics, best, run.validates_on_test_set)


def _train_run(run: Run, in_place: bool, stop: StopFlag, progress: bool,
               on_step: Callable[[int], None] | None) -> None:
    """Train the epochs left, then rank 0 exports the model."""
    ctx, run_dir = run.ctx, run.run_dir
    if run.resumed_from is not None and ctx.is_main:
        keep_best(run, run.resumed_from)
    if in_place and ctx.is_main:  # metrics.csv may lag the checkpoint (killed between
        write_metrics_csv(run_dir / "metrics.csv", run.metrics)  # the two writes) or run
        # ahead of it (a damaged newer checkpoint passed over): the checkpoint's epochs
        if _trains_on(run):  # a finished run given more epochs: its export is of the past
            exported = ckpt.withdraw_export(run_dir)  # not run.epoch's where a newer
            epochs = run.epoch if exported is None else exported  # checkpoint was damaged
            aside = set_reports_aside(run_dir, epochs)
            if aside is not None:
                print(f"the evaluations and visualisations of the model this run had "
                      f"after {epochs} epoch(s) are now in {aside}")
    try:
        while _trains_on(run):
            train_seconds = _train_epoch(run, stop, progress, on_step)
            _end_epoch(run, train_seconds)
    finally:
        _close(run)
    if ctx.is_main:
        export(run)


def _trains_on(run: Run) -> bool:
    return run.epoch < run.epochs and not run.cut_short


@contextlib.contextmanager
def _claimed(run_dir: Path, ctx: dist.DistributedContext, *, resuming: bool, overwrite: bool
             ) -> Iterator[None]:
    """Rank 0 claims and locks the run directory (refusing another run's) while the block
    runs."""
    with contextlib.ExitStack() as stack:
        _by_rank_0(ctx, lambda: stack.enter_context(
            claim_run_dir(run_dir, resume=resuming, overwrite=overwrite)),
            f"rank 0 could not claim the run directory {run_dir}")
        yield


def _by_rank_0(ctx: dist.DistributedContext, action: Callable[[], object], failed: str) -> None:
    """`action` on rank 0 alone; where it fails, every rank raises (rank 0 its own error, the
    others a DataError saying `failed`), so that none trains alone."""
    if ctx.is_main:
        try:
            action()
        except BaseException:
            dist.any_rank(True, ctx)  # the other ranks' matching call below
            raise
    if dist.any_rank(False, ctx):
        raise DataError(failed)


def _close(run: Run) -> None:
    """Whatever way the run stops: end the loader workers, close the events file; rank 0
    draws curves.png."""
    shut_down_workers(run.train_loader)
    shut_down_workers(run.val_loader)  # persistent too, and as deaf to SIGTERM
    if run.events is not None:
        run.events.close()
    if run.ctx.is_main and run.metrics:
        try:
            plot_curves(run.run_dir / "curves.png", run.metrics,
                        f"{run.recipe.name}: {run.recipe.model.name}")
        except Exception as error:  # not to replace why the run stopped, nor skip its export
            warnings.warn(f"{run.run_dir / 'curves.png'} not drawn ({first_line(error)}); "
                          "metrics.csv holds the same curves", stacklevel=2)


# ---- one epoch of training ------------------------------------------------------------------


def _train_epoch(
    run: Run, stop_flag: StopFlag, progress: bool, on_step: Callable[[int], None] | None
) -> float:
    """Train until the epoch (or the iteration limit) ends; returns its training seconds."""
    config, ctx = run.recipe.train, run.ctx
    seen = run.step_in_epoch * config.accum_steps * config.batch_size  # a resumed epoch's
    run.train_order.set_epoch(run.epoch, seen)
    epoch_steps = min(run.steps_per_epoch, run.step_in_epoch + run.total_steps - run.step)
    run.epoch_started, pending_losses = time.perf_counter(), []
    batches = iter(run.train_loader)
    run.train_module.train()
    run.frozen = freeze_stages(run.model, frozen_stage_count(run.recipe, run.epoch))
    with progress_bar(epoch_steps, run.epoch + 1, run.epochs, initial=run.step_in_epoch,
                      enabled=progress and ctx.is_main) as bar:  # closed on errors too
        while run.step_in_epoch < epoch_steps:
            try:
                pending_losses.append((run.step, _optimizer_step(run, batches)))  # step taken
            except DataError as error:  # a file that stops the run, read before the step
                # Under torchrun the other ranks wait in its gradient exchange: no rank can
                # save alone. At an epoch's start the last epoch's checkpoint (or, in the
                # first, none) holds the state, and an --overwrite's replaced run comes back.
                if ctx.world_size > 1 or run.step_in_epoch == 0:
                    raise
                _check_losses(pending_losses, run)  # a diverged state is not kept
                _stop_clock(run)
                _save_before_data_error(run, error)
            bar.update()
            if on_step is not None:
                on_step(run.step)
            at_window = (run.step_in_epoch % LOSS_CHECK_STEPS == 0  # the checks of an uncut
                         or run.step_in_epoch == run.steps_per_epoch)  # epoch, and an
            at_check = at_window or run.step_in_epoch == epoch_steps  # iteration limit's cut
            # GPU ranks agree on a stop at the checks only: agreeing waits for the device, which
            # would stall every step's launches (a signal takes effect within a window). CPU
            # ranks, whose steps are slow and whose agreeing waits for nothing, every step.
            stop = (dist.any_rank(stop_flag.raised, ctx)
                    if at_check or ctx.world_size == 1 or ctx.device.type == "cpu" else False)
            if stop or at_check:
                _check_losses(pending_losses, run)
                pending_losses = []
                elapsed = run.totals["seconds"] + time.perf_counter() - run.epoch_started
                bar.set_postfix(format_postfix(
                    float(run.totals["loss"]) / max(run.totals["images"], 1),
                    run.schedule.lr_at(run.step - 1), run.totals["images"] / max(elapsed, 1e-9),
                ))
            if at_window:  # not at a stop nor a cut: a resumed run, or one given a higher
                _report_train_error(run)  # limit, must see the same windows
            if stop:
                _stop_clock(run)
                _save_interrupted(run, stop_flag.signal_number)
    return run.totals["seconds"] + time.perf_counter() - run.epoch_started


def _stop_clock(run: Run) -> None:
    """The epoch's training seconds so far into its totals, before its state is saved."""
    run.totals["seconds"] += time.perf_counter() - run.epoch_started


def _optimizer_step(run: Run, batches: Iterator) -> torch.Tensor:
    """One optimizer step over accum_steps micro-batches; returns its mean loss (on device)."""
    config = run.recipe.train
    run.schedule.apply(run.step)
    if run.graphed_step is not None:  # one micro-batch, the update included
        images, targets = next(batches)
        loss_sum, correct = run.graphed_step(*_on_device(run, images, targets))
        images_seen = len(targets)
    else:
        loss_sum, correct, images_seen = _accumulate(run, batches)
        for parameter in run.frozen:
            parameter.grad = None
        if images_seen:  # else every file undecodable: no gradient (fp16's scaler would fail)
            run.precision.step(run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
    if config.filter_rms_radius is not None:  # part of the update: the average sees it
        clamp_filter_rms(run.model, config.filter_rms_radius, run.frozen)
    if _averaging(run):
        run.average.update_parameters(run.model)
    run.step += 1
    run.step_in_epoch += 1
    run.totals["loss"] = run.totals["loss"] + loss_sum
    run.totals["correct"] = run.totals["correct"] + correct
    run.totals["images"] += images_seen
    return loss_sum / max(images_seen, 1)


def _accumulate(run: Run, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gradients of accum_steps micro-batches; their summed loss, correct count and size."""
    config, ctx = run.recipe.train, run.ctx
    loss_sum = torch.zeros((), device=ctx.device)
    correct, images_seen = torch.zeros((), device=ctx.device), 0
    # All read before the first forward: a file that stops the run (--strict, a damaged shard)
    # then stops it between steps, where its state is whole (_save_before_data_error).
    micro_batches = [next(batches) for _ in range(config.accum_steps)]
    for micro, (images, targets) in enumerate(micro_batches):
        run.totals["skipped"] += config.batch_size - len(targets)  # undecodable files
        if not len(targets):
            # The last micro-batch's backward all-reduces the gradients: under torchrun the
            # other ranks would wait for this one's.
            if ctx.world_size > 1 and micro == config.accum_steps - 1:
                raise DataError(
                    f"rank {ctx.rank}: every file of a micro-batch of {config.batch_size} was "
                    "undecodable, and under torchrun no rank can skip the gradient exchange "
                    "the others make: remove or repair the bad files (canon train --strict "
                    "stops at the first one and names it)"
                )
            continue
        # Its share of the step's nominal images: with undecodable files skipped every image
        # still weighs alike, here and (DDP averaging ranks) across ranks.
        share = len(targets) / (config.batch_size * config.accum_steps)
        with dist.sync_context(run.train_module, sync=micro == config.accum_steps - 1):
            micro_loss, micro_correct = _forward_backward(
                run, *_on_device(run, images, targets), share)
        loss_sum = loss_sum + micro_loss
        correct = correct + micro_correct
        images_seen += len(targets)
    return loss_sum, correct, images_seen


def _on_device(run: Run, images: torch.Tensor, targets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(run.ctx.device, non_blocking=True)
    if run.recipe.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(run.ctx.device, non_blocking=True)


def _forward_backward(run: Run, images: torch.Tensor, targets: torch.Tensor, share: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, the loss (with GoogLeNet's auxiliary ones) and backward of one micro-batch,
    its mean loss weighted by its `share` of the step; its summed loss (detached) and correct
    count."""
    with run.precision.autocast():
        logits, aux_logits = run.train_module(images)
        loss = classification_loss(run.criterion, logits, aux_logits, targets,
                                   run.recipe.train.aux_loss_weight)
    run.precision.backward(loss * share)
    return loss.detach() * len(targets), (logits.argmax(1) == targets).sum()


def graphed_step(run: Run) -> GraphedStep:
    """train.cuda_graph's step: forward, backward and the SGD update of one batch."""

    def step(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = _forward_backward(run, images, targets, 1.0)
        run.precision.step(run.optimizer)
        return outputs

    return GraphedStep(step, run.model, run.optimizer, run.recipe.train.batch_size,
                       capture=run.ctx.device.type == "cuda")


def _averaging(run: Run) -> bool:
    """Whether this step's weights go into the average: every step for EMA, from the end of
    epoch train.polyak_after_epochs on for Polyak averaging."""
    start = run.recipe.train.polyak_after_epochs
    return run.average is not None and (start is None or run.epoch >= start)


def _report_train_error(run: Run) -> None:
    """Give a warm-up that ends on the training error (ResNet-110) the top-1 error of the
    steps since the last check, all ranks together. Read only while that warm-up runs: the
    one device sync rides on the loss check's."""
    totals = run.totals
    if run.schedule.awaits_train_error(run.step):
        correct, images = dist.all_reduce_sum(torch.tensor(
            [float(totals["correct"] - totals["checked_correct"]),
             totals["images"] - totals["checked_images"]], dtype=torch.float64,
        ), run.ctx).tolist()
        run.schedule.observe_train_error(error_percent(correct, max(images, 1)), run.step)
    totals["checked_correct"], totals["checked_images"] = totals["correct"], totals["images"]


def _check_losses(pending: list[tuple[int, torch.Tensor]], run: Run) -> None:
    """Stop on a NaN/inf loss (one device sync for all pending steps), every process alike
    when any of them saw one (the others would wait for it in their next collective); log
    them otherwise."""
    if not pending:
        return
    values = torch.stack([loss for _, loss in pending]).float().cpu()
    counts = [step + 1 for step, _ in pending]  # the 1st, 2nd, ... step, as the progress bar
    bad = (~torch.isfinite(values)).nonzero()
    if dist.any_rank(bool(len(bad)), run.ctx):
        where = (f"became {values[int(bad[0])].item()} at optimizer step {counts[int(bad[0])]}"
                 if len(bad) else
                 f"became NaN or infinite on another process by optimizer step {counts[-1]}")
        raise NonFiniteError(
            f"the loss {where}; stopping. {newest_checkpoint_note(run)}. {divergence_remedy(run)}"
        )
    if run.events is not None:
        for (step, _), count, value in zip(pending, counts, values.tolist(), strict=True):
            run.events.add_scalar("train/loss", value, count)  # x: steps done, as epoch/*
            run.events.add_scalar("train/lr", run.schedule.lr_at(step), count)


def _save_interrupted(run: Run, signal_number: int) -> NoReturn:
    path = ckpt.interrupted_checkpoint(run.run_dir)
    state = snapshot(run)  # every rank takes part: it gathers their random states
    if run.ctx.is_main:
        ckpt.save_checkpoint(state, path)
    dist.barrier(run.ctx)
    raise TrainingInterrupted(path, signal_number)


def _save_before_data_error(run: Run, error: DataError) -> NoReturn:
    """A file that stops a one-process run mid-epoch or in its validation (--strict, a damaged
    shard): the epoch's steps before it are saved in interrupted.pt, to resume from once the
    data is mended, rather than lost back to the last epoch's checkpoint."""
    path = ckpt.interrupted_checkpoint(run.run_dir)
    ckpt.save_checkpoint(snapshot(run), path)
    raise DataError(f"{canon_message(error)}; the {run.step} steps before it are saved in "
                    f"{path}: mend the data, then resume the run (canon train --resume "
                    f"{run.run_dir})") from error


# ---- end of an epoch: validate, schedule, checkpoint, log ----------------------------------


def _share_rank0_buffers(run: Run) -> None:
    """Rank 0's batch-norm statistics (and average) on every rank: each rank then scores its
    shard with the model that rank 0 saves (see canon.engine.distributed). Not the average's
    step count, which torch keeps on the CPU, where an NCCL group cannot send it: every rank
    counts the same steps."""
    dist.broadcast_buffers(run.model, run.ctx)
    if run.average is not None:
        dist.broadcast_buffers(run.average.module, run.ctx)


def _end_epoch(run: Run, train_seconds: float) -> None:
    """Validate, log and checkpoint the epoch. Where the iteration limit cut it short, the run
    ends there, but its state stays that of the middle of the epoch (as interrupted.pt's), its
    row to be replaced: a resume with a higher limit finishes the epoch as an uncut run does,
    the same images in the same order."""
    ctx, totals = run.ctx, run.totals
    cut = run.step_in_epoch < run.steps_per_epoch
    check_weights(run)  # before validation, whose NaN scores would say less
    _share_rank0_buffers(run)
    try:
        val_top1, val_top5, scored = validate(validated_model(run), run.val_loader, ctx,
                                              run.precision)
    except DataError as error:  # --strict's undecodable image, a damaged shard: not the epoch
        if ctx.world_size > 1:  # (the other ranks may be validating still: none saves alone)
            raise
        run.totals["seconds"] = train_seconds
        _save_before_data_error(run, error)
    if scored < run.val_size and ctx.is_main:
        warnings.warn(f"epoch {run.epoch + 1}: {run.val_size - scored} of the {run.val_size} "
                      "validation images could not be decoded (see the warnings); its "
                      f"validation error is over the other {scored}", stacklevel=2)
    trained_at = run.schedule.lr_at(run.step - 1)  # a plateau cut below is for the next epoch
    if not cut:  # a plateau is judged on whole epochs
        run.schedule.end_epoch(val_top1)
    loss, correct, images, skipped = dist.all_reduce_sum(torch.tensor(
        [float(totals["loss"]), float(totals["correct"]), totals["images"], totals["skipped"]],
        dtype=torch.float64,
    ), ctx).tolist()
    if not images:  # every batch came out empty: no loss to report, nothing learnt
        raise DataError(
            f"no training image of {run.recipe.data.dataset} could be decoded in epoch "
            f"{run.epoch + 1} (see the warnings; {int(skipped)} skipped): check the folder")
    row = {
        "epoch": run.epoch + 1, "step": run.step, "lr": trained_at,  # step: optimizer steps so far
        "train_loss": loss / images, "train_top1_error": error_percent(correct, images),
        "val_top1_error": val_top1, "val_top5_error": val_top5,
        "images_per_second": images / max(train_seconds, 1e-9),
        "seconds": totals["seconds"] + time.perf_counter() - run.epoch_started,
        "skipped_images": int(skipped), "val_skipped_images": run.val_size - scored,
    }
    run.metrics.append(row)
    if cut:  # a resume goes on with these totals, as from interrupted.pt
        run.cut_short, run.totals["seconds"] = True, train_seconds
    else:
        run.epoch, run.step_in_epoch, run.totals = run.epoch + 1, 0, new_totals()
    state = snapshot(run)
    if ctx.is_main:
        is_best = not (run.validates_on_test_set or cut) and val_top1 < run.best_error
        save_epoch(run.run_dir, state, row, is_best, run.recipe.train)
        write_metrics_csv(run.run_dir / "metrics.csv", run.metrics)
        if run.events is not None:
            write_epoch_events(run.events, row, run.step)
        print(epoch_summary(row, run.epochs), flush=True)
    if not cut:  # best.pt is chosen among whole epochs: a resume replaces a cut one's row
        run.best_error = min(run.best_error, val_top1)
    dist.barrier(ctx)


__all__ = ["TrainResult", "TrainingInterrupted", "train", "validate"]
