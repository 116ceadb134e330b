"""What a run leaves for people to read: metrics.csv, curves.png, a progress bar, epoch lines,
and optionally TensorBoard events.

metrics.csv is rewritten whole from the metrics list at every epoch (that list also lives in
the checkpoint), so a resumed run's file holds each epoch exactly once. TensorBoard events
(train.tensorboard) go to run_dir/tensorboard; a resumed run adds a new events file there.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from canon.errors import ConfigError
from canon.files import atomic_write

COLUMNS = (
    "epoch", "step", "lr", "train_loss", "train_top1_error", "val_top1_error", "val_top5_error",
    "images_per_second", "seconds", "skipped_images", "val_skipped_images",
)
EVENTS_DIR = "tensorboard"


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows with floats to 7 significant digits (44.2, not 44.199999999999996: float32
    sums carry no more than that), replacing the file whole (a finished run's file is never
    written again, so a kill mid-write must not leave it cut short)."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(
                {key: f"{value:.7g}" if isinstance(value, float) else value
                 for key, value in row.items()}
                for row in rows
            )

    atomic_write(path, write)


def plot_curves(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Loss, error and learning rate by epoch (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axes, error_axes, lr_axes) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_axes.plot(epochs, [row["train_loss"] for row in rows], marker=".", label="train")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", title="training loss")
    for key, label in (
        ("train_top1_error", "train top-1"),
        ("val_top1_error", "val top-1"),
        ("val_top5_error", "val top-5"),
    ):
        error_axes.plot(epochs, [row[key] for row in rows], marker=".", label=label)
    error_axes.set(xlabel="epoch", ylabel="error (%)", title="error")
    error_axes.legend()
    lr_axes.plot(epochs, [row["lr"] for row in rows], marker=".")
    lr_axes.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate")
    for axes in (loss_axes, error_axes, lr_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    try:  # whole or not at all, as every run file
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    finally:
        plt.close(figure)


def epoch_summary(row: dict[str, Any], epochs: int) -> str:
    skipped = [f"{row[key]} {split}" for key, split in (("skipped_images", "training"),
                                                         ("val_skipped_images", "validation"))
               if row.get(key)]  # an earlier canon's rows have no val_skipped_images
    return (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.3g}  "
        f"train loss {row['train_loss']:.4f}  train top-1 err {row['train_top1_error']:.2f}%  "
        f"val top-1 err {row['val_top1_error']:.2f}%  top-5 err {row['val_top5_error']:.2f}%  "
        f"{row['images_per_second']:.0f} img/s  {row['seconds']:.0f} s"
        + (f"  undecodable skipped: {', '.join(skipped)}" if skipped else "")
    )


def progress_bar(total: int, epoch: int, epochs: int, *, initial: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", unit="step",
        disable=not enabled, leave=False, dynamic_ncols=True,
    )


def format_postfix(loss: float, lr: float, images_per_second: float) -> dict[str, str]:
    return {
        "loss": "nan" if math.isnan(loss) else f"{loss:.3f}",
        "lr": f"{lr:.3g}",
        "img/s": f"{images_per_second:.0f}",
    }


def check_tensorboard() -> None:
    """ConfigError, before a run starts, when train.tensorboard cannot be honoured."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (fails without the tensorboard package)
    except ImportError:
        raise ConfigError(
            "train.tensorboard needs the tensorboard package: pip install tensorboard "
            "(or drop --tensorboard)"
        ) from None


def event_writer(run_dir: Path) -> Any:
    """A TensorBoard SummaryWriter on run_dir/tensorboard (check_tensorboard first)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / EVENTS_DIR))


def write_epoch_events(writer: Any, row: dict[str, Any], step: int) -> None:
    """The epoch's metrics.csv row as scalars at optimizer step `step`."""
    for key in COLUMNS[2:]:  # not the epoch and step: the scalars' own coordinates
        writer.add_scalar(f"epoch/{key}", row[key], step)
    writer.flush()
