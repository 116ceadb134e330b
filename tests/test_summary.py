"""canon.models.summary against torchvision's published figures, the papers' and hand counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import canon
from canon.cli import main
from canon.errors import InputSizeError
from canon.models.resnet import BasicBlock, Bottleneck
from canon.models.summary import ModelSummary, format_table, summarize
from canon.registry import UnknownNameError


def torchvision_model(name: str) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    with torch.device("meta"):
        return getattr(tvm, name)(weights=None, **kwargs)


# torchvision's published metadata for its models (num_params, GFLOPS = multiply-adds) and the
# depth its papers give each network.
TORCHVISION = {
    "alexnet": (61_100_840, 0.714, 8),
    "vgg16": (138_357_544, 15.47, 16),
    "vgg19": (143_667_240, 19.63, 19),
    "googlenet": (6_624_904, 1.50, 22),
    "resnet18": (11_689_512, 1.81, 18),
    "resnet34": (21_797_672, 3.66, 34),
    "resnet50": (25_557_032, 4.09, 50),
    "resnet101": (44_549_160, 7.80, 101),
    "resnet152": (60_192_808, 11.51, 152),
}


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_give_torchvision_figures(name: str) -> None:
    params, gflops, depth = TORCHVISION[name]
    summary = summarize(torchvision_model(name))
    assert summary.params == params
    assert summary.gflops == pytest.approx(gflops, abs=0.005)
    assert summary.layers == depth


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("resnet18", "resnet18"),
        ("resnet34", "resnet34"),
        ("resnet50_v1_5", "resnet50"),
        ("resnet101_v1_5", "resnet101"),
        ("resnet152_v1_5", "resnet152"),
    ],
)
def test_canon_resnets_count_as_torchvision(name: str, reference: str) -> None:
    ours, theirs = summarize(name), summarize(torchvision_model(reference))
    assert (ours.params, ours.gflops, ours.layers) == (theirs.params, theirs.gflops, theirs.layers)
    assert ours.weight_layers == theirs.weight_layers


# ResNet paper, Table 1: 1.8, 3.6, 3.8, 7.6, 11.3 x 10^9 FLOPs (multiply-adds). The paper rounds
# loosely (3.66 is given as 3.6, 3.86 as 3.8), hence 2%.
@pytest.mark.parametrize(
    ("depth", "gflops"), [(18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)]
)
def test_paper_resnets_give_table_1_flops(depth: int, gflops: float) -> None:
    summary = summarize(f"resnet{depth}")
    assert summary.gflops == pytest.approx(gflops, rel=0.02)
    assert summary.layers == depth
    assert summary.input_size == 224


def test_vgg_depths_and_vgg19_flops() -> None:
    for depth in (11, 13, 16, 19):
        assert summarize(f"vgg{depth}").layers == depth
    assert round(summarize("vgg19").gflops, 1) == 19.6


def test_basic_and_bottleneck_blocks_at_56x56() -> None:
    # Two 3x3x64x64 convolutions vs 1x1 256->64, 3x3 64->64, 1x1 64->256 on a 56x56 map:
    # 231.2M vs 218.4M multiply-adds (the ResNet paper: "similar time complexity").
    basic = summarize(BasicBlock(64, 64), input_size=56, in_channels=64)
    bottleneck = summarize(Bottleneck(256, 64), input_size=56, in_channels=256)
    assert round(basic.gflops * 1e9) == 2 * 56 * 56 * 64 * 64 * 9
    assert round(bottleneck.gflops * 1e9) == 56 * 56 * 64 * (256 + 64 * 9 + 256)
    assert (basic.layers, bottleneck.layers) == (2, 3)
    assert (round(basic.gflops, 2), round(bottleneck.gflops, 2)) == (0.23, 0.22)


def test_alexnet_two_towers() -> None:
    summary = summarize("alexnet")
    assert summary.params == 60_965_224
    assert (summary.layers, summary.weight_layers, summary.input_size) == (8, 8, 227)
    with pytest.raises(InputSizeError, match="227"):
        summarize("alexnet", input_size=224)


def test_vgg_head_runs_dense_at_other_sizes() -> None:
    at_384 = summarize("vgg16", input_size=384)
    assert at_384.name == "vgg16 (dense)"
    assert at_384.layers == 16
    assert at_384.params == summarize("vgg16").params
    assert at_384.gflops > 2.5 * summarize("vgg16").gflops


def test_a_model_instance_runs_dense_without_copying_its_weights(monkeypatch) -> None:
    model = canon.create_model("alexnet")
    copy_parameter = nn.Parameter.__deepcopy__

    def meta_only(parameter: nn.Parameter, memo: dict) -> nn.Parameter:
        assert parameter.device.type == "meta", "summarize copied a real weight"
        return copy_parameter(parameter, memo)

    monkeypatch.setattr(nn.Parameter, "__deepcopy__", meta_only)
    summary = summarize(model, input_size=259)
    assert summary.name == "AlexNet (dense)"
    assert summary == dataclasses.replace(summarize("alexnet", input_size=259), name=summary.name)


def test_every_matrix_product_with_a_weight_counts() -> None:
    """Products torch.matmul and hand-written layers dispatch besides mm and addmm."""

    class Products(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.batched = nn.Parameter(torch.zeros(2, 4, 5))
            self.vector = nn.Parameter(torch.zeros(5))
            self.bias = nn.Parameter(torch.zeros(3, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: 1 x 3 x 4 x 4
            rows = x[0, :, 0, :]  # 3 x 4
            baddbmm = torch.baddbmm(self.bias, rows.expand(2, 3, 4), self.batched)  # 2 x 3 x 5
            addbmm = torch.addbmm(self.bias, rows.expand(2, 3, 4), self.batched)  # 3 x 5
            mv = torch.mv(addbmm, self.vector)  # 3
            return baddbmm.sum() + mv.sum() + torch.dot(addbmm[0], self.vector)

    summary = summarize(Products(), input_size=4)
    assert round(summary.gflops * 1e9) == 2 * 3 * 5 * 4 + 2 * 3 * 5 * 4 + 3 * 5 + 5
    assert summary.weight_layers == 4


def test_googlenet_without_auxiliary_heads() -> None:
    summary = summarize("googlenet")
    total = sum(p.numel() for p in canon.create_model("googlenet").parameters())
    assert summary.params == pytest.approx(7.0e6, rel=0.02)
    assert summary.params < total  # the auxiliary classifiers are not counted
    assert summary.layers == 22


@pytest.mark.parametrize(
    ("depth", "params"), [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)]
)
def test_cifar_resnets_give_table_6(depth: int, params: float) -> None:
    summary = summarize(f"resnet{depth}")
    assert summary.params == pytest.approx(params, rel=0.02)
    assert (summary.layers, summary.input_size) == (depth, 32)
    assert summarize(f"plain{depth}").layers == depth


def test_activation_memory_counts_each_kept_storage_once() -> None:
    # Kept for backward: the image (by conv1), conv1's output (by the in-place ReLU and by
    # conv2: one storage), conv2's output (by the max pool), the pool's int64 indices.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1), nn.MaxPool2d(2)
    )
    kept_bytes = 3 * 64 * 4 + 8 * 64 * 4 + 4 * 64 * 4 + 4 * 16 * 8
    summary = summarize(model, input_size=8)
    assert summary.activation_mb * 2**20 == kept_bytes
    assert (summary.layers, summary.params) == (2, 260)
    assert round(summary.gflops * 1e9) == 8 * 64 * 27 + 4 * 64 * 8


def test_depth_follows_the_longest_branch() -> None:
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deep = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
            self.shallow = nn.Conv2d(3, 4, 1)
            self.unused = nn.Linear(4, 4)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            merged = torch.cat([self.deep(x), self.shallow(x)], 1) + self.shallow(x).sum()
            return self.fc(merged.mean((2, 3)))

    summary = summarize(TwoBranches(), input_size=4)
    assert (summary.layers, summary.weight_layers) == (4, 6)
    assert summary.params == 16 + 20 + 20 + 16 + 18  # self.unused is not counted


def test_summarize_leaves_the_model_as_it_was() -> None:
    """Its weights, statistics and each module's mode (a model in training, one block
    frozen in eval mode, as canon.bench passes them)."""
    model = tvm.resnet18(weights=None).train()
    model.layer1.eval()
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summarize(model, input_size=64)
    assert [m.training for m in model.modules()] == modes and True in modes and False in modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.device.type == "cpu" for v in after.values())


def test_every_registered_model_summarizes() -> None:
    for name in canon.list_models():
        summary = summarize(name)
        assert 1 <= summary.layers <= summary.weight_layers
        assert summary.params > 0 and summary.gflops > 0 and summary.activation_mb > 0


def test_format_table_plain_and_markdown() -> None:
    rows = [ModelSummary("resnet50", 50, 25_557_032, 4.0892, 82.13, 224, 54)]
    plain = format_table(rows).splitlines()
    assert plain[0].split() == [
        "model", "input", "(px)", "layers", "(depth)", "conv+fc", "layers", "params",
        "GFLOPs", "(mult-adds)", "activations", "(MiB/image)",
    ]
    assert plain[1].split() == ["resnet50", "224", "50", "54", "25,557,032", "4.09", "82.1"]
    markdown = format_table(rows, markdown=True).splitlines()
    assert markdown[1].startswith("| ---") and markdown[1].endswith(": |")
    assert markdown[2].replace(" ", "") == "|resnet50|224|50|54|25,557,032|4.09|82.1|"


def test_cli_summary(capsys: pytest.CaptureFixture[str]) -> None:
    main(["summary", "resnet18", "alexnet", "--markdown"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "GFLOPs" in lines[0]
    assert lines[2].replace(" ", "").startswith("|resnet18|224|18|21|11,689,512|1.81|")
    assert lines[3].replace(" ", "").startswith("|alexnet|227|8|8|60,965,224|")


def test_cli_summary_skips_models_that_cannot_take_the_size(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["summary", "alexnet*", "--input-size", "128"])
    captured = capsys.readouterr()
    assert "skipped alexnet: " in captured.err and "227" in captured.err
    assert [line.split()[0] for line in captured.out.splitlines()[1:]] == ["alexnet_owt"]
    main(["summary", "alexnet", "resnet18", "--input-size", "128"])  # named: the same
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()[1:]] == ["resnet18"]
    main(["summary", "resnet18", "resnet1?", "resnet18"])  # named and matched: one row each
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == ["resnet18"]
    with pytest.raises(SystemExit) as exit_info:  # none fits: no empty table
        main(["summary", "alexnet", "--input-size", "224"])
    assert exit_info.value.code == 2
    assert ("alexnet takes 227x227 inputs (its fully connected head reads one size); other sizes "
            "are counted in its fully convolutional form, as dense evaluation runs it, which needs "
            "at least 227x227, not 224x224") in capsys.readouterr().err


def test_cli_summary_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "resnet5"])
    assert exit_info.value.code == 2
    assert "did you mean" in capsys.readouterr().err
    with pytest.raises(UnknownNameError):
        summarize("vgg20")
    with pytest.raises(InputSizeError):
        summarize("resnet18", input_size=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "resnet*", "--input-size", "0"])  # an error, not every model skipped
    assert exit_info.value.code == 2 and "positive number of pixels" in capsys.readouterr().err
