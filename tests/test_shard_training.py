"""Training and evaluation from a shard folder (`canon pack`, canon.data.shards): `canon train
--data SHARDS/` end to end with training-set statistics streamed from the shards, `canon eval`
on its val shards, an exact resume from the middle of an epoch, the refusals, and a 2-process
torchrun run. The data: 160 training and 40 validation JPEGs of Imagenette packed into 11 and 3
shards, a ResNet-18 at 32 px (5 s an epoch on one CPU thread)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from canon.cli import main
from canon.data.config import MAX_IMAGE_PIXELS
from canon.data.datasets import open_dataset, open_eval_split, open_split
from canon.data.folders import open_train_folder
from canon.data.loaders import recipe_statistics, trained_preprocess
from canon.data.packing import pack_folder
from canon.data.shard_index import read_index
from canon.data.stats import compute_stats, stats_cache_path
from canon.engine import checkpoint as ckpt
from canon.engine.trainer import TrainingInterrupted, train
from canon.errors import ConfigError, DataError
from canon.recipes import apply_overrides, load_recipe

SMALL = [("data.crop_size", 32), ("data.resize_size", 36), ("train.batch_size", 16),
         ("train.epochs", 2), ("train.channels_last", False)]
SMALL_FLAGS = ["--recipe", "resnet18-imagenette5", "--device", "cpu",
               *(f for key, value in SMALL for f in ("--set", f"{key}={value}"))]


def _link_images(source: Path, target: Path, count: int) -> None:
    """The first `count` images of `source`, class by class in turn, linked into `target`."""
    files = [sorted(folder.glob("*.JPEG")) for folder in sorted(source.iterdir())]
    for images in zip(*files, strict=False):
        for image in images[: max(0, count)]:
            (target / image.parent.name).mkdir(parents=True, exist_ok=True)
            (target / image.parent.name / image.name).symlink_to(image)
        count -= len(images)


@pytest.fixture(scope="module")
def packed(imagenette_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the image folder, its pack): 160 training JPEGs in 11 shards, 40 validation in 3."""
    root = tmp_path_factory.mktemp("shard-training")
    _link_images(imagenette_root / "train", root / "folder" / "train", 160)
    _link_images(imagenette_root / "val", root / "folder" / "val", 40)
    index = pack_folder(root / "folder", root / "shards", shard_bytes=200_000, progress=False)
    assert [len(split.shards) for split in index.splits.values()] == [11, 3]
    return root / "folder", root / "shards"


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def _check_same_weights_after_epoch_2(straight_run: Path, resumed_run: Path) -> None:
    """A run trained straight and one stopped and resumed, bit for bit after epoch 2."""
    straight, resumed = (ckpt.load_checkpoint(ckpt.epoch_checkpoint(run, 2))
                         for run in (straight_run, resumed_run))
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


def _printed_top1(output: str) -> str:
    return re.search(r"top-1 error (\d+\.\d+)%", output).group(1)


