"""Learning-rate schedules, the papers' and today's, as one small object with a state dict:
the lr at optimizer step t is `peak_lr x warmup(t) x decay(t)`, set every step from the step
count alone (plus the state a plateau schedule or a warm-up that ends on the training error
keeps), so resuming at any step gives the same lr sequence."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from canon.recipes.schema import ScheduleSection


def linear_scaled_lr(lr: float, global_batch_size: int, base_batch_size: int) -> float:
    """Goyal et al. 2017 s2.1: "when the minibatch size is multiplied by k, multiply the
    learning rate by k" (`lr` is stated for `base_batch_size` images per step)."""
    return lr * global_batch_size / base_batch_size


def scale_iteration_counts(
    schedule: ScheduleSection, iterations: int | None, base_batch_size: int,
    global_batch_size: int,
) -> tuple[ScheduleSection, int | None]:
    """The schedule's iteration counts and the iteration limit, stated for `base_batch_size`
    images per step, as steps of `global_batch_size` images (the same images seen): ResNet
    CIFAR's 32k/48k/64k at batch 128 become 16k/24k/32k at batch 256."""
    if global_batch_size == base_batch_size:
        return schedule, iterations
    factor = base_batch_size / global_batch_size

    def steps(count: int) -> int:
        return max(1, round(count * factor))

    changes: dict[str, Any] = {}
    if schedule.warmup_iterations:
        changes["warmup_iterations"] = steps(schedule.warmup_iterations)
    if schedule.unit == "iteration" and schedule.kind == "multistep":
        changes["milestones"] = tuple(steps(m) for m in schedule.milestones)
    if schedule.unit == "iteration" and schedule.kind == "step":
        changes["step_size"] = steps(schedule.step_size)
    scaled_iterations = None if iterations is None else steps(iterations)
    return dataclasses.replace(schedule, **changes), scaled_iterations


