"""Ensembles (the mean of the members' softmax under one protocol) and per-class reports,
checked against the same numbers computed by hand on a few bundled sample images."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from canon.data import ArrayImages, DataConfig
from canon.data.datasets import load_sample
from canon.data.folders import BadImageWarning
from canon.data.normalize import Normalize
from canon.data.preprocess import EvalPreprocess
from canon.errors import ConfigError
from canon.evaluation.ensemble import (
    EnsembleMember,
    ensemble_probabilities,
    evaluate_ensemble,
    predict_ensemble,
)
from canon.evaluation.protocols import evaluate
from canon.evaluation.report import (
    class_report,
    confusion_matrix,
    write_class_errors,
    write_confusion_png,
)
from canon.files import printable
from canon.models.factory import create_model

CLASSES = load_sample("test").classes
# Different crops, means and std: each member must be fed through its own preprocessing.
PREPROCESS = (
    EvalPreprocess(32, 32, Normalize(torch.tensor([0.49, 0.48, 0.45]),
                                     torch.tensor([0.25, 0.24, 0.26]))),
    EvalPreprocess(24, 28, Normalize(torch.tensor([0.3, 0.5, 0.7]))),
)


def _member(name: str, seed: int, preprocess: EvalPreprocess, **fields) -> EnsembleMember:
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10).eval()
    return EnsembleMember(name, model, CLASSES, preprocess=preprocess, **fields)


@pytest.fixture(scope="module")
def members() -> list[EnsembleMember]:
    return [_member("a", 0, PREPROCESS[0]), _member("b", 1, PREPROCESS[1])]


def _first(count: int) -> ArrayImages:
    sample = load_sample("test")
    return ArrayImages(sample.images[:count], sample.labels[:count], CLASSES,
                       name=f"sample-test[:{count}]")


@pytest.fixture(scope="module")
def images() -> ArrayImages:
    return _first(40)


@torch.no_grad()
def _center_softmax(member: EnsembleMember, images: torch.Tensor) -> torch.Tensor:
    crops = torch.stack([member.preprocess.center(image) for image in images])
    return member.model(crops).softmax(1)


def test_ensemble_error_is_the_error_of_the_mean_softmax(members, images):
    result = evaluate_ensemble(members, images, "center", batch_size=16, keep_probabilities=True)
    mean = (_center_softmax(members[0], images.images)
            + _center_softmax(members[1], images.images)) / 2
    labels = torch.tensor(images.labels)
    assert torch.equal(result["labels"], labels)
    assert torch.allclose(result["probabilities"].float(), mean, atol=1e-6)
    assert torch.equal(result["member_predictions"],
                       torch.stack([_center_softmax(m, images.images).argmax(1) for m in members]))
    wrong1 = (mean.argmax(1) != labels).sum().item()
    wrong5 = (mean.topk(5, 1).indices != labels[:, None]).all(1).sum().item()
    assert result["images"] == 40 and result["skipped"] == 0
    assert result["top1_error"] == pytest.approx(100 * wrong1 / 40)
    assert result["top5_error"] == pytest.approx(100 * wrong5 / 40)
    # The mean of softmax, not of logits: they rank some images differently here.
    with torch.no_grad():
        logits = [m.model(torch.stack([m.preprocess.center(x) for x in images.images]))
                  for m in members]
    assert not torch.allclose((logits[0] + logits[1]).softmax(1), mean, atol=1e-3)


@pytest.mark.filterwarnings("ignore:ten-crop of 32 px crops")  # the sample: 32 px images
@pytest.mark.parametrize(("protocol", "count"), [("center", 40), ("ten-crop", 8)])
def test_each_member_scores_as_evaluate_does_alone(members, protocol, count):
    images = _first(count)
    result = evaluate_ensemble(members, images, protocol, batch_size=16)
    singles = [evaluate(m.model, images, protocol, batch_size=16, preprocess=m.preprocess,
                        keep_probabilities=True) for m in members]
    for member, reported, alone in zip(members, result["members"], singles, strict=True):
        assert reported["name"] == member.name
        for key in ("top1_error", "top5_error", "images", "views_per_image"):
            assert reported[key] == alone[key]
    mean = ensemble_probabilities([alone["probabilities"] for alone in singles])
    labels = singles[0]["labels"]
    assert result["top1_error"] == pytest.approx(
        100 * (mean.argmax(1) != labels).float().mean().item())
    assert result["protocol"] == protocol


def test_members_with_other_classes_are_refused(members, images):
    shuffled = EnsembleMember("cifar-run", members[1].model, [*CLASSES[1:], CLASSES[0]])
    with pytest.raises(ConfigError, match=r"'a' and 'cifar-run' .*output 0 is 'airplane'"):
        evaluate_ensemble([members[0], shuffled], images)
    fewer = EnsembleMember("five", members[1].model, CLASSES[:5])
    with pytest.raises(ConfigError, match=r"'b' and 'five' .*10 against 5 classes"):
        predict_ensemble([members[1], fewer], [images.images[0]])
    relabelled = ArrayImages(images.images, images.labels, [c.upper() for c in CLASSES],
                             name="upper")
    with pytest.raises(ConfigError, match="labelled by other classes"):
        evaluate_ensemble(members, relabelled)
    with pytest.raises(ConfigError, match="at least one member"):
        evaluate_ensemble([], images)
    ready = TensorDataset(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="not a TensorDataset of ready tensors"):
        evaluate_ensemble(members, ready)


def test_members_that_skip_different_images_are_refused(members, images, tmp_path):
    """A folder split, opened per member with its own data section: one member's pixel limit
    skips an image the other scores, so their posteriors are of different images."""
    for index in range(4):
        folder = tmp_path / CLASSES[images.labels[index]]
        folder.mkdir(exist_ok=True)
        picture = images.images[index].permute(1, 2, 0).numpy()
        Image.fromarray(picture).resize((40 if index == 3 else 32,) * 2).save(
            folder / f"{index}.png")
    same = evaluate_ensemble(members, tmp_path, "center")
    assert same["images"] == 4
    limited = EnsembleMember("small", members[1].model, CLASSES, preprocess=PREPROCESS[1],
                             data_config=DataConfig(max_image_pixels=32 * 32))
    with (pytest.warns(BadImageWarning),
          pytest.raises(ConfigError, match=r"'a' and 'small' scored different images \(4 and 3")):
        evaluate_ensemble([members[0], limited], tmp_path, "center")


def test_ensemble_prediction_averages_the_members_probabilities(members, images):
    decoded = [images.images[i] for i in range(3)]
    named = EnsembleMember("a", members[0].model, CLASSES, preprocess=PREPROCESS[0],
                           classes=[f"class {c}" for c in CLASSES])
    rankings = predict_ensemble([named, members[1]], decoded, top_k=3)
    mean = (_center_softmax(members[0], decoded) + _center_softmax(members[1], decoded)) / 2
    for ranking, expected in zip(rankings, mean, strict=True):
        values, indices = expected.topk(3)
        assert [name for name, _ in ranking] == [f"class {CLASSES[i]}" for i in indices]
        assert [p for _, p in ranking] == pytest.approx(values.tolist(), abs=1e-6)
    assert len(predict_ensemble(members, decoded, top_k=20)[0]) == 10
    with pytest.raises(ConfigError, match=r"got one tensor of shape \(3, 3, 32, 32\): pass list"):
        predict_ensemble(members, torch.stack(decoded))


def test_an_over_confident_member_s_prediction_ranks_as_its_logits(images):
    """Classes whose logits lie about 100 below the best have a float32 probability of 0:
    predict ranks them as their logits do, not lowest class first."""
    member = _member("sure", 0, PREPROCESS[0])
    model = create_model("resnet20", num_classes=10).eval()
    model.load_state_dict(member.model.state_dict())
    with torch.no_grad():
        model.fc.weight.mul_(150)  # gaps of 240-630: past float32, within float64
        crops = torch.stack([PREPROCESS[0].center(image) for image in images.images[:8]])
        logits = model(crops)
    assert (logits.softmax(1) == 0).any()
    sure = EnsembleMember("sure", model, CLASSES, preprocess=PREPROCESS[0])
    rankings = predict_ensemble([sure], list(images.images[:8]), top_k=10)
    order = logits.argsort(1, descending=True)
    for ranking, expected in zip(rankings, order, strict=True):
        assert [name for name, _ in ranking] == [CLASSES[i] for i in expected]
    # An ensemble of it alone, and its per-class report, count as its logits rank.
    labels = order[:, 4]  # each image's fifth class: a top-5 hit, by its logits
    eight = ArrayImages(images.images[:8], labels.tolist(), CLASSES, name="eight")
    alone = evaluate_ensemble([sure], eight, keep_probabilities=True)
    assert alone["top5_error"] == alone["members"][0]["top5_error"] == 0
    report = class_report(alone["probabilities"], alone["labels"], CLASSES)
    assert all(error in (0.0, None) for error in report.top5_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # evaluate's: float64
def test_ensemble_probabilities_is_the_mean(dtype):
    first, second = (torch.tensor([[0.2, 0.8]], dtype=dtype),
                     torch.tensor([[0.6, 0.4]], dtype=dtype))
    mean = ensemble_probabilities([first, second])
    assert mean.dtype == torch.float64 and torch.allclose(mean.float(), torch.tensor([[0.4, 0.6]]))
    assert torch.equal(first, torch.tensor([[0.2, 0.8]], dtype=dtype))  # inputs untouched
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_probabilities([first, torch.ones(2, 2)])


# Six classes; d, e and f have no image. Image 4 (class b) ranks b last: a top-5 miss too.
SCORES = torch.tensor([
    [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # a -> a
    [0.2, 0.4, 0.1, 0.1, 0.1, 0.1],  # a -> b
    [0.1, 0.5, 0.1, 0.1, 0.1, 0.1],  # b -> b
    [0.1, 0.2, 0.3, 0.2, 0.1, 0.1],  # b -> c
    [0.3, 0.0, 0.2, 0.2, 0.15, 0.15],  # b -> a
    [0.1, 0.1, 0.5, 0.1, 0.1, 0.1],  # c -> c
])
LABELS = torch.tensor([0, 0, 1, 1, 1, 2])
NAMES = ["a", "b", "c", "d", "e", "f"]


def test_per_class_errors_and_confusion_by_hand(tmp_path):
    report = class_report(SCORES, LABELS, NAMES)
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[0, :2] = 1
    expected[1, :3] = 1
    expected[2, 2] = 1
    assert torch.equal(report.confusion, expected)
    assert torch.equal(confusion_matrix(SCORES, LABELS), expected)
    assert report.images == [2, 3, 1, 0, 0, 0]
    assert report.top1_error == pytest.approx([50.0, 200 / 3, 0.0, None, None, None])
    assert report.top5_error == pytest.approx([0.0, 100 / 3, 0.0, None, None, None])

    write_class_errors(report, tmp_path / "classes.csv")
    write_class_errors(report, tmp_path / "classes.json")
    rows = list(csv.DictReader((tmp_path / "classes.csv").open()))
    assert rows[1] == {"index": "1", "class": "b", "images": "3", "top1_error": "66.66667",
                       "top5_error": "33.33333"}
    assert rows[3]["top1_error"] == ""
    records = json.loads((tmp_path / "classes.json").read_text())
    assert records == report.rows() and records[4]["top5_error"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.csv", "classes.json"]
    with pytest.raises(ConfigError, match=r"\.csv or \.json"):
        write_class_errors(report, tmp_path / "classes.txt")
    with pytest.raises(ValueError, match="6 x 4 scores"):
        class_report(SCORES, LABELS, NAMES[:4])


def test_class_names_that_are_not_utf8_are_written(tmp_path):
    """A class folder named in Latin-1 (os.fsdecode gives surrogates): the CSV keeps the name's
    bytes, the figure shows them escaped."""
    names = [*NAMES[:5], os.fsdecode(b"caf\xe9")]
    report = class_report(SCORES, LABELS, names)
    write_class_errors(report, tmp_path / "classes.csv")
    assert b"5,caf\xe9,0," in (tmp_path / "classes.csv").read_bytes()
    write_confusion_png(report.confusion, report.classes, tmp_path / "confusion.png")
    assert printable(names[5]) == "caf\\xe9"


@pytest.mark.parametrize("count", [10, 1000])
def test_confusion_png(tmp_path, count):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, count, (4 * count,), generator=generator)
    scores = torch.rand(len(labels), count, generator=generator)
    scores[torch.arange(len(labels) // 2), labels[: len(labels) // 2]] += 1  # half right
    path = tmp_path / "confusion.png"
    write_confusion_png(confusion_matrix(scores, labels), [f"class{i}" for i in range(count)],
                        path)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert all(400 <= side <= 2000 for side in picture.size)
        pixels = np.asarray(picture.convert("L"))
    assert pixels.min() < 100 < 200 < pixels.max()  # dark cells or text on a light ground
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]
