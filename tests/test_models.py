"""Registry-driven checks that every registered model gets for free: the interface, forward and
backward, the exact parameter count, and the fully convolutional form."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import canon
from canon.errors import InputSizeError
from canon.models import CanonModel, EvalConfig
from canon.models.layers import FCHeadNet
from canon.models.resnet_cifar import CifarResNet

NUM_CLASSES = 10

# Parameters at each family's default number of classes (1000; 10 for the CIFAR nets), exact.
# The family tests check them against torchvision where it has the same network (alexnet_owt,
# vgg A/B/D/E and their _bn, resnet18-152 and v1.5, googlenet_bn) and against the papers'
# rounded figures (VGG Table 2, CIFAR ResNets Table 6, GoogLeNet Table 1).
EXPECTED_PARAMS = {
    "alexnet": 60_965_224,
    "alexnet_owt": 61_100_840,
    "zfnet": 62_357_608,
    "zfnet_wide": 107_627_624,
    "vgg11": 132_863_336,
    "vgg11_lrn": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16_c": 133_638_952,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "googlenet": 13_378_280,  # with its two auxiliary classifiers; 6,998,552 without
    "googlenet_bn": 13_004_888,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnet50_v1_5": 25_557_032,
    "resnet101_v1_5": 44_549_160,
    "resnet152_v1_5": 60_192_808,
    "plain18": 11_515_688,
    "plain34": 21_623_848,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
    "plain20": 269_722,
    "plain32": 464_154,
    "plain44": 658_586,
    "plain56": 853_018,
    "plain110": 1_727_962,
}


def smallest_valid_size(model: CanonModel) -> int:
    return model.fixed_input_size or model.min_input_size


def total_stride(model: CanonModel) -> int:
    """Input pixels per score-map position: 32 for the ImageNet nets, 4 for the CIFAR ResNets."""
    return 4 if isinstance(model, CifarResNet) else 32


def test_every_registered_model_has_an_expected_parameter_count() -> None:
    registered = set(canon.list_models())
    missing = sorted(registered - EXPECTED_PARAMS.keys())
    assert not missing, f"add the parameter counts of {missing} to EXPECTED_PARAMS"
    assert EXPECTED_PARAMS.keys() <= registered, "EXPECTED_PARAMS names unregistered models"
    assert registered >= DEEPER_SIBLINGS, "DEEPER_SIBLINGS names unregistered models"


@pytest.mark.parametrize("name", canon.list_models())
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = canon.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS.get(name)


def calibrate_batch_norm(model: CanonModel) -> None:
    """Running statistics from one training-mode pass of an image at the training size.

    A fresh net's statistics (mean 0, variance 1) do not describe its activations; in eval mode
    the 600 residual additions of ResNet-1202 then overflow float32.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one pass sets the batch's statistics
    size = model.eval_config.input_size
    model.train()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))  # every map there is larger than 1x1
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


# Configurations whose modules a sibling runs by default, only more of them (VGG's B and E
# and the batch-norm VGGs but A's, the deeper ImageNet ResNets, ResNet-1202): their forward
# passes take a minute on two cores, so `pytest -m slow` runs them. Their parameter counts are
# checked by default.
DEEPER_SIBLINGS = {"vgg13", "vgg13_bn", "vgg16_bn", "vgg19", "vgg19_bn", "resnet101",
                   "resnet101_v1_5", "resnet152", "resnet152_v1_5", "resnet1202"}


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name in DEEPER_SIBLINGS else name
    for name in canon.list_models()])
def built(request) -> tuple[str, CanonModel]:
    torch.manual_seed(0)
    model = canon.create_model(request.param, num_classes=NUM_CLASSES)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        calibrate_batch_norm(model)
    return request.param, model


