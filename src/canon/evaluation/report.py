"""Per-class reports of an evaluation: each class's top-1/top-5 error and image count, the
confusion matrix, and files for people to read (per-class errors as CSV or JSON, the confusion
matrix as a PNG), from the class probabilities and labels that evaluate(...,
keep_probabilities=True) or evaluate_ensemble gives.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from canon.errors import ConfigError
from canon.evaluation.metrics import error_percent, ranked, topk_correct
from canon.files import atomic_write, printable

# Up to this many classes the PNG names every class and writes each cell's count; beyond it,
# at most this many evenly spaced class names and no counts (1000 would be unreadable).
MAX_NAMED_CLASSES = 30
COLUMNS = ("index", "class", "images", "top1_error", "top5_error")


@dataclass(frozen=True)
class ClassReport:
    """Per class, in output order: images, and top-1/top-5 error in percent (None for a class
    with no image); `confusion` counts images by true class (rows) and top-1 prediction
    (columns)."""

    classes: list[str]
    images: list[int]
    top1_error: list[float | None]
    top5_error: list[float | None]
    confusion: torch.Tensor

    def rows(self) -> list[dict[str, Any]]:
        """One record per class, keyed by COLUMNS."""
        columns = zip(range(len(self.classes)), self.classes, self.images, self.top1_error,
                      self.top5_error, strict=True)
        return [dict(zip(COLUMNS, values, strict=True)) for values in columns]


def confusion_matrix(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """K x K counts (int64) of N images by true class (row) and top-1 prediction (column),
    from N x K class scores and N labels."""
    classes = probabilities.shape[1]
    cells = labels.long() * classes + ranked(probabilities, 1)[:, 0]
    return torch.bincount(cells, minlength=classes * classes).view(classes, classes)


def class_report(
    probabilities: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]
) -> ClassReport:
    """Per-class errors and the confusion matrix of N x K class scores with N labels
    indexing `classes` (K names, the model's output order)."""
    count = len(classes)
    if probabilities.dim() != 2 or probabilities.shape != (len(labels), count):
        raise ValueError(f"expected {len(labels)} x {count} scores for {len(labels)} labels and "
                         f"{count} classes, got {tuple(probabilities.shape)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < count:
        raise ValueError(f"labels outside 0..{count - 1}")
    labels = labels.long()
    order = labels.argsort(stable=True)  # each class's images together, for one split
    images = torch.bincount(labels, minlength=count).tolist()
    hits = [
        topk_correct(scores, targets)
        for scores, targets in zip(
            probabilities[order].split(images), labels[order].split(images), strict=True
        )
    ]

    def errors(k: int) -> list[float | None]:
        return [error_percent(h[k], n) if n else None for h, n in zip(hits, images, strict=True)]

    return ClassReport(list(classes), images, errors(1), errors(5),
                       confusion_matrix(probabilities, labels))


def is_class_report(path: Path) -> bool:
    """Whether `path` is a per-class CSV that write_class_errors wrote (its header)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.readline().rstrip("\r\n") == ",".join(COLUMNS)
    except OSError:
        return False


def write_class_errors(report: ClassReport, path: Path) -> None:
    """The report's per-class rows as CSV (`.csv`; an empty cell for a class with no image)
    or JSON (`.json`; null), written atomically."""
    path = Path(path)
    rows = report.rows()
    if path.suffix == ".json":
        atomic_write(path, lambda temporary: temporary.write_text(json.dumps(rows, indent=2)))
    elif path.suffix == ".csv":
        atomic_write(path, lambda temporary: _write_csv(temporary, rows))
    else:
        raise ConfigError(f"per-class errors go to a .csv or .json file, not {path.name!r}")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(
            {k: "" if v is None else f"{v:.7g}" if isinstance(v, float) else v
             for k, v in row.items()}
            for row in rows
        )


def write_confusion_png(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    """The confusion matrix (true class rows, predicted columns) as a PNG, written atomically
    with matplotlib's Agg renderer (no display): colour is each cell's share of its row, so
    rare and common classes compare; up to MAX_NAMED_CLASSES classes every row and column is
    named and every cell shows its count, beyond that only evenly spaced class names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.as_tensor(matrix).double()
    count = len(classes)
    if counts.shape != (count, count):
        raise ValueError(f"a confusion matrix of {count} classes is {count} x {count}, got "
                         f"{tuple(counts.shape)}")
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(4 + 0.45 * count, 13)  # inches: ten classes get readable cells, 1000 fit
    figure = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    named = count <= MAX_NAMED_CLASSES
    # Beyond the figure's pixels, "nearest" would drop whole rows; antialiasing keeps them.
    picture = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1,
                          interpolation="nearest" if named else "antialiased")
    figure.colorbar(picture, ax=axes, label="share of the true class's images")
    ticks = list(range(0, count, -(-count // MAX_NAMED_CLASSES)))  # every class when named
    names = [printable(classes[i])[:24] for i in ticks]
    axes.set_xticks(ticks, names, rotation=90, fontsize=8)
    axes.set_yticks(ticks, names, fontsize=8)
    if named:
        for row, (row_counts, row_shares) in enumerate(zip(counts.tolist(), shares.tolist(),
                                                           strict=True)):
            for column, (value, share) in enumerate(zip(row_counts, row_shares, strict=True)):
                axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if share > 0.5 else "black")
    axes.set(xlabel="predicted class", ylabel="true class",
             title=f"confusion matrix, {int(counts.sum())} images")
    figure.tight_layout()
    atomic_write(Path(path), lambda temporary: figure.savefig(temporary, format="png"))
