"""canon.bench: the training-step, input-pipeline and training-loop benchmarks give figures on a
CPU with tiny settings (no timing is checked), and their command line parses."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch
import torchvision.models as tvm
from torchvision.transforms.functional import to_pil_image

import canon.bench.train as train_bench
from canon.bench import loop
from canon.bench.commands import add_bench_parser, run_data
from canon.bench.data import (
    bench_config,
    bench_data,
    imagenet_recipes,
    pipelines,
    torchvision_transform,
)
from canon.bench.loop import WARMUP_STEPS, canon_loop, speed_settings_on
from canon.bench.train import (
    TrainingForward,
    bench_train,
    format_train,
    matmul_peak,
    torchvision_twin,
    update,
)
from canon.data.transforms import training_transform
from canon.devices import cudnn_autotuning
from canon.engine.graphed import GraphedStep
from canon.engine.precision import Precision
from canon.engine.setup import build_model
from canon.errors import ConfigError
from canon.models.factory import create_model
from canon.models.summary import summarize
from canon.recipes import load_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canon")
    add_bench_parser(parser.add_subparsers(dest="verb"))
    return parser


def test_train_bench_gives_rates_flops_and_ratio_on_cpu():
    bench = bench_train("resnet18", batch_size=2, steps=1, warmup=1, device="cpu",
                        image_size=64, repeats=2)
    train_gflops = 3 * summarize("resnet18", input_size=64).gflops
    assert bench.canon.train_gflops == pytest.approx(train_gflops)
    assert bench.torchvision.train_gflops == pytest.approx(train_gflops)  # same architecture
    for speed in (bench.canon, bench.torchvision):
        assert speed.images_per_s > 0 and speed.ms_per_step > 0 and speed.mfu > 0
    assert bench.ratio == pytest.approx(bench.canon.images_per_s / bench.torchvision.images_per_s)
    assert bench.settings["image_size"] == 64 and bench.peak_gmacs > 0
    assert "canon / torchvision images/s" in format_train(bench)
    assert "MFU on a CPU: relative to the matmul above" in format_train(bench)
    assert json.loads(json.dumps(bench.to_dict()))["ratio"] == pytest.approx(bench.ratio)


def test_train_bench_utilisation_is_against_the_peak_of_the_autocast_precision_on_cpu(
    monkeypatch,
):
    measured = []
    real_peak = train_bench.matmul_peak

    def recorded_peak(device, dtype, **options):
        measured.append(dtype)
        return real_peak(device, dtype, size=64, iterations=2)

    monkeypatch.setattr(train_bench, "matmul_peak", recorded_peak)
    bench = bench_train("resnet18", batch_size=2, steps=1, warmup=0, device="cpu",
                        image_size=64, repeats=1, amp="bf16")
    assert measured == [torch.bfloat16]  # the peak is measured in the autocast precision
    assert bench.peak_dtype == "bf16" and "matmul peak (bf16)" in format_train(bench)
    achieved = bench.canon.images_per_s * bench.canon.train_gflops  # G multiply-adds/s
    assert bench.canon.mfu == pytest.approx(achieved / bench.peak_gmacs, rel=1e-6)


def test_train_bench_googlenet_trains_the_auxiliary_heads_of_both(monkeypatch):
    """Both libraries' GoogLeNets step with their two auxiliary losses; with --cuda-graph
    canon's step goes through GraphedStep (uncaptured on a CPU)."""
    graphed, real_call = [], GraphedStep.__call__
    monkeypatch.setattr(GraphedStep, "__call__",
                        lambda step, *args: graphed.append(1) or real_call(step, *args))
    torch.manual_seed(0)
    images, targets = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    for model in (create_model("googlenet_bn", 1000),
                  tvm.googlenet(weights=None, init_weights=True)):
        forward = TrainingForward(model.train())
        logits, aux = forward(images)
        assert logits.shape == (2, 1000) and [a.shape for a in aux] == [(2, 1000)] * 2
        heads = [model.aux1.fc2.weight, model.aux2.fc2.weight]
        before = [weight.clone() for weight in heads]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        update(forward, optimizer, Precision("none", torch.device("cpu")), images, targets)
        assert not any(torch.equal(b, w) for b, w in zip(before, heads, strict=True))
    bench = bench_train("googlenet_bn", batch_size=2, steps=1, warmup=1, device="cpu",
                        image_size=64, repeats=1, cuda_graph=True)
    assert bench.settings["model"] == "googlenet_bn" and bench.settings["cuda_graph"]
    assert len(graphed) == 2  # canon's warm-up step and timed step; torchvision's plain
    assert bench.canon.images_per_s > 0 and bench.torchvision.images_per_s > 0
    assert "canon's step in a CUDA graph" in format_train(bench)
    with pytest.raises(ConfigError, match="use --amp bf16 or none"):
        bench_train("resnet18", device="cpu", amp="fp16", cuda_graph=True)


