"""Test-time views and protocols: crop geometry, invariances, and exact top-k over every image."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from canon.data import ArrayImages, DataConfig, build_datasets, build_loader, decode_image_file
from canon.data.datasets import open_eval_split
from canon.data.geometry import resize_image
from canon.data.normalize import Normalize
from canon.data.preprocess import EvalPreprocess
from canon.data.views import (
    PROTOCOLS,
    ProtocolViews,
    collate_views,
    dense_view,
    googlenet_crops,
    grid_crops,
    parse_protocol,
    ten_crop,
)
from canon.errors import ConfigError, DataError, NonFiniteError
from canon.evaluation import TopKErrors, evaluate, score_loader, topk_correct
from canon.evaluation.protocols import ViewScorer, preprocess_for
from canon.evaluation.report import class_report
from canon.models.base import EvalConfig
from canon.models.factory import create_model


class PixelwiseNet(nn.Module):
    """Ignores position: a per-pixel MLP, then the spatial mean (so it is flip-invariant)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.score = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x).mean((2, 3))


class SplitOverDevices(PixelwiseNet):
    """Stands in for a model-parallel model: one piece lives on another device (the meta
    device here, which cannot be copied), so moving the whole model anywhere fails."""

    def __init__(self) -> None:
        super().__init__()
        self.piece_elsewhere = nn.Linear(4, 4, device="meta")

    def fully_convolutional(self) -> nn.Module:
        return self.score


