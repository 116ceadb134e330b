"""AlexNet, ZFNet and VGG against their papers: counts, towers, LRN, init, FC-to-conv, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from canon import create_model
from canon.errors import ConfigError, InputSizeError
from canon.models.alexnet import AlexNet
from canon.models.layers import LocalResponseNorm
from canon.models.vgg import VGG
from canon.recipes import load_recipe

# torchvision has the same network (same weight shapes) for these names; exact counts of every
# model are in test_models.EXPECTED_PARAMS.
VGG_IN_TORCHVISION = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn",
                      "vgg19_bn")
TORCHVISION = {"alexnet_owt": "alexnet", **{name: name for name in VGG_IN_TORCHVISION}}
# The paper's Table 2 in millions (rounded): A, A-LRN, B 133; C 134; D 138; E 144.
VGG_PAPER_MILLIONS = {"vgg11": 133, "vgg11_lrn": 133, "vgg13": 133, "vgg16_c": 134,
                      "vgg16": 138, "vgg19": 144}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION.keys() | VGG_PAPER_MILLIONS.keys()))
def test_parameter_count_agrees_with_torchvision_and_the_paper(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = count(create_model(name))
        if name in TORCHVISION:
            assert ours == count(getattr(torchvision.models, TORCHVISION[name])())
    if name in VGG_PAPER_MILLIONS:
        assert round(ours / 1e6) == VGG_PAPER_MILLIONS[name]


@pytest.fixture(scope="module")
def alexnet() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(num_classes=1000).eval()


@pytest.fixture(scope="module")
def vgg11() -> VGG:
    torch.manual_seed(0)
    return VGG("A", num_classes=5).eval()


# -- FC head as convolutions (equality with forward: test_models.py, for every model) -----------

def test_fully_convolutional_is_a_converted_copy(vgg11: VGG) -> None:
    dense_model = vgg11.fully_convolutional()
    head = dense_model.head
    assert isinstance(head.fc6, nn.Conv2d) and head.fc6.kernel_size == (7, 7)
    assert head.fc7.kernel_size == (1, 1) and head.fc8.kernel_size == (1, 1)
    assert torch.equal(head.fc6.weight.flatten(1), vgg11.head.fc6.weight)
    assert head.fc6.weight.data_ptr() != vgg11.head.fc6.weight.data_ptr()
    assert dense_model.features.conv1.conv1_1 is not vgg11.features.conv1.conv1_1


# -- AlexNet: towers, initialisation, LRN ----------------------------------------------------

def test_alexnet_two_towers_are_channel_groups(alexnet: AlexNet) -> None:
    groups = {name: stage.conv.groups for name, stage in alexnet.stages}
    assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
    # Figure 2: conv3 reads all 256 maps of conv2, conv4 only the 192 of its own tower.
    assert alexnet.features.conv3.conv.weight.shape == (384, 256, 3, 3)
    assert alexnet.features.conv4.conv.weight.shape == (384, 192, 3, 3)
    # The first tower of conv2 is blind to the second tower of conv1.
    conv2 = alexnet.features.conv2.conv
    x = torch.randn(1, 96, 27, 27)
    changed = x.clone()
    changed[:, 48:] = torch.randn(1, 48, 27, 27)
    with torch.no_grad():
        before, after = conv2(x), conv2(changed)
    assert torch.equal(before[:, :128], after[:, :128])
    assert not torch.allclose(before[:, 128:], after[:, 128:])


def test_alexnet_initialisation_follows_section_5(alexnet: AlexNet) -> None:
    layers = {name: stage.conv for name, stage in alexnet.stages}
    layers |= {name: getattr(alexnet.head, name) for name in ("fc6", "fc7", "fc8")}
    bias_one = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        assert abs(weight.std().item() - 0.01) < 0.0005, name
        assert abs(weight.mean().item()) < 0.0005, name
        expected = 1.0 if name in bias_one else 0.0
        assert torch.equal(layer.bias, torch.full_like(layer.bias, expected)), name


def test_vgg_initialisation_is_glorot(vgg11: VGG) -> None:
    for layer in (vgg11.features.conv1.conv1_1, vgg11.features.conv5.conv5_2, vgg11.head.fc7):
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound
        assert abs(layer.weight.std().item() / (bound / 3**0.5) - 1) < 0.05
        assert not layer.bias.any()


def test_vgg_has_section_3_1_s_random_initialisation_for_its_staged_recipes() -> None:
    """N(0, 0.01) weights and zero biases for configuration A and the layers of D that A
    does not start; a fresh classifier alike; the option travels with the model."""
    torch.manual_seed(0)
    for recipe in ("vgg11", "vgg16-s256"):
        assert load_recipe(recipe).model.options == {"init": "normal"}, recipe
    model = create_model("vgg11", num_classes=10, init="normal")
    model.reset_classifier(5)
    for layer in (model.features.conv1.conv1_1, model.features.conv5.conv5_2, model.head.fc7,
                  model.head.fc8):
        assert abs(layer.weight.std().item() - 0.01) < 0.001 and not layer.bias.any()
    assert model.build_options() == {"init": "normal"}
    with pytest.raises(ConfigError, match="unknown VGG init 'he'"):
        create_model("vgg11", init="he")


def paper_lrn(a: torch.Tensor, k: float = 2, n: int = 5, alpha: float = 1e-4,
              beta: float = 0.75) -> torch.Tensor:
    """Section 3.3 written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)}
    a_j^2)^beta."""
    channels = a.shape[1]
    b = torch.empty_like(a)
    for i in range(channels):
        window = a[:, max(0, i - n // 2):min(channels - 1, i + n // 2) + 1]
        b[:, i] = a[:, i] / (k + alpha * (window**2).sum(dim=1)) ** beta
    return b


def test_lrn_matches_the_papers_formula() -> None:
    torch.manual_seed(0)
    # Large activations, so that the alpha term (up to ~1) is comparable to k.
    a = 40 * torch.randn(2, 11, 4, 4, dtype=torch.float64)
    expected = paper_lrn(a)
    torch.testing.assert_close(LocalResponseNorm()(a), expected, rtol=1e-12, atol=0)
    # The documented mapping: torch's alpha is the paper's times n; the same number differs.
    torch.testing.assert_close(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(a),
                               expected, rtol=1e-12, atol=0)
    assert not torch.allclose(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_lrn_is_the_float32_one_rounded(dtype: torch.dtype) -> None:
    """Computed in float32 and rounded once (torch's CPU kernel has no bfloat16 form)."""
    torch.manual_seed(0)
    a = (40 * torch.randn(2, 12, 3, 5)).to(dtype)
    for groups in (1, 2):
        normalised = LocalResponseNorm(groups=groups)(a)
        assert normalised.dtype == dtype
        assert torch.equal(normalised, LocalResponseNorm(groups=groups)(a.float()).to(dtype))


def test_grouped_lrn_is_the_papers_formula_per_group() -> None:
    torch.manual_seed(0)
    a = 40 * torch.randn(2, 12, 3, 5, dtype=torch.float64)
    for groups in (2, 3):
        expected = torch.cat([paper_lrn(part) for part in a.chunk(groups, dim=1)], dim=1)
        actual = LocalResponseNorm(groups=groups)(a)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
        # Next to a group boundary the window differs from the ungrouped one's.
        assert not torch.allclose(actual, paper_lrn(a), rtol=1e-12, atol=0)
        # A channels_last input stays channels_last, for the convolution after it.
        last = LocalResponseNorm(groups=groups)(a.contiguous(memory_format=torch.channels_last))
        assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, actual)
    with pytest.raises(ValueError, match="cannot split 12 channels"):
        LocalResponseNorm(groups=5)(a)