def test_train_with_streamed_statistics_then_eval_on_the_val_shards(
    packed, tmp_path, capsys, monkeypatch
):
    folder, shards = packed
    monkeypatch.setenv("CANON_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    main(["train", *SMALL_FLAGS, "--data", str(shards), "--workers", "2", "--set",
          "data.mean=pixel", "--output-dir", str(run)])
    output = capsys.readouterr().out
    # 2 workers take 9 whole batches of 16 of the 160 images each epoch
    assert "(160 train / 40 val images, 10 classes)" in output
    assert "2 epoch(s) of 9 steps" in output
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]

    # The statistics are the folder's (streamed from its shards), cached under its fingerprint.
    train_folder = open_train_folder(folder)
    expected = compute_stats(train_folder, 36, progress=False)
    mean = load_file(run / "normalization.safetensors")["mean"]
    torch.testing.assert_close(mean, expected.mean_image)
    cached = stats_cache_path(train_folder, 36, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "stats").iterdir()] == [cached.name]

    # canon eval reads the run's own data, the val shards (with workers), or the folder.
    main(["eval", str(run), "--device", "cpu", "--workers", "2"])
    from_shards = capsys.readouterr().out
    assert f"center on {shards} (40 images)" in from_shards
    assert _printed_top1(from_shards) == f"{float(rows[-1]['val_top1_error']):.2f}"
    main(["eval", str(run), "--device", "cpu", "--data", str(folder)])
    assert _printed_top1(capsys.readouterr().out) == _printed_top1(from_shards)

    # A copy of the val shards alone: the recipe's test-time preprocessing needs the train
    # split's index (its statistics' cache key), not its shards; training needs both.
    val_only = tmp_path / "val-only"
    val_only.mkdir()
    for file in [shards / "index.json", *shards.glob("val-*.tar")]:
        (val_only / file.name).symlink_to(file)
    config = load_recipe("resnet18-imagenette5", [*SMALL, ("data.mean", "pixel")]).data
    preprocess = trained_preprocess(config, str(val_only), cache=tmp_path / "cache",
                                    strict=False, download=False, max_pixels=MAX_IMAGE_PIXELS)
    torch.testing.assert_close(preprocess.normalize.mean, expected.mean_image)
    with pytest.raises(DataError, match=r"val-only/train-000000.tar: missing, index.json says"):
        open_dataset(str(val_only))
    with pytest.raises(DataError, match=r"val-only/train-000000.tar: missing"):  # before a
        recipe_statistics(dataclasses.replace(config, dataset=str(val_only)),  # pass, not at
                          cache=tmp_path / "no-cache")  # the shard missing
    assert len(open_eval_split(str(val_only))) == 40
    (val_only / "val-000002.tar").unlink()
    with pytest.raises(DataError, match=r"val-only/val-000002.tar: missing"):
        open_eval_split(str(val_only))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_stopped_mid_epoch_resumes_exactly(packed, tmp_path, workers):
    _, shards = packed
    recipe = load_recipe("resnet18-imagenette5",
                         [("data.dataset", str(shards)), ("train.workers", workers), *SMALL])

    steps_per_epoch = {0: 10, 2: 9}[workers]  # whole batches of 16 of 160 for every worker

    def ctrl_c(step: int) -> None:
        if step == 12:  # in epoch 2
            signal.raise_signal(signal.SIGINT)

    train(recipe, tmp_path / "straight", device="cpu", progress=False)
    with pytest.raises(TrainingInterrupted) as stop:
        train(recipe, tmp_path / "stopped", device="cpu", progress=False, on_step=ctrl_c)
    assert ckpt.load_checkpoint(stop.value.checkpoint)["step_in_epoch"] == 12 - steps_per_epoch
    # other loader workers would deal the epoch's images otherwise
    other = apply_overrides(recipe, [("train.workers", 2 - workers)])
    with pytest.raises(ConfigError, match=rf"were dealt to 1, 16 and {workers}\. Resume with "
                                          rf"--batch-size 16 --workers {workers} on 1 process"):
        train(other, tmp_path / "stopped", resume=tmp_path / "stopped", device="cpu",
              progress=False)
    if workers == 0:  # the same images re-packed into other shards: dealt otherwise too
        folder, _ = packed
        pack_folder(folder, tmp_path / "repacked", shard_bytes=400_000, progress=False)
        repacked = apply_overrides(recipe, [("data.dataset", str(tmp_path / "repacked"))])
        with pytest.raises(ConfigError, match=r"its training shards are not the ones the "
                           r"checkpoint's run was dealt \(11 shards then, \d+ now: re-packed\?\), "
                           r"so the rest of the epoch would read other images\. .*same "
                           r"--shard-size"):
            train(repacked, tmp_path / "stopped", resume=tmp_path / "stopped", device="cpu",
                  progress=False)
        with pytest.raises(ConfigError, match=r"re-packed\?\), so its next epochs would be "
                           r"dealt other images"):  # at an epoch's end: no rest of the epoch
            train(repacked, tmp_path / "boundary", device="cpu", progress=False,
                  resume=ckpt.epoch_checkpoint(tmp_path / "stopped", 1))
    train(recipe, tmp_path / "stopped", resume=tmp_path / "stopped", device="cpu",
          progress=False)
    _check_same_weights_after_epoch_2(tmp_path / "straight", tmp_path / "stopped")
    for row, again in zip(_metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped"),
                          strict=True):
        for key in ("train_loss", "train_top1_error", "val_top1_error", "val_top5_error"):
            assert row[key] == again[key], key


