"""What a training run saves: its complete state for a checkpoint (every rank's random
generators and epoch sums gathered), the epoch checkpoints with best.pt, and the export
(model.safetensors, normalization, eval_config.json); never non-finite weights."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from canon.data.shards import ShardImages
from canon.engine import checkpoint as ckpt
from canon.engine import distributed as dist
from canon.engine.rundir import discard_replaced_run
from canon.engine.setup import Run, loader_workers
from canon.errors import DataError, NonFiniteError
from canon.recipes.schema import TrainSection
from canon.torchrun import launched_by_torchrun


def validated_model(run: Run) -> nn.Module:
    """The averaged weights once averaging has begun, else the raw ones."""
    if run.average is not None and run.average.n_averaged > 0:
        return run.average.module
    return run.model


def check_weights(run: Run) -> None:
    """Refuse to checkpoint NaN/inf weights (one sync per device: a pipeline's stages sit on
    several): a finite loss can still end in an update that overflows, and a checkpoint is a
    promise that the run can go on from it."""
    models = [run.model] if run.average is None else [run.model, run.average]
    finite: dict[torch.device, list[torch.Tensor]] = {}
    for m in models:
        for t in m.state_dict().values():
            if t.is_floating_point():
                finite.setdefault(t.device, []).append(torch.isfinite(t).all())
    # Agreed: a rank's own BN statistics can overflow alone, and a rank raising alone would
    # leave the others waiting in their next collective.
    here = all(bool(torch.stack(flags).all()) for flags in finite.values())
    if not dist.any_rank(not here, run.ctx):
        return
    raise NonFiniteError(
        f"the weights became NaN or infinite{' on another process' if here else ''} by "
        f"optimizer step {run.step}; stopping "
        f"without saving them. {newest_checkpoint_note(run)}. {divergence_remedy(run)}"
    )


def divergence_remedy(run: Run) -> str:
    """What to change when a run diverged: the lr, fp16, and the warm-up key the recipe uses
    (warmup_iterations, where set, overrides warmup_epochs)."""
    iterations, epochs = run.recipe.schedule.warmup_iterations, run.recipe.schedule.warmup_epochs
    if iterations:
        warmup = f"a longer warm-up (--set schedule.warmup_iterations={2 * iterations})"
    elif epochs:
        warmup = f"a longer warm-up (--set schedule.warmup_epochs={2 * epochs:g})"
    else:
        warmup = "a warm-up (--set schedule.warmup_epochs=5)"
    fp16 = ", use --amp bf16 instead of fp16" if run.recipe.train.amp == "fp16" else ""
    return f"Lower the learning rate (--lr, optimizer.lr){fp16}, or give it {warmup}"


def newest_checkpoint_note(run: Run) -> str:
    """Every checkpoint on disk passed check_weights, so the newest is one to go back to: this
    run's, else the one it went on from."""
    saved = ckpt.resumable_checkpoints(run.run_dir) if run.run_dir.is_dir() else []
    if saved:
        return f"The newest checkpoint, {saved[0]}, is finite (canon train --resume {saved[0]})"
    if run.resumed_from is not None:
        return (f"The checkpoint it went on from, {run.resumed_from}, is finite (canon train "
                f"--resume {run.resumed_from} --output-dir {run.run_dir})")
    return "No checkpoint was written before it"


def snapshot(run: Run) -> dict[str, Any]:
    """The complete training state. Every rank must call it: it gathers each rank's random
    generator states and epoch totals so far (a resumed run restores them rank by rank).
    NonFiniteError if the weights are not finite."""
    check_weights(run)
    per_rank = dist.all_gather_object(
        {"rng": ckpt.capture_rng_state(), "totals": _plain(run.totals),
         "workers": loader_workers(run.recipe.train)}, run.ctx
    )
    return {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(), "scaler": run.precision.state_dict(),
        # The average ("ema" for any kind), None until averaging has begun.
        "ema": run.average.state_dict() if validated_model(run) is not run.model else None,
        "epoch": run.epoch, "step": run.step, "step_in_epoch": run.step_in_epoch,
        "epoch_totals": [rank["totals"] for rank in per_rank],
        "rng": [rank["rng"] for rank in per_rank],
        "metrics": list(run.metrics), "recipe": run.recipe.to_dict(), "commit": run.commit,
        "train_size": run.train_size,
        # Each rank's (each machine picks them for its cores): they deal a shard stream.
        "loader_workers": [rank["workers"] for rank in per_rank],
        "train_shards": (run.train_order.layout() if isinstance(run.train_order, ShardImages)
                         else None),
        "model_name": run.recipe.model.name, "model_options": run.model.build_options(),
        "classes": run.classes, "class_ids": run.class_ids,
        "normalization": run.normalization,
        "torch_version": str(torch.__version__),
        # An elastic restart resumes only what its own launch saved (rundir.plan_run).
        "launch": dist.elastic_run_id() if launched_by_torchrun() else None,
    }