def test_alexnet_towers_normalise_only_their_own_maps(alexnet: AlexNet) -> None:
    """The paper's GPUs meet only at conv3 and the FC layers, never in an LRN (section 3.2)."""
    torch.manual_seed(0)
    for stage, channels in ((alexnet.features.conv1, 96), (alexnet.features.conv2, 256)):
        assert stage.norm.groups == 2
        half = channels // 2
        x = 40 * torch.rand(1, channels, 5, 5)
        changed = x.clone()
        changed[:, half:] = 40 * torch.rand(1, half, 5, 5)  # only tower 2's input maps
        before, after = stage.norm(x), stage.norm(changed)
        assert torch.equal(before[:, :half], after[:, :half])
        assert not torch.allclose(before[:, half:], after[:, half:])
    # End to end: tower 2's conv1 kernels do not reach tower 1's conv2 output (first 128 maps).
    images = torch.randn(1, 3, 227, 227)
    towers_in = nn.Sequential(alexnet.features.conv1, alexnet.features.conv2)
    with torch.no_grad():
        before = towers_in(images)
        weight = alexnet.features.conv1.conv.weight
        saved = weight[48:].clone()
        weight[48:] = torch.randn_like(saved) * 0.05
        after = towers_in(images)
        weight[48:] = saved
    assert torch.equal(before[:, :128], after[:, :128])
    assert not torch.allclose(before[:, 128:], after[:, 128:])


def test_lrn_sits_where_each_paper_puts_it(alexnet: AlexNet) -> None:
    assert list(alexnet.features.conv1._modules) == ["conv", "relu", "norm", "pool"]
    assert list(alexnet.features.conv3._modules) == ["conv", "relu"]
    with torch.device("meta"):
        zfnet = create_model("zfnet", num_classes=3)
        vgg_lrn = create_model("vgg11_lrn", num_classes=3)
    assert list(zfnet.features.conv1._modules) == ["conv", "relu", "pool", "norm"]
    assert list(vgg_lrn.features.conv1._modules) == ["conv1_1", "relu1_1", "norm1", "pool1"]
    # Only AlexNet's two towers split the normalisation; one-tower nets normalise all maps.
    assert (zfnet.features.conv2.norm.groups, vgg_lrn.features.conv1.norm1.groups) == (1, 1)


