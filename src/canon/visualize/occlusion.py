"""Occlusion sensitivity (Zeiler & Fergus 2013, section 4.2 and Fig. 7): a grey square slid
over the image the network sees, each occluded copy evaluated, and three maps over the square's
positions: (a) the total activation of the feature map of one layer (default: the last stage,
"layer 5" for AlexNet and ZFNet) that responds most strongly to the unoccluded image, (b) the
probability of the correct class, (c) the most probable class.

The square is grey in the sense of the paper's "gray square": the dataset's mean colour. After
the run's normalisation (x - mean) / std, whose mean is a channel mean or the mean image at
each pixel, that colour is exactly 0, so the square is filled with 0 in normalised space (the
mean image's own values where a per-pixel mean is subtracted).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

from canon.data.preprocess import center_transform
from canon.engine.trained import TrainedModel
from canon.errors import ConfigError
from canon.evaluation.protocols import model_inputs
from canon.files import make_folder
from canon.visualize.images import check_not_another, save_json, seen_crop
from canon.visualize.layers import capture_outputs
from canon.visualize.plots import (
    check_counts,
    class_index,
    correct_class,
    mean_colour,
    model_device,
    new_figure,
    read_image,
    save_figure,
    show_image,
    stage_layers,
    trained_model,
)

GREY = 0.0  # the dataset's mean colour in normalised space (see the module docstring)
GREY_MEANING = "the dataset's mean colour: 0.0 after the run's normalisation"
PAPER_INPUT, PAPER_SIZE, PAPER_STRIDE = 224, 32, 8  # canon's defaults at 224 (Fig. 7's scale)


def occlusion(
    source: TrainedModel | str | Path,
    image: str | Path,
    output_dir: str | Path,
    *,
    size: int | None = None,
    stride: int | None = None,
    label: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Occlusion maps of `image` for the run `source`; writes occlusion-STEM.png and .json to
    `output_dir` and returns what the JSON holds plus the paths written.

    The square (side `size`, moved by `stride`; defaults 32 and 8 at a 224 input, scaled to
    the run's crop) takes the positions `stride` apart inside the centre crop, and the last
    row and column flush with its edge, so that every pixel is covered (`square_starts`).
    `label` (a class name, id or index) is the correct class; default: the class the image's
    folder names (ImageNet's layout) if the model has it, else the unoccluded image's top
    prediction. `layer` is a module's dotted name (e.g. conv5_x, features.conv5); default: the
    last of model.stages.
    """
    check_counts(batch_size=batch_size)
    stem, whole = f"occlusion-{Path(image).stem}", str(Path(image).resolve())
    check_not_another(Path(output_dir) / f"{stem}.json", image=whole)
    trained = trained_model(source, device)
    model = trained.model
    raw = read_image(trained, image)
    crop = center_transform(trained.preprocess)(raw)
    side = crop.shape[-1]
    if size is None:
        size = max(1, round(PAPER_SIZE * side / PAPER_INPUT))
    if stride is None:
        stride = max(1, round(PAPER_STRIDE * side / PAPER_INPUT))
    if not 1 <= size <= side or stride < 1:
        raise ConfigError(f"the square must be 1..{side} pixels (the crop) and the stride at "
                          f"least 1, got size {size}, stride {stride}")
    layer = layer or stage_layers(model)[-1]
    starts = square_starts(side, size, stride)
    given = class_index(trained, label) if label is not None else None  # checked first
    probabilities, strongest, activation, scores = _scan(model, crop, layer, starts, size,
                                                         batch_size)
    target, label_from = correct_class(trained, image, given, probabilities)
    probability, top_class = scores[:, target].tolist(), scores.argmax(1).tolist()
    rows = len(starts)
    maps = {name: [values[i * rows : (i + 1) * rows] for i in range(rows)]
            for name, values in (("activation", activation), ("probability", probability),
                                 ("top_class", top_class))}
    result = {
        "image": whole, "model": str(trained.source), "crop_size": side,
        "size": size, "stride": stride, "starts": starts, "grey": GREY_MEANING,
        "layer": layer, "feature_map": strongest,
        "label": trained.classes[target], "label_index": target,
        "label_from": label_from,
        "unoccluded_probability": float(probabilities[target]),
        "unoccluded_top_class": trained.classes[int(probabilities.argmax())],
        "classes": {str(i): trained.classes[i] for i in sorted(set(top_class))},
        "maps": maps,
    }
    folder = Path(output_dir)
    make_folder(folder)
    grey = [c / 255 for c in mean_colour(trained.preprocess)]
    figure = _figure(seen_crop(trained.preprocess, raw), result, trained.classes, grey)
    result["png"] = str(save_figure(figure, folder / f"{stem}.png"))
    result["json"] = str(save_json(folder / f"{stem}.json", result))
    return result


