"""The training runs of an experiment: each recipe and seed as a mode shortens it, in its own
run directory under the reproduction's runs/ folder, shared by every experiment that needs the
same run (the degradation runs serve Fig. 7's responses and Table 6's first seed). A finished
run (its export written) is read, not trained again; an interrupted one resumes from its
newest checkpoint (canon.engine.checkpoint.load_for_resume), bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from canon.data.datasets import is_dataset_name
from canon.data.labeled import ImageSubset
from canon.data.loaders import Datasets, build_datasets
from canon.engine.checkpoint import EXPORT_CONFIG, EXPORT_WEIGHTS, resumable_checkpoints
from canon.engine.rundir import anchored_recipe, holds_results, recorded_commit
from canon.engine.schedules import scale_iteration_counts
from canon.engine.trainer import train
from canon.errors import ConfigError, DataError
from canon.recipes import Recipe, apply_overrides, flat_values, load_recipe, read_yaml_mapping
from canon.recipes.schema import SECTIONS, SPEED_ONLY_KEYS
from canon.reproduce.experiments import Experiment, Mode
from canon.validation import plain
from canon.visualize.curves import metrics_file, read_metrics


@dataclass(frozen=True)
class PlannedRun:
    recipe: Recipe  # as the mode shortens it
    seed: int
    run_dir: Path  # named RECIPE[-MODE][-AMP]-seedN
    precision: str = ""  # the AMP it is named with: --amp, where it is not the recipe's own

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass(frozen=True)
class RunRecord:
    """A finished run: what this call did with it and what its metrics.csv says."""

    run: PlannedRun
    status: str  # "trained", "resumed" or "finished before"
    wall_seconds: float | None  # of this call's training; None when it had nothing to do
    epochs: int
    epoch_seconds: float  # metrics.csv's seconds summed: training and each epoch's
    # validation, every session
    commit: str | None  # the commit that last trained it (its recipe.yaml's header)
    train_error: float  # final epoch's top-1 training error (%), over its augmented batches
    test_error: float  # the final model's top-1 test error (%)
    # The images behind train_error: the final epoch's steps x batch (None for a run logged
    # before canon recorded steps)
    train_images: int | None = None


def plan_runs(experiment: Experiment, mode: Mode, runs: int | None, root: Path,
              data: str | None = None, amp: str | None = None) -> list[PlannedRun]:
    """Every (recipe, seed) run of `experiment` in `mode`, with seeds 0 .. runs - 1, on the
    folder `data` when given, in autocast precision `amp` (train.amp) when given. A run in
    another precision than its recipe's computes other numbers: another run, in a folder
    named with the precision."""
    if runs is not None and experiment.runs is None:
        raise ConfigError(f"{experiment.name} trains one run per recipe; --runs applies to "
                          "experiments that compare seeds (canon reproduce --list)")
    count = experiment.runs if runs is None else runs
    if count is not None and count < experiment.min_runs:
        raise ConfigError(f"{experiment.name} needs --runs {experiment.min_runs} at least, "
                          f"got {count}")
    if data is not None and mode.dataset is not None:
        raise ConfigError(f"--{mode.name} trains {experiment.name} on {mode.dataset}; --data "
                          "applies where a mode keeps the recipes' dataset")
    if data is not None and not Path(data).is_dir():  # a name (sample) is another dataset
        dataset = _recipes_dataset(experiment)
        named = (f"; leave --data out for canon's copy of {dataset} (downloaded when absent)"
                 if is_dataset_name(dataset) else "")
        raise ConfigError(f"--data {data}: not a folder; {experiment.name} trains on the "
                          f"folder of its recipes' dataset ({dataset}){named}")
    planned = []
    for name in experiment.recipes_in(mode.name):
        for seed in range(count or 1):
            recipe = shortened_recipe(name, mode, seed, data)
            # A mode that leaves a run as the full mode has it (imagenette's quick: its
            # 5-epoch run alone) shares the full mode's folder, so neither trains it again.
            same = (recipe == shortened_recipe(name, experiment.mode("full"), seed, data)
                    and mode.train_images is None and mode.test_images is None)
            suffix = "" if same else f"-{mode.name}"
            precision = amp if amp is not None and amp != recipe.train.amp else ""
            if precision:
                recipe = apply_overrides(recipe, [("train.amp", amp)])
                suffix += f"-{amp}"
            planned.append(PlannedRun(recipe, seed, root / f"{name}{suffix}-seed{seed}",
                                      precision))
    return planned


def _recipes_dataset(experiment: Experiment) -> str:
    return load_recipe(experiment.recipes[0]).data.dataset


def shortened_recipe(name: str, mode: Mode, seed: int, data: str | None = None) -> Recipe:
    """Recipe `name` with train.seed `seed` (on the folder `data` when given), shortened as
    `mode` says."""
    dataset = mode.dataset or data
    recipe = anchored_recipe(load_recipe(name, [
        ("train.seed", seed), *([] if dataset is None else [("data.dataset", dataset)]),
        *mode.overrides, *mode.recipe_overrides.get(name, ())]))
    if mode.iterations is None:
        return recipe
    if recipe.train.iterations is None:
        raise ConfigError(f"{name} has no train.iterations: a mode shortens iteration counts")
    # The conversion a larger batch makes (same images seen), by the ratio of the limits.
    schedule, iterations = scale_iteration_counts(
        recipe.schedule, recipe.train.iterations, mode.iterations, recipe.train.iterations)
    if mode.warmup_iterations and not (schedule.warmup_iterations or schedule.warmup_epochs):
        schedule = dataclasses.replace(schedule, warmup_iterations=mode.warmup_iterations,
                                       warmup_mode="linear", warmup_start="factor",
                                       warmup_start_factor=0.1)
    # The iteration limit is the run's length (the trainer then ignores epochs). epochs is
    # still the most the limit can take, as runs recorded it in their recipe.yaml when epochs
    # capped the length: finished and interrupted runs are checked against it.
    epochs = math.ceil(iterations * recipe.optimizer.base_batch_size / recipe.train.batch_size)
    return dataclasses.replace(recipe, schedule=schedule, train=dataclasses.replace(
        recipe.train, iterations=iterations, epochs=epochs))


def ensure_run(run: PlannedRun, mode: Mode, *, device: str, progress: bool) -> RunRecord:
    """Train `run`, resume it, or leave it as it is when it has finished."""
    run_dir = run.run_dir
    if finished(run_dir):
        _check_same_recipe(run_dir, run.recipe, finished=True)
        return _record(run, "finished before", None)
    resume = run_dir if resumable_checkpoints(run_dir) else None
    if resume is not None:
        _check_same_recipe(run_dir, run.recipe)
    elif holds_results(run_dir):  # the trainer would advise --overwrite, which this has not
        raise DataError(f"{run_dir} holds results of a run but no checkpoint to resume from: "
                        "delete it to train it again, or choose another --output-dir")
    started = time.perf_counter()
    train(run.recipe, run_dir, resume=resume, device=device, progress=progress,
          datasets=micro_datasets(run.recipe, mode))
    status = "trained" if resume is None else "resumed"
    return _record(run, status, time.perf_counter() - started)


def finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` has ended: the trainer exports the model only once the
    last epoch is done."""
    return (run_dir / EXPORT_WEIGHTS).is_file() and (run_dir / EXPORT_CONFIG).is_file()


