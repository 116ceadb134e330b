"""What the first layer learned and what a layer makes of one image: the first convolution's
kernels as a grid (the layout of Krizhevsky et al. 2012, Fig. 3: 96 kernels, the two towers'
halves in rows 1-3 and 4-6 of a 16-wide grid; Zeiler & Fergus 2013, Fig. 6), each
contrast-normalised on its own by default, canon's choice, which the papers do not state (it
shows each one's pattern; one scale for all, `shared_contrast`, shows how strong each kernel
is), and a layer's feature maps for one image."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from canon.data.decoding import decode_image_file
from canon.data.preprocess import center_transform
from canon.engine.trained import TrainedModel
from canon.errors import ConfigError
from canon.evaluation.protocols import model_inputs
from canon.files import make_folder
from canon.visualize.images import (
    Written,
    as_rgb,
    check_not_another,
    contrast_normalise,
    save_csv,
    save_json,
    save_png,
    seen_crop,
    tile_grid,
    upscale,
)
from canon.visualize.layers import capture_outputs, stages_hint

GRID_COLUMNS = 16  # AlexNet's 96 kernels: 6 rows, each tower's 48 in 3 of them


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first nn.Conv2d in model.named_modules() order, with its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ConfigError(f"{type(model).__name__} has no convolution to show the kernels of")


def kernel_tiles(weight: torch.Tensor, *, shared_contrast: bool = False) -> torch.Tensor:
    """Kernels out x in x k x k as uint8 RGB tiles, each contrast-normalised on its own (or,
    `shared_contrast`, all by one minimum and maximum): RGB when they read 3 channels, else
    their mean over the input channels in grey; small kernels are enlarged by a whole factor,
    nearest neighbour."""
    kernels = weight.detach().float().cpu()
    if kernels.shape[1] != 3:
        kernels = kernels.mean(1, keepdim=True)
    if shared_contrast:  # one tile of them all, stretched once
        normalised = contrast_normalise(kernels.unsqueeze(0))[0]
    else:
        normalised = contrast_normalise(kernels)
    return upscale(as_rgb(normalised))


def write_filters(trained: TrainedModel, output_dir: Path, *,
                  shared_contrast: bool = False) -> Written:
    """filters.png (the first convolution's kernels, GRID_COLUMNS to a row) and filters.csv
    (each kernel's norm, minimum and maximum); `shared_contrast` (see kernel_tiles) writes
    filters-shared.*, so that both pictures can sit side by side."""
    name, conv = first_conv(trained.model)
    tiles = kernel_tiles(conv.weight, shared_contrast=shared_contrast)
    make_folder(output_dir)
    stem = output_dir / ("filters-shared" if shared_contrast else "filters")
    weight = conv.weight.detach().float().cpu()
    rows = [
        {"kernel": index, "l2_norm": float(kernel.norm()), "min": float(kernel.min()),
         "max": float(kernel.max())}
        for index, kernel in enumerate(weight)
    ]
    columns = min(GRID_COLUMNS, len(tiles))
    written = [
        save_png(stem.with_suffix(".png"), tile_grid(tiles, columns)),
        save_csv(stem.with_suffix(".csv"), rows),
        save_json(stem.with_suffix(".json"), {
            "source": str(trained.source), "layer": name, "shape": list(weight.shape),
            "stride": list(conv.stride), "grid_columns": columns,
            "normalisation": ("all kernels' minimum to 0, maximum to 255" if shared_contrast
                              else "each kernel's own minimum to 0, maximum to 255"),
        }),
    ]
    return Written(f"{len(tiles)} kernels of {name}, {tuple(weight.shape[1:])} each", written)


def write_activations(
    trained: TrainedModel, image: Path, layer: str, output_dir: Path, *, device: str = "cpu"
) -> Written:
    """The feature maps of `layer` for one image file (the run's centre crop): a grid on one
    scale for the whole layer (its minimum black, its maximum white), so strong and silent
    maps compare; the crop the network saw; and each map's maximum, mean and share of
    positive values."""
    stem = f"activations-{Path(image).stem}-{layer}"  # another image's go beside these
    whole = str(image.resolve())
    check_not_another(output_dir / f"{stem}.json", image=whole)
    decoded = decode_image_file(image, trained.data.max_image_pixels)
    model = trained.model.to(device)
    inputs = model_inputs(model, center_transform(trained.preprocess)(decoded)[None], device)
    with capture_outputs(model, [layer]) as outputs, torch.no_grad():
        model(inputs)
    maps = outputs[layer]
    if not torch.is_tensor(maps) or maps.dim() != 4:
        raise ConfigError(f"{layer} gives no feature maps (its output is not N x C x H x W); "
                          f"choose a convolutional layer{stages_hint(model)}")
    maps = maps[0].float().cpu()
    tiles = upscale(as_rgb(contrast_normalise(maps[None])[0][:, None]))  # the layer as one
    make_folder(output_dir)
    rows = [
        {"channel": c, "max": float(m.max()), "mean": float(m.mean()),
         "positive": float((m > 0).float().mean())}
        for c, m in enumerate(maps)
    ]
    written = [
        save_png(output_dir / f"{stem}.png", tile_grid(tiles, min(GRID_COLUMNS, len(tiles)))),
        save_png(output_dir / f"{stem}-input.png", seen_crop(trained.preprocess, decoded)),
        save_csv(output_dir / f"{stem}.csv", rows),
        save_json(output_dir / f"{stem}.json", {
            "source": str(trained.source), "image": whole, "layer": layer,
            "shape": list(maps.shape), "min": float(maps.min()), "max": float(maps.max()),
        }),
    ]
    return Written(f"{len(maps)} feature maps of {layer} ({maps.shape[1]}x{maps.shape[2]}) "
                   f"for {image.name}", written)
