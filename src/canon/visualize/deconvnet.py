"""Zeiler & Fergus's deconvnet (2013, s2.1, Figs. 1 and 2): one activation of a feature map
projected back to pixel space through the layers below it, in reverse.

The forward pass records each max pool's switches (the location of every pooled maximum). On
the way down all other activations of the layer are zero, and each layer is undone by its
deconvnet counterpart: max unpooling puts values back at the switches, ReLU is applied again,
a convolution becomes the transposed convolution with the same filters (no bias), and local
response normalisation and dropout pass the signal unchanged (the paper treats contrast
normalisation so; dropout does nothing at test time). This is its own pass with recorded
switches, not a gradient: no autograd runs through the network.

It applies to networks made of those modules alone, in nn.Sequential stages: AlexNet, ZFNet,
VGG without batch normalisation, GoogLeNet's layers below inception3a. Any other module on the
way (batch normalisation, residual blocks, inception modules) is refused: there is no
deconvnet counterpart for it to use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from canon.data.datasets import anchored_dataset
from canon.data.preprocess import center_transform
from canon.engine.trained import TrainedModel
from canon.errors import ConfigError
from canon.evaluation.protocols import model_inputs
from canon.files import make_folder
from canon.models.base import CanonModel
from canon.models.layers import LocalResponseNorm
from canon.visualize.images import (
    Written,
    check_not_another,
    patch_windows,
    projection_windows,
    save_csv,
    save_json,
    save_labelled_grid,
    seen_crop,
    side_by_side,
    upscale,
)
from canon.visualize.layers import Box, clip, conv_padding, find_layer, receptive_field
from canon.visualize.search import image_name, indexed_batches, open_split, top_activations

PROJECTABLE = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout, LocalResponseNorm,
               nn.LocalResponseNorm)
# A record per layer of the forward pass: its input's size and, for a max pool, the switches.
Trace = list[tuple[torch.Size, torch.Tensor | None]]


def deconvnet_layers(model: nn.Module, layer: str) -> list[nn.Module]:
    """The modules from the input up to `layer` (included), in forward order; ConfigError when
    `layer` is not in the feature stages or a module on the way has no deconvnet counterpart."""
    find_layer(model, layer)  # an unknown name: the error lists the layers
    if isinstance(model, CanonModel):
        if type(model).forward_features is not CanonModel.forward_features:
            raise _unsupported(f"{type(model).__name__} runs its stages its own way "
                               "(forward_features)")
        stages = [module for _, module in model.stages]
    elif type(model) is nn.Sequential:
        stages = list(model.children())
    else:
        raise _unsupported(f"{type(model).__name__} is neither a canon model nor an "
                           "nn.Sequential")
    names = {id(module): name for name, module in model.named_modules()}
    path: list[nn.Module] = []
    for stage in stages:
        if _collect(model, stage, names, layer, path):
            return path
    raise ConfigError(
        f"{layer} is not a layer of {type(model).__name__}'s feature stages; the deconvnet "
        "projects feature maps: choose a layer below the head, e.g. "
        f"{names[id(stages[-1])]}"
    )


def _collect(model: nn.Module, module: nn.Module, names: dict[int, str], layer: str,
             path: list[nn.Module]) -> bool:
    """Append `module`'s layers to `path` in forward order; True once `layer` is reached."""
    name = names[id(module)]
    if type(module) is nn.Sequential:
        if any(_collect(model, child, names, layer, path) for child in module.children()):
            return True
    elif isinstance(module, PROJECTABLE) and (
            not isinstance(module, nn.Conv2d) or conv_padding(module) is not None):
        path.append(module)
    else:
        raise _unsupported(f"{name} of {type(model).__name__} is {type(module).__name__}, "
                           "which it cannot invert")
    return name == layer


def _unsupported(reason: str) -> ConfigError:
    return ConfigError(
        "the deconvnet (Zeiler & Fergus 2013, s2.1) inverts only Conv2d (zero padding), ReLU, "
        "MaxPool2d, local response normalisation and Dropout chained in nn.Sequential stages, "
        f"as in AlexNet, ZFNet and VGG without batch normalisation; {reason}. For this layer "
        "use `canon visualize activations` (feature maps) or `canon visualize occlusion`"
    )


def forward(layers: list[nn.Module], images: torch.Tensor, trace: Trace | None = None
            ) -> torch.Tensor:
    """The output of `layers` on `images`; with `trace`, each layer's input size and each max
    pool's switches appended to it."""
    x = images
    for layer in layers:
        switches = None
        size = x.shape
        if isinstance(layer, nn.MaxPool2d):
            x, switches = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                                       layer.dilation, ceil_mode=layer.ceil_mode,
                                       return_indices=True)
        elif isinstance(layer, nn.ReLU):
            x = F.relu(x)  # never in place: `images` belongs to the caller
        elif not isinstance(layer, nn.Dropout):  # dropout is the identity at test time
            x = layer(x)
        if trace is not None:
            trace.append((size, switches))
    return x


