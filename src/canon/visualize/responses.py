"""Standard deviations of layer responses (He et al. 2015, section 4.2, "Analysis of Layer
Responses", Fig. 7): "the responses are the outputs of each 3x3 layer, after BN and before
other nonlinearity (ReLU/addition)", in the layers' order and sorted by magnitude, for several
runs on one plot; residual functions should respond more weakly than plain layers.

Definitions:
- The layers are every BatchNorm2d applied directly to the output of a 3x3 convolution, in the
  order they run: in canon's ResNets and plain nets both BNs of each basic block (bn1, bn2),
  the middle one (bn2) of each bottleneck, and the stem's BN where the stem convolution is 3x3
  (the CIFAR nets: ResNet-20 has 19 such layers). Found by running the model once on a blank
  image with hooks: a BN counts when its input is the very tensor a 3x3 convolution returned.
- The std of a layer is each channel's standard deviation over all images, rows and columns of
  the evaluation split (population std, as BN's), averaged over the channels; `std_all`, the
  std of all the layer's values together, is reported too. Sums and sums of squares are
  accumulated in float64 in one pass over the data, the model in eval mode (BN's running
  statistics, as at test time).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from canon.data.datasets import canon_cache_dir, open_eval_split
from canon.data.labeled import ImageSubset
from canon.data.loaders import build_loader
from canon.data.preprocess import center_transform
from canon.data.shards import ShardImages
from canon.engine.trained import TrainedModel
from canon.errors import ConfigError, DataError
from canon.evaluation.protocols import model_inputs
from canon.files import make_folder
from canon.visualize.images import save_csv, save_json
from canon.visualize.plots import (
    check_counts,
    integer_x,
    model_device,
    new_figure,
    run_names,
    save_figure,
    trained_model,
)


def response_layers(model: nn.Module, input_size: int) -> list[str]:
    """Names of the BatchNorm2d layers applied directly to a 3x3 convolution's output, in the
    order a forward pass (in eval mode: no running statistic moves) runs them."""
    names = {module: name for name, module in model.named_modules()}
    last_conv: list[tuple[nn.Conv2d, torch.Tensor]] = []
    found: list[str] = []

    def after_conv(conv: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        last_conv[:] = [(conv, output)]

    def after_norm(norm: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        if last_conv and inputs[0] is last_conv[0][1] and last_conv[0][0].kernel_size == (3, 3):
            found.append(names[norm])

    handles = [module.register_forward_hook(after_conv if isinstance(module, nn.Conv2d)
                                            else after_norm)
               for module in model.modules() if isinstance(module, nn.Conv2d | nn.BatchNorm2d)]
    was_training = model.training
    try:
        with torch.inference_mode():
            probe = torch.zeros(1, 3, input_size, input_size)
            model.eval()(model_inputs(model, probe, model_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(found))


def layer_stds(
    trained: TrainedModel, data: str | Path | None = None, *, batch_size: int = 128,
    max_images: int | None = None, workers: int = 0,
) -> dict[str, Any]:
    """The response std of every layer response_layers finds, over the evaluation split of
    `data` (default: the run's own dataset) under the run's centre-crop preprocessing;
    `max_images` spreads that many over the split. ConfigError for a model without them."""
    check_counts(batch_size=batch_size, max_images=max_images)
    model = trained.model
    layers = response_layers(model, trained.preprocess.crop_size)
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no batch norm after its 3x3 convolutions, and the "
            "layer responses of He et al. Fig. 7 are those BN outputs: use a ResNet or plain "
            "net (e.g. resnet20, plain20)"
        )
    data = str(data or trained.data.dataset)
    split = open_eval_split(data, cache=canon_cache_dir(), download=trained.data.download,
                            max_pixels=trained.data.max_image_pixels)
    if max_images is not None and max_images < len(split):
        if isinstance(split, ShardImages):
            raise ConfigError(
                f"--max-images spreads images over an indexed split, and {data} is a shard "
                "folder, which streams: drop --max-images (every image is read once) or pass "
                "the image folder it was packed from"
            )
        split = ImageSubset(split, torch.linspace(0, len(split) - 1, max_images).long().tolist())
    sums: dict[str, list] = {}  # name: [per-channel sum, sum of squares, values per channel]

    def accumulate(name: str, output: torch.Tensor) -> None:
        values = output.detach().double().transpose(0, 1).flatten(1)  # C x (N H W)
        totals = sums.setdefault(name, [0, 0, 0])
        totals[0] = totals[0] + values.sum(1)
        totals[1] = totals[1] + values.square().sum(1)
        totals[2] += values.shape[1]

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, output, name=name: accumulate(name, output)) for name in layers]
    loader = build_loader(split.with_transform(center_transform(trained.preprocess)),
                          batch_size, train=False, workers=workers)
    images = 0
    try:
        with torch.inference_mode():
            for batch, _ in loader:
                if len(batch):
                    model(model_inputs(model, batch, model_device(model)))
                    images += len(batch)
    finally:
        for handle in handles:
            handle.remove()
    if not images:
        raise DataError(f"no decodable image in the evaluation split of {data}")
    return {"data": data, "images": images, "layers": [_std(name, *sums[name])
                                                          for name in layers]}


def _std(name: str, total: torch.Tensor, squares: torch.Tensor, count: int) -> dict[str, Any]:
    mean = total / count
    per_channel = (squares / count - mean.square()).clamp_min(0).sqrt()
    overall_mean = total.sum() / (count * len(total))
    overall = (squares.sum() / (count * len(total)) - overall_mean.square()).clamp_min(0).sqrt()
    return {"layer": name, "channels": len(total), "std": float(per_channel.mean()),
            "std_all": float(overall)}


def responses(
    sources: Sequence[TrainedModel | str | Path],
    output_dir: str | Path,
    *,
    data: str | Path | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 128,
    max_images: int | None = None,
    workers: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Layer response stds of each run (see layer_stds) on one plot, by layer index and
    sorted (Fig. 7); writes responses.png, .csv and .json to `output_dir` and returns what
    the JSON holds plus the paths written. `names` label the runs (default: their folders)."""
    labels = run_names(sources, names)
    runs = []
    for label, source in zip(labels, sources, strict=True):
        trained = trained_model(source, device)
        stats = layer_stds(trained, data, batch_size=batch_size, max_images=max_images,
                           workers=workers)
        runs.append({"name": label, "model": str(trained.source), **stats})
    result: dict[str, Any] = {
        "std": "per-channel std over images x rows x columns, mean over channels",
        "std_all": "std over all values of the layer", "runs": runs,
    }
    folder = Path(output_dir)
    make_folder(folder)
    result["png"] = str(save_figure(_figure(runs), folder / "responses.png"))
    rows = [{"run": run["name"], "index": index, **layer}
            for run in runs for index, layer in enumerate(run["layers"], start=1)]
    result["csv"] = str(save_csv(folder / "responses.csv", rows))
    result["json"] = str(save_json(folder / "responses.json", result))
    return result


def _figure(runs: list[dict[str, Any]]) -> Any:
    figure = new_figure(8, 7)
    by_order, by_size = figure.subplots(2, 1)
    for run in runs:
        stds = [layer["std"] for layer in run["layers"]]
        positions = range(1, len(stds) + 1)
        by_order.plot(positions, stds, marker=".", label=run["name"])
        by_size.plot(positions, sorted(stds, reverse=True), marker=".", label=run["name"])
    by_order.set(xlabel="layer index (original)", title="responses of each 3x3 layer after BN")
    by_size.set(xlabel="layer index (sorted by magnitude)")
    for axes in (by_order, by_size):
        integer_x(axes)
        axes.set_ylabel("std")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    data = Path(runs[0]["data"]).name or runs[0]["data"]
    figure.suptitle(f"layer responses (He et al. Fig. 7) on {data}", fontsize=11)
    return figure
