"""Invariance to transformations (Zeiler & Fergus 2013, section 4, "Feature Invariance", and
Fig. 5): images translated vertically, scaled or rotated by a range of amounts; for each, how
far the feature vectors of layer 1 and of the penultimate layer (Fig. 5's layer 7) move from
the untransformed image's, and the probability of the true class.

Definitions:
- The transformation acts on the uint8 image as the run's test preprocessing rescales it,
  before its centre crop and normalisation, so shifts are in pixels of the network's input and
  rotations and scalings turn about the crop's centre. Uncovered pixels get the dataset's mean
  colour (its channel mean; the spatial average of a mean image). Bilinear resampling.
- Layer 1 is the output of the first of model.stages; the penultimate layer is
  model.forward_head(features, pre_logits=True) (fc7 for AlexNet/ZFNet/VGG, the pooled
  features for GoogLeNet and ResNets).
- Distance: the Euclidean distance between the transformed and the original image's feature
  vectors divided by the norm of the original's, ||f(T x) - f(x)|| / ||f(x)||, so that layers
  of different sizes share a scale (the paper does not say how it normalised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from canon.engine.trained import TrainedModel
from canon.errors import ConfigError
from canon.evaluation.protocols import model_inputs
from canon.files import make_folder
from canon.validation import one_or_many
from canon.visualize.images import save_csv, save_json, seen_crop
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

TRANSFORMS = {  # name: the x axis
    "translate": "vertical shift (pixels of the input; + is down)",
    "scale": "scale factor",
    "rotate": "rotation (degrees)",
}
IDENTITY = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}
NORMALISATION = "||f(T x) - f(x)|| / ||f(x)||"


def default_values(transform: str, input_size: int) -> list[float]:
    """Shifts of up to 60 pixels at a 224 input (scaled to `input_size`, Fig. 5's range), in
    about 20 steps; scales 0.5 to 1.5 by 0.05; rotations 0 to 360 degrees by 10."""
    if transform == "translate":
        step = max(1, round(6 * input_size / 224))
        reach = max(1, round(60 * input_size / 224)) // step
        return [float(step * k) for k in range(-reach, reach + 1)]
    if transform == "scale":
        return [round(0.5 + 0.05 * k, 2) for k in range(21)]
    return [float(angle) for angle in range(0, 361, 10)]


def transform_image(image: torch.Tensor, transform: str, value: float,
                    fill: list[float]) -> torch.Tensor:
    """`image` shifted down by `value` pixels, scaled by `value` or rotated by `value` degrees
    (clockwise) about its centre."""
    shift, scale, angle = 0.0, 1.0, 0.0
    if transform == "translate":
        shift = value
    elif transform == "scale":
        scale = value
    else:
        angle = value
    return TF.affine(image, angle=angle, translate=[0.0, shift], scale=scale, shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR, fill=fill)


def invariance(
    source: TrainedModel | str | Path,
    images: Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    *,
    transform: str = "translate",
    values: Sequence[float] | None = None,
    labels: Sequence[str | int] | str | int | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Feature distances and true-class probabilities of `images` under `transform` at each of
    `values` (default: default_values); writes invariance-TRANSFORM.png, .csv and .json to
    `output_dir` and returns what the JSON holds plus the paths written.

    `images`: one image file or several. `labels`: the true class of each image (a class
    name, id or index), or one for all; default: the class each image's folder names
    (ImageNet's layout) if the model has it, else the untransformed image's top prediction.
    """
    if transform not in TRANSFORMS:
        raise ConfigError(f"unknown transform {transform!r}; use one of {', '.join(TRANSFORMS)}")
    if values is not None and not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{transform} values must be finite numbers, got {list(values)}")
    check_counts(batch_size=batch_size)
    trained = trained_model(source, device)
    preprocess = trained.preprocess
    values = list(values) if values is not None else default_values(transform,
                                                                     preprocess.crop_size)
    if not values or (transform == "scale" and min(values) <= 0):
        raise ConfigError(f"{transform} needs at least one value (scales above 0), got {values}")
    images = one_or_many(images)
    given = [class_index(trained, label)
             for label in (one_or_many(labels) if labels is not None else [])]
    if not images or len(given) not in (0, 1, len(images)):
        raise ConfigError(f"{len(given)} labels for {len(images)} images: give at least one "
                          "image, and one label per image, one for all, or none (the class "
                          "each image's folder names, else its top prediction)")
    fill = mean_colour(preprocess)
    results, examples = [], []
    for index, path in enumerate(images):
        rescaled = preprocess.rescale(read_image(trained, path))
        changed = [transform_image(rescaled, transform, v, fill) for v in values]
        measured = _measure(trained.model, preprocess.center(rescaled),
                            [preprocess.center(image) for image in changed], batch_size)
        original, probabilities = measured.pop("original"), measured.pop("probabilities")
        target, label_from = correct_class(
            trained, path, given[min(index, len(given) - 1)] if given else None, original)
        results.append({
            "image": str(path), "label": trained.classes[target], "label_from": label_from,
            **measured, "probability": probabilities[:, target].tolist(),
            "top_class": [trained.classes[i] for i in probabilities.argmax(1).tolist()],
        })
        if index == 0:
            shown = torch.linspace(0, len(values) - 1, min(5, len(values))).round().long()
            examples = [(values[i], seen_crop(preprocess, changed[i])) for i in shown.tolist()]
    result = {
        "model": str(trained.source), "transform": transform, "axis": TRANSFORMS[transform],
        "values": values, "layer1": stage_layers(trained.model)[0],
        "top_layer": "forward_head(pre_logits=True)", "distance": NORMALISATION,
        "fill": fill, "images": results,
    }
    folder = Path(output_dir)
    make_folder(folder)
    stem = folder / f"invariance-{transform}"
    result["png"] = str(save_figure(_figure(result, examples), stem.with_suffix(".png")))
    rows = [{"image": r["image"], "label": r["label"], "transform": transform, "value": v,
             "layer1_distance": r["layer1_distance"][i], "top_distance": r["top_distance"][i],
             "probability": r["probability"][i], "top_class": r["top_class"][i]}
            for r in results for i, v in enumerate(values)]
    result["csv"] = str(save_csv(stem.with_suffix(".csv"), rows))
    result["json"] = str(save_json(stem.with_suffix(".json"), result))
    return result


def _measure(model: torch.nn.Module, original: torch.Tensor, views: list[torch.Tensor],
             batch_size: int) -> dict[str, Any]:
    """Each view's normalised distances to `original` at layer 1 and the penultimate layer,
    the views' class probabilities, and the original's. Every batch carries the original
    first, so reference and views go through identical arithmetic."""
    layer = stage_layers(model)[0]
    device = model_device(model)
    first, top, probabilities = [], [], []
    with torch.inference_mode(), capture_outputs(model, [layer]) as outputs:
        for begin in range(0, len(views), batch_size):
            batch = model_inputs(model, torch.stack([original, *views[begin : begin + batch_size]]),
                                 device)
            features = model.forward_features(batch)
            for distances, vectors in ((first, outputs[layer]),
                                       (top, model.forward_head(features, pre_logits=True))):
                vectors = vectors.float().flatten(1)
                norm = vectors[0].norm().clamp_min(torch.finfo(torch.float32).tiny)
                distances += ((vectors[1:] - vectors[0]).norm(dim=1) / norm).tolist()
            probabilities.append(model.forward_head(features).float().softmax(1).cpu())
    return {"layer1_distance": first, "top_distance": top, "original": probabilities[0][0],
            "probabilities": torch.cat([p[1:] for p in probabilities])}


def _figure(result: dict[str, Any], examples: list[tuple[float, torch.Tensor]]) -> Any:
    figure = new_figure(15, 7.2)
    strip, panels = figure.subfigures(2, 1, height_ratios=[1, 2.1])
    name = Path(result["images"][0]["image"]).name
    strip_axes = strip.subplots(1, len(examples), squeeze=False)[0]
    for axes, (value, image) in zip(strip_axes, examples, strict=True):  # short: side by side
        show_image(axes, image, f"{result['transform']} {value:g}")
    strip.suptitle(f"{name}, the first image, as the network saw it", fontsize=9)
    titles = (f"layer 1 ({result['layer1']}): distance", "penultimate layer: distance",
              "probability of the true class")
    keys = ("layer1_distance", "top_distance", "probability")
    for axes, title, key in zip(panels.subplots(1, 3), titles, keys, strict=True):
        for image in result["images"]:
            axes.plot(result["values"], image[key], marker=".",
                      label=f"{Path(image['image']).stem} ({image['label']})")
        axes.set(xlabel=result["axis"], title=title)
        axes.set_ylabel(NORMALISATION if key != "probability" else "p(true class)")
        axes.grid(alpha=0.3)
    axes.set_ylim(-0.02, 1.02)
    axes.legend(fontsize=8)
    figure.suptitle(f"invariance to {result['transform']} (Zeiler & Fergus Fig. 5)",
                    fontsize=11)
    return figure
