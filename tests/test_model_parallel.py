"""Model parallelism on CPU "devices": outputs, gradients and SGD steps equal the plain model's."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from canon.engine import setup as run_setup
from canon.engine.model_parallel import (
    PipelineParallel,
    TwoTowerAlexNet,
    balance_stages,
    parallelize,
)
from canon.engine.trainer import train
from canon.errors import ConfigError, InputSizeError
from canon.models.factory import create_model
from canon.models.layers import LocalResponseNorm
from canon.recipes import load_recipe
from canon.recipes.schema import parse_model_parallel

CPU = torch.device("cpu")


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _assert_state_equal(actual: dict, expected: dict, **tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=key, **tolerance)


def _tower_grads(towers: TwoTowerAlexNet, device: torch.device = CPU
                 ) -> dict[str, torch.Tensor]:
    """Each original parameter's gradient, rebuilt on `device` from its two tower halves."""
    params = dict(towers.named_parameters())
    return {
        original: torch.cat([params[name].grad.to(device) for name in names])
        for original, names in towers.split_names.items()
    }


def test_parse_model_parallel() -> None:
    assert parse_model_parallel("towers").num_devices == 2
    plan = parse_model_parallel("stages:3")
    assert (plan.kind, plan.num_devices, plan.micro_batches) == ("stages", 3, 12)
    assert parse_model_parallel("stages:2:5").micro_batches == 5
    for bad in ("stages", "stages:0", "pipeline:2", "stages:2:0"):
        with pytest.raises(ConfigError, match="model-parallel"):
            parse_model_parallel(bad)


def test_balance_stages_minimises_the_largest_group() -> None:
    assert balance_stages([1, 1, 1, 1], 0, 2) == [0, 0, 1, 1]
    assert balance_stages([5, 1, 1, 1], 0, 2) == [0, 1, 1, 1]
    # A heavy head pulls every stage it can away from the last device.
    assert balance_stages([1, 1, 1, 1], 10, 2) == [0, 0, 0, 1]
    assert balance_stages([3, 3, 3], 0, 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="at most 3"):
        balance_stages([1, 1, 1], 0, 4)


def test_towers_train_like_the_single_device_alexnet() -> None:
    torch.manual_seed(0)
    # Dropout off so that both nets draw no random numbers; 7 classes splits fc8 unevenly.
    reference = create_model("alexnet", num_classes=7, dropout=0.0)
    towers = parallelize(copy.deepcopy(reference), "towers", CPU)
    assert isinstance(towers, TwoTowerAlexNet)
    _assert_state_equal(towers.state_dict(), reference.state_dict())
    images, labels = torch.randn(2, 3, 227, 227), torch.tensor([3, 6])
    optimizers = [_sgd(reference), _sgd(towers)]
    for step in range(2):
        outputs = []
        for model, optimizer in zip((reference, towers), optimizers, strict=True):
            optimizer.zero_grad()
            logits = model(images)
            nn.functional.cross_entropy(logits, labels).backward()
            outputs.append(logits)
        torch.testing.assert_close(outputs[1], outputs[0])
        if step == 0:
            expected = {k: p.grad for k, p in reference.named_parameters()}
            _assert_state_equal(_tower_grads(towers), expected)
        for optimizer in optimizers:
            optimizer.step()
    _assert_state_equal(towers.state_dict(), reference.state_dict())


def test_towers_exchange_only_at_conv3_and_the_fc_layers() -> None:
    """Figure 2: each tower normalises its own maps; the GPUs meet at conv3, fc6, fc7, fc8."""
    meta = torch.device("meta")  # the structure only
    with meta:
        towers = TwoTowerAlexNet(create_model("alexnet", num_classes=5), [meta, meta])
    exchanges = [key for kind, key in towers.steps if kind == "exchange"]
    assert exchanges == ["conv3", "fc6", "fc7", "fc8"]
    norms = [m for m in towers.shared.values() if isinstance(m, LocalResponseNorm)]
    assert len(norms) == 2 and all(norm.groups == 1 for norm in norms)