def _check_same_recipe(run_dir: Path, recipe: Recipe, *, finished: bool = False) -> None:
    """Refuse to keep or continue a run of another recipe (another mode, an edited recipe).
    A finished run may predate a key that is at its default: its result stands; a run to
    continue may not (the key may change what the rest of it does)."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():  # training writes it first: this folder holds no run of canon's
        raise DataError(f"{run_dir} has a model or checkpoints but no recipe.yaml: not a run "
                        "canon reproduce can check; delete it to train it again, or choose "
                        "another --output-dir")
    saved, ours = flat_values(read_yaml_mapping(path)), flat_values(recipe.to_dict())
    defaults = flat_values(_defaults()) if finished else {}
    differing = sorted(key for key in (saved.keys() | ours.keys()) - SPEED_ONLY_KEYS
                       if not _describes(key)
                       and saved.get(key, defaults.get(key)) != ours.get(key))
    if differing == ["data.dataset"]:
        before = saved.get("data.dataset")
        way = "run without --data" if is_dataset_name(str(before)) else f"pass --data {before}"
        raise ConfigError(
            f"{run_dir} holds a run on {before}, not on {ours.get('data.dataset')}: {way} to "
            "go on with it, or choose another --output-dir for these images"
        )
    if differing:
        raise ConfigError(
            f"{run_dir} holds a run of another recipe ({', '.join(differing)} differ): delete "
            "it to train it again, or choose another --output-dir"
        )


def _describes(key: str) -> bool:
    """A recipe key of words about it (its description, its sources, the paper's numbers the
    report sets beside ours), which edits to the recipe's wording change: not the run's."""
    return key in ("description", "source") or key.startswith("reported.")


def _defaults() -> dict[str, Any]:
    """Every section's defaults, as Recipe.to_dict writes values (the model's but its name,
    which has none)."""
    defaults = {section: plain(kind() if section != "model" else kind(name=""))
                for section, kind in SECTIONS.items()}
    del defaults["model"]["name"]
    return defaults


def micro_datasets(recipe: Recipe, mode: Mode) -> Datasets | None:
    """Micro mode's few images, spread evenly over the splits (so every class is in); None in
    the other modes, which train and validate on the whole splits."""
    if mode.train_images is None or mode.test_images is None:
        return None
    sets = build_datasets(recipe.data)
    return Datasets(_spread(sets.train, mode.train_images), _spread(sets.val, mode.test_images),
                    sets.preprocess)


def _spread(split: Any, count: int) -> ImageSubset:
    indices = torch.linspace(0, len(split) - 1, count).long().tolist()
    return ImageSubset(split, indices, transform=split.transform)


def _record(run: PlannedRun, status: str, wall_seconds: float | None) -> RunRecord:
    columns = read_metrics(metrics_file(run.run_dir),
                           ["epoch", "train_top1_error", "val_top1_error", "seconds"],
                           optional=["step", "skipped_images"])
    steps, skipped = columns["step"], columns["skipped_images"]
    train_images = None
    if steps is not None:  # one process: an optimizer step is batch x accum images
        final_steps = steps[-1] - (steps[-2] if len(steps) > 1 else 0)
        config = run.recipe.train
        train_images = int(final_steps * config.batch_size * config.accum_steps
                           - (skipped[-1] if skipped is not None else 0))
    return RunRecord(run, status, wall_seconds, int(columns["epoch"][-1]),
                     sum(columns["seconds"]), recorded_commit(run.run_dir),
                     columns["train_top1_error"][-1], columns["val_top1_error"][-1],
                     train_images)
