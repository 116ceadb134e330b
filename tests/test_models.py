"""Registry-driven checks that every registered model gets for free."""

from __future__ import annotations

import pytest
import torch

import canon
from canon.errors import InputSizeError
from canon.models import CanonModel, EvalConfig

NUM_CLASSES = 10


def smallest_valid_size(model: CanonModel) -> int:
    return model.fixed_input_size or model.min_input_size


@pytest.fixture(scope="module", params=canon.list_models())
def built(request) -> tuple[str, CanonModel]:
    torch.manual_seed(0)
    return request.param, canon.create_model(request.param, num_classes=NUM_CLASSES)


def test_forward_backward_and_interface(built) -> None:
    name, model = built
    assert isinstance(model, CanonModel), name
    assert isinstance(model.eval_config, EvalConfig)
    size = smallest_valid_size(model)
    images = torch.randn(2, 3, size, size)
    model.train()
    logits, aux = model.forward_with_aux(images)
    assert logits.shape == (2, NUM_CLASSES)
    (logits.sum() + sum(a.sum() for a in aux)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model.eval()
    with torch.no_grad():
        features = images
        for _, stage in model.stages:
            features = stage(features)
        assert torch.equal(features, model.forward_features(images))
        logits = model(images)
        assert torch.allclose(model.forward_head(features), logits)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.dim() == 2 and pooled.shape[0] == 2
        assert torch.isfinite(logits).all()


def test_reset_classifier(built) -> None:
    name, model = built
    model.reset_classifier(7)
    size = smallest_valid_size(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7), name
    model.reset_classifier(NUM_CLASSES)


def test_too_small_input_names_minimum(built) -> None:
    _, model = built
    size = smallest_valid_size(model) - 1
    with pytest.raises(InputSizeError, match=str(smallest_valid_size(model))):
        model(torch.randn(1, 3, size, size))