def test_towers_load_alexnet_checkpoints_and_follow_eval_mode() -> None:
    torch.manual_seed(1)
    source, target = create_model("alexnet", num_classes=5), create_model("alexnet", num_classes=5)
    towers = TwoTowerAlexNet(target, [CPU, CPU])
    towers.load_state_dict(source.state_dict())
    _assert_state_equal(towers.state_dict(), source.state_dict())
    towers.eval()
    assert not any(module.training for module in towers.modules())
    with pytest.raises(InputSizeError, match="227x227"):
        towers(torch.randn(1, 3, 224, 224))
    with pytest.raises(ConfigError, match="alexnet"):
        parallelize(create_model("resnet20"), "towers", CPU)
    # The split keeps the unsplit model's options, not the model itself (61M parameters).
    unsplit = create_model("alexnet", num_classes=5, dropout=0.4)
    towers, unsplit = TwoTowerAlexNet(unsplit, [CPU, CPU]), weakref.ref(unsplit)
    gc.collect()
    assert unsplit() is None and towers.build_options() == {"dropout": 0.4}
    # Each tower's half on its own device ("meta" stands in for a second GPU).
    towers = TwoTowerAlexNet(create_model("alexnet", num_classes=5), [CPU, torch.device("meta")])
    for index, device in enumerate(("cpu", "meta")):
        assert {p.device.type for p in towers.towers[index].parameters()} == {device}


def _check_pipeline(name: str, spec: str, size: int, train: bool) -> None:
    torch.manual_seed(2)
    reference = create_model(name, num_classes=10).train(train)
    pipeline = parallelize(copy.deepcopy(reference), spec, CPU).train(train)
    assert isinstance(pipeline, PipelineParallel)
    images, labels = torch.randn(6, 3, size, size), torch.arange(6)
    expected, actual = reference(images), pipeline(images)
    torch.testing.assert_close(actual, expected)
    nn.functional.cross_entropy(expected, labels).backward()
    nn.functional.cross_entropy(actual, labels).backward()
    grads = {k: p.grad for k, p in pipeline.module.named_parameters()}
    # Micro-batches sum each weight gradient in a different order: fp32 rounding apart.
    expected_grads = {k: p.grad for k, p in reference.named_parameters()}
    _assert_state_equal(grads, expected_grads, rtol=1e-4, atol=1e-6)
    # The pipeline's state dict is the model's: same keys, so checkpoints load either way.
    _assert_state_equal(pipeline.state_dict(), reference.state_dict())
    pipeline.load_state_dict(reference.state_dict())


def test_pipeline_places_consecutive_stages_by_parameter_count() -> None:
    pipeline = parallelize(create_model("resnet20"), "stages:3", CPU)
    assert pipeline.group_names == [["conv1", "conv2_x"], ["conv3_x"], ["conv4_x"]]
    assert pipeline.micro_batches == 12
    # Where the pieces go, seen without GPUs: the "meta" device stands in for the second one.
    pipeline = PipelineParallel(create_model("resnet20"), [CPU, torch.device("meta")], 2)
    assert pipeline.group_names == [["conv1", "conv2_x", "conv3_x"], ["conv4_x"]]
    devices = {name: p.device.type for name, p in pipeline.module.named_parameters()}
    on_second = {name.split(".")[0] for name, device in devices.items() if device == "meta"}
    assert on_second == {"conv4_x", "fc"}


def test_pipeline_matches_resnet20_with_whole_batch_norm_statistics() -> None:
    # One micro-batch: batch norm sees the whole batch and its running statistics must agree.
    _check_pipeline("resnet20", "stages:3:1", 32, train=True)


def test_pipeline_micro_batches_match_resnet20_in_eval_mode() -> None:
    _check_pipeline("resnet20", "stages:2:4", 32, train=False)


def test_pipeline_micro_batches_match_alexnet() -> None:
    _check_pipeline("alexnet", "stages:2:3", 227, train=False)


def test_fine_tuning_options_are_refused_with_a_split_model() -> None:
    recipe = load_recipe("quickstart", ["train.model_parallel=stages:2",
                                        "model.frozen_stages=1",
                                        "optimizer.backbone_lr_scale=0.1"])
    with pytest.raises(ConfigError, match=r"train.model_parallel \(stages:2\) splits the "
                       r".* model.frozen_stages and optimizer.backbone_lr_scale cannot"):
        train(recipe, "unused", device="cpu", progress=False)


def test_a_split_model_is_refused_torch_compile(tmp_path: Path) -> None:
    recipe = load_recipe("quickstart", ["train.model_parallel=stages:2", "train.compile=true"])
    with pytest.raises(ConfigError, match=r"^--model-parallel \(train.model_parallel\) runs one "
                       r"process without torch.compile: .* drop --compile \(train.compile\)$"):
        train(recipe, tmp_path / "run", device="cpu", progress=False)