def test_the_bench_s_fused_sgd_starts_with_zero_momentum(monkeypatch):
    """As the trainer's (optimization.sgd): fused SGD, which GPUs get, would otherwise add
    uninitialised memory after fp16's skipped first step. The CPU's fused kernel stands in."""
    monkeypatch.setattr(train_bench, "fused_sgd", lambda model: True)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    contender = train_bench._prepare(
        "canon resnet20", create_model("resnet20", 10), "resnet20", device=torch.device("cpu"),
        amp="none", channels_last=False, compile=False, images=images, targets=targets,
        warmup=0)
    optimizer = contender.optimizer
    assert optimizer.defaults["fused"]
    buffers = [optimizer.state[p]["momentum_buffer"] for p in contender.model.parameters()]
    assert buffers and not any(buffer.any() for buffer in buffers)


def test_cuda_contenders_all_get_autotuned_kernels_and_the_setting_is_restored(
        monkeypatch):
    """canon's trainer turns cudnn.benchmark on for a CUDA run: every contender of a CUDA
    benchmark gets it from the start, not only those after canon's loop."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with cudnn_autotuning(torch.device("cpu")):
        assert not torch.backends.cudnn.benchmark
    with cudnn_autotuning(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark


def test_torchvision_twins_paper_resnets_included():
    assert torchvision_twin("resnet50_v1_5") == torchvision_twin("resnet50") == "resnet50"
    assert torchvision_twin("alexnet_owt") == "alexnet"
    assert torchvision_twin("googlenet_bn") == "googlenet"


def test_a_model_without_torchvision_twin_is_refused_naming_the_supported():
    with pytest.raises(ConfigError, match=r"resnet50_v1_5.*vgg16_bn"):
        bench_train("zfnet", device="cpu")


def test_matmul_peak_is_positive():
    assert matmul_peak(torch.device("cpu"), size=64, iterations=2) > 0


def test_data_bench_gives_both_rates(imagenette_root):
    (result,) = bench_data(imagenette_root, images=8, repeats=1)
    assert result.recipe == "resnet18-imagenette5" and result.images == 8
    assert result.canon_images_per_s > 0 and result.torchvision_images_per_s > 0
    assert result.ratio > 0


def test_data_bench_times_only_the_files_canon_decodes(imagenette_root, tmp_path):
    """An undecodable file is left out of both pipelines (PIL raised on it), with a warning.
    Only the training split is timed: a folder without val/ will do."""
    import shutil

    from canon.data import BadImageWarning

    for class_folder in sorted((imagenette_root / "train").iterdir())[:2]:
        target = tmp_path / "train" / class_folder.name
        target.mkdir(parents=True)
        for image in sorted(class_folder.iterdir())[:2]:
            shutil.copy(image, target)
        (target / "broken.JPEG").write_text("not a JPEG")
    with pytest.warns(BadImageWarning, match="broken.JPEG"):
        (result,) = bench_data(tmp_path, images=6, repeats=1)
    assert result.images == 4 and result.torchvision_images_per_s > 0


def test_data_bench_names_the_packed_folder_for_a_shard_folder(imagenette_root, tmp_path):
    """A journey's `canon bench data --data SHARDS` said, after 9 s of scanning, that the
    folder held no image files."""
    from canon.data.packing import pack_folder

    pack_folder(imagenette_root, tmp_path / "shards", splits=["train"], progress=False)
    with pytest.raises(ConfigError, match=r"shards: a shard folder; .*image folder's files "
                       rf"\(--data {imagenette_root.resolve()}, the folder it was packed from\)"):
        bench_data(tmp_path / "shards", images=4, repeats=1)


def test_data_bench_times_the_on_device_path_where_a_recipe_has_one(imagenette_root, capsys):
    """--device: canon's decode_on_device path, the same batched ops on the CPU here; AlexNet's
    fixed square crops have no on-device form."""
    from canon.cli import main

    results = bench_data(imagenette_root, ["resnet18-imagenette5", "alexnet"], images=8,
                         repeats=1, device="cpu", batch_size=4)
    assert results[0].on_device_images_per_s > 0 and results[1].on_device_images_per_s is None
    main(["bench", "data", "--data", str(imagenette_root), "--images", "4", "--repeats", "1",
          "--device", "cpu", "--batch-size", "2"])
    table = capsys.readouterr().out.splitlines()
    assert table[1].endswith("on cpu") and len(table[2].split()) == 6
    assert table[-1].startswith("on cpu: canon's on-device path")


def test_both_pipelines_give_the_same_tensors_of_the_same_images(imagenette_root):
    """The same files, and without random crops the same values (decoders and resamplers
    differ in the last levels: about 1e-4 on average here; a crop one pixel off gives 0.03)."""
    config = bench_config("resnet18-imagenette5", imagenette_root)
    for augmentation in ("googlenet", "none"):
        sets = pipelines(replace(config, augmentation=augmentation), images=3)
        for i, j in zip(sets.canon_indices, sets.torchvision_indices, strict=True):
            assert sets.canon.paths[i].name == sets.torchvision.samples[j][0].rsplit("/", 1)[1]
            canon_image, tv_image = sets.canon[i][0], sets.torchvision[j][0]
            assert canon_image.shape == tv_image.shape == (3, 128, 128)
            assert canon_image.dtype == tv_image.dtype == torch.float32
            if augmentation == "none":
                assert (canon_image - tv_image).abs().mean() < 0.005


def test_every_imagenet_recipe_has_a_torchvision_pipeline_and_cifar_is_refused(tmp_path):
    recipes = imagenet_recipes()
    assert {"alexnet", "zfnet", "vgg16", "resnet50", "googlenet"} <= set(recipes)
    assert "quickstart" not in recipes
    image = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    for recipe in recipes:
        config = bench_config(recipe, tmp_path)
        assert config.pca_std == 0 and config.photometric == 0
        # canon's pipeline with ImageNet's mean: the recipe's pixel mean needs a dataset.
        canon_image = training_transform(replace(config, mean="imagenet"), None)(image)
        tv_image = torchvision_transform(config)(to_pil_image(image))
        assert canon_image.shape == tv_image.shape == (3, config.crop_size, config.crop_size)
    with pytest.raises(ConfigError, match="CIFAR"):
        bench_config("resnet20-cifar10", tmp_path)


def test_parser_and_data_command(imagenette_root, tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["bench", "train", "--model", "resnet18"])
    assert (args.model, args.batch_size, args.channels_last, args.amp) == (
        "resnet18", None, None, "none")
    assert args.run.__name__ == "run_train"
    args = parser.parse_args(["bench", "data", "--data", "X"])
    assert (args.data, args.recipe, args.images) == ("X", "resnet18-imagenette5", 500)
    out = tmp_path / "data.json"
    run_data(parser.parse_args(["bench", "data", "--data", str(imagenette_root), "--images",
                                "4", "--repeats", "1", "--json", str(out)]))
    assert "resnet18-imagenette5" in capsys.readouterr().out
    assert json.loads(out.read_text())["figures"][0]["images"] == 4
    run_data(parser.parse_args(["bench", "data", "--data", str(imagenette_root), "--images",
                                "4", "--repeats", "1", "--json", str(out)]))  # its own: replaced


def test_loop_bench_times_canons_loop_and_the_plain_ones(capsys, monkeypatch):
    from canon.cli import main

    main(["bench", "loop", "--steps", "5", "--repeats", "1", "--workers", "0",
          "--set", "train.batch_size=32", "--set", "train.cuda_graph=true"])
    out = capsys.readouterr().out
    assert "--set train.batch_size=32 --set train.cuda_graph=true on cpu" in out
    assert "canon / plain, 0 workers:" in out
    assert "(train.cuda_graph: canon's loop alone; the plain loops run eagerly)" in out
    assert speed_settings_on(load_recipe("quickstart", ["train.cuda_graph=false"])) == []
    # One epoch of both loops, whatever the recipe's iteration limit (canon's would stop there):
    # the trainer (run above) is given the epoch, and timed to its last step, the sample's 10th.
    given = []

    def trainer(recipe, run_dir, *, on_step, **options):
        given.append(recipe.train)
        for step in range(1, 11):
            on_step(step)

    monkeypatch.setattr(loop, "train", trainer)
    timing = canon_loop(load_recipe("quickstart", ["train.iterations=5", "train.batch_size=500"]),
                        "cpu")
    assert (given[0].iterations, given[0].epochs, timing.steps) == (None, 1, 10 - WARMUP_STEPS)
    monkeypatch.undo()
    rates = [float(line.split()[-1]) for line in out.splitlines()
             if line.startswith(("canon ", "plain")) and "/" not in line]
    assert len(rates) == 2 and min(rates) > 0
    # The plain loop trains the net canon's does, model.options included.
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *args: built.append(build_model(*args))
                        or built[-1])
    recipe = load_recipe("quickstart", ["model.options={shortcut: B}", "train.batch_size=32"])
    loop.plain_loop(recipe, "cpu", 0, steps=WARMUP_STEPS + 1)
    assert sum(p.numel() for p in built[0].parameters()) == sum(
        p.numel() for p in build_model(recipe, 10).parameters()) == 272_474  # projections
    with pytest.raises(SystemExit) as refused:
        main(["bench", "loop", "--recipe", "resnet20-cifar10"])
    assert refused.value.code == 2 and "trains on cifar10" in capsys.readouterr().err



def test_bench_arguments_that_cannot_work_stop_before_timing(tmp_path, capsys):
    from canon.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "eval_config.json").write_text('{"model": "resnet18"}')  # a run's export
    cases = [
        (["loop", "--workers", "a,b"], "expected counts such as 0,2"),
        (["loop", "--workers", "0,-1"], "counts must be at least 0"),
        (["loop", "--steps", "3"], "--steps 3: time at least 4 steps"),
        (["loop", "--steps", "79"], "--steps 79: an epoch of the sample is 78 steps at batch 64"),
        (["loop", "--set", "train.batch_size=2048"], "an epoch of the sample is 2 steps"),
        (["loop", "--set", "train.accum_steps=2"], "drop train.accum_steps and data.val_split"),
        (["loop", "--set", "model.frozen_stages=1", "--set", "data.augmentation=alexnet"],
         "has no counterpart of model.frozen_stages, data.augmentation: leave them"),
        (["loop", "--set", "train.ema_decay=0.999"], "has no counterpart of train.ema_decay"),
        (["loop", "--repeats", "0"], "--repeats must be at least 1"),
        (["train", "--model", "resnet18", "--compile", "--warmup", "0"],
         "--warmup must be at least 1"),
        (["train", "--model", "resnet18", "--cuda-graph", "--warmup", "0"],
         "--warmup must be at least 1"),
        (["train", "--model", "resnet18", "--json", str(tmp_path)], "is a folder"),
        (["loop", "--json", str(tmp_path / "notes.txt")], "exists and is not a canon bench"),
        (["loop", "--json", str(tmp_path / "eval_config.json")], "exists and is not a canon"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as refused:
            main(["bench", *argv])
        assert refused.value.code == 2 and expected in capsys.readouterr().err, argv
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "eval_config.json").read_text() == '{"model": "resnet18"}'
