"""The ResNets against the paper (He et al. 2015) and torchvision: counts, strides, shortcuts."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torchvision

import canon
from canon.errors import ConfigError
from canon.models.resnet import BasicBlock, Bottleneck, ResidualBlock, ZeroPadShortcut
from canon.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD

# Exact counts of every model are in test_models.EXPECTED_PARAMS; here they are checked against
# torchvision and the paper.
# The three projection shortcuts (64->128, 128->256, 256->512: 1x1 conv + BN) plain nets lack.
PROJECTIONS_18_34 = sum(c * 2 * c + 2 * 2 * c for c in (64, 128, 256))
# Table 6 of the paper (10 classes).
CIFAR_PAPER_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """Structure only (no memory, no initialisation): enough to count parameters fast."""
    with torch.device("meta"):
        return canon.create_model(name, **kwargs)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_counts_equal_torchvision(depth: int) -> None:
    with torch.device("meta"):
        expected = count(getattr(torchvision.models, f"resnet{depth}")())
    assert count(build_on_meta(f"resnet{depth}")) == expected
    if depth >= 50:
        assert count(build_on_meta(f"resnet{depth}_v1_5")) == expected


@pytest.mark.parametrize("depth", [18, 34])
def test_plain_nets_lack_only_the_projections(depth: int) -> None:
    plain = build_on_meta(f"plain{depth}")
    assert count(plain) == count(build_on_meta(f"resnet{depth}")) - PROJECTIONS_18_34
    assert all(block.shortcut is None for block in plain.blocks())


@pytest.mark.parametrize("name", sorted(CIFAR_PAPER_PARAMS))
def test_cifar_counts_match_table_6(name: str) -> None:
    paper = CIFAR_PAPER_PARAMS[name]
    ours = count(build_on_meta(name, num_classes=10))
    assert abs(ours - paper) / paper < 0.02
    plain_name = name.replace("resnet", "plain")
    if plain_name in canon.list_models():  # option A shortcuts add nothing over plain nets
        assert count(build_on_meta(plain_name, num_classes=10)) == ours


def test_cifar_layout_is_6n_plus_2() -> None:
    model = canon.create_model("resnet56", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 56
    assert all(conv.kernel_size == (3, 3) for conv in convs)  # no 1x1 projections anywhere
    assert len(build_on_meta("resnet1202", num_classes=10).blocks()) == 600  # n = 200
    assert {conv.out_channels for conv in convs} == {16, 32, 64}
    assert model.eval_config.input_size == 32 and model.eval_config.resize_size == 32
    assert model.eval_config.mean == CIFAR10_MEAN and model.eval_config.std == CIFAR10_STD
    model.eval()
    shapes = {}
    features = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, stage in model.stages:
            features = stage(features)
            shapes[name] = tuple(features.shape[1:])
    assert shapes == {"conv1": (16, 32, 32), "conv2_x": (16, 32, 32),
                      "conv3_x": (32, 16, 16), "conv4_x": (64, 8, 8)}


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    model = canon.create_model("resnet20", num_classes=10)
    first_of_stage3 = model.conv3_x[0]
    shortcut = first_of_stage3.shortcut
    assert isinstance(shortcut, ZeroPadShortcut)
    assert not list(shortcut.parameters())
    x = torch.randn(2, 16, 32, 32)
    out = shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 16, 16))
    # Blocks that keep their shape use a plain identity.
    assert isinstance(model.conv3_x[1].shortcut, nn.Identity)


@pytest.mark.parametrize("residual, plain", [("resnet20", "plain20"), ("resnet18", "plain18")])
def test_plain_blocks_drop_the_input_and_residual_blocks_pass_it(residual, plain) -> None:
    """With the residual branch silenced, a residual block passes relu(x) on; a plain one 0."""
    x = torch.randn(2, 64, 8, 8) if residual == "resnet18" else torch.randn(2, 16, 8, 8)
    for name, expected in ((residual, torch.relu(x)), (plain, torch.zeros_like(x))):
        block = canon.create_model(name, num_classes=10).conv2_x[0].eval()
        nn.init.zeros_(block.last_bn.weight)
        nn.init.zeros_(block.last_bn.bias)
        with torch.no_grad():
            assert torch.equal(block(x), expected), name


def test_paper_strides_the_first_1x1_and_v1_5_the_3x3() -> None:
    paper = build_on_meta("resnet50")
    v1_5 = build_on_meta("resnet50_v1_5")
    for stage in ("conv3_x", "conv4_x", "conv5_x"):
        first, rest = getattr(paper, stage)[0], getattr(paper, stage)[1:]
        assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))
        first = getattr(v1_5, stage)[0]
        assert (first.conv1.stride, first.conv2.stride) == ((1, 1), (2, 2))
        assert first.shortcut[0].stride == (2, 2)
        assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in rest)
    for model in (paper, v1_5):
        assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in model.conv2_x)


def torchvision_key(key: str) -> str:
    """Our key for a torchvision ResNet key: layerN is conv{N+1}_x, downsample is shortcut."""
    key = re.sub(r"^layer(\d)", lambda m: f"conv{int(m.group(1)) + 1}_x", key)
    key = key.replace("downsample", "shortcut")
    return re.sub(r"^bn1\.", "conv1.1.", re.sub(r"^conv1\.", "conv1.0.", key))


@pytest.mark.parametrize("name, reference", [("resnet50_v1_5", "resnet50"),
                                             ("resnet18", "resnet18")])
def test_same_function_as_torchvision_given_its_weights(name: str, reference: str) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, reference)().eval()
    ours = canon.create_model(name).eval()
    ours.load_state_dict({torchvision_key(k): v for k, v in theirs.state_dict().items()})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images))


def test_imagenet_stage_shapes_follow_table_1() -> None:
    model = canon.create_model("resnet18").eval()
    features = torch.randn(1, 3, 224, 224)
    shapes = {}
    with torch.no_grad():
        for name, stage in model.stages:
            features = stage(features)
            shapes[name] = tuple(features.shape[1:])
    assert shapes == {"conv1": (64, 56, 56), "conv2_x": (64, 56, 56), "conv3_x": (128, 28, 28),
                      "conv4_x": (256, 14, 14), "conv5_x": (512, 7, 7)}
    assert [name for name, _ in build_on_meta("resnet152").stages] == list(shapes)


def test_kaiming_init_and_zero_init_residual() -> None:
    torch.manual_seed(0)
    model = canon.create_model("resnet34", zero_init_residual=True)
    conv = model.conv4_x[1].conv1  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    blocks = model.blocks()
    assert len(blocks) == 16
    assert all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)
    # Every block starts as relu(shortcut(x)): identity blocks leave a non-negative input alone.
    block = model.conv3_x[1].eval()
    x = torch.rand(1, 128, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    bottleneck = canon.create_model("resnet50", zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in bottleneck.blocks())
    assert not any(torch.all(b.bn3.weight == 0) for b in canon.create_model("resnet50").blocks())
    cifar = canon.create_model("resnet20", zero_init_residual=True)  # the CIFAR nets too
    assert all(torch.all(b.bn2.weight == 0) for b in cifar.blocks())


def test_zero_init_residual_refuses_plain_nets() -> None:
    with pytest.raises(ConfigError, match="shortcuts"):
        canon.create_model("plain20", num_classes=10, zero_init_residual=True)


def test_standalone_blocks_for_flop_counting() -> None:
    basic = BasicBlock(64, 64)
    bottleneck = Bottleneck(256, 64)
    assert isinstance(basic, ResidualBlock) and (basic.expansion, bottleneck.expansion) == (1, 4)
    assert isinstance(basic.shortcut, nn.Identity) and isinstance(bottleneck.shortcut, nn.Identity)
    x = torch.randn(2, 64, 56, 56)
    assert basic(x).shape == (2, 64, 56, 56)
    assert bottleneck(torch.randn(1, 256, 56, 56)).shape == (1, 256, 56, 56)
    projected = Bottleneck(64, 64)  # conv2_x's first block: 64 -> 256 channels needs option B
    assert isinstance(projected.shortcut, nn.Sequential)
    with pytest.raises(ConfigError, match="shortcut must be one of"):
        BasicBlock(64, 64, shortcut="D")


def test_shortcut_options_of_table_3() -> None:
    option_a = build_on_meta("resnet34", shortcut="A")
    option_c = build_on_meta("resnet34", shortcut="C")
    projections = [b for b in option_c.blocks() if isinstance(b.shortcut, nn.Sequential)]
    assert len(projections) == len(option_c.blocks()) == 16
    option_b = count(build_on_meta("resnet34"))
    assert count(option_a) == option_b - PROJECTIONS_18_34
    assert count(option_c) > option_b


def test_deep_stem_is_three_3x3_convolutions_at_the_same_stride() -> None:
    """stem="deep" (VGG s2.3's stack of 3x3s in place of the 7x7): timm's resnet34d has
    21.82M parameters, and conv1 still ends at a quarter of the input's side."""
    deep = canon.create_model("resnet34", stem="deep").eval()
    convs = [m for m in deep.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [
        ((3, 3), (2, 2), 32), ((3, 3), (1, 1), 32), ((3, 3), (1, 1), 64)]
    stem_weights = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 2 * (32 + 32 + 64)
    assert count(deep) == count(build_on_meta("resnet34")) - (3 * 64 * 49 + 2 * 64) + stem_weights
    assert round(count(deep) / 1e6, 2) == 21.82
    with torch.no_grad():
        assert deep.conv1(torch.randn(1, 3, 128, 128)).shape == (1, 64, 32, 32)
    with pytest.raises(ConfigError, match="stem must be one of '7x7', 'deep'"):
        canon.create_model("resnet18", stem="3x3")


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_avg_down_projects_the_mean_of_each_2x2_window(block) -> None:
    """avg_down=True (ResNet-D): a strided projection reads every pixel, not one in four."""
    torch.manual_seed(0)
    strided = block(64, 64, stride=2, avg_down=True).eval()
    x = torch.randn(2, 64, 9, 9)  # odd: the last row and column average what they have
    _, conv, bn = strided.shortcut
    window_means = torch.stack([torch.stack([x[..., i:i + 2, j:j + 2].mean((-2, -1))
                                             for j in range(0, 9, 2)], -1)
                                for i in range(0, 9, 2)], -2)
    with torch.no_grad():
        torch.testing.assert_close(strided.shortcut(x), bn(conv(window_means)))
    assert (conv.stride, conv.kernel_size) == ((1, 1), (1, 1))
    assert count(strided) == count(block(64, 64, stride=2))
    widening = block(64, 128, avg_down=True).shortcut  # no stride: the projection alone
    assert [type(m) for m in widening] == [nn.Conv2d, nn.BatchNorm2d]
    assert count(build_on_meta("resnet50", avg_down=True)) == count(build_on_meta("resnet50"))
    for no_projection in ("resnet20", "plain20"):  # option A, and no shortcuts at all
        with pytest.raises(ConfigError, match="avg_down averages before a projection"):
            canon.create_model(no_projection, avg_down=True)


def test_head_interface() -> None:
    model = canon.create_model("resnet50", num_classes=10).eval()
    features = torch.randn(2, 2048, 2, 2)
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    torch.testing.assert_close(model.forward_head(features), model.fc(pooled))
    model.reset_classifier(5)
    assert model.forward_head(features).shape == (2, 5)
    with pytest.raises(ConfigError):
        model.reset_classifier(0)


def test_cifar_depth_must_be_6n_plus_2() -> None:
    from canon.models.resnet_cifar import CifarResNet

    with pytest.raises(ConfigError, match="6n \\+ 2"):
        CifarResNet(21)