class SmallConvNet(nn.Module):
    """Position-sensitive: a fixed-size FC head, and its fully convolutional form."""

    def __init__(self, size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.fc = nn.Linear(8 * (size // 4) ** 2, num_classes)
        self.side = size // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))

    def fully_convolutional(self) -> nn.Module:
        conv = nn.Conv2d(8, self.fc.out_features, self.side)
        conv.weight.data = self.fc.weight.data.view(conv.weight.shape).clone()
        conv.bias.data = self.fc.bias.data.clone()
        return nn.Sequential(self.features, conv)


@pytest.fixture(scope="module")
def sample_sets(tmp_path_factory):
    return build_datasets(DataConfig(), root_cache=tmp_path_factory.mktemp("cache"))


def test_topk_correct_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([2, 0, 0])
    assert topk_correct(scores, targets, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    errors = TopKErrors((1, 2))
    errors.update(scores, targets)
    errors.update(scores[:1], torch.tensor([1]))
    result = errors.result()
    assert result["images"] == 4
    assert result["top1_error"] == pytest.approx(50.0)
    assert result["top2_error"] == pytest.approx(25.0)


def test_equal_scores_rank_by_class_and_nan_is_refused():
    """Ties rank lowest class first in the top-k counts and the per-class report alike (topk
    alone orders them as the device likes); a diverged model's NaN is not scored."""
    uniform = torch.full((3, 10), 0.1)
    labels = torch.tensor([0, 8, 3])
    assert topk_correct(uniform, labels, (1, 5)) == {1: 1, 5: 2}
    report = class_report(uniform, labels, [str(i) for i in range(10)])
    assert report.top1_error[0] == 0.0 and report.top1_error[8] == 100.0
    assert report.confusion[:, 0].tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        TopKErrors().update(torch.tensor([[0.5, float("nan")]]), torch.tensor([0]))


def test_every_error_rate_is_computed_alike():
    """11 of 20 right is 45.0% wrong in the per-class report as in the totals, not the
    44.99999999999999 of 1 - 11 / 20."""
    scores = torch.eye(2)[torch.tensor([0] * 11 + [1] * 9)]
    labels = torch.zeros(20, dtype=torch.long)
    totals = TopKErrors(ks=(1,))
    totals.update(scores, labels)
    assert totals.result()["top1_error"] == 45.0
    assert class_report(scores, labels, ["a", "b"]).top1_error[0] == 45.0


def test_crop_geometry():
    image = torch.arange(3 * 6 * 8, dtype=torch.float32).view(3, 6, 8)
    crops = ten_crop(image, 4)
    assert crops.shape == (10, 3, 4, 4)
    expected = [image[:, :4, :4], image[:, :4, 4:], image[:, 2:, :4], image[:, 2:, 4:],
                image[:, 1:5, 2:6]]
    for i, crop in enumerate(expected):
        assert torch.equal(crops[i], crop)
        assert torch.equal(crops[i + 5], crop.flip(-1))
    dense = dense_view(image)
    assert torch.equal(dense[0], image) and torch.equal(dense[1], image.flip(-1))
    with pytest.raises(ConfigError, match="cannot take 7x7 crops"):
        ten_crop(image, 7)


def test_googlenet_144_crops():
    """GoogLeNet s7: per scale 3 squares x (4 corners + centre + whole square) x 2 flips."""
    image = torch.rand(3, 10, 16)  # landscape: left, centre, right 10 x 10 squares
    crops = googlenet_crops(image, 6)
    assert crops.shape == (36, 3, 6, 6)
    for index, offset in enumerate((0, 3, 6)):
        square = image[:, :, offset : offset + 10]
        first = crops[index * 6 : index * 6 + 6]
        assert torch.equal(first[:5], ten_crop(square, 6)[:5])
        assert torch.allclose(first[5], resize_image(square, 6, 6, "bilinear"))
        assert torch.equal(crops[18 + index * 6 : 24 + index * 6], first.flip(-1))
    portrait = googlenet_crops(image.transpose(1, 2), 6)
    assert torch.equal(portrait[0], image.transpose(1, 2)[:, :6, :6])
    preprocess = EvalPreprocess(224, 256, Normalize(torch.zeros(3)))
    views = ProtocolViews(parse_protocol("144-crop"), preprocess)
    assert views.scales == (256, 288, 320, 352)
    stacks = views(torch.randint(0, 255, (3, 240, 320), dtype=torch.uint8))
    assert sum(len(s) for s in stacks) == 144


def test_144_crop_needs_crops_of_64_px(sample_sets):
    """GoogLeNet's 144 views of a 32 px CIFAR image mostly repeat each other: refused."""
    protocol = parse_protocol("144-crop")
    for crop_size in (32, 63):
        preprocess = EvalPreprocess(crop_size, crop_size, Normalize(torch.zeros(3)))
        with pytest.raises(ConfigError, match=rf"'144-crop' .* {crop_size} px crops .*center, "
                                              "ten-crop or dense"):
            ProtocolViews(protocol, preprocess)
    preprocess = EvalPreprocess(64, 73, Normalize(torch.zeros(3)))
    assert ProtocolViews(protocol, preprocess).scales == (73, 82, 91, 101)
    with pytest.raises(ConfigError, match=r"scales \(60, 80\): .* under the crop size 64"):
        ProtocolViews(protocol, preprocess, scales=(60, 80))  # not in a loader worker, later
    square = dataclasses.replace(preprocess, fit="center-square")  # AlexNet's and ZFNet's
    with pytest.warns(UserWarning, match=r"squares are one \(48 distinct views, not 144\)"):
        ProtocolViews(protocol, square)
    val = sample_sets.val
    with pytest.raises(ConfigError, match="144-crop"):
        evaluate(SmallConvNet(), val, "144-crop", preprocess=sample_sets.preprocess)


def test_test_scales_are_refused_where_ignored_or_too_small():
    preprocess = EvalPreprocess(32, 40, Normalize(torch.zeros(3)), scales=(32, 40, 48))
    with pytest.raises(ConfigError, match=r"scales \(48,\) apply to .*; dense evaluates at"):
        ProtocolViews(parse_protocol("dense"), preprocess, scales=(48,))
    with pytest.raises(ConfigError, match=r"scales \(24, 40\): .* under the crop size 32"):
        ProtocolViews(parse_protocol("multi-scale+ten-crop"), preprocess, scales=(24, 40))
    assert ProtocolViews(parse_protocol("multi-scale+dense"), preprocess, scales=(24,)).scales == (
        24,)
    assert ProtocolViews(parse_protocol("multi-crop"), preprocess).scales == (32, 40, 48)
    # The preprocessing's own scales are checked as well, and there must be some.
    small = dataclasses.replace(preprocess, scales=(24, 40))
    with pytest.raises(ConfigError, match=r"scales \(24, 40\) \(the recipe's data.test_scales\)"
                       r": a shorter side under the crop size 32 has no multi-crop crops"):
        ProtocolViews(parse_protocol("multi-crop"), small)
    assert ProtocolViews(parse_protocol("multi-scale+dense"), small).scales == (24, 40)
    for name in ("multi-scale+center", "multi-crop", "multi-crop+dense"):
        with pytest.raises(ConfigError, match=re.escape(f"{name} needs test scales")):
            ProtocolViews(parse_protocol(name), dataclasses.replace(preprocess, scales=()))
    assert ProtocolViews(parse_protocol("ten-crop"), small).scales == (40,)  # resize_size


def test_protocol_names():
    assert parse_protocol("multi-scale").name == "multi-scale+center"
    assert parse_protocol("dense+multi-scale").name == "multi-scale+dense"
    with pytest.raises(ConfigError, match="unknown protocol 'twelve-crop'"):
        parse_protocol("twelve-crop")
    with pytest.raises(ConfigError, match=r"'multi-scale\+multi-scale' names a part twice"):
        parse_protocol("multi-scale+multi-scale")


def test_a_model_is_scored_in_its_own_dtype_and_checked_against_its_classes(sample_sets):
    """A bfloat16 model takes bfloat16 views; class_ids must name every output; dense
    evaluation of a model without a fully convolutional form says so."""
    val = sample_sets.val
    subset = ArrayImages(val.images[:20], val.labels[:20], val.classes, name="val[:20]")
    model = SmallConvNet().eval()
    single = evaluate(model, subset, preprocess=sample_sets.preprocess)
    bf16, views = SmallConvNet().to(torch.bfloat16).eval(), []
    bf16.register_forward_pre_hook(lambda module, inputs: views.append(inputs[0].dtype))
    half = evaluate(bf16, subset, preprocess=sample_sets.preprocess)
    assert half["images"] == 20 and abs(half["top1_error"] - single["top1_error"]) <= 10
    assert views and set(views) == {torch.bfloat16}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # left as it was
    with pytest.raises(ConfigError, match="class_ids names 11 classes where the model gives 10 "
                                          "scores: pass the model's classes, all of them"):
        evaluate(create_model("resnet20", 10), "sample", class_ids=[*val.class_ids, "unicorn"])
    with pytest.raises(ConfigError, match=r"class_ids names the model's classes .*imagenet_wnids"
                                          r"\(\)\), not output indices; got \[0, 1, 2\]"):
        evaluate(create_model("resnet20", 10), "sample", class_ids=list(range(10)))
    plain = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match=r"Sequential has no fully_convolutional\(\): choose "
                                          "another protocol"):
        evaluate(plain, subset, "dense", preprocess=sample_sets.preprocess)


def test_vgg_multi_crop_is_a_5x5_grid_with_flips_at_three_scales():
    """VGG s3.2: "50 crops per scale (5 x 5 regular grid with 2 flips), for a total of 150
    crops over 3 scales"."""
    image = torch.arange(3 * 50 * 70, dtype=torch.float32).view(3, 50, 70)
    crops = grid_crops(image, 30)
    assert crops.shape == (50, 3, 30, 30)
    tops, lefts = [0, 5, 10, 15, 20], [0, 10, 20, 30, 40]  # regular, edge to edge
    for index, (top, left) in enumerate((t, c) for t in tops for c in lefts):
        assert torch.equal(crops[index], image[:, top : top + 30, left : left + 30])
        assert torch.equal(crops[25 + index], crops[index].flip(-1))
    preprocess = EvalPreprocess(32, 40, Normalize(torch.zeros(3)), scales=(32, 40, 48))
    raw = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    stacks = ProtocolViews(parse_protocol("multi-crop"), preprocess)(raw)
    assert [len(stack) for stack in stacks] == [50, 50, 50]
    for stack, scale in zip(stacks, (32, 40, 48), strict=True):
        assert torch.equal(stack, grid_crops(preprocess(raw, scale), 32))
    assert {"multi-crop", "multi-crop+dense"} <= set(PROTOCOLS)
    for name in ("multi-crop+dense", "dense+multi-crop", "multi-scale+multi-crop+dense"):
        assert parse_protocol(name).methods == ("multi-crop", "dense")
    assert parse_protocol("multi-scale+multi-crop").name == "multi-crop"
    with pytest.raises(ConfigError, match="unknown protocol"):
        parse_protocol("ten-crop+dense")


def average_posteriors(model, dense_network, stacks, protocol, views_per_forward=None):
    """The posteriors of a list of images' view stacks, given to a ViewScorer as one batch
    (in float32, as the float32 models' outputs they are compared with)."""
    scorer = ViewScorer(model, dense_network, protocol, "cpu", views_per_forward)
    labels = torch.zeros(len(stacks), dtype=torch.long)
    return torch.cat([posteriors for posteriors, _ in [*scorer.add(stacks, labels),
                                                       *scorer.finish()]]).float()


def _three_scale_setting(count: int):
    """`count` random 40 x 52 images, preprocessed at scales 32 / 40 / 48, and a SmallConvNet
    with its fully convolutional form."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 40, 52), dtype=torch.uint8, generator=generator)
    preprocess = EvalPreprocess(32, 40, Normalize(torch.tensor([0.5, 0.4, 0.3])),
                                scales=(32, 40, 48))
    model = SmallConvNet().eval()
    return images, preprocess, model, model.fully_convolutional().eval()


def test_multi_crop_plus_dense_averages_the_two_methods():
    """VGG s4.3 (Table 5): multi-crop and dense evaluation combined by "averaging their
    soft-max outputs": each method's posteriors over its views, then the two methods'."""
    images, preprocess, model, dense_network = _three_scale_setting(4)
    crop_only, dense_only = parse_protocol("multi-crop"), parse_protocol("multi-scale+dense")
    both = parse_protocol("multi-crop+dense")
    with torch.no_grad():
        expected, per_view = [], []
        for image in images:
            crops = torch.cat(ProtocolViews(crop_only, preprocess)(image))
            crop_posterior = model(crops).softmax(1).mean(0)
            dense = [dense_network(stack).mean((2, 3)).softmax(1)
                     for stack in ProtocolViews(dense_only, preprocess)(image)]
            dense_posterior = torch.cat(dense).mean(0)
            expected.append((crop_posterior + dense_posterior) / 2)
            per_view.append((150 * crop_posterior + 6 * dense_posterior) / 156)
        stacks = [ProtocolViews(both, preprocess)(image) for image in images]
        combined = average_posteriors(model, dense_network, stacks, both)
    assert torch.allclose(combined, torch.stack(expected), atol=1e-6)
    assert not torch.allclose(combined, torch.stack(per_view), atol=1e-4)
    labels = torch.stack(expected).argmax(1).tolist()
    dataset = ArrayImages(images, labels, [str(c) for c in range(10)], name="four")
    result = evaluate(model, dataset, "dense+multi-crop", preprocess=preprocess)
    assert result["top1_error"] == 0 and result["views_per_image"] == 156
    assert result["protocol"] == "multi-crop+dense"


def test_a_forward_pass_takes_at_most_batch_size_views():
    """64 images under VGG's multi-crop are 9,600 views: they go through the model in passes of
    at most evaluate's batch_size, with the same posteriors as in one pass, and are loaded a
    few images at a time."""
    images, preprocess, model, dense_network = _three_scale_setting(5)
    passes = []
    for network in (model, dense_network):
        network.register_forward_pre_hook(lambda _, inputs: passes.append(len(inputs[0])))
    protocol = parse_protocol("multi-crop+dense")
    stacks = [ProtocolViews(protocol, preprocess)(image) for image in images]
    with torch.no_grad():
        whole = average_posteriors(model, dense_network, stacks, protocol)
        assert max(passes) == 5 * 150  # every crop at once, without a bound
        passes.clear()
        chunked = average_posteriors(model, dense_network, stacks, protocol, 7)
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert max(passes) == 7 and sum(passes) == 5 * 156
    passes.clear()
    labels = whole.argmax(1).tolist()
    dataset = ArrayImages(images, labels, [str(c) for c in range(10)], name="five")
    result = evaluate(model, dataset, "ten-crop", batch_size=3, preprocess=preprocess)
    assert result["images"] == 5 and passes == [3] * 16 + [2]
    # Two images (20 views) are loaded at a time, and views carry over to fill each pass of
    # 25, as a 144-crop image at batch 256 would otherwise run alone in a pass 56% full.
    passes.clear()
    result = evaluate(model, dataset, "ten-crop", batch_size=25, preprocess=preprocess,
                      keep_probabilities=True)
    assert result["images"] == 5 and passes == [25, 25]
    ten = parse_protocol("ten-crop")
    with torch.no_grad():
        expected = average_posteriors(model, None, [ProtocolViews(ten, preprocess)(image)
                                                    for image in images], ten)
    assert torch.allclose(result["probabilities"].float(), expected, atol=1e-6)
    assert result["labels"].tolist() == labels


def test_views_carried_across_batches_score_as_each_image_alone():
    """Streams of images whose crops and dense views come in several shapes, split into
    loaded batches at random and scored in passes of a few views: every image's posteriors
    are its own views' (crops' mean and dense views' mean, averaged), in order, each view
    scored once, no pass over the bound."""
    model = PixelwiseNet()
    generator = torch.Generator().manual_seed(1)
    protocol = parse_protocol("multi-crop+dense")
    passes = []
    # model.score runs in every pass: the dense network is it, and the model calls it
    model.score.register_forward_pre_hook(lambda _, inputs: passes.append(len(inputs[0])))

    def draw(count, shapes):
        return torch.rand(count, 3, *shapes[int(torch.randint(len(shapes), (1,),
                                                              generator=generator))],
                          generator=generator)

    for size in (1, 3, 7, 40):
        images = [[draw(int(torch.randint(1, 9, (1,), generator=generator)), [(4, 4), (5, 3)]),
                   draw(2, [(6, 6), (6, 9), (9, 6)])] for _ in range(23)]
        with torch.no_grad():
            expected = torch.stack([(model(crops).softmax(1).mean(0)
                                     + model.score(dense).mean((2, 3)).softmax(1).mean(0)) / 2
                                    for crops, dense in images])
        scorer = ViewScorer(model, model.score, protocol, "cpu", size)
        scored, start, passes[:] = [], 0, []
        while start < len(images):
            stop = start + int(torch.randint(0, 6, (1,), generator=generator))
            labels = torch.arange(start, min(stop, len(images)))
            scored += scorer.add(images[start:stop], labels)
            start = stop
        scored += scorer.finish()
        posteriors = torch.cat([chunk for chunk, _ in scored]).float()
        assert torch.allclose(posteriors, expected, atol=1e-6)
        assert torch.cat([labels for _, labels in scored]).tolist() == list(range(23))
        assert max(passes) <= size and sum(passes) == sum(len(c) + 2 for c, _ in images)


def test_multi_scale_views_on_real_photos(imagenette_root, tmp_path):
    config = DataConfig(dataset=str(imagenette_root), augmentation="vgg", crop_size=96,
                        resize_size=128, mean="imagenet")
    sets = build_datasets(config, root_cache=tmp_path)
    val, preprocess = sets.val, sets.preprocess
    assert preprocess.scales == (96, 128, 160)  # VGG s3.2: {S - 32, S, S + 32}
    raw = val.load_image(0)
    for name, per_scale in [("multi-scale+ten-crop", 10), ("multi-scale+dense", 2)]:
        stacks = ProtocolViews(parse_protocol(name), preprocess)(raw)
        assert [len(s) for s in stacks] == [per_scale] * 3
        for stack, scale in zip(stacks, (96, 128, 160), strict=True):
            if name.endswith("dense"):
                assert min(stack.shape[-2:]) == scale
            else:
                assert stack.shape[-2:] == (96, 96)
    batch, labels = collate_views([(stacks, 3), None, (stacks, 4)])
    assert len(batch) == 2 and labels.tolist() == [3, 4]


def test_ten_crop_equals_center_for_a_position_blind_model():
    """A model blind to position (per-pixel scores, spatially averaged) scores a crop by the
    multiset of its pixels alone. In an image tiled with period 4, every 32 x 32 window holds
    each tile pixel 64 times, so the ten crops (which really differ: the 46 x 50 image's
    corner and centre offsets are not multiples of 4) and their reflections must all score
    exactly like the centre crop."""
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=generator)
    images = tiles.repeat(1, 1, 12, 13)[:, :, :46, :50]  # 46 x 50, period 4
    preprocess = EvalPreprocess(32, 46, Normalize(torch.tensor([0.5, 0.4, 0.3])))
    per_image = ProtocolViews(parse_protocol("ten-crop"), preprocess)(images[0])
    crops = per_image[0][:5]
    assert all(not torch.equal(crops[i], crops[j]) for i in range(5) for j in range(i))
    model, ten, center = PixelwiseNet(), parse_protocol("ten-crop"), parse_protocol("center")
    with torch.no_grad():
        stacks = [ProtocolViews(ten, preprocess)(image) for image in images]
        tencrop = average_posteriors(model, None, stacks, ten)
        stacks = [ProtocolViews(center, preprocess)(image) for image in images]
        single = average_posteriors(model, None, stacks, center)
    assert torch.allclose(tencrop, single, atol=1e-6)
    assert not torch.allclose(single, single.mean(0))  # the images do score differently


def test_evaluate_counts_every_image_exactly(sample_sets):
    val = sample_sets.val
    model = SmallConvNet().eval()
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor(val.labels)
    with torch.no_grad():
        top = model(images).topk(5, 1).indices
    wrong1 = (top[:, 0] != labels).sum().item()
    wrong5 = (top != labels[:, None]).all(1).sum().item()
    for data in (val, TensorDataset(images, labels)):  # views of raw images; ready tensors
        result = evaluate(model, data, "center", batch_size=96)  # 1000 = 10 x 96 + 40
        assert result["images"] == 1000 and result["skipped"] == 0
        assert result["top1_error"] == pytest.approx(100 * wrong1 / 1000)
        assert result["top5_error"] == pytest.approx(100 * wrong5 / 1000)
    with pytest.raises(ConfigError, match="makes its views of raw images"):
        evaluate(model, TensorDataset(images, labels), "ten-crop")
    # a set of raw images without preprocess= is preprocessed per the model's eval_config,
    # as the dataset's name is
    resnet = create_model("resnet20").eval()
    raw = open_eval_split("sample")
    by_name = evaluate(resnet, "sample", "center", batch_size=100)
    by_set = evaluate(resnet, raw, "center", batch_size=100)
    assert (by_set["images"], by_set["top1_error"]) == (1000, by_name["top1_error"])
    with pytest.raises(ConfigError, match="SmallConvNet has no eval_config"):
        evaluate(model, raw, "center")
    # ... and per a recipe's data section when given, as the dataset's name is
    config = DataConfig(dataset="sample", crop_size=24, resize_size=28)
    by_name, by_set, own = (
        evaluate(resnet, data, "center", data_config=settings, keep_probabilities=True)
        for data, settings in (("sample", config), (raw, config), (raw, None)))
    assert torch.equal(by_set["probabilities"], by_name["probabilities"])
    assert not torch.equal(by_set["probabilities"], own["probabilities"])
    with pytest.raises(ConfigError, match="scales apply to the views made of raw images"):
        evaluate(model, TensorDataset(images, labels), "center", scales=(64,))
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        evaluate(model, val, "center", batch_size=0)


def test_an_over_confident_model_s_views_rank_as_its_logits(sample_sets):
    """Logit gaps beyond about 100 underflow a float32 softmax to 0, whose ties would rank
    lowest class first: the views' posteriors would then count other top-5 hits than the
    logits of the same images do (training's validation)."""
    val = sample_sets.val
    model = SmallConvNet().eval()
    with torch.no_grad():
        model.fc.weight.mul_(1000)
    subset = ArrayImages(val.images[:200], val.labels[:200], val.classes, name="val[:200]")
    images = torch.stack([val[i][0] for i in range(200)])
    ready = TensorDataset(images, torch.tensor(val.labels[:200]))
    by_logits = evaluate(model, ready, "center")
    by_views = evaluate(model, subset, "center", preprocess=sample_sets.preprocess,
                        keep_probabilities=True)
    assert by_views["top5_error"] == by_logits["top5_error"]
    assert by_views["top1_error"] == by_logits["top1_error"]
    assert (by_views["probabilities"].float() == 0).any()  # the gaps underflow float32
    assert by_views["probabilities"].dtype == torch.float64
    assert (by_views["probabilities"] > 0).all()


def test_dense_equals_center_at_training_size(sample_sets):
    val = sample_sets.val
    model = SmallConvNet().eval()
    images = torch.stack([val[i][0] for i in range(64)])
    with torch.no_grad():
        posteriors = average_posteriors(
            model, model.fully_convolutional(), [[dense_view(x)] for x in images],
            parse_protocol("dense"),
        )
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        assert torch.allclose(posteriors, expected, atol=1e-6)
        score_map = model.fully_convolutional()(images)
        assert score_map.shape[-2:] == (1, 1)
        assert torch.allclose(score_map.flatten(1), model(images), atol=1e-5)


def test_dense_on_a_canon_model(sample_sets):
    """resnet20's fully convolutional form scores the training-size image like forward."""
    model = create_model("resnet20", 10).eval()
    val = sample_sets.val
    images = torch.stack([val[i][0] for i in range(16)])
    with torch.no_grad():
        dense = model.fully_convolutional().eval()(images).mean((2, 3))
        assert torch.allclose(dense, model(images), atol=1e-4)
    subset = ArrayImages(val.images[:100], val.labels[:100], val.classes, name="val[:100]")
    with pytest.warns(UserWarning, match=r"multi-scale\+dense at 2 scales, shorter side 32 and "
                                         r"64, not VGG's 3: 0 is under the 32 px crop"):
        result = evaluate(model, subset, "multi-scale+dense", batch_size=100,
                          preprocess=sample_sets.preprocess)
    assert result["images"] == 100 and result["scales"] == [32, 64]
    named = dataclasses.replace(sample_sets.preprocess, scales_named=True)  # data.test_scales
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProtocolViews(parse_protocol("multi-scale"), named)
        ProtocolViews(parse_protocol("multi-scale"), sample_sets.preprocess, scales=(32, 64))


def test_evaluate_a_folder_with_model_eval_config(imagenette_root, tmp_path):
    """A folder path uses the model's eval_config; a plain nn.Module without one is refused."""
    for split, count in (("train", 2), ("val", 15)):
        for wnid in ("n01440764", "n02102040"):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for path in sorted((imagenette_root / split / wnid).iterdir())[:count]:
                (folder / path.name).symlink_to(path)
    model = PixelwiseNet()
    with pytest.raises(ConfigError, match="eval_config"):
        evaluate(model, tmp_path, "center")
    model.eval_config = EvalConfig(input_size=112, resize_size=128)
    # 2 classes for 10 outputs: labels 0 and 1 would score them as the model's first two
    with pytest.raises(ConfigError, match="holds 2 classes where the model gives 10 scores"):
        evaluate(model, tmp_path, "center")
    class_ids = ["n01440764", "n02102040", *(f"other{i}" for i in range(8))]
    result = evaluate(model, tmp_path, "ten-crop", batch_size=8,  # 30 batches of one image
                      class_ids=class_ids)
    assert result["images"] == 30 and result["scales"] == [128]


def test_score_loader_leaves_a_split_model_where_it_is(sample_sets):
    """The trainer validates a model-parallel model through score_loader: the model must not
    be gathered onto one device; only evaluate(), the public entry, moves a plain model."""
    val = sample_sets.val
    model = SplitOverDevices()
    ready = build_loader(val, 250, train=False)
    errors = score_loader(model, ready, None, "cpu")
    assert errors.result() == {k: v for k, v in evaluate(PixelwiseNet(), val, "center",
                                                         batch_size=250).items()
                               if k in ("top1_error", "top5_error", "images")}
    dense = parse_protocol("dense")
    views = val.with_transform(ProtocolViews(dense, sample_sets.preprocess))
    loader = build_loader(views, 250, train=False, collate_fn=collate_views)
    assert score_loader(model, loader, dense, "cpu").images == 1000
    assert model.piece_elsewhere.weight.is_meta


def test_loader_of_views_restores_training_mode(sample_sets):
    val = sample_sets.val
    model = SmallConvNet().train()
    preprocess = EvalPreprocess(32, 32, Normalize(torch.zeros(3)))
    dataset = val.with_transform(ProtocolViews(parse_protocol("center"), preprocess))
    loader = build_loader(dataset, 50, train=False, collate_fn=collate_views)
    assert len(next(iter(loader))[0]) == 50
    evaluate(model, val, "center")
    assert model.training


def _link_images(source: Path, target: Path, count: int) -> list[Path]:
    target.mkdir(parents=True)
    for path in sorted(source.iterdir())[:count]:
        (target / path.name).symlink_to(path)
    return sorted(target.iterdir())


def test_evaluate_a_folder_of_some_of_the_models_classes(imagenette_root, tmp_path):
    """A val folder without train/ and without one of the model's classes: labels are the
    model's indices of its class names, and the error is the one computed by hand."""
    wnids = ["n01440764", "n02102040", "n02979186"]  # the model's classes, its output order
    for wnid in (wnids[0], wnids[2]):
        _link_images(imagenette_root / "val" / wnid, tmp_path / "val" / wnid, 6)
    val = open_eval_split(str(tmp_path), wnids)
    assert val.labels == [0] * 6 + [2] * 6
    model = PixelwiseNet(num_classes=3)
    model.eval_config = EvalConfig(input_size=64, resize_size=72)
    center = ProtocolViews(parse_protocol("center"), preprocess_for(model))
    with torch.no_grad():
        scores = model(torch.cat([center(decode_image_file(p))[0] for p in val.paths]))
    wrong = (scores.argmax(1) != torch.tensor(val.labels)).sum().item()
    result = evaluate(model, tmp_path, "center", batch_size=5, class_ids=wnids)
    assert result["images"] == 12 and result["top1_error"] == pytest.approx(100 * wrong / 12)

    _link_images(imagenette_root / "val" / "n03000684", tmp_path / "val" / "n03000684", 1)
    with pytest.raises(DataError, match=r"n03000684 are not among the 3 classes"):
        evaluate(model, tmp_path, "center", class_ids=wnids)


def test_a_labelled_set_is_scored_only_by_a_model_of_its_classes(sample_sets):
    """A LabeledImages set's labels index its own class_ids: against a model whose outputs are
    those classes in another order they would count the wrong outputs, silently."""
    val = sample_sets.val
    subset = ArrayImages(val.images[:8], val.labels[:8], val.class_ids, name="val[:8]")
    model = SmallConvNet().eval()
    scored = evaluate(model, subset, preprocess=sample_sets.preprocess, class_ids=val.class_ids)
    assert scored["images"] == 8
    reordered = val.class_ids[::-1]
    expected = f"output 0 is '{reordered[0]}' against '{val.class_ids[0]}'"
    with pytest.raises(ConfigError, match=rf"other classes than the model's \({expected}\)"):
        evaluate(model, subset, preprocess=sample_sets.preprocess, class_ids=reordered)


def test_evaluate_with_a_preprocess_reads_no_training_split(imagenette_root, tmp_path):
    wnids = ["n01440764", "n02102040"]
    for wnid in wnids:
        _link_images(imagenette_root / "val" / wnid, tmp_path / "val" / wnid, 3)
    for name in ("other", "classes"):
        _link_images(imagenette_root / "train" / wnids[0], tmp_path / "train" / name, 1)
    with pytest.raises(DataError, match="train and val have different classes"):
        build_datasets(DataConfig(dataset=str(tmp_path), mean="imagenet"))
    model = PixelwiseNet(num_classes=2)
    preprocess = EvalPreprocess(64, 72, Normalize(torch.zeros(3)))
    result = evaluate(model, tmp_path, "ten-crop", preprocess=preprocess)
    assert result["images"] == 6 and result["views_per_image"] == 10


def test_ten_crop_without_a_margin_says_it_has_two_views(sample_sets):
    """The sample's 32 px images rescaled to 32 for 32 px crops: AlexNet's ten crops, 224 of
    256, reduce to the image and its reflection."""
    with pytest.warns(UserWarning, match=r"the centre crop and its reflection \(2 distinct "):
        ProtocolViews(parse_protocol("ten-crop"), sample_sets.preprocess)


@pytest.mark.filterwarnings("ignore:ten-crop of 32 px crops")  # the sample: 32 px images
def test_evaluate_keeps_the_probabilities_in_dataset_order(sample_sets):
    """keep_probabilities: the posteriors the errors were counted from, one row per image in
    the dataset's order, with its label; a softmax of the logits for ready tensors."""
    val = sample_sets.val
    subset = ArrayImages(val.images[:30], val.labels[:30], val.classes, name="val[:30]")
    model, ten = SmallConvNet().eval(), parse_protocol("ten-crop")
    result = evaluate(model, subset, "ten-crop", batch_size=8, preprocess=sample_sets.preprocess,
                      keep_probabilities=True)
    with torch.no_grad():
        stacks = [ProtocolViews(ten, sample_sets.preprocess)(image) for image in subset.images]
        expected = average_posteriors(model, None, stacks, ten)
    assert torch.allclose(result["probabilities"].float(), expected, atol=1e-6)
    assert torch.equal(result["labels"], torch.tensor(subset.labels))
    wrong = (expected.argmax(1) != result["labels"]).sum().item()
    assert result["top1_error"] == pytest.approx(100 * wrong / 30)

    images = torch.stack([val[i][0] for i in range(30)])
    ready = TensorDataset(images, torch.tensor(val.labels[:30]))
    kept = evaluate(model, ready, "center", batch_size=8, keep_probabilities=True)
    with torch.no_grad():
        assert torch.allclose(kept["probabilities"].float(), model(images).softmax(1),
                              atol=1e-6)
    assert kept["probabilities"].shape == (30, 10) and kept["probabilities"].device.type == "cpu"
    assert "probabilities" not in evaluate(model, ready, "center")


def test_a_model_s_own_preprocessing_keeps_the_central_square_of_alexnet_and_zfnet():
    """AlexNet s2 and ZFNet s3 test on the central 256 x 256 square of the rescaled image,
    with or without a recipe; the other models keep the whole rescaled image."""
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    for name, fit in (("alexnet", "center-square"), ("zfnet", "center-square"),
                      ("vgg11", "shorter"), ("resnet18", "shorter")):
        preprocess = preprocess_for(create_model(name, 10))
        assert preprocess.fit == fit
        dense = ProtocolViews(parse_protocol("dense"), preprocess)(image)
        assert dense[0].shape[-2:] == ((256, 256) if fit == "center-square" else (256, 341))
    squash = preprocess_for(create_model("alexnet", 10), fit="squash")  # a recipe's choice
    assert squash.fit == "squash"


def test_a_recipe_s_data_section_normalises_by_the_set_it_trained_on(tmp_path):
    """A test folder with no train/ (as ImageNetV2): the statistics come from the training set
    the data section names, as in training, not from the folder being tested."""
    from PIL import Image

    from canon.data.datasets import load_sample
    from canon.data.loaders import trained_preprocess

    test = load_sample("test")
    for index in range(6):
        folder = tmp_path / "val" / test.classes[test.labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[index].permute(1, 2, 0).numpy()).save(folder / f"{index}.png")
    config = DataConfig(dataset="sample", crop_size=32, resize_size=32, mean="channel",
                        divide_std=True)
    model = create_model("resnet20", 10).eval()
    result = evaluate(model, tmp_path, data_config=config, class_ids=test.class_ids,
                      keep_probabilities=True, root_cache=tmp_path / "cache")
    trained = trained_preprocess(config, "sample", cache=tmp_path / "cache", strict=False,
                                 download=False, max_pixels=config.max_image_pixels)
    expected = evaluate(model, tmp_path, preprocess=trained, class_ids=test.class_ids,
                        keep_probabilities=True)
    assert result["images"] == 6
    torch.testing.assert_close(result["probabilities"], expected["probabilities"])
    # ... whose statistics are the sample's training images' (its test images' differ by 0.005)
    pixels = load_sample("train").images.float().div(255).transpose(0, 1).flatten(1)
    torch.testing.assert_close(trained.normalize.mean.flatten(), pixels.mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(trained.normalize.std.flatten(), pixels.std(1, correction=0),
                               atol=1e-4, rtol=0)