def layer_maps(model: nn.Module, layers: list[nn.Module], device: str | torch.device
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The output of `layers` (of `model`) on a batch of images, which go to `device` in the
    floating dtype of `model`'s weights."""
    return lambda images: forward(layers, model_inputs(model, images, device))


def unpool(signal: torch.Tensor, switches: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Max unpooling: each value of N x C x h x w `signal` added at its switch in a zero map of
    `size`. Adding, not overwriting, makes it the transpose of the pool's selection: where
    overlapping windows (3x3 stride 2) share a maximum, both values reach it."""
    out = signal.new_zeros(*signal.shape[:2], *size[2:])
    out.flatten(2).scatter_add_(2, switches.flatten(2), signal.flatten(2))
    return out


def transposed_conv(conv: nn.Conv2d, signal: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """`signal` through the transpose of `conv` (its filters, stride, padding, groups and
    dilation; no bias), with the output padding that gives the conv's input `size`."""
    padding = conv_padding(conv)
    assert padding is not None, "_collect admits only convolutions padded with zeros evenly"
    extra = tuple(
        size[2 + i] - ((signal.shape[2 + i] - 1) * conv.stride[i] - 2 * padding[i]
                       + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(signal, conv.weight, None, conv.stride, padding, extra,
                              conv.groups, conv.dilation)


@torch.no_grad()
def project(
    layers: list[nn.Module], images: torch.Tensor, channels: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image i, the activation of channel channels[i] at flat position positions[i] of the
    last layer's map (default: that channel's maximum in that image) projected to pixel space
    alone. Returns the projections (the images' size), the activations and their positions."""
    trace: Trace = []
    out = forward(layers, images, trace)
    rows = torch.arange(len(images), device=out.device)
    maps = out[rows, channels.to(out.device)].flatten(1)
    if positions is None:
        values, positions = maps.max(1)
    else:
        positions = positions.to(out.device)
        values = maps[rows, positions]
    signal = torch.zeros_like(out)
    signal.flatten(2)[rows, channels.to(out.device), positions] = values
    for layer, (size, switches) in zip(reversed(layers), reversed(trace), strict=True):
        if isinstance(layer, nn.MaxPool2d):
            signal = unpool(signal, switches, size)
        elif isinstance(layer, nn.ReLU):
            signal = F.relu(signal)
        elif isinstance(layer, nn.Conv2d):
            signal = transposed_conv(layer, signal, size)
        # local response normalisation and dropout: the identity (s2.1)
    return signal, values, positions


def fields(layers: list[nn.Module], positions: torch.Tensor, width: int) -> list[Box]:
    """The receptive field of each flat position of the last layer's map (`width` wide)."""
    return [receptive_field(layers, *divmod(int(position), width)) for position in positions]


def activation_columns(value: float, position: int, width: int, box: Box,
                       size: Sequence[int]) -> dict[str, float | int]:
    """An activation, its place in the map (`width` wide) and its receptive field clipped to
    the input (`size`: height, width), as the columns of the numbers written beside the
    pictures."""
    field = dict(zip(("field_top", "field_left", "field_bottom", "field_right"),
                     clip(box, *size), strict=True))
    return {"activation": value, "row": position // width, "column": position % width, **field}


# ---------------------------------------------------------------------------------------------
# `canon visualize deconvnet`: the top images of a split per feature, and their projections


def write_deconvnet(
    trained: TrainedModel, layer: str, output_dir: Path, *, data: str | Path | None = None,
    split: str = "val", features: int = 9, channels: Sequence[int] = (), top: int = 9,
    batch_size: int = 32, workers: int = 0, device: str = "cpu",
) -> Written:
    """Zeiler & Fergus Fig. 2 for `layer`: per feature, the `top` images of the split whose
    maximum activation of it is largest, each activation's projection beside its image patch
    (the activation's receptive field, clipped to the image).

    The features are `channels` when given, else the `features` channels whose strongest
    activation over the split is largest. Writes deconvnet-LAYER.png and .json/.csv (per
    feature and rank: image, class, activation, position, receptive field)."""
    stem, searched = f"deconvnet-{layer}", anchored_dataset(str(data or trained.data.dataset))
    check_not_another(output_dir / f"{stem}.json", data=searched, split=split)
    model = trained.model.to(device)
    layers = deconvnet_layers(model, layer)
    dataset = open_split(trained, data, split)
    found = top_activations(layer_maps(model, layers, device),
                            indexed_batches(dataset, trained.preprocess, batch_size, workers), top)
    chosen = found.choose(channels, features, layer)
    width = found.map_size[1]
    transform, tiles, rows = center_transform(trained.preprocess), [], []
    for channel in chosen:
        indices = found.images[channel].tolist()
        raw = [dataset.load_image(i) for i in indices]
        inputs = model_inputs(model, torch.stack([transform(image) for image in raw]), device)
        projections, values, positions = project(
            layers, inputs, torch.full((len(raw),), channel), found.positions[channel]
        )
        boxes = fields(layers, positions, width)
        crops = [seen_crop(trained.preprocess, image) for image in raw]
        tiles.append(upscale(side_by_side(projection_windows(projections, boxes),
                                          patch_windows(crops, boxes))))
        for rank, (index, value, position, box) in enumerate(
            zip(indices, values.tolist(), positions.tolist(), boxes, strict=True), start=1
        ):
            rows.append({
                "channel": channel, "rank": rank, "image": image_name(dataset, index),
                "class": dataset.classes[dataset.labels[index]],
                **activation_columns(value, position, width, box, inputs.shape[-2:]),
            })
    make_folder(output_dir)
    ranks = found.values.shape[1]
    figure = save_labelled_grid(
        output_dir / f"{stem}.png", torch.cat(tiles), [f"channel {c}" for c in chosen],
        [f"top {r}" for r in range(1, ranks + 1)],
        f"{layer}: projection | image patch, top {ranks} of {found.searched} images",
    )
    numbers = {
        "method": "deconvnet (Zeiler & Fergus 2013, s2.1)", "source": str(trained.source),
        "layer": layer, "data": searched, "split": split,
        "images_searched": found.searched,
        "features": "given channels" if channels else "strongest maximum activation",
        "receptive_field": "field_top..field_right: input pixels (inclusive), clipped to it",
        "activations": rows,
    }
    written = [figure, save_json(output_dir / f"{stem}.json", numbers),
               save_csv(output_dir / f"{stem}.csv", rows)]
    return Written(f"{len(chosen)} features of {layer}, top {ranks} of {found.searched} "
                   f"{split} images each", written)
