"""The analyses of canon.visualize (occlusion, invariance, layer responses, training curves),
each checked for the property its paper's figure rests on, on a real (tiny) training run of
the bundled CIFAR-10 sample and on models built here so the right answer is known, and their
`canon visualize` verbs."""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import shutil
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from sample_subsets import spread_subset
from visualize_helpers import assert_picture, run_verb, save_png

import canon
from canon.data import DataConfig
from canon.data.datasets import open_split
from canon.data.decoding import decode_image_file
from canon.data.packing import pack_folder
from canon.data.preprocess import center_transform, eval_preprocess
from canon.engine.trained import TrainedModel, load_trained
from canon.errors import ConfigError, DataError
from canon.evaluation.protocols import preprocess_for
from canon.models.base import CanonModel
from canon.transfer.features import extract_features
from canon.visualize.curves import curves, curves_figure
from canon.visualize.filters import write_activations
from canon.visualize.invariance import default_values, invariance, transform_image
from canon.visualize.occlusion import _cell_edges, occlusion, square_starts
from canon.visualize.plots import class_index
from canon.visualize.responses import layer_stds, response_layers, responses


class PatchModel(CanonModel):
    """Two classes; the logit of class 0 is the mean over one size x size patch of the image's
    colour sums, the other's is 1: only that patch matters."""

    def __init__(self, top: int, left: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 1, 1, bias=False)  # sums the colours
        nn.init.ones_(self.conv1.weight)
        self.window = (slice(top, top + size), slice(left, left + size))

    @property
    def stages(self) -> list[tuple[str, nn.Module]]:
        return [("conv1", self.conv1)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            return x.flatten(1)
        patch = x[:, 0, self.window[0], self.window[1]].mean((1, 2))
        return torch.stack([patch, torch.ones_like(patch)], 1)


def hand_made(model: nn.Module, name: str) -> TrainedModel:
    """A TrainedModel for a model built here: a PatchModel sees raw [0, 1] pixels (mean 0),
    a CIFAR net is preprocessed as its eval_config says."""
    data = DataConfig(augmentation="none", crop_size=32, resize_size=32)
    if isinstance(model, PatchModel):
        classes, preprocess = ["patch", "other"], eval_preprocess(data, mean=torch.zeros(3))
    else:
        classes, preprocess = [f"class{i}" for i in range(10)], preprocess_for(model)
    return TrainedModel(model=model.eval(), classes=classes, class_ids=classes,
                        preprocess=preprocess, data=data, source=Path(name), name=name)


def test_occlusion_is_lowest_where_the_one_region_that_matters_is_covered(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    picture = torch.randint(128, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
    image = save_png(tmp_path / "bright.png", picture)
    trained = hand_made(PatchModel(top=12, left=20, size=8), "patch-model")
    result = occlusion(trained, image, tmp_path / "out", size=8, stride=4, device="cpu")

    assert result["starts"] == [0, 4, 8, 12, 16, 20, 24]
    assert result["label"] == "patch" and result["label_from"].startswith("top prediction")
    probability = torch.tensor(result["maps"]["probability"])
    row, column = divmod(int(probability.argmin()), probability.shape[1])
    assert (result["starts"][row], result["starts"][column]) == (12, 20)  # covers it whole
    # Squares that miss the patch leave the probability where it was.
    for i, top in enumerate(result["starts"]):
        for j, left in enumerate(result["starts"]):
            if top + 8 <= 12 or top >= 20 or left + 8 <= 20 or left >= 28:
                assert probability[i, j] == pytest.approx(result["unoccluded_probability"])
    # (a): conv1's one map totals the colours of the image less those of the grey (0) square.
    crop = center_transform(trained.preprocess)(picture)
    activation = torch.tensor(result["maps"]["activation"])
    expected = torch.tensor([[crop.sum() - crop[:, t : t + 8, s : s + 8].sum()
                              for s in result["starts"]] for t in result["starts"]])
    torch.testing.assert_close(activation, expected, rtol=1e-5, atol=1e-3)
    # (c): with two classes the top one is class 0 exactly where p(class 0) > 0.5.
    top_class = torch.tensor(result["maps"]["top_class"])
    assert torch.equal(top_class == 0, probability > 0.5)
    assert top_class[row, column] == 1  # the patch hidden, the other class wins
    assert_picture(result["png"], 1200, 300, levels=50)
    # In ImageNet's layout (val/<class id>/x.JPEG) the folder names the correct class.
    (tmp_path / "val" / "other").mkdir(parents=True)
    filed = save_png(tmp_path / "val" / "other" / "bright.png", picture)
    result = occlusion(trained, filed, tmp_path / "filed", size=8, stride=4, device="cpu")
    assert (result["label"], result["label_from"]) == ("other", "the image's folder")
    assert result["unoccluded_top_class"] == "patch"
    # A stride that does not divide the room: the last square sits flush with the edge, so
    # every pixel is covered (the strip past 20 + 8 was never occluded before).
    result = occlusion(trained, image, tmp_path / "uneven", size=8, stride=10, device="cpu")
    assert result["starts"] == [0, 10, 20, 24]
    assert len(result["maps"]["probability"]) == 4
    assert all(len(row) == 4 for row in result["maps"]["probability"])
    assert_picture(result["png"], 1200, 300, levels=50)


def test_occlusion_squares_cover_every_pixel_and_map_cells_sit_on_their_centres() -> None:
    for side, size, stride in ((227, 32, 8), (32, 5, 2), (224, 113, 112), (32, 32, 8)):
        starts = square_starts(side, size, stride)
        covered = torch.zeros(side, dtype=torch.bool)
        for start in starts:
            covered[start : start + size] = True
        assert covered.all() and starts == sorted(set(starts)) and starts[-1] == side - size
        assert all(b - a <= stride for a, b in pairwise(starts))
    # Cells stride wide centred on each square; the last, flush one meets its neighbour
    # halfway between their centres.
    assert _cell_edges([0, 4, 8], 8, 4) == [1.5, 5.5, 9.5, 13.5]
    assert _cell_edges([0, 10, 20, 24], 8, 10) == [-1.5, 8.5, 18.5, 25.5, 32.5]


def test_occlusion_on_a_trained_run_names_its_last_stage(
    quickstart_run, sample_images, tmp_path
) -> None:
    checkpoint = quickstart_run / "checkpoints" / "epoch-002.pt"
    result = occlusion(checkpoint, sample_images[0], tmp_path, size=8, stride=8, label="cat",
                       device="cpu")
    assert result["starts"] == [0, 8, 16, 24]
    assert result["layer"] == "conv4_x" and result["label"] == "cat"
    assert result["label_from"] == "given"
    assert all(0 <= p <= 1 for row in result["maps"]["probability"] for p in row)
    assert Path(result["json"]).is_file()
    assert_picture(result["png"], 1200, 300, levels=50)
    for size, stride in ((0, 8), (8, 0)):  # not the defaults in their place
        with pytest.raises(ConfigError, match=rf"got size {size}, stride {stride}"):
            occlusion(checkpoint, sample_images[0], tmp_path / "zero", size=size,
                      stride=stride, device="cpu")


def test_response_stds_match_hooks_on_every_3x3_bn(tmp_path) -> None:
    torch.manual_seed(0)
    resnet, plain = canon.create_model("resnet20"), canon.create_model("plain20")
    for norm in (m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1)  # so BN's output differs from its input
        norm.running_var.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    data = tmp_path / "images"
    generator = torch.Generator().manual_seed(1)
    for index in range(6):
        (data / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        picture = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8, generator=generator)
        save_png(data / f"class{index % 2}" / f"{index}.png", picture)

    expected_layers = ["conv1.1"] + [f"conv{stage}_x.{block}.bn{i}" for stage in (2, 3, 4)
                                     for block in range(3) for i in (1, 2)]
    assert response_layers(resnet, 32) == expected_layers
    result = responses([hand_made(resnet, "resnet20"), hand_made(plain, "plain20")],
                       tmp_path / "out", data=data, batch_size=4, device="cpu")

    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in expected_layers}
    modules = dict(resnet.named_modules())
    for name in expected_layers:  # clone: an in-place ReLU follows the BN
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: outputs[name].append(out.clone()))
    transform = center_transform(hand_made(resnet, "resnet20").preprocess)
    batch = torch.stack([transform(decode_image_file(p)) for p in sorted(data.rglob("*.png"))])
    with torch.no_grad():
        resnet(batch)
    run = result["runs"][0]
    assert run["images"] == 6 and [layer["layer"] for layer in run["layers"]] == expected_layers
    for layer in run["layers"]:
        values = torch.cat(outputs[layer["layer"]]).double()
        per_channel = values.transpose(0, 1).flatten(1).std(1, unbiased=False)
        assert layer["std"] == pytest.approx(float(per_channel.mean()), rel=1e-6)
        assert layer["std_all"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-6)
    assert [r["name"] for r in result["runs"]] == ["resnet20", "plain20"]
    assert len(result["runs"][1]["layers"]) == 19
    with open(result["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 19
    assert_picture(result["png"], 800, 700, levels=50)

    with pytest.raises(ConfigError, match="no batch norm after its 3x3 convolutions"):
        responses([hand_made(PatchModel(0, 0, 4), "patch")], tmp_path, data=data,
                  device="cpu")


def test_responses_of_a_run_default_to_its_own_evaluation_split(quickstart_run, tmp_path) -> None:
    result = responses([quickstart_run / "model.safetensors"], tmp_path, max_images=2000,
                       device="cpu")
    run = result["runs"][0]  # all the sample's 1,000 test images (it has 5,000 for training)
    assert (run["name"], run["data"], run["images"]) == ("resnet20-tiny", "sample", 1000)
    assert all(layer["std"] > 0 and layer["channels"] in (16, 32, 64) for layer in run["layers"])


def test_responses_refuse_to_subsample_a_shard_folder(quickstart_run, imagenette_root, tmp_path):
    shards = tmp_path / "shards"
    pack_folder(imagenette_root, shards, splits=("val",), progress=False)
    with pytest.raises(ConfigError, match=r"shards is a shard folder, which streams: drop "
                                          r"--max-images"):
        responses([quickstart_run / "model.safetensors"], tmp_path / "out", data=shards,
                  max_images=8, device="cpu")


@pytest.mark.parametrize(("transform", "values"), [
    ("translate", [-4.0, 0.0, 4.0]), ("rotate", [0.0, 90.0, 360.0]), ("scale", [0.8, 1.0, 1.25]),
    ("rotate", [0.0]),  # one value: a strip of one example image
])
def test_invariance_is_zero_at_the_identity_and_grows_away_from_it(
    quickstart_run, sample_images, tmp_path, transform, values
) -> None:
    trained = load_trained(quickstart_run)
    result = invariance(trained, sample_images, tmp_path, transform=transform, values=values,
                        labels=["cat"], device="cpu")
    identity = values.index(1.0 if transform == "scale" else 0.0)
    ranked = dict(trained.predict([sample_images[0]], top_k=10)[0])
    for image in result["images"]:
        assert image["layer1_distance"][identity] == 0.0  # identical features
        assert image["top_distance"][identity] == 0.0
        changed = [i for i, v in enumerate(values) if v not in (0.0, 1.0, 360.0)]
        assert all(image["layer1_distance"][i] > 0 for i in changed)
        if 360.0 in values:  # a whole turn is the identity again
            assert image["layer1_distance"][values.index(360.0)] == 0.0
        assert all(0.0 <= p <= 1.0 for p in image["probability"])
        assert image["label"] == "cat"
    probability = result["images"][0]["probability"][identity]
    assert probability == pytest.approx(ranked["cat"], abs=1e-5)  # as canon's predict says
    with open(result["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == len(sample_images) * len(values)
    assert_picture(result["png"], 1200, 600, levels=50)


def test_a_bfloat16_model_is_analysed_in_its_own_precision(
    quickstart_run, sample_images, tmp_path
) -> None:
    """Inputs go in the dtype of the model's weights (torch refuses float inputs to bfloat16
    convolutions), and every analysis's numbers come out as the float32 model's, to
    bfloat16's precision (8 bits of mantissa, through 20 layers)."""
    trained = load_trained(quickstart_run)
    halved = dataclasses.replace(trained, model=copy.deepcopy(trained.model).bfloat16())
    results = {}
    for name, model in (("float32", trained), ("bfloat16", halved)):
        occluded = occlusion(model, sample_images[0], tmp_path / name, size=8, stride=8,
                             label="cat", device="cpu")
        shifted = invariance(model, sample_images[0], tmp_path / name, values=[0.0, 4.0],
                             labels=3, device="cpu")  # one image, its class by index
        assert [image["label"] for image in shifted["images"]] == ["cat"]
        write_activations(model, sample_images[0], "conv2_x", tmp_path / name)
        with open(tmp_path / name / f"activations-{sample_images[0].stem}-conv2_x.csv") as f:
            maxima = [float(row["max"]) for row in csv.DictReader(f)]
        features = extract_features(model, spread_subset(open_split("sample", "val"), 64),
                                    "sample").features
        results[name] = {
            "occlusion probability": occluded["maps"]["probability"],
            "occluded map total": occluded["maps"]["activation"],
            "shifted probability": shifted["images"][0]["probability"],
            "shifted top distance": shifted["images"][0]["top_distance"],
            "activation maxima": maxima,
            "response stds": [layer["std"] for layer in
                              layer_stds(model, max_images=32)["layers"]],
            "mean feature": features.mean(0).tolist(),
        }
    for key, expected in results["float32"].items():
        torch.testing.assert_close(torch.tensor(results["bfloat16"][key]),
                                   torch.tensor(expected), rtol=0.05, atol=0.01,
                                   msg=lambda message, key=key: f"{key}: {message}")
    zero = invariance(trained, sample_images[0], tmp_path / "zero", values=[0.0], labels=0,
                      device="cpu")  # class 0 given, not "no label"
    assert zero["images"][0]["label"] == "airplane"
    with pytest.raises(ConfigError, match=r"^fc gives no feature maps .*; choose a convolutional "
                                          r"layer, e\.g\. a stage: conv1, conv2_x, conv3_x, "
                                          r"conv4_x$"):  # the layers to try, by name
        write_activations(trained, sample_images[0], "fc", tmp_path)


def test_invariance_refuses_values_that_are_not_finite(sample_images, tmp_path) -> None:
    for values in ([float("nan")], [1.0, float("inf")]):
        with pytest.raises(ConfigError, match=r"scale values must be finite numbers"):
            invariance("no model is loaded first", sample_images, tmp_path, transform="scale",
                       values=values)


def test_identity_transforms_leave_the_image_alone_and_defaults_include_them() -> None:
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    for transform, value in (("translate", 0.0), ("rotate", 0.0), ("scale", 1.0)):
        assert torch.equal(transform_image(image, transform, value, [0.0] * 3), image)
        for size in (32, 224, 227):
            assert value in default_values(transform, size)
    assert max(default_values("translate", 224)) == 60


def test_transforms_move_the_pixels_as_they_say() -> None:
    """Rotation in degrees, clockwise; translation downwards, the uncovered rows filled."""
    square = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(transform_image(square, "rotate", 90.0, [0.0] * 3), square.rot90(-1, (1, 2)))
    assert torch.equal(transform_image(square, "rotate", 360.0, [0.0] * 3), square)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    down, up = torch.full_like(image, 7), torch.full_like(image, 7)
    down[:, 4:], up[:, :-4] = image[:, :-4], image[:, 4:]
    assert torch.equal(transform_image(image, "translate", 4.0, [7.0] * 3), down)
    assert torch.equal(transform_image(image, "translate", -4.0, [7.0] * 3), up)


def test_curves_plot_the_metrics_file_of_a_real_run(quickstart_run, tmp_path) -> None:
    with open(quickstart_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    result = curves([quickstart_run, quickstart_run / "metrics.csv"], tmp_path, names=["a", "b"])
    for series in result["runs"]:
        assert series["epoch"] == [1.0, 2.0]
        assert series["train"] == [float(r["train_top1_error"]) for r in rows]
        assert series["val"] == [float(r["val_top1_error"]) for r in rows]
    lines = curves_figure(result["runs"][:1], "top1").axes[0].get_lines()
    dashed, bold = lines[0], lines[1]
    assert dashed.get_linestyle() == "--" and bold.get_linewidth() > dashed.get_linewidth()
    assert list(dashed.get_ydata()) == result["runs"][0]["train"]
    assert list(bold.get_ydata()) == result["runs"][0]["val"]
    assert_picture(result["png"], 800, 500, levels=50)
    # against iterations, as He et al. plot them: each epoch at the steps it ends with
    steps = [float(r["step"]) for r in rows]
    assert steps[1] == 2 * steps[0] and result["runs"][0]["step"] == steps
    by_step = curves_figure(result["runs"][:1], "top1", x="iteration").axes[0]
    assert list(by_step.get_lines()[0].get_xdata()) == steps
    assert by_step.get_xlabel() == "iteration (optimizer step)"
    older = tmp_path / "older.csv"  # a metrics.csv from before canon logged steps
    with open(older, "w", newline="") as f:
        writer = csv.DictWriter(f, [key for key in rows[0] if key != "step"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert curves([older], tmp_path / "older")["runs"][0]["step"] is None
    with pytest.raises(DataError, match=r": metrics\.csv has no step column.*plot by epoch"):
        curves([older], tmp_path / "older", x="iteration")

    top5 = curves(quickstart_run, tmp_path, metric="top5")  # one run, not in a list
    assert len(top5["runs"]) == 1 and top5["runs"][0]["train"] is None
    assert top5["runs"][0]["val"] == [float(r["val_top5_error"]) for r in rows]
    empty = tmp_path / "no-metrics"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no-metrics/metrics\.csv does not exist"):
        curves([empty], tmp_path)
    (tmp_path / "notes.yaml").write_text("a: 1\n")  # not beside a run's files: named itself
    with pytest.raises(DataError, match=r"notes\.yaml: neither a run directory"):
        curves([tmp_path / "notes.yaml"], tmp_path)


def test_the_analyses_from_the_command_line(
    quickstart_run, sample_images, tmp_path, monkeypatch, capsys
) -> None:
    """Each verb prints the files it wrote, then its summary and the folder; by default one
    run's pictures go to its run directory, several runs' to ./visualize/VERB."""
    monkeypatch.chdir(tmp_path)
    run, image = str(quickstart_run), str(sample_images[0])

    def written(lines: list[str], folder: Path, names: list[str], summary: str) -> None:
        assert lines == [*(str(folder / name) for name in names), lines[-1]]
        assert lines[-1].startswith(summary) and lines[-1].endswith(f" -> {folder}")
        assert all(Path(line).is_file() for line in lines[:-1])
        assert_picture(tmp_path / folder / names[0], 800, 500, levels=50)

    out = tmp_path / "occlusion"
    lines = run_verb(["occlusion", run, image, "--size", "8", "--stride", "8", "--label", "cat",
                      "--output-dir", str(out), "--device", "cpu"], capsys)
    written(lines, out, ["occlusion-test3.png", "occlusion-test3.json"],
            "occlusion: 4x4 positions of a 8x8 square on test3.png: p(cat) ")
    namesake = tmp_path / "other" / "test3.png"  # another image of that file name
    namesake.parent.mkdir()
    shutil.copy(sample_images[1], namesake)
    with pytest.raises(SystemExit):
        run_verb(["occlusion", run, str(namesake), "--output-dir", str(out), "--device", "cpu"],
                 capsys)
    assert (f"occlusion-test3.json holds the result for image {image}: name another folder "
            "with --output-dir") in capsys.readouterr().err
    run_verb(["occlusion", run, os.path.relpath(image), "--size", "8", "--stride", "8",
              "--output-dir", str(out), "--device", "cpu"], capsys)  # the same, spelt otherwise

    out = tmp_path / "invariance"
    lines = run_verb(["invariance", run, image, str(sample_images[1]), "--transform", "rotate",
                      "--values", "0", "90", "--label", "cat", "--label", "dog",
                      "--output-dir", str(out), "--device", "cpu"], capsys)
    written(lines, out, [f"invariance-rotate.{suffix}" for suffix in ("png", "csv", "json")],
            "invariance: rotate at 2 values (0 to 90) on 2 image(s): largest distance ")
    with open(out / "invariance-rotate.csv", newline="") as f:
        assert [row["label"] for row in csv.DictReader(f)] == ["cat", "cat", "dog", "dog"]

    lines = run_verb(["responses", run, str(quickstart_run / "model.safetensors"), "--names",
                      "a", "b", "--max-images", "4", "--batch-size", "2", "--device", "cpu"],
                     capsys)
    written(lines, Path("visualize") / "responses",
            [f"responses.{suffix}" for suffix in ("png", "csv", "json")],
            "responses: 2 run(s) on 4 images, average layer response std: a ")

    lines = run_verb(["curves", run, "--metric", "top5"], capsys)
    written(lines, quickstart_run / "visualize" / "curves",
            [f"curves-top5.{suffix}" for suffix in ("png", "csv", "json")],
            "curves: final validation top-5 error: resnet20-tiny ")


def test_an_int_label_is_an_index_and_digits_name_a_class_first() -> None:
    """Folders named by digits ('1', '10', '2', sorted as text): the int 1 is output 1, the
    string '1' the class named so (output 0), as the command line's text is read."""
    trained = SimpleNamespace(classes=["1", "10", "2"], class_ids=["1", "10", "2"])
    assert class_index(trained, 1) == 1 and class_index(trained, "1") == 0
    assert class_index(trained, np.int64(1)) == class_index(trained, torch.tensor(1)) == 1
    assert class_index(trained, "2") == 2
    with pytest.raises(ConfigError, match=r"class index 3 is outside the model's 3 outputs"):
        class_index(trained, 3)
