"""Training curves of several runs on one plot, as He et al. (2015) compare plain nets and
ResNets (Fig. 4 and Fig. 6): thin dashed lines the training error, bold lines the validation
error (the test error for runs that validate on their test set: CIFAR, the sample), one colour
per run, against epochs or, as the paper plots them, iterations (optimizer steps), read from
each run's metrics.csv (canon.engine.logs: a row per epoch, ending at its step count).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from canon.engine.checkpoint import run_dir_of
from canon.errors import ConfigError, DataError
from canon.files import make_folder
from canon.validation import one_or_many
from canon.visualize.images import save_csv, save_json
from canon.visualize.plots import (
    integer_x,
    new_figure,
    run_names,
    save_figure,
)

METRICS_FILE = "metrics.csv"
# metric: (training column or None where training does not log it, validation column)
METRICS = {"top1": ("train_top1_error", "val_top1_error"), "top5": (None, "val_top5_error")}
METRIC_NAMES = {"top1": "top-1", "top5": "top-5"}


def metrics_file(run: str | Path) -> Path:
    """A run's metrics.csv: in a run directory, beside an export or a checkpoint, or the path
    of a .csv itself."""
    run = Path(run)
    if not run.exists():
        raise DataError(f"{run} does not exist; give a run directory (it holds {METRICS_FILE})")
    if run.is_dir():
        return run / METRICS_FILE
    if run.suffix == ".csv":
        return run
    if run.suffix not in (".pt", ".safetensors"):
        raise DataError(f"{run}: neither a run directory, a checkpoint (.pt), an export "
                        f"(.safetensors) nor a {METRICS_FILE}")
    return run_dir_of(run) / METRICS_FILE


def read_metrics(path: Path, columns: Sequence[str], optional: Sequence[str] = ()
                 ) -> dict[str, list[float] | None]:
    """The named columns of a metrics.csv, as floats; DataError naming the file for one that is
    missing, unreadable, empty or lacks a column. An `optional` column (one that older files
    lack, or a resumed run's older rows leave empty) comes out None where it is not whole."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: give a run directory, which holds the "
                        f"{METRICS_FILE} canon train writes after every epoch")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if not rows:
        raise DataError(f"{path} holds no epoch yet: the run has not finished its first one")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)}; is it a canon "
                        f"{METRICS_FILE}?")
    try:
        values: dict[str, list[float] | None] = {c: [float(row[c]) for row in rows]
                                                 for c in columns}
    except (TypeError, ValueError):
        raise DataError(f"{path}: a row with a missing or non-numeric value") from None
    for column in optional:
        try:
            values[column] = [float(row[column]) for row in rows]
        except (KeyError, TypeError, ValueError):
            values[column] = None
    return values


def curves(
    runs: Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    *,
    metric: str = "top1",
    names: Sequence[str] | None = None,
    x: str = "epoch",
) -> dict[str, Any]:
    """Training and validation `metric` error (%) by epoch (or by `x` "iteration") for `runs`
    (run directories, or their checkpoints, exports or metrics.csv files; one or several); writes
    curves-METRIC.png, .csv and .json to `output_dir` and returns what the JSON holds plus the
    paths written. `names` label the runs (default: their folders). Training logs no top-5
    error, so `top5` draws validation curves only."""
    series = run_series(one_or_many(runs), metric, names)
    result: dict[str, Any] = {"metric": metric, "unit": "error (%)", "runs": series}
    folder = Path(output_dir)
    make_folder(folder)
    stem = folder / f"curves-{metric}"
    result["png"] = str(save_figure(curves_figure(series, metric, x),
                                    stem.with_suffix(".png")))
    result["csv"] = str(save_csv(stem.with_suffix(".csv"), series_rows(series)))
    result["json"] = str(save_json(stem.with_suffix(".json"), result))
    return result


def run_series(runs: Sequence[str | Path], metric: str = "top1",
               names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Each run's curves as read from its metrics.csv: name, file, epoch, step (None for a
    file from before canon logged steps), train (None for top-5) and val, a value per epoch."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    train_column, val_column = METRICS[metric]
    series = []
    for name, run in zip(run_names(runs, names), runs, strict=True):
        path = metrics_file(run)
        columns = read_metrics(path, [c for c in ("epoch", train_column, val_column) if c],
                               optional=["step"])  # logged since 7a3c297
        series.append({"name": name, "file": str(path), "epoch": columns["epoch"],
                       "step": columns["step"], "train": columns.get(train_column),
                       "val": columns[val_column]})
    return series


def series_rows(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """run_series' curves as CSV rows, a row per run and epoch."""
    return [{"run": s["name"], "epoch": epoch,
             "step": int(s["step"][i]) if s["step"] is not None else "",
             "train_error": s["train"][i] if s["train"] is not None else "",
             "val_error": s["val"][i]}
            for s in series for i, epoch in enumerate(s["epoch"])]


def curves_figure(series: list[dict[str, Any]], metric: str, x: str = "epoch") -> Figure:
    """The plot of curves()."""
    figure = new_figure(8, 5)
    axes = figure.subplots()
    draw_curves(axes, series, metric, x)
    axes.set_title(f"{METRIC_NAMES[metric]} error by {x} (He et al. Fig. 6 style)")
    return figure


def draw_curves(axes: Any, series: list[dict[str, Any]], metric: str, x: str = "epoch",
                validation: str = "validation") -> None:
    """Per run, its training curve dashed and thin, its `validation` curve (e.g. "test")
    solid and bold, in one colour, against `x`: "epoch" or "iteration"."""
    if x not in ("epoch", "iteration"):
        raise ConfigError(f"curves against {x!r}: use epoch or iteration")
    if x == "iteration" and (lacking := [run["name"] for run in series if run["step"] is None]):
        raise DataError(f"{', '.join(lacking)}: metrics.csv has no step column (written before "
                        "canon logged steps, or resumed across that change): plot by epoch")
    for index, run in enumerate(series):
        colour, where = f"C{index % 10}", run["epoch" if x == "epoch" else "step"]
        if run["train"] is not None:
            axes.plot(where, run["train"], "--", color=colour, linewidth=1)
        axes.plot(where, run["val"], "-", color=colour, linewidth=2.5, label=run["name"])
    styles = [Line2D([], [], color="black", linewidth=2.5, label=f"bold: {validation}")]
    if any(run["train"] is not None for run in series):
        styles.append(Line2D([], [], color="black", linestyle="--", linewidth=1,
                             label="dashed: training"))
    runs_legend = axes.legend(fontsize=9, loc="upper right")
    axes.add_artist(runs_legend)
    axes.legend(handles=styles, fontsize=8, loc="lower left")
    axes.set(xlabel="epoch" if x == "epoch" else "iteration (optimizer step)",
             ylabel=f"{METRIC_NAMES[metric]} error (%)")
    integer_x(axes)
    axes.grid(alpha=0.3)