def test_a_file_that_stops_a_run_mid_epoch_leaves_the_steps_before_it(packed, tmp_path):
    """--strict meeting undecodable files in epoch 2 (as a shard cut short would): the steps
    before them are saved in interrupted.pt, where the run lost them back to epoch 1's
    checkpoint (a journey found it), and once the data is mended the run resumes exactly."""
    folder, _ = packed
    data = tmp_path / "data"
    shutil.copytree(folder, data, symlinks=True)
    recipe = load_recipe("resnet18-imagenette5", [
        ("data.dataset", str(data)), ("train.workers", 0), ("train.strict_data", True), *SMALL])
    train(recipe, tmp_path / "straight", device="cpu", progress=False)
    images = sorted((data / "train").rglob("*.JPEG"))

    def damage_after(last_step: int) -> Callable[[int], None]:
        def damage(step: int) -> None:
            if step == last_step:
                for image in images:
                    image.unlink()
                    image.write_bytes(b"no JPEG")
        return damage

    def mend() -> None:
        for image in images:
            image.unlink()
            image.symlink_to(folder / image.relative_to(data))

    # At an epoch's start epoch-001.pt holds the state: no interrupted.pt (which would keep
    # an --overwrite's replaced run set aside, a review found)
    with pytest.raises(DataError, match=r"not a recognised image format.*without strict\)$"):
        train(recipe, tmp_path / "at-start", device="cpu", progress=False,
              on_step=damage_after(10))  # the last of epoch 1's 10 steps
    assert ckpt.resumable_checkpoints(tmp_path / "at-start") == [
        ckpt.epoch_checkpoint(tmp_path / "at-start", 1)]
    mend()
    with pytest.raises(DataError, match=r"; the 12 steps before it are saved in "
                       r".*stopped/checkpoints/interrupted\.pt: mend the data, then resume"):
        train(recipe, tmp_path / "stopped", device="cpu", progress=False,
              on_step=damage_after(12))
    mend()
    train(recipe, tmp_path / "stopped", resume=tmp_path / "stopped", device="cpu",
          progress=False)
    _check_same_weights_after_epoch_2(tmp_path / "straight", tmp_path / "stopped")


def test_no_loader_worker_and_one_deal_the_same_shard_stream(packed):
    """A run on shards resumes with 0 workers where it had 1 (both read the stream as one
    part), but not with 2."""
    from types import SimpleNamespace

    from canon.data.shards import ShardImages
    from canon.engine.setup import _check_same_shard_stream

    _, shards = packed
    recipe = load_recipe("resnet18-imagenette5",
                         [("data.dataset", str(shards)), ("train.workers", 0), *SMALL])
    run = SimpleNamespace(train_order=ShardImages(shards, "train", batch_size=16),
                          recipe=recipe, ctx=SimpleNamespace(world_size=1))
    state = {"rng": [{}], "recipe": {"train": {"batch_size": 16}}, "loader_workers": 1}
    _check_same_shard_stream(run, state)
    with pytest.raises(ConfigError, match="were dealt to 1, 16 and 2"):
        _check_same_shard_stream(run, {**state, "loader_workers": 2})


