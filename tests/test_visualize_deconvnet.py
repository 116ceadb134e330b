"""The deconvnet of Zeiler & Fergus (2013, s2.1): unpooling with recorded switches, transposed
convolutions, receptive fields, the one-pass top-k search (canon.visualize.search), refusal of
networks it cannot invert, and `canon visualize deconvnet` and `evolution` on a ZFNet's
checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from visualize_helpers import assert_picture, run_verb

import canon
from canon.data.datasets import load_sample
from canon.engine.checkpoint import epoch_checkpoint, save_checkpoint
from canon.engine.trained import load_trained
from canon.errors import ConfigError
from canon.visualize.deconvnet import (
    deconvnet_layers,
    forward,
    project,
    unpool,
    write_deconvnet,
)
from canon.visualize.layers import capture_outputs, clip, receptive_field
from canon.visualize.search import top_activations


def tiny_net() -> nn.Sequential:
    """Conv/ReLU/pool/LRN/dropout with padding, strides, overlapping ceil-mode pools."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 5, stride=2, padding=1), relu1=nn.ReLU(inplace=True),
        pool1=nn.MaxPool2d(3, 2, ceil_mode=True), norm1=nn.LocalResponseNorm(3),
        conv2=nn.Conv2d(6, 8, 3, padding=1, groups=2), relu2=nn.ReLU(inplace=True),
        drop=nn.Dropout(0.5), pool2=nn.MaxPool2d(2, 2),
    )).eval()


def test_unpooling_puts_each_value_at_its_switch_and_zero_elsewhere() -> None:
    x = torch.randn(2, 3, 8, 8)
    pooled, switches = F.max_pool2d(x, 2, 2, return_indices=True)
    signal = torch.randn_like(pooled)
    out = unpool(signal, switches, x.shape)
    expected = torch.zeros(2, 3, 64)
    for n in range(2):
        for c in range(3):
            for value, where in zip(signal[n, c].flatten(), switches[n, c].flatten(), strict=True):
                expected[n, c, where] = value
    assert torch.equal(out, expected.view_as(out))
    assert (out != 0).sum() == signal.numel()
    # Overlapping windows (3x3 stride 2) that share their maximum both send a value to it.
    shared = torch.zeros(1, 1, 5, 5)
    shared[0, 0, 2, 2] = 1.0
    pooled, switches = F.max_pool2d(shared, 3, 2, return_indices=True)
    assert (switches == 12).all()
    back = unpool(torch.ones_like(pooled), switches, shared.shape)
    assert back[0, 0, 2, 2] == 4 and back.sum() == 4


def test_a_conv1_projection_is_the_transposed_convolution_of_its_one_activation() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 7, stride=2, padding=1)  # ZFNet's conv1 geometry
    model = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))
    images = torch.randn(2, 3, 34, 34)  # (34 + 2 - 7) // 2 + 1 = 15: 33 back, so 1 padding
    projections, values, positions = project(deconvnet_layers(model, "relu"), images,
                                             torch.tensor([4, 1]))
    maps = F.relu(conv(images)).detach()
    for i, channel in enumerate((4, 1)):
        value, position = maps[i, channel].flatten().max(0)
        assert values[i] == value and positions[i] == position
        single = torch.zeros(1, 5, 15, 15)
        single[0, channel].view(-1)[position] = value
        expected = F.conv_transpose2d(single, conv.weight.detach(), stride=2, padding=1,
                                      output_padding=1)
        assert expected.shape[-2:] == (34, 34)
        torch.testing.assert_close(projections[i : i + 1], expected)