def test_pipeline_refuses_what_it_cannot_place() -> None:
    with pytest.raises(ConfigError, match="auxiliary heads"):
        parallelize(create_model("googlenet", num_classes=3), "stages:2", CPU)
    with pytest.raises(ConfigError, match="at most 4"):
        parallelize(create_model("resnet20"), "stages:5", CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_towers_across_gpu_and_cpu_match_the_single_device_alexnet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One GPU is enough to exercise real cross-device exchanges: tower 0 on it, tower 1 on CPU.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare in full fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(3)
    gpu = torch.device("cuda", 0)
    reference = create_model("alexnet", num_classes=10, dropout=0.0).to(gpu)
    towers = TwoTowerAlexNet(copy.deepcopy(reference), [gpu, CPU])
    images = torch.randn(4, 3, 227, 227, device=gpu)
    expected, actual = reference(images), towers(images)
    assert actual.device == gpu
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)
    expected.sum().backward()
    actual.sum().backward()
    grads = _tower_grads(towers, gpu)
    expected_grads = {k: p.grad for k, p in reference.named_parameters()}
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_across_gpu_and_cpu_matches_resnet20(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(4)
    gpu = torch.device("cuda", 0)
    reference = create_model("resnet20", num_classes=10).eval().to(gpu)
    pipeline = PipelineParallel(copy.deepcopy(reference), [gpu, CPU], micro_batches=4).eval()
    images = torch.randn(8, 3, 32, 32, device=gpu)
    expected, actual = reference(images), pipeline(images)
    assert actual.device == gpu
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4)


@pytest.fixture
def two_class_folder(imagenette_root: Path, tmp_path: Path) -> Path:
    """16 training and 4 validation JPEGs of two Imagenette classes, ImageNet layout."""
    for split, count in (("train", 8), ("val", 2)):
        for source in sorted((imagenette_root / split).iterdir())[:2]:
            target = tmp_path / "data" / split / source.name
            target.mkdir(parents=True)
            for image in sorted(source.glob("*.JPEG"))[:count]:
                (target / image.name).symlink_to(image)
    return tmp_path / "data"


def test_trainer_runs_a_pipeline_like_the_plain_model(
    two_class_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.model_parallel (--model-parallel) pipelines the recipe's model: same weights,
    checkpoints, export as the plain model."""
    common = [
        f"data.dataset={two_class_folder}", "data.mean=imagenet", "train.batch_size=8",
        "train.epochs=2",
    ]
    pipelines = []

    def recording_parallelize(model, spec, device):
        pipelines.append(parallelize(model, spec, device))
        return pipelines[-1]

    monkeypatch.setattr(run_setup, "parallelize", recording_parallelize)
    exported = []
    for name, spec in (("plain", "null"), ("pipeline", "stages:2:1")):
        torch.manual_seed(0)
        recipe = load_recipe("quickstart", [*common, f"train.model_parallel={spec}"])
        model = create_model("resnet20", num_classes=2)
        train(recipe, tmp_path / name, model=model, device="cpu", progress=False)
        exported.append(load_file(tmp_path / name / "model.safetensors"))
    assert len(pipelines) == 1 and len(pipelines[0].groups) == 2
    _assert_state_equal(exported[1], exported[0])


def test_a_two_tower_run_resumed_without_towers_says_so(two_class_folder: Path,
                                                         tmp_path: Path, capsys) -> None:
    common = [f"data.dataset={two_class_folder}", "data.mean=imagenet", "model.name=alexnet",
              "data.crop_size=227", "data.resize_size=256", "data.scale_range=null",
              "train.batch_size=8", "train.workers=0"]
    train(load_recipe("quickstart", [*common, "train.epochs=1", "train.model_parallel=towers"]),
          tmp_path, device="cpu", progress=False)
    assert ("--model-parallel towers: every piece on cpu, one after another: the split's "
            "arithmetic without its speed") in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"cannot resume without --model-parallel towers a run "
                                          r"trained with it.*--init-from"):
        train(load_recipe("quickstart", [*common, "train.epochs=2"]), tmp_path,
              resume=tmp_path, device="cpu", progress=False)
