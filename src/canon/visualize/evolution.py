"""How features develop over training (Zeiler & Fergus 2013, s4.2, Fig. 4): for a few features
of a layer, the deconvnet projection of the strongest activation at each epoch whose
checkpoint the run kept (checkpoints/epoch-NNN.pt; train.keep_epochs chooses them).

Zeiler & Fergus search the training set again at every epoch. Here the images are chosen once,
with the final model: per feature, the image (of a dataset split, or of given files) in which
its activation is strongest; then each epoch's weights project, in that same image, that
feature's strongest activation under those weights. The same image in every column shows the
feature itself changing, not the image chosen for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from canon.data.decoding import decode_image_file
from canon.data.preprocess import center_transform
from canon.engine.checkpoint import run_dir_of, run_epoch_checkpoints
from canon.engine.trained import load_trained
from canon.errors import ConfigError, DataError
from canon.evaluation.protocols import model_inputs
from canon.files import make_folder
from canon.visualize.deconvnet import (
    activation_columns,
    deconvnet_layers,
    fields,
    layer_maps,
    project,
)
from canon.visualize.images import (
    Written,
    patch_windows,
    projection_windows,
    save_csv,
    save_json,
    save_labelled_grid,
    seen_crop,
    upscale,
)
from canon.visualize.search import (
    image_batches,
    image_name,
    indexed_batches,
    open_split,
    top_activations,
)


def epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, checkpoint) for each epoch checkpoint the run kept, oldest first."""
    return sorted((int(path.stem.removeprefix("epoch-")), path)
                  for path in run_epoch_checkpoints(run_dir))


def write_evolution(
    run: str | Path, layer: str, output_dir: Path, *, data: str | Path | None = None,
    split: str = "val", images: Sequence[Path] = (), features: int = 6,
    channels: Sequence[int] = (), batch_size: int = 32, workers: int = 0, device: str = "cpu",
) -> Written:
    """evolution-LAYER.png (rows: features; columns: the kept epochs, then the image patch the
    final model's strongest activation sees) and .json/.csv (per feature and epoch: the
    activation, its position and receptive field). The images come from `images` when given,
    else from the `split` of `data` (default: the run's dataset); the features are `channels`
    when given, else the `features` channels strongest over those images."""
    if not Path(run).is_dir():  # a checkpoint's run would show epochs past it; torchvision
        raise ConfigError(  # weights have none
            f"{run}: not a run directory; evolution sets the epochs a run kept beside its final "
            "model: name the run's directory")
    run_dir = run_dir_of(Path(run))
    epochs = epoch_checkpoints(run_dir)
    if not epochs:
        raise DataError(
            f"{run_dir} kept no epoch checkpoints (checkpoints/epoch-NNN.pt); train with "
            "train.keep_epochs (e.g. [1, 2, 5, 10]) to keep the epochs to compare"
        )
    final = load_trained(run)
    final_model = final.model.to(device)
    layers = deconvnet_layers(final_model, layer)
    if images:
        decoded = [decode_image_file(path, final.data.max_image_pixels) for path in images]
        batches = image_batches(decoded, final.preprocess, batch_size)
        load, name = decoded.__getitem__, lambda index: str(images[index])
    else:
        dataset = open_split(final, data, split)
        batches = indexed_batches(dataset, final.preprocess, batch_size, workers)
        load, name = dataset.load_image, partial(image_name, dataset)
    found = top_activations(layer_maps(final_model, layers, device), batches, 1)
    chosen = found.choose(channels, features, layer)
    picked = found.images[chosen, 0].tolist()
    raw = [load(index) for index in picked]
    transform = center_transform(final.preprocess)
    seen = torch.stack([transform(image) for image in raw])
    width = found.map_size[1]

    columns, rows = [], []
    for epoch, checkpoint in epochs:
        model = load_trained(checkpoint).model.to(device)
        projections, values, positions = project(
            deconvnet_layers(model, layer), model_inputs(model, seen, device), torch.tensor(chosen)
        )
        boxes = fields(layers, positions, width)
        columns.append(projection_windows(projections, boxes))
        for channel, index, value, position, box in zip(
            chosen, picked, values.tolist(), positions.tolist(), boxes, strict=True
        ):
            rows.append({
                "channel": channel, "epoch": epoch, "image": name(index),
                **activation_columns(value, position, width, box, seen.shape[-2:]),
            })
    crops = [seen_crop(final.preprocess, image) for image in raw]
    columns.append(patch_windows(crops, fields(layers, found.positions[chosen, 0], width)))
    tiles = upscale(torch.stack(columns, 1).flatten(0, 1))  # row-major: feature, then epoch
    make_folder(output_dir)
    stem = f"evolution-{layer}"
    figure = save_labelled_grid(
        output_dir / f"{stem}.png", tiles, [f"channel {c}" for c in chosen],
        [*(f"epoch {e}" for e, _ in epochs), "image"],
        f"{layer}: each epoch's own peak in the image at right, projected",
    )
    numbers = {
        "method": "deconvnet over training (Zeiler & Fergus 2013, s4.2, Fig. 4)",
        "source": str(final.source), "layer": layer, "epochs": [e for e, _ in epochs],
        "images": "given files" if images else f"{split} split of {data or final.data.dataset}",
        "images_searched": found.searched,
        "features": "given channels" if channels else "strongest maximum activation (final)",
        "activations": rows,
    }
    written = [figure, save_json(output_dir / f"{stem}.json", numbers),
               save_csv(output_dir / f"{stem}.csv", rows)]
    return Written(f"{len(chosen)} features of {layer} over {len(epochs)} kept epochs", written)
