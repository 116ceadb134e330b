"""Which run, and where: `plan_run` decides what a `canon train` command starts or continues
(a new run directory, `--resume`, an elastic restart under torchrun) and with which recipe;
`claim_run_dir` then holds that directory for the run: it locks it against every other canon
run (flock on `.lock`, which the kernel releases when the holder dies, so a killed run never
blocks the next), refuses to mix a new run's files with an earlier run's unless told to replace
them, and sweeps away the temporary files of writes that were killed midway.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canon.data.datasets import anchored_dataset
from canon.engine import distributed
from canon.engine.checkpoint import (
    CHECKPOINT_DIR,
    EXPORT_CONFIG,
    EXPORT_NORMALIZATION,
    EXPORT_WEIGHTS,
    OUTPUT_DIR_ADVICE,
    REPLACED_DIR,
    RESUMED_FROM,
    best_checkpoint,
    holding_run_dir,
    interrupted_checkpoint,
    load_checkpoint,
    load_for_resume,
    replaced_run_note,
    resumable_checkpoints,
    run_dir_of,
    run_epoch_checkpoints,
)
from canon.engine.initialize import INIT_REPORT
from canon.engine.logs import EVENTS_DIR
from canon.engine.trained import TORCHVISION
from canon.errors import CanonError, ConfigError, DataError
from canon.files import locked_folder, make_folder, sweep_partial_writes
from canon.recipes import (
    Recipe,
    apply_overrides,
    load_recipe,
    read_yaml_mapping,
    run_header,
)
from canon.torchrun import launched_by_torchrun

PROBE_REPORT = "probe.json"  # what `canon transfer --mode linear-probe` measured
# Everything a training or transfer run writes into its directory (`canon eval` adds
# eval-*.json and `canon visualize` VISUALIZE_DIR, of its model; a linear probe's features/
# cache stays, checked against its source and data).
VISUALIZE_DIR = "visualize"
# Where those reports go when the run is resumed to train further: its export was their model.
EARLIER_REPORTS = "earlier-reports"
RUN_FILES = ("recipe.yaml", "metrics.csv", "curves.png", EXPORT_WEIGHTS, EXPORT_NORMALIZATION,
             EXPORT_CONFIG, CHECKPOINT_DIR, EVENTS_DIR, INIT_REPORT, PROBE_REPORT)
# Files that show an earlier run got as far as results (besides its checkpoints).
_RESULTS = ("metrics.csv", EXPORT_WEIGHTS, EXPORT_CONFIG)
# The run's own files written atomically: a killed write leaves a temporary file of theirs.
_WRITTEN_WHOLE = tuple(name for name in RUN_FILES if name not in (CHECKPOINT_DIR, EVENTS_DIR))


def recorded_commit(run_dir: Path) -> str | None:
    """The commit that last trained the run in `run_dir`, as its recipe.yaml names it."""
    header = run_header(run_dir / "recipe.yaml")
    commit = header.rpartition(", commit ")[2].rstrip() if header else ""
    return None if commit in ("", "None") else commit


RUNS_ROOT = Path("runs")  # where `canon train` puts run directories by default


@dataclass(frozen=True)
class RunPlan:
    """What a training command runs: the recipe, its directory, and the checkpoint state it
    continues from (None for a new run)."""

    recipe: Recipe
    run_dir: Path
    state: dict[str, Any] | None


DEFAULT_RECIPE = "quickstart"  # what `canon train` trains without --recipe


def plan_run(
    recipe: str | Path | None,
    overrides: Iterable[str | tuple[str, Any]] = (),
    *,
    resume: str | Path | None = None,
    output_dir: Path | None = None,
) -> RunPlan:
    """The run a `canon train` command means.

    A new run: `recipe` (a bundled name or a YAML file; None: DEFAULT_RECIPE) with
    `overrides`, in `output_dir` or a fresh runs/<recipe>[-N]. `resume`: a run directory or
    checkpoint file, or "latest" (the run in `output_dir`, else the newest run of `recipe`
    under runs/); the recipe is the checkpoint's, with `overrides` on top, and a `recipe`
    named beside a path must be the run's. Under torchrun every process picks the same
    directory (runs/<recipe>-<the launch's id>, distributed.elastic_run_id), and an elastic
    restart (the same command again) continues that run from the newest checkpoint its
    launch saved there (not from an earlier launch's run the first attempt was refused to
    replace).
    """
    named, recipe = recipe, DEFAULT_RECIPE if recipe is None else recipe
    if resume is None and launched_by_torchrun():
        name = load_recipe(recipe).name
        output_dir = output_dir or RUNS_ROOT / f"{name}-{distributed.elastic_run_id()}"
        if distributed.elastic_restart_count() > 0 and _saved_by_this_launch(output_dir):
            resume = output_dir
    elif resume not in (None, "latest") and distributed.elastic_restart_count() > 0:
        # A restart replays the command's --resume: the run goes on from where it got to in
        # the directory it writes, not from the checkpoint it started from.
        target = Path(resume)
        writing = output_dir or (target if target.is_dir() else run_dir_of(target))
        if _saved_by_this_launch(writing):
            resume = writing
    if resume is None:
        loaded = anchored_recipe(load_recipe(recipe, overrides))
        return RunPlan(loaded, output_dir or new_run_dir(RUNS_ROOT, loaded.name), None)
    if resume != "latest":
        source = Path(resume)
    elif output_dir is not None:
        source = output_dir
    else:
        source = latest_run_dir(RUNS_ROOT, load_recipe(recipe).name)
    path, state = load_for_resume(source)
    loaded = anchored_recipe(apply_overrides(Recipe.from_dict(state["recipe"], where=str(path)),
                                       overrides))
    if named is not None and load_recipe(named).name != loaded.name:  # --output-dir's run too
        resumed = f"--resume {resume}" if resume != "latest" else f"the run in {source}"
        raise ConfigError(
            f"{resumed} continues a run of {loaded.name}, not of --recipe {named}: "
            "drop --recipe (a resumed run keeps its recipe; --set changes its values), or "
            "start a new run without --resume")
    if output_dir is None and holding_run_dir(path) is None:
        raise ConfigError(  # its folder may be any (Downloads): no run's files are there
            f"{path} is not in a run's {CHECKPOINT_DIR}/ folder, so there is no run directory "
            "to go on in: pass --output-dir DIR, a new folder for the run")
    run_dir = output_dir or run_dir_of(path)
    check_continuation(path, state, Path(source).is_file(), run_dir)
    return RunPlan(loaded, run_dir, state)


def anchored_recipe(recipe: Recipe) -> Recipe:
    """The recipe with its relative paths (the dataset folder, model.init_from,
    data.normalization_from) made absolute (anchored_dataset), as a run records them: a
    resume from another directory finds them."""
    anchored = [(key, anchored_dataset(value)) for key, value in (
        ("data.dataset", recipe.data.dataset), ("model.init_from", recipe.model.init_from),
        ("data.normalization_from", recipe.data.normalization_from))
        if value is not None and anchored_dataset(value) != value]
    return apply_overrides(recipe, anchored) if anchored else recipe


def check_continuation(loaded: Path, state: dict[str, Any], named: bool, run_dir: Path) -> None:
    """Refuse to go on in its own run directory from a checkpoint file the user `named` that
    is behind the run's newest: the continuation's epoch checkpoints would interleave with the
    later ones (pruning deleting its own), and a later --resume pick up the abandoned ones.
    best.pt of the newest epoch is that epoch's state: it goes on. An unreadable newer file
    (load_for_resume passed over it) holds no later state."""
    source_run = run_dir_of(loaded)
    if not named or source_run.resolve() != run_dir.resolve():
        return
    newest = _newest_readable(source_run)
    if (newest is not None and newest[0].resolve() != loaded.resolve()
            and newest[1]["step"] != state["step"]):
        raise DataError(
            f"{loaded} is older than {newest[0]}, the newest checkpoint of {source_run}: going "
            "on from it there would mix two continuations of the run; continue it in another "
            "output folder (--output-dir DIR), or delete the later checkpoints first"
        )


def _newest_readable(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that reads, with its state (tensors left in the
    file); unreadable ones are passed over, as load_for_resume passes over them."""
    for checkpoint in resumable_checkpoints(run_dir):
        try:
            return checkpoint, load_checkpoint(checkpoint, mmap=True)
        except DataError:
            continue
    return None


def _saved_by_this_launch(run_dir: Path) -> bool:
    """Whether the newest readable checkpoint in `run_dir` was saved by this torchrun launch
    (an earlier attempt of it), by the launch id it records."""
    newest = _newest_readable(run_dir)
    return newest is not None and newest[1].get("launch") == distributed.elastic_run_id()


def continues_elsewhere(state: dict[str, Any] | None, run_dir: Path) -> bool:
    """Whether a resumed run writes to another directory than its checkpoint's run, which is
    then claimed as a new run's (refused when it holds another run, unless overwrite)."""
    source = None if state is None else state.get(RESUMED_FROM)
    return source is not None and run_dir_of(Path(source)).resolve() != run_dir.resolve()


def new_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3, ... when taken: every run gets its own directory."""
    candidate, number = root / name, 1
    while candidate.exists():
        number += 1
        candidate = root / f"{name}-{number}"
    return candidate


def latest_run_dir(root: Path, name: str) -> Path:
    """The most recently written run of recipe `name` under `root` (for a bare --resume):
    root/NAME, NAME-2, ... and torchrun's NAME-<run id>, not another recipe's NAME-suffix."""
    named = [p for p in root.glob(f"{name}-*")
             if p.name[len(name) + 1 :].isdigit() or _recipe_name(p) == name]
    runs = [p for p in (root / name, *named) if resumable_checkpoints(p)]
    if not runs:
        raise DataError(
            f"no run of {name} with checkpoints under {root}/; pass --resume PATH "
            "(a run directory or a checkpoint file)"
        )
    return max(runs, key=lambda run: resumable_checkpoints(run)[0].stat().st_mtime_ns)


def _recipe_name(run_dir: Path) -> str | None:
    """The recipe a run directory's recipe.yaml names; None where it has none readable."""
    try:
        values = read_yaml_mapping(run_dir / "recipe.yaml")
    except CanonError:
        return None
    return values.get("name")


def check_source_outside(run_dir: str | Path, source: str | Path | None, what: str) -> None:
    """Refuse a new run in the folder that holds the network it starts from: its files would
    replace the source's (--overwrite sets them aside, deleted at the new run's first
    checkpoint)."""
    if source is None or str(source).startswith(TORCHVISION):
        return
    folder, source_path = Path(run_dir).resolve(), Path(source).resolve()
    if source_path == folder or folder in source_path.parents:
        raise ConfigError(f"--output-dir {run_dir} holds {what} {source}: the new run would "
                          "replace it there; pick another --output-dir")


@contextmanager
def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool = False) -> Iterator[None]:
    """Hold `run_dir` for one training run while the block runs: create it (DataError when it
    cannot be), lock it (DataError naming the holder's pid when another canon run has it; freed
    on exit, errors included), then delete the temporary files of killed writes. Only rank 0
    claims the directory: the other ranks write nothing there.

    A new run (`resume` False) refuses a directory holding an earlier run's results (a
    checkpoint, metrics.csv, an export) with a DataError saying what to do; `overwrite` sets
    that run's files (RUN_FILES, canon eval's and visualize/, EARLIER_REPORTS, nothing else)
    aside in REPLACED_DIR instead, deleted once the new run has saved an epoch checkpoint or
    ended well, put back if it fails before writing any checkpoint (bad data found in its
    first epoch must not cost the earlier run), and kept aside while the new run, stopped by
    Ctrl-C in its first epoch, can be resumed (_end_replacement). The files of an earlier run
    that stopped before its first checkpoint are deleted without asking: there is nothing in
    them to resume.
    Unrelated files stay. A directory this call created is removed again when the block fails
    having written nothing there, so failed attempts leave no empty runs/NAME-N behind.
    """
    created = not run_dir.exists()
    make_folder(run_dir, advice=OUTPUT_DIR_ADVICE)
    try:
        with locked_folder(run_dir, user="canon run", other="use another "
                           "--output-dir", advice=OUTPUT_DIR_ADVICE):
            _end_replacement(run_dir, failed=True)  # a killed run's: kept if it got no further
            if not resume:
                _clear_earlier_run(run_dir, overwrite)
            # Not every file there is the run's: a canon eval may be writing its JSON.
            sweep_partial_writes(run_dir, targets=_WRITTEN_WHOLE)
            sweep_partial_writes(run_dir / CHECKPOINT_DIR)
            try:
                yield
            except BaseException:
                if not resume and not resumable_checkpoints(run_dir):  # a carried best.pt
                    best_checkpoint(run_dir).unlink(missing_ok=True)  # alone: nothing to resume
                _end_replacement(run_dir, failed=True)  # after: it may bring back a best.pt
                raise
            _end_replacement(run_dir, failed=False)
    except BaseException:
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise


