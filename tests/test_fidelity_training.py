"""Training as the papers did it: Goyal et al.'s large-minibatch schedule and zero-initialised
residual BN, weight averaging named for what it is (Polyak averaging is the uniform mean of the
iterates, EMA is exponential), and no choice made on a test set."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.optim import swa_utils

from canon.data import DataConfig
from canon.data.datasets import validates_on_test_split
from canon.engine import setup
from canon.engine.optimization import make_average, make_optimizer
from canon.engine.schedules import LearningRateSchedule, scale_iteration_counts
from canon.engine.setup import build_model
from canon.errors import ConfigError
from canon.recipes import list_recipes, load_recipe
from canon.recipes.schema import TrainSection

IMAGENET_TRAIN_IMAGES = 1_281_167


def goyal_schedule(k: int) -> tuple[LearningRateSchedule, int]:
    """resnet50-goyal's schedule at global batch 256k, built as canon.engine.setup builds it."""
    recipe = load_recipe("resnet50-goyal")
    global_batch = 256 * k
    optimizer, peak_lr = make_optimizer(nn.Linear(2, 2), recipe.optimizer, global_batch)
    config, _ = scale_iteration_counts(
        recipe.schedule, recipe.train.iterations, recipe.optimizer.base_batch_size, global_batch
    )
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // global_batch
    schedule = LearningRateSchedule(
        optimizer, config, peak_lr=peak_lr, base_lr=recipe.optimizer.lr,
        steps_per_epoch=steps_per_epoch, total_steps=recipe.train.epochs * steps_per_epoch,
    )
    return schedule, steps_per_epoch


