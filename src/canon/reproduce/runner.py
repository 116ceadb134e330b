"""`reproduce`: an experiment end to end: train the runs it lacks (resuming interrupted ones),
analyse them all, write the report. What each experiment is lives in
canon.reproduce.experiments; the layout of its output folder:

```
OUTPUT/runs/RECIPE[-MODE][-AMP]-seedN/   one canon.train run directory each, shared by experiments
OUTPUT/NAME[-MODE]/                README.md, results.json and the plots of experiment NAME
```
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import shlex
import signal
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from canon.data.datasets import anchored_dataset
from canon.engine.stopping import (
    STOP_SIGNALS,
    StopFlag,
    release_stop_signals,
    stop_signals_held,
)
from canon.engine.trainer import TrainingInterrupted
from canon.errors import CanonError
from canon.files import make_folder
from canon.recipes import apply_overrides
from canon.reproduce.analyses import ANALYSES, Context, Finding
from canon.reproduce.experiments import Mode, get_experiment
from canon.reproduce.report import environment, mixed_commits, run_threads, write_report
from canon.reproduce.training import PlannedRun, RunRecord, ensure_run, finished, plan_runs

DEFAULT_OUTPUT = Path("reproduce")


@dataclass(frozen=True)
class Reproduction:
    readme: Path
    findings: list[Finding]
    shown: bool  # every finding held
    trained: int  # runs this call trained or resumed


def reproduce(
    name: str,
    output_dir: str | Path = DEFAULT_OUTPUT,
    *,
    mode: str = "full",
    runs: int | None = None,
    device: str = "auto",
    data: str | None = None,
    progress: bool = True,
    jobs: int = 1,
    cuda_graph: bool = False,
    amp: str | None = None,
) -> Reproduction:
    """Reproduce experiment `name` (canon.reproduce.experiments.EXPERIMENTS) in `mode`
    ("full", "quick" or "micro", the last for tests) with `runs` seeds where it compares
    seeds, on the folder `data` instead of the recipes' dataset when given. Finished runs
    under OUTPUT/runs are read as they are, interrupted ones resumed; Ctrl-C stops the run in
    training with a checkpoint (canon.engine.trainer's TrainingInterrupted), and the same
    call again goes on from it. `jobs` > 1 trains that many runs at once, each in a process
    of its own on the same device: small nets leave a big GPU mostly idle. `cuda_graph`
    captures every run's step in a CUDA graph (train.cuda_graph), which changes its speed,
    not what it computes; `amp` ("bf16", "fp16" or "none") sets every run's autocast
    precision (train.amp), which changes both: its runs are others, named with it."""
    experiment = get_experiment(name)
    chosen = experiment.mode(mode)
    if data is not None:  # stored in each run's recipe.yaml, compared when a run is reused
        data = anchored_dataset(data)
    root = Path(output_dir)
    started = time.perf_counter()
    planned = plan_runs(experiment, chosen, runs, root / "runs", data, amp)
    if cuda_graph:
        planned = [dataclasses.replace(run, recipe=apply_overrides(
            run.recipe, [("train.cuda_graph", True)])) for run in planned]
    at_once = max(1, min(jobs, len(planned)))  # processes training (one: this one)
    records = _ensure_runs(planned, chosen, device, progress, at_once)
    # Runs named with another precision are other runs: their report goes beside, not over,
    # the recipes' own.
    suffix = ("" if mode == "full" else f"-{mode}") + "".join(
        sorted({f"-{run.precision}" for run in planned if run.precision}))
    context = Context(experiment, chosen, device, root / f"{name}{suffix}")
    make_folder(context.folder)
    if note := mixed_commits(records):
        warnings.warn(note, stacklevel=2)
    outcome = ANALYSES[experiment.analysis](records, context)
    command = _command(name, mode, runs, root, data, amp, jobs, device, cuda_graph)
    readme = write_report(context, command, records, outcome, environment(device, at_once),
                          time.perf_counter() - started)
    return Reproduction(readme, outcome.findings, all(f.held for f in outcome.findings),
                        sum(record.status != "finished before" for record in records))


def _ensure_runs(planned: list[PlannedRun], mode: Mode, device: str, progress: bool,
                 jobs: int) -> list[RunRecord]:
    """Each planned run trained, resumed or read; those to train or resume `jobs` at a time
    (at most one process per run) in spawned processes, each with the threads of one of `jobs`
    runs, and no progress bars (their lines would interleave). A stop signal to every
    process (Ctrl-C, SLURM) makes each running run save its checkpoint; then, as when a run
    fails, no queued run starts, and the stop or the first failure is raised once the running
    ones are done. A SIGTERM to this process alone lets the running runs finish."""
    if jobs <= 1:
        return [ensure_run(run, mode, device=device, progress=progress) for run in planned]
    # Finished runs are read here: a process of their own would only spend seconds importing.
    records = {index: ensure_run(run, mode, device=device, progress=False)
               for index, run in enumerate(planned) if finished(run.run_dir)}
    to_train = [index for index in range(len(planned)) if index not in records]
    if not to_train:
        return list(records.values())
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    stopping, flag = spawn.Event(), StopFlag()
    with flag.installed(), ProcessPoolExecutor(
            max_workers=min(jobs, len(to_train)), mp_context=spawn,
            initializer=_pool_process, initargs=(jobs, stopping)) as pool:
        with stop_signals_held():  # the pool's processes start during the submissions
            futures = [pool.submit(_ensure_in_process, planned[index], mode, device)
                       for index in to_train]
        while pending := [future for future in futures if not future.done()]:
            wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            if flag.raised or any(_ended_early(future) for future in futures):
                stopping.set()  # the runs queued in the pool's processes do not start
                for future in futures:
                    future.cancel()
    records.update(zip(to_train, _records(futures, [planned[i] for i in to_train], flag),
                       strict=True))
    return [records[index] for index in range(len(planned))]


def _records(futures: list[Future], planned: list[PlannedRun], flag: StopFlag
             ) -> list[RunRecord]:
    """The pool's runs' records, in plan order; or the stop (TrainingInterrupted: the
    checkpoint a run saved, or the runs' folder where several did), after saying on stderr any
    run that failed beside it; or the first failure."""
    ended = [future for future in futures if not future.cancelled()]
    error = next((f.exception() for f in ended if f.exception() is not None), None)
    if isinstance(error, BrokenProcessPool):
        error = CanonError(f"a run's process died ({error}); the same command resumes the "
                           "runs from their last checkpoints")
    outcomes = [future.result() for future in ended if future.exception() is None]
    stops = [outcome for outcome in outcomes if isinstance(outcome, tuple)]
    if stops:
        if error is not None:  # the stop's resume hint alone would hide it
            print(f"canon reproduce: besides the stop, a run failed: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
        checkpoint, signal_number = stops[0]
        # Several runs saved a checkpoint each: the folder holding them, not the first alone.
        raise TrainingInterrupted(checkpoint if len(stops) == 1 else planned[0].run_dir.parent,
                                  signal_number)
    if error is not None:
        raise error
    if flag.raised:  # a signal to this process alone: the running runs finished, no more began
        raise TrainingInterrupted(planned[0].run_dir.parent, flag.signal_number)
    return outcomes  # every run's record, in plan order: none was cancelled or failed


_STOPPING: Any = None  # a pool process's copy of the stop event
_SIGNAL: int | None = None  # the stop signal this pool process got, if any
_IN_RUN = False  # whether this pool process is in a run (its training's StopFlag aside)


class _StoppedOutsideTraining(BaseException):
    """A stop signal in a run's set-up or wrap-up, where no training step is lost."""


def _pool_process(workers: int, stopping: Any) -> None:
    global _STOPPING
    _STOPPING = stopping
    torch.set_num_threads(run_threads(workers))
    for number in STOP_SIGNALS:  # Ctrl-C reaches every pool process, and one that died of it
        signal.signal(number, _stop_signal)  # would break the pool, which kills the others
    release_stop_signals()


def _stop_signal(signum: int, frame: object) -> None:
    """Between runs: no queued run starts. In a run outside its training (whose StopFlag takes
    the signals meanwhile, and saves a checkpoint): the run stops at once."""
    global _SIGNAL
    _SIGNAL = signum
    if _IN_RUN:
        raise _StoppedOutsideTraining


def _ended_early(future: Future) -> bool:
    """A run that failed, or stopped with a checkpoint."""
    if not future.done() or future.cancelled():
        return False
    return future.exception() is not None or isinstance(future.result(), tuple)


def _ensure_in_process(run: PlannedRun, mode: Mode, device: str
                       ) -> RunRecord | tuple[Path, int] | None:
    """ensure_run in a pool process; None when another process's stop came before it began;
    a stop signal to this process as (checkpoint, signal) when the run's training saved one,
    else as (the runs folder, signal), since TrainingInterrupted's arguments do not survive
    pickling."""
    global _IN_RUN
    if _SIGNAL is not None:
        return run.run_dir.parent, _SIGNAL
    if _STOPPING.is_set():
        return None
    _IN_RUN = True
    try:
        return ensure_run(run, mode, device=device, progress=False)
    except BaseException as error:
        # Set here, not only by the waiting process: this process may take its next queued
        # run before that one has seen the stop.
        _STOPPING.set()
        if isinstance(error, TrainingInterrupted):
            return error.checkpoint, error.signal_number
        if isinstance(error, _StoppedOutsideTraining):
            return run.run_dir.parent, _SIGNAL
        raise
    finally:
        _IN_RUN = False


def _command(name: str, mode: str, runs: int | None, root: Path, data: str | None,
             amp: str | None, jobs: int, device: str, cuda_graph: bool) -> str:
    """The command line that makes the same report (--jobs too: it sets a CPU run's threads;
    --device: a CPU run's numbers are not a GPU's; --cuda-graph: it changes the times)."""
    parts = ["canon", "reproduce", name]
    if mode != "full":
        parts.append(f"--{mode}")
    if runs is not None:
        parts += ["--runs", str(runs)]
    if data is not None:
        parts += ["--data", data]
    if amp is not None:
        parts += ["--amp", amp]
    if jobs != 1:
        parts += ["--jobs", str(jobs)]
    if device != "auto":
        parts += ["--device", device]
    if cuda_graph:
        parts.append("--cuda-graph")
    if root != DEFAULT_OUTPUT:
        parts += ["--output-dir", str(root)]
    return shlex.join(parts)  # a folder with spaces pastes back whole