def discard_replaced_run(run_dir: Path) -> None:
    """Delete the run an --overwrite set aside: the new run has a checkpoint of its own."""
    aside = run_dir / REPLACED_DIR
    if aside.is_dir():
        shutil.rmtree(aside)


def _end_replacement(run_dir: Path, *, failed: bool) -> None:
    """The set-aside run goes for good once the new one has an epoch checkpoint or ended well,
    and comes back in place of what the new run wrote where that holds no checkpoint. A new
    run stopped by Ctrl-C before its first epoch ended keeps its interrupted.pt, to resume, and
    the set-aside run waits on: a few minutes of the new run are not worth the earlier run.
    best.pt is not one: a run continued from another folder's copies that run's best before
    its first (keep_best)."""
    aside = run_dir / REPLACED_DIR
    if not aside.is_dir():
        return
    if not failed or run_epoch_checkpoints(run_dir):
        discard_replaced_run(run_dir)
        return
    if interrupted_checkpoint(run_dir).is_file():
        return
    _remove_run_files(run_dir)
    for path in aside.iterdir():
        path.rename(run_dir / path.name)
    aside.rmdir()


def _clear_earlier_run(run_dir: Path, overwrite: bool) -> None:
    if holds_results(run_dir) and not overwrite:
        raise DataError(
            f"{run_dir} already holds a run; pass --overwrite (overwrite=True in Python) to "
            f"replace it, or pick another output folder (a training run continues with --resume "
            f"{run_dir}, resume= in Python)"
            + replaced_run_note(run_dir)
        )
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file() and run_header(recipe) is None:  # the user's own, not a run's copy
        raise DataError(
            f"{recipe} is not a recipe a run wrote (its first line would say so), and a run "
            "writes its resolved recipe there: move it, or pick another --output-dir"
        )
    if not holds_results(run_dir):  # a run that stopped before its first checkpoint
        _remove_run_files(run_dir, reports=False)
        return
    aside = run_dir / REPLACED_DIR
    if aside.is_dir():  # the earlier run waits there; this one replaced it and was stopped
        _remove_run_files(run_dir)  # before its first epoch ended (_end_replacement)
        return
    aside.mkdir()
    for path in _run_files(run_dir):
        path.rename(aside / path.name)