@pytest.mark.parametrize("k", [1, 8, 32])
def test_goyal_lr_is_0_1_k_after_a_5_epoch_ramp_from_0_1_and_falls_at_30_60_80(k):
    schedule, epoch = goyal_schedule(k)
    peak = 0.1 * k  # s5.1: eta = 0.1 kn/256
    assert schedule.peak_lr == pytest.approx(peak)
    assert schedule.lr_at(0) == pytest.approx(0.1)  # s2.2: "we start from a learning rate of eta"
    warmup = 5 * epoch  # s2.2: a constant increment per iteration, "k eta after 5 epochs"
    for step in (1, warmup // 2, warmup - 1):
        assert schedule.lr_at(step) == pytest.approx(0.1 + (peak - 0.1) * step / warmup)
    assert schedule.lr_at(warmup) == pytest.approx(peak)
    for milestone, factor in ((30, 1.0), (60, 0.1), (80, 0.01)):
        assert schedule.lr_at(milestone * epoch - 1) == pytest.approx(peak * factor)
        assert schedule.lr_at(milestone * epoch) == pytest.approx(peak * factor / 10)
    assert schedule.lr_at(90 * epoch - 1) == pytest.approx(peak / 1000)


def test_goyal_recipe_values():
    recipe = load_recipe("resnet50-goyal")
    assert recipe.model.name == "resnet50_v1_5" and recipe.model.zero_init_residual
    assert (recipe.optimizer.momentum, recipe.optimizer.nesterov) == (0.9, True)
    assert (recipe.optimizer.weight_decay, recipe.optimizer.no_decay_bn_bias) == (1e-4, True)
    assert recipe.train.epochs == 90 and recipe.train.batch_size == 32  # BN over n = 32
    assert recipe.train.batch_size * recipe.train.accum_steps == recipe.optimizer.base_batch_size


def test_zero_init_residual_is_set_by_the_recipe_for_every_resnet():
    for name, last_bn in (("resnet20", "bn2"), ("resnet50_v1_5", "bn3")):
        recipe = load_recipe("quickstart", [f"model.name={name}", "model.zero_init_residual=true"])
        model = build_model(recipe, 10)
        assert all(torch.all(getattr(b, last_bn).weight == 0) for b in model.blocks())
        assert all(torch.all(b.bn1.weight == 1) for b in model.blocks())
    default = build_model(load_recipe("quickstart"), 10)
    assert not any(torch.all(b.bn2.weight == 0) for b in default.blocks())
    with pytest.raises(ConfigError, match="zero_init_residual is for ResNets"):
        build_model(load_recipe("quickstart", ["model.name=alexnet",
                                               "model.zero_init_residual=true"]), 10)
    with pytest.raises(ConfigError, match=r"^model\.zero_init_residual is for ResNets; plain18 "
                                          r"has no residual blocks"):  # options beside it
        build_model(load_recipe("quickstart", [
            "model.name=plain18", "model.zero_init_residual=true",
            "model.options.widths=[64, 128, 256, 512]"]), 10)


def sgd_iterates(model: nn.Module, average: nn.Module, steps: int) -> list[torch.Tensor]:
    """`steps` SGD steps on random data, the average updated after each; the weights after
    each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    iterates = []
    for _ in range(steps):
        loss = model(torch.randn(8, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average.update_parameters(model)
        iterates.append(model.weight.detach().clone())
    return iterates


def test_polyak_averaging_is_the_mean_of_the_iterates_and_ema_stays_exponential():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    polyak = make_average(model, TrainSection(polyak_after_epochs=0))
    iterates = sgd_iterates(model, polyak, 6)
    assert int(polyak.n_averaged) == 6
    torch.testing.assert_close(polyak.module.weight, torch.stack(iterates).mean(0))

    ema = make_average(model, TrainSection(ema_decay=0.75))
    iterates = sgd_iterates(model, ema, 4)
    expected = iterates[0]  # the first update copies the weights
    for weights in iterates[1:]:
        expected = 0.75 * expected + 0.25 * weights
    torch.testing.assert_close(ema.module.weight, expected)
    assert make_average(model, TrainSection()) is None
    with pytest.raises(ConfigError, match="set one of them"):
        TrainSection(ema_decay=0.9, polyak_after_epochs=0)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_polyak_averaging_takes_batch_norms_integer_counter(monkeypatch, device):
    """On a GPU AveragedModel averages with torch's foreach kernels, whose uniform mean
    refuses BN's int64 num_batches_tracked; made to take that path on the CPU too."""
    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices",
                        lambda: ["cuda", "cpu"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(device)
    polyak = make_average(model, TrainSection(polyak_after_epochs=0))
    means = []
    for _ in range(3):
        model(torch.randn(2, 3, 5, 5, device=device))
        polyak.update_parameters(model)
        means.append(model[1].running_mean.clone())
    assert int(polyak.module[1].num_batches_tracked) == 3
    torch.testing.assert_close(polyak.module[1].running_mean, torch.stack(means).mean(0))


def test_googlenet_uses_polyak_averaging_not_an_ema():
    train = load_recipe("googlenet").train
    assert train.polyak_after_epochs is not None and train.ema_decay == 0
    assert train.polyak_after_epochs < train.epochs


def test_no_cifar_recipe_chooses_a_checkpoint_on_the_test_set(tmp_path):
    cifar = [name for name in list_recipes()
             if load_recipe(name).data.dataset in ("cifar10", "cifar100", "sample")]
    assert "resnet110-cifar10" in cifar and "quickstart" in cifar
    for name in cifar:  # they validate on the test split, so the trainer picks no best.pt
        assert validates_on_test_split(load_recipe(name).data), name
        held_out = load_recipe(name, ["data.val_split=5000"]).data
        assert not validates_on_test_split(held_out), name  # s4.2's 45k/5k split for tuning
    assert not validates_on_test_split(load_recipe("resnet50").data)  # ImageNet's val/
    assert not validates_on_test_split(DataConfig(dataset="/data/imagenet"))
    # An image folder's test/, where it has no val/, is a test set too.
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    assert validates_on_test_split(DataConfig(dataset=str(tmp_path)))
    (tmp_path / "val" / "cat").mkdir(parents=True)  # preferred to test/
    assert not validates_on_test_split(DataConfig(dataset=str(tmp_path)))


def test_a_builder_s_own_type_error_is_not_blamed_on_a_recipe_without_options(monkeypatch):
    """Only options the recipe gives can 'not fit' a builder: without any, a TypeError
    is a fault in the builder and is raised as it is."""
    def faulty_create_model(name, num_classes, **options):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(setup, "create_model", faulty_create_model)
    with pytest.raises(TypeError, match="unsupported operand"):
        build_model(load_recipe("quickstart"), 10)
    with pytest.raises(TypeError, match="unsupported operand"):  # options canon adds itself
        build_model(load_recipe("quickstart", ["model.zero_init_residual=true"]), 10)
    with pytest.raises(ConfigError, match=r"model.options \{'widths': \[8\]\} do not fit"):
        build_model(load_recipe("quickstart", ["model.options.widths=[8]"]), 10)


def test_a_builder_s_check_of_an_option_s_value_names_the_recipe_s_options():
    """The builder's own message names its argument (`stem`), as Python passes it; from a
    recipe, the key to change is model.options.stem."""
    recipe = load_recipe("resnet34d-imagenette5", ["model.options.stem=shallow"])
    with pytest.raises(ConfigError, match=r"^resnet34 with model.options \{'stem': 'shallow', "
                                          r"'avg_down': True\}: stem must be one of"):
        build_model(recipe, 10)
    with pytest.raises(ConfigError, match=r"^num_classes must be"):  # not the options' fault
        build_model(recipe, 0)