def _plain(totals: dict[str, Any]) -> dict[str, Any]:
    return {key: float(value) if torch.is_tensor(value) else value for key, value in totals.items()}


def save_epoch(
    run_dir: Path, state: dict[str, Any], row: dict[str, Any], is_best: bool,
    config: TrainSection,
) -> None:
    """The epoch's checkpoint (replacing interrupted.pt), best.pt when it is the best, and
    only the newest train.keep_checkpoints epoch checkpoints besides train.keep_epochs'.

    The epoch's checkpoint is written first, then interrupted.pt deleted (resume takes it for
    the newest state: kept past the epoch's write, by a kill or a full disk copying best.pt,
    it would take the run back to before this epoch), then best.pt copied from it: a run killed
    in between resumes from this epoch, and keep_best restores best.pt from it. (Copied first,
    best.pt was left alone by a kill in the first epoch, and no resume goes on from that.)"""
    path = ckpt.epoch_checkpoint(run_dir, row["epoch"])
    ckpt.save_checkpoint(state, path)
    ckpt.interrupted_checkpoint(run_dir).unlink(missing_ok=True)
    if is_best:
        ckpt.copy_checkpoint(path, ckpt.best_checkpoint(run_dir))
    discard_replaced_run(run_dir)  # the run --overwrite replaced: this one has a checkpoint
    ckpt.prune_epoch_checkpoints(run_dir, config.keep_checkpoints, config.keep_epochs)


def keep_best(run: Run, source: Path) -> None:
    """Rank 0 of a run resumed from checkpoint `source`: best.pt of its epochs so far, so
    that the best is still chosen over every epoch. Continued in another directory: copied
    from the run it continues (its best.pt, or the best epoch's checkpoint). In its own:
    restored from the best epoch's checkpoint where a kill between save_epoch's two writes
    left best.pt behind it. Where the run keeps neither (pruned, or it went on past `source`
    to a better epoch) or reads neither (damaged: warned of), the best is chosen among the
    epochs trained from here."""
    if run.validates_on_test_set or not run.metrics:
        return
    best_epoch = min(run.metrics, key=lambda row: row["val_top1_error"])["epoch"]
    source_dir, best = ckpt.run_dir_of(source), ckpt.best_checkpoint(run.run_dir)
    for candidate in (ckpt.best_checkpoint(source_dir),
                      ckpt.epoch_checkpoint(source_dir, best_epoch)):
        if not candidate.is_file():
            continue
        try:
            state = ckpt.load_checkpoint(candidate, mmap=True)
        except DataError:
            warnings.warn(f"{candidate} is unreadable (damaged?): passed over for best.pt",
                          ckpt.CheckpointWarning, stacklevel=2)
            continue
        if _ends_epoch(state, best_epoch):
            if candidate.resolve() != best.resolve():
                ckpt.copy_checkpoint(candidate, best)
            return
    run.best_error = math.inf


def _ends_epoch(state: dict[str, Any], epoch: int) -> bool:
    """Whether `state` is the end of whole epoch `epoch` (not one cut short inside it)."""
    return state["epoch"] == epoch and state["step_in_epoch"] == 0


def export(run: Run) -> None:
    """model.safetensors (the averaged weights once averaging has begun), normalization,
    eval_config.json."""
    final = validated_model(run)
    recipe = run.recipe.to_dict()
    last = run.metrics[-1] if run.metrics else {}
    ckpt.export_model(run.run_dir, final, run.normalization, {
        **ckpt.model_info(run.recipe.model.name, final, run.num_classes, run.classes,
                          run.class_ids, recipe["data"]),
        "recipe": run.recipe.name, "commit": run.commit,
        "epochs": last.get("epoch", run.epoch), "steps": run.step,  # a cut last epoch counts
        "val_top1_error": last.get("val_top1_error"), "val_top5_error": last.get("val_top5_error"),
        "reported": recipe["reported"],
    })
