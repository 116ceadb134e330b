"""`reproduce`: an experiment end to end: train the runs it lacks (resuming interrupted ones),
analyse them all, write the report. What each experiment is lives in
canon.reproduce.experiments; the layout of its output folder:

```
OUTPUT/runs/RECIPE[-MODE]-seedN/   one canon.train run directory each, shared by experiments
OUTPUT/NAME[-MODE]/                README.md, results.json and the plots of experiment NAME
```
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from canon.files import make_folder
from canon.reproduce.analyses import ANALYSES, Context, Finding
from canon.reproduce.experiments import get_experiment
from canon.reproduce.report import environment, write_report
from canon.reproduce.training import ensure_run, plan_runs

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
) -> Reproduction:
    """Reproduce experiment `name` (canon.reproduce.experiments.EXPERIMENTS) in `mode`
    ("full", "quick" or "micro", the last for tests) with `runs` seeds where it compares
    seeds, on the folder `data` instead of the recipes' dataset when given. Finished runs
    under OUTPUT/runs are read as they are, interrupted ones resumed; Ctrl-C stops the run in
    training with a checkpoint (canon.engine.trainer's TrainingInterrupted), and the same
    call again goes on from it."""
    experiment = get_experiment(name)
    chosen = experiment.mode(mode)
    if data is not None:  # stored in each run's recipe.yaml, compared when a run is reused
        data = str(Path(data).expanduser().resolve())
    root = Path(output_dir)
    started = time.perf_counter()
    planned = plan_runs(experiment, chosen, runs, root / "runs", data)
    records = [ensure_run(run, chosen, device=device, progress=progress) for run in planned]
    suffix = "" if mode == "full" else f"-{mode}"
    context = Context(experiment, chosen, device, root / f"{name}{suffix}")
    make_folder(context.folder)
    outcome = ANALYSES[experiment.analysis](records, context)
    readme = write_report(context, _command(name, mode, runs, root, data), records, outcome,
                          environment(device), time.perf_counter() - started)
    return Reproduction(readme, outcome.findings, all(f.held for f in outcome.findings),
                        sum(record.status != "finished before" for record in records))


def _command(name: str, mode: str, runs: int | None, root: Path, data: str | None) -> str:
    """The command line that makes the same report."""
    parts = ["canon", "reproduce", name]
    if mode != "full":
        parts.append(f"--{mode}")
    if runs is not None:
        parts += ["--runs", str(runs)]
    if data is not None:
        parts += ["--data", data]
    if root != DEFAULT_OUTPUT:
        parts += ["--output-dir", str(root)]
    return " ".join(parts)