# -- stages, head, classifier ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "size", "shapes"),
    [
        ("alexnet", 227, [(96, 27), (256, 13), (384, 13), (384, 13), (256, 6)]),
        ("zfnet", 224, [(96, 55), (256, 13), (384, 13), (384, 13), (256, 6)]),  # Figure 3
        ("zfnet_wide", 224, [(96, 55), (256, 13), (512, 13), (1024, 13), (512, 6)]),
    ],
)
def test_stage_shapes_follow_the_papers(name: str, size: int, shapes: list) -> None:
    model = create_model(name, num_classes=3).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        for (stage_name, stage), (channels, side) in zip(model.stages, shapes, strict=True):
            x = stage(x)
            assert x.shape == (1, channels, side, side), stage_name
    assert torch.equal(x, features)
    assert [name for name, _ in model.stages] == ["conv1", "conv2", "conv3", "conv4", "conv5"]


def test_vgg_table_layers_and_names() -> None:
    with torch.device("meta"):
        vgg16_c = create_model("vgg16_c")
        vgg19_bn = create_model("vgg19_bn")
    conv3 = vgg16_c.features.conv3
    assert list(conv3._modules) == ["conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3",
                                    "relu3_3", "pool3"]
    assert conv3.conv3_3.kernel_size == (1, 1) and conv3.conv3_3.padding == (0, 0)
    weight_layers = [m for m in vgg19_bn.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(weight_layers) == 19
    assert isinstance(vgg19_bn.features.conv5.bn5_4, nn.BatchNorm2d)
    with pytest.raises(ConfigError, match="Table 1 has"):
        VGG("F")


def test_pre_logits_is_fc7_after_relu(alexnet: AlexNet) -> None:
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        features = alexnet.forward_features(x)
        pre_logits = alexnet.forward_head(features, pre_logits=True)
        logits = alexnet.forward_head(features)
    assert pre_logits.shape == (2, 4096)
    assert (pre_logits >= 0).all()
    torch.testing.assert_close(alexnet.head.fc8(pre_logits), logits)


def test_reset_classifier_uses_the_family_init() -> None:
    torch.manual_seed(0)
    model = create_model("alexnet", num_classes=10)
    model.reset_classifier(3)
    assert model.head.fc8.out_features == 3
    assert not model.head.fc8.bias.any()
    assert abs(model.head.fc8.weight.std().item() - 0.01) < 0.001
    assert model.fully_convolutional().head.fc8.out_channels == 3
    with pytest.raises(ConfigError, match="positive integer"):
        model.reset_classifier(0)


# -- input sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "height", "width", "message"),
    [
        ("alexnet", 224, 224, "at least 227x227, got 224x224"),
        ("alexnet", 256, 256, "takes 227x227 inputs, got 256x256; use model.fully_convolutional"),
        ("zfnet", 224, 240, "takes 224x224 inputs, got 224x240"),
        ("vgg11", 100, 100, "at least 224x224, got 100x100"),
        ("alexnet_owt", 62, 62, "at least 63x63, got 62x62"),
    ],
)
def test_bad_input_size_names_the_size(name: str, height: int, width: int, message: str) -> None:
    with torch.device("meta"):  # the size check comes before any computation
        model = create_model(name, num_classes=2)
        with pytest.raises(InputSizeError, match=message):
            model(torch.empty(1, 3, height, width))


def test_alexnet_owt_takes_any_size_from_63() -> None:
    """Densely evaluated too: a run trained at 112 px (the gallery's) is scored on maps its
    adaptive pool brings up to fc6's 6 x 6, as forward does."""
    model = create_model("alexnet_owt", num_classes=4).eval()
    dense = model.fully_convolutional()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 63, 63)).shape == (1, 4)
        assert model(torch.randn(1, 3, 160, 200)).shape == (1, 4)
        for size in (63, 112, 128):
            image = torch.randn(2, 3, size, size + 20)
            torch.testing.assert_close(dense(image).mean((2, 3)), model(image))


def test_eval_configs() -> None:
    sizes = {}
    for name in ("alexnet", "alexnet_owt", "zfnet", "vgg16"):
        with torch.device("meta"):
            config = create_model(name, num_classes=2).eval_config
        sizes[name] = (config.input_size, config.resize_size)
    assert sizes == {"alexnet": (227, 256), "alexnet_owt": (224, 256), "zfnet": (224, 256),
                     "vgg16": (224, 256)}
