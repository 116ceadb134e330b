"""Learning-rate schedules: the papers' step rules, plateau, cosine and warmup, and resuming."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch

from canon.engine.schedules import LearningRateSchedule, linear_scaled_lr, scale_iteration_counts
from canon.errors import ConfigError
from canon.recipes import load_recipe
from canon.recipes.schema import ScheduleSection


def make(config: ScheduleSection, **kwargs) -> LearningRateSchedule:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    defaults = {"peak_lr": 0.1, "base_lr": 0.1, "steps_per_epoch": 100, "total_steps": 1000}
    return LearningRateSchedule(optimizer, config, **{**defaults, **kwargs})


def test_resnet_cifar_multistep_by_iteration_with_constant_warmup():
    schedule = make(ScheduleSection(
        kind="multistep", unit="iteration", milestones=(32000, 48000), warmup_mode="constant",
        warmup_iterations=400, warmup_start_factor=0.1,
    ), steps_per_epoch=390, total_steps=64000)
    assert schedule.lr_at(0) == pytest.approx(0.01)
    assert schedule.lr_at(399) == pytest.approx(0.01)
    assert schedule.lr_at(400) == pytest.approx(0.1)
    assert schedule.lr_at(31999) == pytest.approx(0.1)
    assert schedule.lr_at(32000) == pytest.approx(0.01)
    assert schedule.lr_at(48000) == pytest.approx(0.001)


def test_a_run_that_ends_before_its_schedule_changes_is_warned_of():
    # `canon train --recipe resnet56-cifar10 --epochs 20`: 7,800 steps, milestones 32k/48k
    config = load_recipe("resnet56-cifar10").schedule
    with pytest.warns(UserWarning, match=r"ends after 7800 steps \(20 epochs\), before it "
                                         r"reaches schedule\.milestones \[32000, 48000\] "
                                         r"\(iterations\): fit the schedule"):
        make(config, steps_per_epoch=390, total_steps=7800)
    epochs = ScheduleSection(kind="multistep", unit="epoch", milestones=(3, 5),
                             warmup_iterations=50)
    with pytest.warns(UserWarning, match=r"milestones \[3, 5\] \(epochs\) and the end of its "
                                         r"50-step warm-up"):
        make(epochs, steps_per_epoch=10, total_steps=40)  # 4 epochs: step 39 is in epoch 3
    with pytest.warns(UserWarning, match=r"50-step warm-up"):  # steps 0-49 all warm up
        make(dataclasses.replace(epochs, milestones=(1,)), steps_per_epoch=10, total_steps=50)
    step = ScheduleSection(kind="step", unit="epoch", step_size=8)
    with pytest.warns(UserWarning, match=r"schedule\.step_size 8 \(epochs\)"):
        make(step, steps_per_epoch=10, total_steps=80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(config, steps_per_epoch=390, total_steps=48001)  # step 48000 is the run's last
        make(epochs, steps_per_epoch=10, total_steps=51)
        make(step, steps_per_epoch=10, total_steps=81)


def test_resnet110_warms_up_at_001_until_the_training_error_is_below_80_percent():
    """He et al. 2015 s4.2: 0.01 "until the training error is below 80% (about 400
    iterations), and then go back to 0.1"; the 400 iterations are only the latest end."""
    config = load_recipe("resnet110-cifar10").schedule
    schedule = make(config, steps_per_epoch=390, total_steps=64000)
    for step, error in ((10, 90.0), (20, 85.5), (30, 80.0)):  # 80.0 is not below 80%
        schedule.observe_train_error(error, step)
        assert schedule.awaits_train_error(step)
        assert schedule.lr_at(step) == pytest.approx(0.01)
    schedule.observe_train_error(79.2, 40)
    assert not schedule.awaits_train_error(40)
    assert schedule.lr_at(39) == pytest.approx(0.01)
    assert schedule.lr_at(40) == schedule.lr_at(399) == pytest.approx(0.1)
    schedule.observe_train_error(95.0, 50)  # once ended, the warm-up stays over
    assert schedule.lr_at(50) == pytest.approx(0.1)
    assert schedule.lr_at(32000) == pytest.approx(0.01)  # the milestones are unchanged

    # State round trip: a resumed run keeps where the warm-up ended; an older checkpoint,
    # from before the key existed, loads as not ended.
    resumed = make(config, steps_per_epoch=390, total_steps=64000)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.lr_at(40) == pytest.approx(0.1) and not resumed.awaits_train_error(40)
    older = {k: v for k, v in schedule.state_dict().items() if k != "warmup_ended_at"}
    resumed.load_state_dict(older)
    assert resumed.lr_at(40) == pytest.approx(0.01) and resumed.awaits_train_error(40)

    # Fallback: an error that never falls below 80% ends the warm-up at 400 iterations.
    stuck = make(config, steps_per_epoch=390, total_steps=64000)
    for step in range(10, 400, 10):
        stuck.observe_train_error(88.0, step)
    assert stuck.lr_at(399) == pytest.approx(0.01)
    assert not stuck.awaits_train_error(400) and stuck.lr_at(400) == pytest.approx(0.1)
    stuck.observe_train_error(10.0, 410)
    assert stuck.warmup_ended_at is None  # reports after the cap change nothing


