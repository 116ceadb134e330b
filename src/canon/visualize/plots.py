"""What the analyses (occlusion, invariance, responses, curves) share: a run's model on a
device, its images and classes, and matplotlib figures drawn with the Agg backend (no display,
no pyplot state) and written atomically. Crops, JSON and CSV come from canon.visualize.images,
as for the other pictures."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from canon.data.decoding import decode_image_file
from canon.data.preprocess import EvalPreprocess
from canon.devices import resolve_device
from canon.engine.checkpoint import run_dir_of
from canon.engine.trained import TrainedModel, load_trained
from canon.errors import ConfigError
from canon.files import atomic_write

DPI = 150  # sharp enough for a projector, small enough to mail


def trained_model(source: TrainedModel | str | Path, device: str = "auto") -> TrainedModel:
    """`source` (a TrainedModel, or what load_trained reads) with its model on `device`, in
    eval mode (dropout off, batch norm's running statistics, as at test time)."""
    trained = source if isinstance(source, TrainedModel) else load_trained(source)
    trained.model.to(resolve_device(device)).eval()
    return trained


def check_counts(**counts: int | None) -> None:
    """ConfigError naming any count (batch size, number of images) below 1; None passes."""
    for name, count in counts.items():
        if count is not None and count < 1:
            raise ConfigError(f"{name} must be at least 1, got {count}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_names(sources: Sequence[TrainedModel | str | Path], names: Sequence[str] | None
              ) -> list[str]:
    """Legend names: `names` when given, else each run directory's name (a path's when two
    would be equal)."""
    if names is not None:
        if len(names) != len(sources):
            raise ConfigError(f"{len(names)} names for {len(sources)} runs; give one per run")
        return list(names)
    paths = [Path(s.source if isinstance(s, TrainedModel) else s) for s in sources]
    short = [run_dir_of(p).name or p.stem for p in paths]
    return [str(p) if short.count(s) > 1 else s for p, s in zip(paths, short, strict=True)]


def stage_layers(model: nn.Module) -> list[str]:
    """The dotted names (as capture_outputs takes them) of the model's `stages`, in order."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(stage)] for _, stage in model.stages]


def read_image(trained: TrainedModel, path: str | Path) -> torch.Tensor:
    """The decoded uint8 RGB image 3 x H x W (DataError naming an unreadable file)."""
    return decode_image_file(path, trained.data.max_image_pixels)


def mean_colour(preprocess: EvalPreprocess) -> list[float]:
    """The dataset's mean colour (its channel mean; a mean image's spatial average) on the
    0..255 scale of uint8 images."""
    return (preprocess.normalize.mean.mean((1, 2)) * 255).tolist()


def class_index(trained: TrainedModel, label: str | int) -> int:
    """An output index from a class name, a class id (ImageNet wnid) or an index (an int, or
    its digits as the command line gives them, where no class is named so)."""
    index = None if isinstance(label, str | bool) else _as_index(label)
    if index is not None:  # an integer (Python's, numpy's, a torch scalar's): never a name
        if 0 <= index < len(trained.classes):
            return index
        raise ConfigError(f"class index {index} is outside the model's "
                          f"{len(trained.classes)} outputs (0 to {len(trained.classes) - 1})")
    label = str(label)
    for names in (trained.classes, trained.class_ids):
        if label in names:
            return names.index(label)
    if label.isdigit() and int(label) < len(trained.classes):
        return int(label)
    shown = ", ".join(trained.classes[:10]) + (", ..." if len(trained.classes) > 10 else "")
    raise ConfigError(f"no class {label!r} among the model's {len(trained.classes)} "
                      f"outputs ({shown}); give a class name, id or index")


def _as_index(value: object) -> int | None:
    try:
        return operator.index(value)
    except TypeError:
        return None


def correct_class(trained: TrainedModel, image: str | Path, given: int | None,
                  probabilities: torch.Tensor) -> tuple[int, str]:
    """(output index, where it came from) of an image's correct class: `given`, else the class
    its folder names when the model has it (ImageNet's layout, val/<wnid>/x.JPEG), else its
    top prediction (`probabilities`, of the unaltered image)."""
    if given is not None:
        return given, "given"
    folder = Path(image).parent.name
    if folder in trained.class_ids:
        return trained.class_ids.index(folder), "the image's folder"
    return int(probabilities.argmax()), "top prediction of the unaltered image"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def integer_x(axes: Any) -> None:
    """Ticks at whole numbers only (epochs, layer indices)."""
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def show_image(axes: Any, image: torch.Tensor, title: str) -> None:
    axes.imshow(image.permute(1, 2, 0).cpu().numpy())
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()


def save_figure(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI))
    return path