class LearningRateSchedule:
    """Decay: `plateau` divides by 1/gamma (10 in every paper) when the validation top-1 error
    has not improved for more than `patience` epochs (Krizhevsky et al. 2012 s5, Simonyan &
    Zisserman 2014 s3.1, He et al. 2015 s3.4), at most `max_reductions` times (AlexNet and
    VGG: three);
    `step` multiplies by gamma every `step_size` epochs or iterations (GoogLeNet s6: 0.96 every
    8 epochs); `multistep` at each milestone (ResNet CIFAR s4.2: 32k and 48k iterations);
    `cosine` is half a cosine from peak_lr to min_lr after warmup (Loshchilov & Hutter 2017,
    no restarts; min_lr scaled as the lr is); `constant`.

    Warmup over `warmup_iterations` (or `warmup_epochs`) from a start lr: warmup_start_factor
    x peak, or with `warmup_start: base_lr` the unscaled `base_lr` (optimizer.lr, at most the
    peak; Goyal et al. 2017 s2.2: "we start from a learning rate of eta and increment it by a
    constant amount at each iteration such that it reaches eta-hat = k eta after 5 epochs").
    `linear` ramps from the start to peak (Goyal et al. 2017); `constant` holds the start,
    then jumps to peak. With `warmup_until_train_error` a constant warm-up ends as soon as
    the trainer reports (`observe_train_error`) a training error below it, the iteration
    count being the latest it ends (He et al. 2015 s4.2, ResNet-110: "we use 0.01 to warm up
    the training until the training error is below 80% (about 400 iterations), and then go
    back to 0.1"); the step where it ended is part of the state dict.

    Momentum: torch.optim.SGD keeps u = m u + g and steps w -= lr u, Goyal et al.'s reference
    form (s3, eq. 9), in which u does not depend on the lr; their "momentum correction" (s3,
    Remark 3) only makes the lr-folded form v = m v + lr g (eq. 10) equal to it when the lr
    changes, so setting a new lr each step needs no correction here."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: ScheduleSection,
        *,
        peak_lr: float,
        base_lr: float,
        steps_per_epoch: int,
        total_steps: int,
    ) -> None:
        self.optimizer = optimizer
        self.config = config
        self.peak_lr = peak_lr
        self.warmup_start_factor = (
            min(1.0, base_lr / peak_lr) if config.warmup_start == "base_lr"
            else config.warmup_start_factor
        )
        # min_lr is stated, as optimizer.lr is, at optimizer.base_batch_size: the linear
        # scaling rule scales it with the peak, so the floor stays the same fraction of it.
        self.floor = config.min_lr / base_lr
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = max(1, total_steps)
        self.warmup_steps = config.warmup_iterations or round(
            config.warmup_epochs * self.steps_per_epoch
        )
        _warn_of_unreached_changes(config, self.steps_per_epoch, self.total_steps,
                                   self.warmup_steps)
        # The state that depends on the run's history: where an error-ended warm-up ended ...
        self.warmup_ended_at: int | None = None
        # ... and the plateau schedule's.
        self.reductions = 0
        self.best_error = math.inf
        self.epochs_without_improvement = 0

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        return self.peak_lr * self._warmup_factor(step) * self._decay_factor(step)

    def apply(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # fine-tuning's backbone rate
        return lr

    def end_epoch(self, val_top1_error: float) -> bool:
        """Feed the epoch's validation error to a plateau schedule; True if it cut the lr."""
        if self.config.kind != "plateau":
            return False
        if val_top1_error < self.best_error - self.config.threshold:
            self.best_error = val_top1_error
            self.epochs_without_improvement = 0
            return False
        self.epochs_without_improvement += 1
        limit = self.config.max_reductions
        if self.epochs_without_improvement > self.config.patience and (
            limit is None or self.reductions < limit
        ):
            self.reductions += 1
            self.epochs_without_improvement = 0
            return True
        return False

    def awaits_train_error(self, step: int) -> bool:
        """True while a warm-up that ends on the training error runs at optimizer step `step`."""
        return (
            self.config.warmup_until_train_error is not None
            and self.warmup_ended_at is None
            and step < self.warmup_steps
        )

    def observe_train_error(self, train_top1_error: float, step: int) -> None:
        """The training top-1 error (%) of the steps before optimizer step `step`: below
        warmup_until_train_error, it ends the warm-up, and step `step` is taken at peak."""
        threshold = self.config.warmup_until_train_error
        if self.awaits_train_error(step) and train_top1_error < threshold:
            self.warmup_ended_at = step

    def _warmup_factor(self, step: int) -> float:
        ended = self.warmup_ended_at is not None and step >= self.warmup_ended_at
        if step >= self.warmup_steps or ended:
            return 1.0
        start = self.warmup_start_factor
        if self.config.warmup_mode == "constant":
            return start
        return start + (1.0 - start) * step / self.warmup_steps

    def _decay_factor(self, step: int) -> float:
        config = self.config
        count = step if config.unit == "iteration" else step // self.steps_per_epoch
        if config.kind == "plateau":
            return config.gamma**self.reductions
        if config.kind == "step":
            return config.gamma ** (count // config.step_size)
        if config.kind == "multistep":
            return config.gamma ** sum(count >= milestone for milestone in config.milestones)
        if config.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0, step - self.warmup_steps) / span)
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_ended_at": self.warmup_ended_at,
            "reductions": self.reductions,
            "best_error": self.best_error,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup_ended_at = state.get("warmup_ended_at")  # absent from older checkpoints
        self.reductions = int(state["reductions"])
        self.best_error = float(state["best_error"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])


def _warn_of_unreached_changes(config: ScheduleSection, steps_per_epoch: int, total_steps: int,
                               warmup_steps: int) -> None:
    """A warning when the run ends before a change its schedule names: e.g. `canon train
    --epochs 20` on a recipe whose milestones are the paper's 32k and 48k iterations trains at
    a constant rate, which is rarely what was meant."""
    last = total_steps - 1 if config.unit == "iteration" else (total_steps - 1) // steps_per_epoch
    unreached = []
    if config.kind == "multistep" and any(m > last for m in config.milestones):
        unreached.append(f"schedule.milestones {list(config.milestones)} ({config.unit}s)")
    if config.kind == "step" and config.step_size > last:
        unreached.append(f"schedule.step_size {config.step_size} ({config.unit}s)")
    if warmup_steps >= total_steps:  # the peak rate comes at step warmup_steps
        unreached.append(f"the end of its {warmup_steps}-step warm-up")
    if unreached:
        warnings.warn(
            f"the run ends after {total_steps} steps ({total_steps / steps_per_epoch:g} epochs), "
            f"before it reaches {' and '.join(unreached)}: fit the schedule to the run "
            "(schedule.*) or lengthen the run", stacklevel=3)