def square_starts(side: int, size: int, stride: int) -> list[int]:
    """Offsets `stride` apart along a side, then flush with its far edge when they stop short
    of it (Zeiler & Fergus slide the square over the whole image)."""
    starts = list(range(0, side - size + 1, stride))
    return starts if starts[-1] == side - size else [*starts, side - size]


@torch.inference_mode()
def _scan(model: torch.nn.Module, crop: torch.Tensor, layer: str, starts: list[int], size: int,
          batch_size: int) -> tuple[torch.Tensor, int, list[float], torch.Tensor]:
    """The unoccluded crop's class probabilities and its strongest feature map at `layer`;
    for the square at each (top, left) of `starts` x `starts`, row by row, that map's total
    activation and the class probabilities (positions x classes, on the CPU)."""
    device = model_device(model)
    corners = [(top, left) for top in starts for left in starts]
    activation, scores = [], []
    with capture_outputs(model, [layer]) as outputs:
        probabilities = model(model_inputs(model, crop[None], device)).float().softmax(1)[0].cpu()
        strongest = int(_map_totals(outputs[layer])[0].argmax())
        for begin in range(0, len(corners), batch_size):
            chunk = corners[begin : begin + batch_size]
            batch = crop.repeat(len(chunk), 1, 1, 1)
            for copy, (top, left) in zip(batch, chunk, strict=True):
                copy[:, top : top + size, left : left + size] = GREY
            scores.append(model(model_inputs(model, batch, device)).float().softmax(1).cpu())
            activation += _map_totals(outputs[layer])[:, strongest].tolist()
    return probabilities, strongest, activation, torch.cat(scores)


def _map_totals(output: torch.Tensor) -> torch.Tensor:
    """N x C: each feature map's total activation (a unit's value for a flat output)."""
    return output.float().reshape(*output.shape[:2], -1).sum(-1)


def _figure(view: torch.Tensor, result: dict[str, Any], classes: list[str],
            grey: list[float]) -> Any:
    figure = new_figure(16, 4.4)
    image_axes, *map_axes = figure.subplots(1, 4)
    size, stride, side = result["size"], result["stride"], result["crop_size"]
    show_image(image_axes, view, f"input ({side}x{side}) and the {size}x{size} grey square")
    image_axes.add_patch(Rectangle((-0.5, -0.5), size, size, facecolor=grey, edgecolor="white"))
    edges = _cell_edges(result["starts"], size, stride)
    label = result["label"]
    for axes, key, title, colours in (
        (map_axes[0], "activation", f"(a) {result['layer']}, feature map "
                                    f"{result['feature_map']}: total activation", "viridis"),
        (map_axes[1], "probability", f"(b) p({label})", "magma"),
    ):
        shown = axes.pcolormesh(edges, edges, result["maps"][key], cmap=colours)
        axes.figure.colorbar(shown, ax=axes, shrink=0.8)
        axes.set(xlim=(-0.5, side - 0.5), ylim=(side - 0.5, -0.5))
        axes.set_title(title, fontsize=9)
    _class_map(map_axes[2], result["maps"]["top_class"], edges, classes, side)
    figure.suptitle(f"occlusion sensitivity (Zeiler & Fergus Fig. 7): {Path(result['image']).name}"
                    f", correct class {label} ({result['label_from']}, "
                    f"p = {result['unoccluded_probability']:.3f} unoccluded)", fontsize=10)
    return figure


def _cell_edges(starts: list[int], size: int, stride: int) -> list[float]:
    """Pixel coordinates of the map cells' edges: each cell is centred on its square, `stride`
    wide, and the last (flush with the edge, nearer its neighbour) meets it halfway, so the
    maps overlay the input pixel for pixel."""
    centres = [start + (size - 1) / 2 for start in starts]
    between = [(a + b) / 2 for a, b in pairwise(centres)]
    return [centres[0] - stride / 2, *between, centres[-1] + stride / 2]


def _class_map(axes: Any, top_class: list[list[int]], edges: list[float], classes: list[str],
               side: int) -> None:
    """The most probable class at each position, one colour per class (the ten most frequent
    named in the legend)."""
    flat = torch.tensor(top_class)
    present, counts = flat.unique(return_counts=True)
    codes = torch.searchsorted(present, flat)
    palette = [colormaps["tab20"](i % 20) for i in range(len(present))]
    axes.pcolormesh(edges, edges, codes.numpy(), cmap=ListedColormap(palette),
                    vmin=-0.5, vmax=len(present) - 0.5)
    axes.set(xlim=(-0.5, side - 0.5), ylim=(side - 0.5, -0.5))
    axes.set_title("(c) most probable class", fontsize=9)
    frequent = counts.argsort(descending=True)[:10].tolist()
    axes.legend(handles=[Patch(color=palette[i], label=classes[present[i]]) for i in frequent],
                fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