def set_reports_aside(run_dir: Path, epoch: int) -> Path | None:
    """Move what canon eval and canon visualize wrote of the run's model into
    EARLIER_REPORTS/epoch-N (N: the epochs trained when they were made) and return that folder,
    or None when there were none: a run resumed to train further replaces that model, and its
    reports left beside the new one would read as the new model's."""
    reports = _report_files(run_dir)
    if not reports:
        return None
    aside = run_dir / EARLIER_REPORTS / f"epoch-{epoch}"
    count = 1
    while aside.exists():  # reports of a checkpoint of the same epoch, made after a stop
        count += 1
        aside = aside.with_name(f"epoch-{epoch}-{count}")
    make_folder(aside, advice=OUTPUT_DIR_ADVICE)
    for path in reports:
        path.rename(aside / path.name)
    return aside


def _report_files(run_dir: Path) -> list[Path]:
    named = [run_dir / VISUALIZE_DIR, *(path for pattern in (
        "eval-*.json", "eval-*-per-class.csv", "eval-*-confusion.png")
        for path in run_dir.glob(pattern))]
    return [p for p in named if p.exists() or p.is_symlink()]


def _run_files(run_dir: Path, *, reports: bool = True) -> list[Path]:
    """The run's files there; with `reports`, also what canon eval and canon visualize wrote
    of its model, and of its earlier models (a folder holding no model holds none of theirs:
    a visualize/ there is of other models)."""
    named = [run_dir / name for name in RUN_FILES]
    if reports:
        named += [run_dir / EARLIER_REPORTS, *_report_files(run_dir)]
    return [p for p in named if p.exists() or p.is_symlink()]


def _remove_run_files(run_dir: Path, *, reports: bool = True) -> None:
    for path in _run_files(run_dir, reports=reports):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _has_checkpoint(run_dir: Path) -> bool:
    checkpoints = run_dir / CHECKPOINT_DIR
    return checkpoints.is_dir() and any(not p.name.startswith(".") for p in checkpoints.iterdir())


def holds_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run's results (a checkpoint, metrics.csv, an export), which a
    new run there would replace."""
    return _has_checkpoint(run_dir) or any((run_dir / name).exists() for name in _RESULTS)