def test_forward_backward_and_interface(built) -> None:
    name, model = built
    assert isinstance(model, CanonModel), name
    assert isinstance(model.eval_config, EvalConfig)
    size = smallest_valid_size(model)
    # Two images: batch norm in training mode needs more than one value per channel.
    images = torch.randn(2, 3, size, size)
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.train()
    logits, aux = model.forward_with_aux(images)
    assert logits.shape == (2, NUM_CLASSES)
    (logits.sum() + sum(a.sum() for a in aux)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # keep the calibrated statistics for the eval-mode checks
        for name, buffer in model.named_buffers():
            buffer.copy_(statistics[name])

    # forward runs the stages in order, each on the previous one's output, then the head.
    model.eval()
    image = images[:1]
    ran: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [stage.register_forward_hook(lambda _, args, out: ran.append((args[0], out)))
             for _, stage in model.stages]
    try:
        with torch.no_grad():
            logits = model(image)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(ran) == len(model.stages)
    assert torch.equal(ran[0][0], image)
    assert all(torch.equal(output, next_input)
               for (_, output), (next_input, _) in itertools.pairwise(ran))
    features = ran[-1][1]
    with torch.no_grad():
        assert torch.equal(model.forward_features(image), features)
        torch.testing.assert_close(model.forward_head(features), logits)
        pooled = model.forward_head(features, pre_logits=True)
        # the classifier is the last layer: a linear probe fitted on `pooled` replaces it
        torch.testing.assert_close(model.classifier(pooled), logits)
    assert pooled.dim() == 2 and pooled.shape[0] == 1
    assert torch.isfinite(logits).all()


def test_fully_convolutional_matches_forward(built) -> None:
    """At the training size the score map's mean is the logits (1x1 for FC heads); every
    `total_stride` more rows of pixels add a row of positions."""
    _, model = built
    model.eval()
    size = model.eval_config.input_size
    image = torch.randn(1, 3, size, size)
    dense = model.fully_convolutional()
    assert not dense.training  # keeps the model's mode
    with torch.no_grad():
        logits = model(image)
        scores = dense(image)
        taller = dense(torch.randn(1, 3, size + 32, size))
    stride = total_stride(model)
    side = 1 if isinstance(model, FCHeadNet) else size // stride
    assert scores.shape == (1, NUM_CLASSES, side, side)
    error = (scores.mean(dim=(2, 3)) - logits).abs().max() / logits.abs().max()
    assert error < 1e-5
    assert taller.shape == (1, NUM_CLASSES, side + 32 // stride, side)
    minimum = dense.min_input_size
    with pytest.raises(InputSizeError, match=f"at least {minimum}x{minimum}"):
        dense(torch.randn(1, 3, minimum - 1, size))


def test_reset_classifier(built) -> None:
    name, model = built
    model.reset_classifier(7)
    assert model.classifier.out_features == 7
    class_layers = model.class_layers()  # each reset with it: transfer treats them alike
    assert class_layers[0] is model.classifier
    assert [layer.out_features for layer in class_layers] == [7] * len(class_layers)
    size = smallest_valid_size(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7), name
    model.reset_classifier(NUM_CLASSES)


def test_too_small_input_names_minimum(built) -> None:
    _, model = built
    minimum = smallest_valid_size(model)
    with pytest.raises(InputSizeError, match=f"at least {minimum}x{minimum}"):
        model(torch.randn(1, 3, minimum - 1, minimum - 1))


@pytest.mark.parametrize("name, options", [
    ("resnet34", {"shortcut": "A"}),  # Table 3's option A: no projection weights
    ("resnet34", {"stem": "deep", "avg_down": True}),  # timm's resnet34d
    ("resnet50", {"stride_in_1x1": False}),  # the same weights, other outputs
    ("vgg11", {"batch_norm": True}),
    ("zfnet", {"widths": (64, 64, 32)}),
    ("googlenet", {"lrn": False, "aux_logits": False}),
])
def test_build_options_rebuild_a_model_built_with_other_options(name, options) -> None:
    """What travels with an export (build_options) rebuilds the model its builder made: the
    same weights load and give the same outputs."""
    torch.manual_seed(0)
    model = canon.create_model(name, NUM_CLASSES, **options).eval()
    assert model.build_options() == options
    rebuilt = canon.create_model(name, NUM_CLASSES, **model.build_options()).eval()
    rebuilt.load_state_dict(model.state_dict())
    size = smallest_valid_size(model)
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    assert canon.create_model(name, NUM_CLASSES).build_options() == {}