def test_a_projection_has_the_input_size_and_is_zero_outside_the_receptive_field() -> None:
    model = tiny_net()
    layers = deconvnet_layers(model, "pool2")
    images = torch.randn(3, 3, 41, 45)
    maps = forward(layers, images)
    height, width = maps.shape[-2:]
    for channel in (0, 5):
        positions = torch.tensor([0, height * width - 1, (height // 2) * width + width // 2])
        projections, _, _ = project(layers, images, torch.full((3,), channel), positions)
        assert projections.shape == images.shape
        for i, position in enumerate(positions.tolist()):
            top, left, bottom, right = clip(receptive_field(layers, *divmod(position, width)),
                                            41, 45)
            outside = torch.ones(41, 45, dtype=torch.bool)
            outside[top : bottom + 1, left : right + 1] = False
            assert projections[i][:, outside].abs().max() == 0
            # The box holds every pixel the activation depends on (its gradient's support).
            image = images[i : i + 1].clone().requires_grad_()
            model(image)[0, channel].flatten()[position].backward()
            depends = image.grad[0].abs().sum(0) > 0
            assert not depends[outside].any()


def test_the_zfnet_pass_matches_the_model_and_projects_within_the_field() -> None:
    model = canon.create_model("zfnet", num_classes=10).eval()
    images = torch.randn(1, 3, 224, 224)
    with capture_outputs(model, ["features.conv2", "features.conv5"]) as outputs:
        model(images)
    for name in outputs:
        assert torch.equal(forward(deconvnet_layers(model, name), images), outputs[name])
    layers = deconvnet_layers(model, "features.conv2")
    assert type(layers[2]) is nn.MaxPool2d and layers[2].ceil_mode  # pool before LRN (Fig. 3)
    projections, values, positions = project(layers, images, torch.tensor([7]))
    box = receptive_field(layers, *divmod(int(positions[0]), 13))
    assert box[2] - box[0] + 1 == 43  # 7 + 2*(3 - 1 + 2*(5 - 1 + 2*(3 - 1)))
    top, left, bottom, right = clip(box, 224, 224)
    outside = projections[0].clone()
    outside[:, top : bottom + 1, left : right + 1] = 0
    assert outside.abs().max() == 0 < projections.abs().max() and values[0] > 0
    with pytest.raises(ConfigError, match="feature stages"):
        deconvnet_layers(model, "head.fc6")


def test_the_top_search_keeps_the_largest_activations_of_the_whole_set() -> None:
    model = tiny_net()
    with torch.no_grad():
        model.conv2.bias.add_(1.0)  # no silent channel, so no ties to order
    layers = deconvnet_layers(model, "pool2")
    torch.manual_seed(2)
    images = torch.randn(40, 3, 24, 24)
    indices = torch.arange(40) * 3  # not 0..39: a set whose undecodable files were dropped
    batches = [(images[s : s + 7], indices[s : s + 7]) for s in range(0, 40, 7)]
    found = top_activations(partial(forward, layers), batches, 9)
    peaks = model(images).detach().flatten(2).max(2).values  # 40 x C, brute force
    expected_values, order = peaks.T.sort(1, descending=True)
    assert found.searched == 40 and found.values.shape == (8, 9) and found.values.min() > 0
    torch.testing.assert_close(found.values, expected_values[:, :9])
    assert torch.equal(found.images, indices[order[:, :9]])
    maps = model(images).detach().flatten(2)
    for channel in range(8):
        rows = found.images[channel] // 3
        assert torch.equal(maps[rows, channel, found.positions[channel]], found.values[channel])
    assert found.strongest_channels(3) == peaks.max(0).values.argsort(descending=True)[:3].tolist()
    assert found.choose([5, 2], 3, "pool2") == [5, 2]
    assert found.choose([], 3, "pool2") == found.strongest_channels(3)
    with pytest.raises(ConfigError, match=r"pool2 has channels 0\.\.7"):
        found.choose([8], 3, "pool2")


@pytest.mark.parametrize(("name", "layer", "culprit"), [
    ("resnet18", "conv2_x", "BatchNorm2d"), ("googlenet", "inception4a", "Inception"),
])
def test_networks_it_cannot_invert_are_refused_clearly(name, layer, culprit) -> None:
    model = canon.create_model(name, num_classes=10)
    with pytest.raises(ConfigError, match=culprit) as caught:
        deconvnet_layers(model, layer)
    message = str(caught.value)
    assert "AlexNet, ZFNet and VGG" in message and "activations" in message


def test_named_paddings_project_as_their_numbers() -> None:
    """padding="valid" and "same" (odd kernels) are zero paddings of 0 and (k - 1) x d / 2 a
    side; "same" with an even kernel pads unevenly and, like reflection, is refused."""

    def net(first: int | str, second: int | str) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=first), relu1=nn.ReLU(),
            conv2=nn.Conv2d(4, 5, 3, padding=second, dilation=2), relu2=nn.ReLU(),
        )).eval()

    images = torch.randn(2, 3, 12, 12)
    numbered = deconvnet_layers(net(0, 2), "relu2")
    named = deconvnet_layers(net("valid", "same"), "relu2")
    expected, _, _ = project(numbered, images, torch.tensor([1, 3]))
    projections, _, _ = project(named, images, torch.tensor([1, 3]))
    assert projections.shape == images.shape and projections.abs().max() > 0
    assert torch.equal(projections, expected)
    for row, column in ((0, 0), (3, 7), (11, 11)):
        assert receptive_field(named, row, column) == receptive_field(numbered, row, column)
    for conv in (nn.Conv2d(3, 4, 2, padding="same"), nn.Conv2d(3, 4, 3, padding_mode="reflect")):
        with pytest.raises(ConfigError, match="Conv2d"):
            deconvnet_layers(nn.Sequential(OrderedDict(conv=conv)), "conv")


def sample_folder(root, per_class: dict[str, int]) -> None:
    """An ImageNet-layout tree of real CIFAR-10 sample images (32x32 PNGs), two classes."""
    sample = load_sample("test")
    for split, count in per_class.items():
        for label, name in enumerate(("airplane", "automobile")):
            folder = root / split / name
            folder.mkdir(parents=True)
            chosen = [i for i, y in enumerate(sample.labels) if y == label][:count]
            for i in chosen:
                array = sample.images[i].permute(1, 2, 0).numpy()
                Image.fromarray(array).save(folder / f"{split}{i}.png")


