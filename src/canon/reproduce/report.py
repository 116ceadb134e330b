"""What `canon reproduce` writes beside the plots: README.md (whether the paper's finding
showed, our numbers beside the paper's, the plots, every run with its seed and times, and the
machine, torch version, date and commit behind them) and results.json with the same numbers.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from canon import __version__
from canon.data.datasets import validates_on_test_split
from canon.devices import resolve_device
from canon.engine.checkpoint import git_commit
from canon.files import atomic_write
from canon.reproduce.analyses import Context, Outcome
from canon.reproduce.training import RunRecord
from canon.visualize.images import save_json


def environment(device: str, jobs: int = 1) -> dict[str, Any]:
    """The machine and software a reproduction ran on; with `jobs` runs at once, the torch
    threads each run trained with (the thread count changes a CPU run's numbers)."""
    resolved = resolve_device(device)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_cores": os.cpu_count(),
        "torch_threads": run_threads(jobs), "jobs": jobs,
        "gpu": torch.cuda.get_device_name(resolved) if resolved.startswith("cuda") else None,
        "device": resolved, "torch": torch.__version__, "python": platform.python_version(),
        "canon": __version__, "commit": git_commit(),
    }


def run_threads(jobs: int) -> int:
    """The torch threads of each of `jobs` runs trained at once (canon.reproduce.runner)."""
    return max(1, torch.get_num_threads() // jobs)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def write_report(
    context: Context, command: str, records: list[RunRecord], outcome: Outcome,
    env: dict[str, Any], wall_seconds: float,
) -> Path:
    """README.md and results.json in context.folder; returns the README's path."""
    experiment, mode, folder = context.experiment, context.mode, context.folder
    shown = all(finding.held for finding in outcome.findings)
    runs = [_run_entry(record) for record in records]
    save_json(folder / "results.json", {
        "experiment": experiment.name, "cites": experiment.cites, "mode": mode.name,
        "command": command, "finding_shown": shown,
        "findings": [dataclasses.asdict(f) for f in outcome.findings],
        "table": outcome.table, "numbers": outcome.numbers,
        "plots": [str(p.relative_to(folder)) for p in outcome.plots], "runs": runs,
        "environment": env, "wall_seconds": wall_seconds,
    })
    lines = [
        f"# {experiment.name} ({mode.name} mode): {experiment.cites}", "",
        f"The claim: {experiment.shows}.", "",
        f"**Finding {'shown' if shown else 'not shown'}** in this {mode.name} run:",
        *(f"- [{'x' if f.held else ' '}] {f.statement}: {f.evidence}"
          for f in outcome.findings), "",
        f"Command: `{command}`  ", f"Mode: {mode.name}: {mode.describe}.", "",
        "## Our numbers beside the paper's", "", *_markdown_table(outcome.table), "",
        f"Errors are top-1 errors of the final model on the {_evaluated_on(records)} (no "
        "epoch is chosen on it); training errors are over the last epoch's augmented "
        "batches.", "",
        "## Plots", "", f"{experiment.plot[0].upper()}{experiment.plot[1:]}.", "",
        *(f"![{p.relative_to(folder).as_posix()}]({p.relative_to(folder).as_posix()})"
          for p in outcome.plots), "",
        f"## The reference: {experiment.cites}", "",
        *(f"- {note}" for note in experiment.paper), "",
        "## Runs", "", *_markdown_table([_run_row(entry) for entry in runs]), "",
        *([f"**Note:** {note}.", ""] if (note := mixed_commits(records)) else []),
        "Epochs s: metrics.csv's seconds summed (training and each epoch's validation, every "
        "session of the run); "
        "wall s: the run's training call in this command, validation and set-up included.", "",
        "## This command's environment", "", *_environment_lines(env, wall_seconds), "",
    ]
    path = folder / "README.md"
    atomic_write(path, lambda target: target.write_text("\n".join(lines)))
    return path


def _evaluated_on(records: list[RunRecord]) -> str:
    """The split the runs' errors are measured on: CIFAR's test set, a folder's validation
    set."""
    on_test = all(validates_on_test_split(r.run.recipe.data) for r in records)
    return "test set" if on_test else "validation set"


def _run_entry(record: RunRecord) -> dict[str, Any]:
    return {"run": record.run.name, "recipe": record.run.recipe.name, "seed": record.run.seed,
            "run_dir": str(record.run.run_dir), "status": record.status,
            "wall_seconds": record.wall_seconds, "epochs": record.epochs,
            "epoch_seconds": record.epoch_seconds, "commit": record.commit,
            "train_error": record.train_error, "train_images": record.train_images,
            "test_error": record.test_error}


def _run_row(entry: dict[str, Any]) -> dict[str, Any]:
    return {"run": entry["run"], "seed": entry["seed"], "this command": entry["status"],
            "epochs": entry["epochs"], "epochs s": entry["epoch_seconds"],
            "wall s": entry["wall_seconds"], "trained at": _short_commit(entry["commit"])}


def mixed_commits(records: list[RunRecord]) -> str | None:
    """A warning when the runs compared were last trained at different commits (finished runs
    are reused, so a report may compare code of several dates); None when they agree."""
    commits = sorted({_short_commit(record.commit) for record in records})
    if len(commits) < 2:
        return None
    return (f"the runs were last trained at {len(commits)} different commits "
            f"({', '.join(commits)}; the Runs table names each run's): a change between them "
            "may account for part of a difference; to compare one commit's code, delete the "
            "older runs' folders and run the command again")


def _short_commit(commit: str | None) -> str:
    """A commit's first 10 hex digits, with its "-dirty" mark (uncommitted changes)."""
    if commit is None:
        return "unknown"
    return commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")


def _environment_lines(env: dict[str, Any], wall_seconds: float) -> list[str]:
    return [
        f"- hardware: {env['platform']}; CPU {env['cpu']} ({env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch threads a run"
        + (f", {env['jobs']} runs at once" if env.get("jobs", 1) > 1 else "")
        + f"); GPU {env['gpu'] or 'none used'}; "
        f"device {env['device']}",
        "- runs 'finished before' or 'resumed' were trained, wholly or in part, by earlier "
        "commands, perhaps elsewhere: 'trained at' names the commit that last trained each",
        f"- software: torch {env['torch']}, Python {env['python']}, canon {env['canon']}, "
        f"commit {env['commit'] or 'unknown (not a git checkout)'}",
        f"- date: {env['date']}; this command took {wall_seconds:.0f} s",
    ]


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    header = list(rows[0])
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(row[key]) for key in header) + " |" for row in rows),
    ]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)
