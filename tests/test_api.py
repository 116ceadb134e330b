"""The Python API that `import canon` gives, used as the README shows it: a model by name, a
recipe with overrides, a real (short) training run, the trained model back, its predictions
and its evaluation under a protocol."""

from __future__ import annotations

import pytest
import torch

import canon
from canon.data.datasets import load_sample
from canon.errors import ConfigError


def test_every_documented_name_comes_from_canon() -> None:
    for name in ("create_model", "list_models", "load_recipe", "train", "load_trained",
                 "evaluate"):
        assert callable(getattr(canon, name)), name
    assert set(canon.__all__) >= {"create_model", "list_models", "load_recipe", "train",
                                  "load_trained", "evaluate"}


def test_train_then_load_predict_and_evaluate(tmp_path) -> None:
    model = canon.create_model("resnet50", num_classes=100)
    assert model.forward_head(torch.zeros(1, 2048, 7, 7)).shape == (1, 100)
    assert "resnet20" in canon.list_models("resnet*")

    recipe = canon.load_recipe("quickstart", ["train.iterations=2", "train.channels_last=false"])
    result = canon.train(recipe, tmp_path / "run", device="cpu", progress=False)
    assert result.metrics[-1]["epoch"] == 1

    trained = canon.load_trained(tmp_path / "run")
    assert trained.model.training is False and len(trained.classes) == 10
    images = load_sample("test").images[:3]
    ranked = trained.predict(list(images), top_k=2)  # decoded uint8 tensors, or file paths
    assert [len(top) for top in ranked] == [2, 2, 2]
    assert all(name in trained.classes for top in ranked for name, _ in top)
    for wrong, named in (("cat.png", r"got one str: pass \[image\]"),
                         ([], "no images to predict"),
                         ([images[0].float()], r"torch.float32 tensor of shape \(3, 32, 32\)"),
                         ([images[0].permute(1, 2, 0)], r"shape \(32, 32, 3\)"),
                         ([tmp_path], r"is a folder: pass its image files, one result each")):
        with pytest.raises(ConfigError, match=named):
            trained.predict(wrong)
    with pytest.raises(ConfigError, match="top_k must be at least 1, got 0"):
        trained.predict(list(images), top_k=0)

    by_run = trained.evaluate(protocol="center", batch_size=500)  # the data it trained on
    by_hand = canon.evaluate(trained.model, "sample", "center", batch_size=500,
                             preprocess=trained.preprocess, class_ids=trained.class_ids)
    assert by_run["images"] == by_hand["images"] == 1000
    assert by_run["top1_error"] == by_hand["top1_error"]
    assert by_run["top1_error"] == result.metrics[-1]["val_top1_error"]
