"""The Python API that `import canon` gives, used as the README shows it: a model by name, a
recipe with overrides, a real (short) training run, the trained model back, its predictions
and its evaluation under a protocol."""

from __future__ import annotations

import pytest
import torch

import canon
from canon.data.datasets import load_sample
from canon.errors import ConfigError
from canon.models.factory import ModelOptionError
from canon.registry import UnknownNameError


def test_every_documented_name_comes_from_canon() -> None:
    for name in ("create_model", "list_models", "load_recipe", "train", "load_trained",
                 "evaluate"):
        assert callable(getattr(canon, name)), name
    assert set(canon.__all__) >= {"create_model", "list_models", "load_recipe", "train",
                                  "load_trained", "evaluate"}


class MapStyle:
    """A dataset as torch's map-style ones are: indexed, with a length, not iterable."""

    def __init__(self, items: torch.Tensor) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index >= len(self.items):
            raise IndexError(index)
        return self.items[index]


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
    assert trained.predict(image for image in images[:2]) == trained.predict(list(images[:2]))
    with pytest.raises(ConfigError, match=r"images\[0\] is a ndarray: pass image files or "
                                          "uint8 RGB tensors"):
        trained.predict([images[0].permute(1, 2, 0).numpy()])
    with pytest.raises(ConfigError, match=r"got one ndarray: pass \[image\]"):  # not its rows
        trained.predict(images[0].permute(1, 2, 0).numpy())
    assert trained.predict(MapStyle(images[:2])) == trained.predict(list(images[:2]))

    by_run = trained.evaluate(protocol="center", batch_size=500)  # the data it trained on
    by_hand = canon.evaluate(trained.model, "sample", "center", batch_size=500, device="auto",
                             preprocess=trained.preprocess, class_ids=trained.class_ids)
    assert by_run["images"] == by_hand["images"] == 1000
    assert by_run["top1_error"] == by_hand["top1_error"]
    by_recipe = canon.evaluate(trained.model, "sample", "center", batch_size=500,  # its stats
                               data_config=recipe.data, root_cache=str(tmp_path / "cache"),
                               class_ids=trained.class_ids)
    assert by_recipe["top1_error"] == by_run["top1_error"]
    assert list((tmp_path / "cache" / "stats").iterdir())
    assert by_run["top1_error"] == result.metrics[-1]["val_top1_error"]


def test_wrong_arguments_are_named_in_python_terms(tmp_path) -> None:
    """What a notebook user gets wrong: a recipe by name, a resume flag, a model option the
    builder lacks, overrides as a dict."""
    with pytest.raises(UnknownNameError, match="unknown recipe 'quickstrat'; did you mean "
                                               "quickstart"):
        canon.train("quickstrat", tmp_path / "run")  # a name, loaded as load_recipe would
    for resume in (True, "latest"):
        with pytest.raises(ConfigError, match=f"resume={resume!r}: give the run directory"):
            canon.train("quickstart", tmp_path / "run", resume=resume)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ModelOptionError, match="resnet20 takes no option 'pretrained'"):
        canon.create_model("resnet20", pretrained=True)
    with pytest.raises(ModelOptionError, match="resnet20 sets 'widths' itself"):
        canon.create_model("resnet20", widths=[8, 8])
    recipe = canon.load_recipe("quickstart", {"train.epochs": 3, "optimizer.lr": 0.05})
    assert (recipe.train.epochs, recipe.optimizer.lr) == (3, 0.05)
    with pytest.raises(ConfigError, match=r"^override 'train\.epoch=3': 'epoch' is not a key"):
        canon.load_recipe("quickstart", {"train.epoch": 3})