def test_shard_folders_refuse_val_split_and_readers_by_index(packed, tmp_path, capsys):
    folder, shards = packed
    with pytest.raises(SystemExit) as exit_:
        main(["train", *SMALL_FLAGS, "--data", str(shards), "--set", "data.val_split=20",
              "--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "cannot hold images out of its training split" in error
    assert str(folder.resolve()) in error and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:  # 160 images, 11 shards: no batch of 200 fills
        main(["train", *SMALL_FLAGS, "--data", str(shards), "--set", "train.batch_size=200",
              "--workers", "0", "--output-dir", str(tmp_path / "big")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "160 training images make no full step of batch 200" in error
    assert "of 11 shards over 1 rank(s) and 1 loader worker(s)" in error
    assert "re-pack into more shards with canon pack --shard-size" in error
    assert "or a smaller train.batch_size (--batch-size)" in error
    assert not (tmp_path / "big").exists()
    with pytest.raises(ConfigError, match=re.escape(f"packed from, {folder.resolve()}")):
        open_split(str(shards), "val")
    assert read_index(shards).source == str(folder.resolve())


def test_the_val_shards_are_labelled_by_a_model_s_classes_by_name(packed):
    _, shards = packed
    own = open_eval_split(str(shards))
    model_ids = [*reversed(own.class_ids), "n00000000"]  # another order, one class more
    relabelled = open_eval_split(str(shards), model_ids)
    assert relabelled.class_ids == model_ids and relabelled.classes[0] == own.classes[-1]
    labels = [label for _, label in own]
    assert [label for _, label in relabelled] == [9 - label for label in labels]
    with pytest.raises(DataError, match="not among the 9 classes"):
        open_eval_split(str(shards), own.class_ids[1:])


# `canon train` that records how many validation images the trainer scored on each rank, and
# whose rank 1 reads its shards with 3 loader processes and rank 0 with none, as ranks on
# machines of other core counts do when the recipe leaves train.workers unset.
RECORDING_UNEVEN_TRAIN = '''
import json, os, sys
from pathlib import Path
import canon.engine.trainer
from canon.cli import main

score_loader = canon.engine.trainer.score_loader
def recording_score_loader(model, loader, *args, **kwargs):
    errors = score_loader(model, loader, *args, **kwargs)
    Path(sys.argv[1], f"validated-by-rank-{os.environ['RANK']}.json").write_text(
        json.dumps({"images": errors.images}))
    return errors
canon.engine.trainer.score_loader = recording_score_loader
main([*sys.argv[2:], "--workers", "3" if os.environ["RANK"] == "1" else "0"])
'''


@pytest.mark.distributed
def test_two_torchrun_processes_train_on_their_own_shards_with_other_worker_counts(
    packed, tmp_path, capsys
):
    """A shard stream's length depends on its loader's workers (each ends short of a batch):
    here 4 steps with none, 2 with 3. Every rank takes the fewest, where the one with more
    stepped on alone into a collective no other rank joined, and hung. The ranks validate on
    their val shards together, every image once; resumed, each rank reads with its own
    workers again, as each dealt its own. (One test: a launch costs two cores about 17 s.)"""
    _, shards = packed
    worker = tmp_path / "recording_uneven_train.py"
    worker.write_text(RECORDING_UNEVEN_TRAIN)

    def launch(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", str(worker), str(tmp_path), "train", *argv],
            env={**os.environ, "CANON_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run = tmp_path / "run"
    output = launch(*SMALL_FLAGS, "--set", "train.epochs=1", "--data", str(shards),
                    "--output-dir", str(run))
    assert "global batch 32 = 16 x 1 accum x 2 device(s)" in output
    assert "1 epoch(s) of 2 steps" in output
    assert [row["step"] for row in _metrics(run)] == ["2"]
    scored = [json.loads((tmp_path / f"validated-by-rank-{rank}.json").read_text())["images"]
              for rank in (0, 1)]
    assert sum(scored) == 40 and min(scored) > 0, scored
    launch("--resume", str(run), "--device", "cpu", "--set", "train.epochs=2")
    rows = _metrics(run)
    assert [row["step"] for row in rows] == ["2", "4"]
    state = ckpt.load_checkpoint(ckpt.epoch_checkpoint(run, 2))
    assert state["loader_workers"] == [0, 3]
    main(["eval", str(run), "--device", "cpu"])
    assert _printed_top1(capsys.readouterr().out) == f"{float(rows[-1]['val_top1_error']):.2f}"
