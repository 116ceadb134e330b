"""GoogLeNet against the paper's Table 1 and torchvision: structure, counts, the training path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import canon
from canon.models.googlenet import AuxClassifier, Inception
from canon.models.layers import LocalResponseNorm

# Table 1's "params" column: weights only (no biases), in units of 1,024. The column does not
# always agree with the table's own filter counts (which the model follows): conv1's 2.7K is not
# 7 x 7 x 3 x 64 = 9,408 weights, and 4c, 4d, 5a and 5b are off by 2-7%; its total is within 1%.
TABLE_1_PARAMS_K = {
    "conv1": 2.7, "conv2": 112, "inception3a": 159, "inception3b": 380, "inception4a": 364,
    "inception4b": 437, "inception4c": 463, "inception4d": 580, "inception4e": 840,
    "inception5a": 1072, "inception5b": 1388, "fc": 1000,
}
TABLE_1_MISMATCHES = {"conv1", "inception4c", "inception4d", "inception5a", "inception5b"}
# Table 1's output sizes (channels, height = width) at 224 x 224.
TABLE_1_SHAPES = {
    "conv1": (64, 112), "pool1": (64, 56), "conv2": (192, 56), "pool2": (192, 28),
    "inception3a": (256, 28), "inception3b": (480, 28), "pool3": (480, 14),
    "inception4a": (512, 14), "inception4b": (512, 14), "inception4c": (512, 14),
    "inception4d": (528, 14), "inception4e": (832, 14), "pool4": (832, 7),
    "inception5a": (832, 7), "inception5b": (1024, 7),
}
GOOGLENET_PARAMS = 6_998_552  # without auxiliary heads, 1000 classes
TORCHVISION_GOOGLENET_PARAMS = 6_624_904


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weights_only(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.fixture(scope="module")
def paper_net() -> nn.Module:
    torch.manual_seed(0)
    return canon.create_model("googlenet")


def test_counts(paper_net) -> None:
    without_aux = canon.create_model("googlenet", aux_logits=False)
    assert count(without_aux) == GOOGLENET_PARAMS
    aux_params = sum(count(aux) for aux in paper_net.aux_classifiers())
    assert count(paper_net) == GOOGLENET_PARAMS + aux_params
    with torch.device("meta"):
        for aux_logits in (False, True):
            reference = torchvision.models.googlenet(aux_logits=aux_logits, init_weights=False)
            ours = canon.create_model("googlenet_bn", aux_logits=aux_logits)
            assert count(ours) == count(reference)
        assert count(canon.create_model("googlenet_bn", aux_logits=False)) == (
            TORCHVISION_GOOGLENET_PARAMS)


def test_table_1_params_column(paper_net) -> None:
    layers = {**dict(paper_net.stages), "fc": paper_net.fc}
    ours_k = {name: weights_only(layers[name]) / 1024 for name in TABLE_1_PARAMS_K}
    for name, paper_k in TABLE_1_PARAMS_K.items():
        agrees = abs(ours_k[name] - paper_k) / paper_k < 0.01
        assert agrees == (name not in TABLE_1_MISMATCHES), (name, ours_k[name], paper_k)
    total_k = sum(ours_k.values())
    aux_weights = sum(weights_only(aux) for aux in paper_net.aux_classifiers())
    assert total_k == (weights_only(paper_net) - aux_weights) / 1024
    assert abs(total_k - sum(TABLE_1_PARAMS_K.values())) / total_k < 0.01
    assert ours_k["conv1"] * 1024 == 7 * 7 * 3 * 64


def test_table_1_shapes_at_224(paper_net) -> None:
    paper_net.eval()
    features = torch.randn(1, 3, 224, 224)
    shapes = {}
    with torch.no_grad():
        for name, stage in paper_net.stages:
            features = stage(features)
            shapes[name] = (features.shape[1], features.shape[2])
            assert features.shape[2] == features.shape[3]
    assert shapes == TABLE_1_SHAPES


def test_true_5x5_branches_biases_and_lrn(paper_net) -> None:
    inceptions = [m for m in paper_net.modules() if isinstance(m, Inception)]
    assert len(inceptions) == 9
    for module in inceptions:
        assert module.branch5x5[1].conv.kernel_size == (5, 5)
    convs = [m for m in paper_net.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is not None for conv in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paper_net.modules())
    stages = dict(paper_net.stages)
    assert isinstance(stages["pool1"][-1], LocalResponseNorm)
    assert isinstance(stages["conv2"][-1], LocalResponseNorm)
    assert sum(isinstance(m, LocalResponseNorm) for m in paper_net.modules()) == 2
    assert paper_net.dropout.p == 0.4

    bn_net = canon.create_model("googlenet_bn", aux_logits=False)
    for module in (m for m in bn_net.modules() if isinstance(m, Inception)):
        assert module.branch5x5[1].conv.kernel_size == (3, 3)
    assert not any(isinstance(m, LocalResponseNorm) for m in bn_net.modules())
    assert all(m.bias is None for m in bn_net.modules() if isinstance(m, nn.Conv2d))


def test_caffe_initialisation(paper_net) -> None:
    conv = paper_net.inception4c.branch3x3[1].conv  # 128 -> 256, 3x3: fan_in 1152
    bound = (3 / (128 * 9)) ** 0.5
    assert conv.weight.abs().max().item() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    assert torch.all(conv.bias == 0.2)
    assert torch.all(paper_net.aux1.fc1.bias == 0.2)
    for classifier in (paper_net.fc, paper_net.aux1.fc2, paper_net.aux2.fc2):
        assert torch.all(classifier.bias == 0)


def test_training_path_returns_main_and_aux_logits(paper_net) -> None:
    paper_net.train()
    images = torch.randn(1, 3, 224, 224)
    logits, aux = paper_net.forward_with_aux(images)
    assert logits.shape == (1, 1000) and len(aux) == 2
    assert all(a.shape == (1, 1000) for a in aux)
    (logits.sum() + 0.3 * sum(a.sum() for a in aux)).backward()
    for aux_head in paper_net.aux_classifiers():
        assert all(p.grad is not None for p in aux_head.parameters())
    paper_net.zero_grad(set_to_none=True)

    paper_net.eval()
    with torch.no_grad():
        output = paper_net(images)
        main, _ = paper_net.forward_with_aux(images)
    assert isinstance(output, torch.Tensor) and output.shape == (1, 1000)
    torch.testing.assert_close(main, output)


def test_aux_heads_take_no_part_in_forward(paper_net) -> None:
    """The modules `forward` runs hold exactly the parameters of a net built without aux heads."""
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda module, *_: ran.add(module))
             for m in paper_net.modules()]
    paper_net.eval()
    with torch.no_grad():
        paper_net(torch.randn(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    used = {id(p) for m in ran for p in m.parameters(recurse=False)}
    used_count = sum(p.numel() for p in paper_net.parameters() if id(p) in used)
    assert used_count == GOOGLENET_PARAMS
    assert not any(isinstance(m, AuxClassifier) for m in ran)


def test_without_aux_heads() -> None:
    model = canon.create_model("googlenet", num_classes=10, aux_logits=False)
    assert not any("aux" in key for key in model.state_dict())
    logits, aux = model.forward_with_aux(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10) and aux == []


def test_aux_heads_at_other_sizes_use_adaptive_pooling() -> None:
    """At 224 the paper's 5x5/3 pool feeds the fc layers; elsewhere an adaptive pool does."""
    torch.manual_seed(0)
    head = AuxClassifier(512, 10).eval()
    paper_map = torch.randn(1, 512, 14, 14)
    small_map = torch.randn(1, 512, 8, 8)
    with torch.no_grad():
        expected = head.fc2(head.relu(head.fc1(head.conv(head.pool(paper_map)).flatten(1))))
        torch.testing.assert_close(head(paper_map), expected)
        pooled = small_map.unflatten(2, (4, 2)).unflatten(4, (4, 2)).mean((3, 5))  # 2x2 means
        expected = head.fc2(head.relu(head.fc1(head.conv(pooled).flatten(1))))
        torch.testing.assert_close(head(small_map), expected)
    model = canon.create_model("googlenet", num_classes=10)
    _, aux = model.forward_with_aux(torch.randn(2, 3, 96, 96))
    assert [a.shape for a in aux] == [(2, 10), (2, 10)]


def test_reset_classifier_resets_aux_heads_too() -> None:
    model = canon.create_model("googlenet_bn", num_classes=10)
    model.reset_classifier(3)
    logits, aux = model.train().forward_with_aux(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and [a.shape for a in aux] == [(2, 3), (2, 3)]
    pooled = model.forward_head(torch.randn(2, 1024, 2, 2), pre_logits=True)
    assert pooled.shape == (2, 1024)