def save_epoch(run, epoch: int, model: nn.Module, data: str) -> None:
    """An epoch checkpoint as canon train writes it, minus the optimiser's state: training a
    62M-parameter ZFNet for real costs more than this file's whole CPU budget."""
    recipe = canon.load_recipe("zfnet", [f"data.dataset={data}", "data.crop_size=224",
                                         "data.resize_size=224", "model.num_classes=2"])
    classes = ["airplane", "automobile"]
    save_checkpoint({
        "model": model.state_dict(), "optimizer": {}, "schedule": {}, "scaler": {},
        "ema": None, "epoch": epoch, "step": epoch, "step_in_epoch": 0, "epoch_totals": [],
        "rng": [], "metrics": [], "model_name": "zfnet", "classes": classes,
        "class_ids": classes, "recipe": recipe.to_dict(),
        "normalization": {"mean": torch.tensor([0.49, 0.48, 0.45]), "std": None},
    }, epoch_checkpoint(run, epoch))


def test_deconvnet_and_evolution_commands_on_a_zfnet_run(tmp_path, capsys) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    sample_folder(data, {"val": 3})
    model = canon.create_model("zfnet", num_classes=2)
    save_epoch(run, 1, model, str(data))
    with torch.no_grad():  # a second epoch: the filters moved on
        for parameter in model.features.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std())
    save_epoch(run, 2, model, str(data))

    out = tmp_path / "deconvnet"
    lines = run_verb(["deconvnet", str(epoch_checkpoint(run, 2)), "--layer", "features.conv2",
                      "--features", "2", "--top", "4", "--output-dir", str(out)], capsys)
    assert lines[-1].startswith("deconvnet: 2 features of features.conv2, top 4 of 6 val")
    numbers = json.loads((out / "deconvnet-features.conv2.json").read_text())
    assert numbers["images_searched"] == 6 and len(numbers["activations"]) == 8
    first = numbers["activations"][:4]
    assert [row["rank"] for row in first] == [1, 2, 3, 4]
    assert all(Path(row["image"]).parent.parent == data / "val" for row in first)  # its file
    strengths = [row["activation"] for row in first]
    assert strengths == sorted(strengths, reverse=True) and strengths[0] > 0
    assert_picture(out / "deconvnet-features.conv2.png", 4 * 2 * 43, 2 * 43)
    # A result on a dataset canon names (as `--data cifar10` records it) is not replaced by
    # one on other images.
    (out / "deconvnet-features.conv2.json").write_text(json.dumps({**numbers, "data": "cifar10"}))
    with pytest.raises(SystemExit):
        run_verb(["deconvnet", str(epoch_checkpoint(run, 2)), "--layer", "features.conv2",
                  "--output-dir", str(out)], capsys)
    assert "deconvnet-features.conv2.json holds the result for data cifar10" in \
        capsys.readouterr().err

    lines = run_verb(["evolution", str(run), "--layer", "features.conv1", "--features", "3"],
                     capsys)
    out = run / "visualize" / "evolution"
    assert lines[-1].startswith("evolution: 3 features of features.conv1 over 2 kept epochs")
    numbers = json.loads((out / "evolution-features.conv1.json").read_text())
    assert numbers["epochs"] == [1, 2] and len(numbers["activations"]) == 6
    assert_picture(out / "evolution-features.conv1.png", 3 * 45, 3 * 45)
    with pytest.raises(SystemExit):  # one epoch's model is not the run's final one
        run_verb(["evolution", str(run / "checkpoints" / "epoch-001.pt"), "--layer",
                  "features.conv1"], capsys)
    assert "epoch-001.pt: not a run directory; evolution sets the epochs a run kept" in \
        capsys.readouterr().err


def test_a_bfloat16_model_is_searched_and_projected_in_its_own_precision(tmp_path) -> None:
    """The search and the projections feed the model inputs of its weights' dtype (torch
    refuses float inputs to bfloat16 convolutions), and find what the float32 model finds, to
    bfloat16's precision."""
    data, run = tmp_path / "data", tmp_path / "run"
    sample_folder(data, {"val": 3})
    save_epoch(run, 1, canon.create_model("zfnet", num_classes=2), str(data))
    trained = load_trained(epoch_checkpoint(run, 1))
    halved = dataclasses.replace(trained, model=copy.deepcopy(trained.model).bfloat16())
    strengths = {}
    for name, model in (("float32", trained), ("bfloat16", halved)):
        write_deconvnet(model, "features.conv2", tmp_path / name, channels=[0, 5], top=3)
        numbers = json.loads((tmp_path / name / "deconvnet-features.conv2.json").read_text())
        strengths[name] = [row["activation"] for row in numbers["activations"]]
    assert len(strengths["float32"]) == 6 and max(strengths["float32"]) > 0
    torch.testing.assert_close(torch.tensor(strengths["bfloat16"]),
                               torch.tensor(strengths["float32"]), rtol=0.05, atol=0.01)