def test_a_warmup_that_ends_on_the_training_error_needs_a_constant_warmup_and_a_cap():
    with pytest.raises(ConfigError, match="warmup_until_train_error needs"):
        ScheduleSection(warmup_until_train_error=80.0, warmup_mode="constant")
    with pytest.raises(ConfigError, match="warmup_until_train_error needs"):
        ScheduleSection(warmup_until_train_error=80.0, warmup_iterations=400)  # linear
    with pytest.raises(ConfigError, match="in percent"):
        ScheduleSection(warmup_until_train_error=-5.0, warmup_mode="constant",
                        warmup_iterations=400)


def test_warmup_from_the_base_lr_starts_at_the_unscaled_rate():
    config = ScheduleSection(warmup_epochs=1, warmup_start="base_lr")
    ramp = make(config, peak_lr=0.8, base_lr=0.1)  # k = 8
    assert ramp.lr_at(0) == pytest.approx(0.1)
    assert ramp.lr_at(50) == pytest.approx(0.45)
    assert ramp.lr_at(100) == pytest.approx(0.8)
    # At or below the base batch there is nothing to warm up from.
    assert make(config, peak_lr=0.05, base_lr=0.1).lr_at(0) == pytest.approx(0.05)


def test_step_by_epoch_googlenet():
    schedule = make(ScheduleSection(kind="step", step_size=8, gamma=0.96))
    assert schedule.lr_at(799) == pytest.approx(0.1)
    assert schedule.lr_at(800) == pytest.approx(0.096)
    assert schedule.lr_at(1600) == pytest.approx(0.1 * 0.96**2)


def test_cosine_with_linear_warmup():
    schedule = make(ScheduleSection(
        kind="cosine", warmup_epochs=1, warmup_start_factor=0.0, min_lr=0.001
    ))
    assert schedule.lr_at(0) == 0.0
    assert schedule.lr_at(50) == pytest.approx(0.05)
    assert schedule.lr_at(100) == pytest.approx(0.1)
    assert schedule.lr_at(550) == pytest.approx(0.001 + 0.099 * 0.5)
    assert schedule.lr_at(1000) == pytest.approx(0.001)
    lrs = [schedule.lr_at(s) for s in range(100, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    # min_lr is at the base batch, as the lr: at a sixteenth of it both are a sixteenth (a
    # floor above the scaled peak would make the "decay" climb).
    small = make(ScheduleSection(kind="cosine", min_lr=0.01), peak_lr=0.1 / 16, base_lr=0.1)
    assert small.lr_at(1000) == pytest.approx(0.01 / 16)
    assert small.lr_at(500) == pytest.approx((0.01 + 0.09 * 0.5) / 16, rel=1e-2)


def test_plateau_divides_by_ten_after_patience_at_most_max_reductions_times():
    schedule = make(ScheduleSection(kind="plateau", patience=1, max_reductions=2))
    errors = [50, 40, 41, 41, 39, 39, 39, 39, 39, 39]
    cuts = [schedule.end_epoch(e) for e in errors]
    assert cuts == [False, False, False, True, False, False, True, False, False, False]
    assert schedule.lr_at(0) == pytest.approx(0.001)


def test_apply_sets_every_group_and_state_round_trips():
    """Each group at the schedule's lr times its lr_scale (fine-tuning's backbone, 0.1)."""
    schedule = make(ScheduleSection(kind="plateau", patience=0))
    backbone = torch.nn.Parameter(torch.zeros(1))
    schedule.optimizer.add_param_group({"params": [backbone], "lr_scale": 0.1})
    schedule.end_epoch(10.0)
    schedule.end_epoch(12.0)  # cut once
    lr = schedule.apply(5)
    assert lr == pytest.approx(0.01)
    assert [group["lr"] for group in schedule.optimizer.param_groups] == [lr, lr * 0.1]
    fresh = make(ScheduleSection(kind="plateau", patience=0))
    fresh.load_state_dict(schedule.state_dict())
    assert fresh.lr_at(5) == lr and fresh.best_error == 10.0
    assert math.isinf(make(ScheduleSection(kind="plateau")).best_error)


def test_linear_scaling_rule():
    assert linear_scaled_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert linear_scaled_lr(0.1, 64, 128) == pytest.approx(0.05)  # quickstart: batch 64


def test_iteration_counts_scale_with_the_global_batch():
    recipe = load_recipe("resnet110-cifar10")  # 32k/48k/64k and 400 warmup at batch 128
    schedule, iterations = recipe.schedule, recipe.train.iterations
    assert scale_iteration_counts(schedule, iterations, 128, 128) == (schedule, iterations)
    doubled, limit = scale_iteration_counts(schedule, iterations, 128, 256)
    assert (doubled.milestones, doubled.warmup_iterations, limit) == ((16000, 24000), 200, 32000)
    halved, limit = scale_iteration_counts(schedule, iterations, 128, 64)
    assert (halved.milestones, halved.warmup_iterations, limit) == ((64000, 96000), 800, 128000)
    # At batch 256 the lr is cut after as many images as at batch 128: 32k x 128 = 16k x 256.
    lr = make(doubled, steps_per_epoch=195, total_steps=limit).lr_at
    assert (lr(15999), lr(16000), lr(24000)) == pytest.approx((0.1, 0.01, 0.001))
    # Epoch-based values and iteration-free schedules are left alone.
    by_epoch = ScheduleSection(kind="step", step_size=8, warmup_epochs=5)
    assert scale_iteration_counts(by_epoch, None, 256, 1024) == (by_epoch, None)
    by_iteration = ScheduleSection(kind="step", unit="iteration", step_size=3)
    assert scale_iteration_counts(by_iteration, 5, 256, 1024)[0].step_size == 1  # never 0
