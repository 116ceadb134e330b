"""First-layer filters (Krizhevsky et al. 2012, Fig. 3) and feature maps: one contrast-normalised
tile per kernel, maps on one scale per layer, layer outputs captured before an in-place ReLU,
and `canon visualize filters/activations` on a real (tiny) training run and on torchvision's
weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from visualize_helpers import assert_picture, run_verb

import canon
from canon.data.config import DataConfig
from canon.data.preprocess import center_transform, eval_preprocess
from canon.engine.trained import TrainedModel
from canon.errors import ConfigError
from canon.evaluation.protocols import preprocess_for
from canon.visualize.filters import first_conv, kernel_tiles, write_activations, write_filters
from canon.visualize.images import GRID_PADDING, contrast_normalise
from canon.visualize.layers import capture_outputs


def in_memory(model: nn.Module, preprocess=None) -> TrainedModel:
    data = DataConfig(crop_size=32, resize_size=32)
    preprocess = preprocess or eval_preprocess(data, mean=torch.tensor([0.5, 0.5, 0.5]))
    return TrainedModel(model.eval(), ["a"], ["a"], preprocess, data, source=Path("in-memory"),
                        name=type(model).__name__)


def read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as picture:
        return torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)


def tiles_of(grid: torch.Tensor, count: int, side: int, columns: int) -> list[torch.Tensor]:
    """Cut a grid back into its tiles by geometry alone (GRID_PADDING around each)."""
    step = side + GRID_PADDING
    return [
        grid[:, GRID_PADDING + step * (i // columns) : step * (i // columns + 1),
             GRID_PADDING + step * (i % columns) : step * (i % columns + 1)]
        for i in range(count)
    ]


def test_alexnet_filters_make_one_contrast_normalised_tile_per_kernel(tmp_path) -> None:
    model = canon.create_model("alexnet", num_classes=10)
    written = write_filters(in_memory(model, preprocess_for(model)), tmp_path)
    assert written.summary.startswith("96 kernels of features.conv1.conv")
    grid = read_png(tmp_path / "filters.png")
    side = 55  # 11x11 kernels enlarged 5 times, nearest neighbour
    assert grid.shape == (3, 6 * (side + GRID_PADDING) + GRID_PADDING,
                          16 * (side + GRID_PADDING) + GRID_PADDING)  # 96 tiles, 16 a row
    weight = model.features.conv1.conv.weight.detach()
    for index, tile in enumerate(tiles_of(grid, 96, side, 16)):
        assert tile.min() == 0 and tile.max() == 255
        assert torch.equal(tile[:, ::5, ::5], contrast_normalise(weight[index : index + 1])[0])
    with open(tmp_path / "filters.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96
    assert float(rows[3]["l2_norm"]) == pytest.approx(float(weight[3].norm()), rel=1e-6)


def test_small_kernels_are_enlarged_and_flat_ones_grey() -> None:
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[2] = 0.7
    name, found = first_conv(nn.Sequential(nn.ReLU(), conv, nn.Conv2d(4, 4, 1)))
    assert (name, found) == ("1", conv)
    tiles = kernel_tiles(conv.weight)
    assert tiles.shape == (4, 3, 48, 48)  # 3x3 kernels as 16x16 blocks
    assert (tiles[2] == 128).all()
    assert all(tiles[i].min() == 0 and tiles[i].max() == 255 for i in (0, 1, 3))
    grey = kernel_tiles(nn.Conv2d(1, 2, 5).weight)  # one input channel: grey tiles
    assert torch.equal(grey[:, 0], grey[:, 1]) and grey.shape == (2, 3, 50, 50)
    # One range for all: a kernel of a tenth the strength spans a tenth of the greys.
    with torch.no_grad():
        conv.weight[1] = conv.weight[0] / 10
    shared = kernel_tiles(conv.weight, shared_contrast=True).float()
    assert shared.min() == 0 and shared.max() == 255 and not (shared[2] == 128).all()
    spans = [float(tile.max() - tile.min()) for tile in shared]
    assert spans[1] == pytest.approx(spans[0] / 10, abs=1.0)


def test_activations_show_a_layers_maps_on_one_scale(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 16 * 16, 2))
    trained = in_memory(model)
    image = tmp_path / "image.png"
    sample = canon.data.datasets.load_sample("test").images[0]
    Image.fromarray(sample.permute(1, 2, 0).numpy()).save(image)
    write_activations(trained, image, "1", tmp_path)
    maps = model[1](model[0](center_transform(trained.preprocess)(sample)[None]))[0].detach()
    grid = read_png(tmp_path / "activations-image-1.png")
    side = 64  # 32x32 maps enlarged to at least 48 pixels: twice
    assert grid.shape == (3, side + 2 * GRID_PADDING, 6 * (side + GRID_PADDING) + GRID_PADDING)
    low, high = maps.min(), maps.max()
    for channel, tile in enumerate(tiles_of(grid, 6, side, 6)):
        expected = ((maps[channel] - low) / (high - low) * 255).round()
        assert torch.equal(tile[0, ::2, ::2].float(), expected)
    with Image.open(tmp_path / "activations-image-1-input.png") as picture:
        assert picture.size == (32, 32)
    with open(tmp_path / "activations-image-1.csv") as f:
        peaks = [float(row["max"]) for row in csv.DictReader(f)]
    torch.testing.assert_close(torch.tensor(peaks), maps.flatten(1).max(1).values)
    with pytest.raises(ConfigError, match="no feature maps"):
        write_activations(trained, image, "4", tmp_path)


def test_captured_outputs_are_not_changed_by_an_in_place_relu_after_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
    with capture_outputs(model, ["0"]) as outputs, torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    assert outputs["0"].min() < 0  # the convolution's output, not the ReLU's


def test_a_layer_that_inference_does_not_run_is_named_in_the_error(tmp_path) -> None:
    """GoogLeNet's auxiliary heads run only in training: their layers have no activations
    to show (before, a bare KeyError)."""
    model = canon.create_model("googlenet", num_classes=10).eval()
    with (pytest.raises(ConfigError, match=r"layer aux1.conv did not run in the model's "
                                           r"forward pass \(auxiliary heads run only in "
                                           r"training\); choose a layer on the main path, e\.g\. "
                                           r"a stage: conv1, pool1, conv2, .*, inception5b$"),
          capture_outputs(model, ["aux1.conv", "inception4a"]) as outputs, torch.no_grad()):
        model(torch.zeros(1, 3, 224, 224))
        assert outputs["inception4a"].shape[1] == 512
        outputs["aux1.conv"]


def test_filters_and_activations_commands_on_a_real_run(
    quickstart_run, sample_images, tmp_path, capsys
) -> None:
    lines = run_verb(["filters", str(quickstart_run), "--contrast", "shared", "--output-dir",
                      str(tmp_path / "shared")], capsys)
    assert "all kernels' minimum to 0" in (tmp_path / "shared" / "filters-shared.json").read_text()
    run_verb(["filters", str(quickstart_run), "--output-dir", str(tmp_path / "shared")], capsys)
    assert sorted(p.name for p in (tmp_path / "shared").glob("*.png")) == [  # side by side
        "filters-shared.png", "filters.png"]
    lines = run_verb(["filters", str(quickstart_run)], capsys)
    assert lines[-1].startswith("filters: 16 kernels of conv1.0")  # ResNet-20's 3x3 conv
    assert_picture(quickstart_run / "visualize" / "filters" / "filters.png", 16 * 48, 48)
    # An epoch's checkpoint: beside the final model's pictures, not over them.
    final = (quickstart_run / "visualize" / "filters" / "filters.json").read_text()
    run_verb(["filters", str(quickstart_run / "checkpoints" / "epoch-001.pt")], capsys)
    epoch = json.loads((quickstart_run / "visualize" / "filters-epoch-001" / "filters.json"
                        ).read_text())
    assert epoch["source"].endswith("epoch-001.pt")
    assert (quickstart_run / "visualize" / "filters" / "filters.json").read_text() == final

    out = tmp_path / "maps"
    lines = run_verb(["activations", str(quickstart_run / "model.safetensors"),
                      str(sample_images[0]), "--layer", "conv3_x", "--output-dir", str(out),
                      "--device", "cpu"], capsys)
    stem = f"activations-{Path(sample_images[0]).stem}-conv3_x"
    assert lines[:4] == [str(out / f"{stem}{suffix}")
                         for suffix in (".png", "-input.png", ".csv", ".json")]
    assert_picture(out / f"{stem}.png", 16 * 48, 2 * 48)  # 32 maps 16x16

    with pytest.raises(SystemExit) as exit_info:
        run_verb(["deconvnet", str(quickstart_run), "--layer", "conv2_x"], capsys)
    assert exit_info.value.code == 2 and "BatchNorm2d" in capsys.readouterr().err


@pytest.mark.usefixtures("random_torchvision")
def test_torchvision_weights_write_to_the_working_directory(tmp_path, monkeypatch,
                                                            capsys) -> None:
    """`canon visualize filters torchvision:resnet18` (random weights here, instead of
    downloaded ones): no run directory, so ./visualize/filters."""
    monkeypatch.chdir(tmp_path)
    lines = run_verb(["filters", "torchvision:resnet18"], capsys)
    out = Path("visualize") / "filters"
    assert lines[:-1] == [str(out / name) for name in ("filters.png", "filters.csv",
                                                       "filters.json")]
    assert lines[-1].startswith("filters: 64 kernels of") and lines[-1].endswith(str(out))
    assert_picture(tmp_path / out / "filters.png", 16 * 49, 4 * 49)  # 7x7 kernels, 7 times
