"""Real (small) training runs on the bundled CIFAR-10 sample: learning, exact resumption,
truncated checkpoints, gradient accumulation, NaN stops.

The sample is real CIFAR-10 data (500 training and 100 test images per class, shipped in the
package); the runs use slices of it so the whole file stays within its CPU budget.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import warnings
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from sample_subsets import spread_subsets

from canon.cli import main
from canon.data import DataConfig, build_datasets
from canon.engine import checkpoint as ckpt
from canon.engine.distributed import init_distributed
from canon.engine.graphed import GraphedStep, restored_after
from canon.engine.rundir import latest_run_dir, new_run_dir
from canon.engine.saving import divergence_remedy
from canon.engine.setup import build_model, set_up
from canon.engine.stopping import StopFlag, StoppedAtOnce
from canon.engine.trained import load_trained
from canon.engine.trainer import TrainingInterrupted, train
from canon.errors import ConfigError, DataError, NonFiniteError
from canon.models.base import CanonModel
from canon.recipes import RECIPE_HEADER, Recipe, apply_overrides, load_recipe


@pytest.fixture(scope="module")
def sample_sets():
    return build_datasets(DataConfig(dataset="sample"))


def tiny_recipe(**train_values) -> Recipe:
    """quickstart with a schedule that does not depend on the run's length (a cosine one
    would change when a resumed run is given more epochs)."""
    overrides = [
        ("train.workers", 0), ("train.channels_last", False), ("schedule.kind", "step"),
        ("schedule.step_size", 1), ("schedule.gamma", 0.5),
    ]
    overrides += [(f"train.{key}", value) for key, value in train_values.items()]
    return load_recipe("quickstart", overrides)


def final_weights(run_dir, epoch):
    return ckpt.load_checkpoint(ckpt.epoch_checkpoint(run_dir, epoch))


def assert_same_state(first: dict, second: dict) -> None:
    for key, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][key]), key
    for index, buffers in first["optimizer"]["state"].items():
        assert torch.equal(buffers["momentum_buffer"],
                           second["optimizer"]["state"][index]["momentum_buffer"])


def test_short_run_lowers_the_loss_and_beats_chance_on_held_out_images(sample_sets, tmp_path):
    recipe = load_recipe("quickstart", [
        ("train.epochs", 2), ("train.batch_size", 32), ("optimizer.base_batch_size", 32),
        ("optimizer.lr", 0.05), ("schedule.warmup_epochs", 0.2),
    ])
    data = spread_subsets(sample_sets, 1600, 500)
    result = train(recipe, tmp_path, device="cpu", datasets=data, progress=False)
    first, last = result.metrics
    assert last["train_loss"] < min(first["train_loss"], math.log(10))  # ln 10: chance level
    # Chance is 90% top-1 and 50% top-5 on 10 balanced classes. Two epochs on 1,600 images
    # end near 66-75% top-1 (it varies with the CPU's kernels) and 12-20% top-5: the top-5
    # error is the stable, wide-margin sign of learning.
    assert last["val_top5_error"] < 35.0
    assert last["val_top1_error"] < 85.0
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    for name in ("model.safetensors", "eval_config.json", "recipe.yaml"):
        assert (tmp_path / name).is_file()


def test_the_run_header_names_the_models_builder_options() -> None:
    def label(recipe: Recipe) -> str:
        return recipe.model.labelled(recipe.model.name)

    assert label(load_recipe("resnet34-imagenette5")) == "resnet34"
    assert label(load_recipe("vgg11")) == "vgg11 (init=normal)"
    options = load_recipe("resnet34", [("model.options", {"stem": "deep", "avg_down": True})])
    assert label(options) == "resnet34 (stem=deep, avg_down=True)"


@pytest.fixture(scope="module")
def resume_data(sample_sets):
    return spread_subsets(sample_sets, 128, 50)


@pytest.fixture(scope="module")
def uninterrupted(resume_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_recipe(epochs=2, batch_size=16), run_dir, device="cpu", datasets=resume_data,
          progress=False)
    return final_weights(run_dir, 2)


def test_stopping_after_an_epoch_and_resuming_is_bit_identical(
    resume_data, uninterrupted, tmp_path
):
    train(tiny_recipe(epochs=1, batch_size=16), tmp_path, device="cpu", datasets=resume_data,
          progress=False)
    _, state = ckpt.load_for_resume(tmp_path)
    longer = apply_overrides(Recipe.from_dict(state["recipe"]), [("train.epochs", 2)])
    train(longer, tmp_path, resume=state, device="cpu", datasets=resume_data, progress=False)
    assert_same_state(final_weights(tmp_path, 2), uninterrupted)

    # A checkpoint truncated on disk is reported and the previous one is used.
    newest = ckpt.epoch_checkpoint(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(DataError, match=r"epoch-002\.pt is unreadable"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(ckpt.CheckpointWarning, match="epoch-002.pt"):
        path, state = ckpt.load_for_resume(tmp_path)
    assert path == ckpt.epoch_checkpoint(tmp_path, 1) and state["epoch"] == 1
    train(longer, tmp_path, resume=state, device="cpu", datasets=resume_data, progress=False)
    assert_same_state(final_weights(tmp_path, 2), uninterrupted)


def test_an_iteration_limit_inside_an_epoch_resumes_as_if_the_run_never_stopped(
    resume_data, tmp_path
):
    """A limit that ends a run inside an epoch (epoch 1 of 8 steps, at step 3) leaves the
    middle of that epoch to resume from: a higher limit (13) or a whole number of epochs (2)
    then trains what an unlimited run trains, bit for bit, and the cut epoch's row is
    replaced by the whole epoch's."""
    def run(run_dir, resume=None, **values):
        recipe = apply_overrides(tiny_recipe(batch_size=16, **values),
                                 [("optimizer.base_batch_size", 16)])  # limits count steps
        return train(recipe, tmp_path / run_dir, resume=resume, device="cpu",
                     datasets=resume_data, progress=False).metrics

    def untimed(rows):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
                for row in rows]

    limited, unlimited = run("limited", epochs=2, iterations=13), run("unlimited", epochs=2)
    for longer, reference, rows in (({"iterations": 13}, "limited", limited),
                                    ({"iterations": None}, "unlimited", unlimited)):
        cut = f"cut-{reference}"
        assert [row["epoch"] for row in run(cut, epochs=2, iterations=3)] == [1]
        _, state = ckpt.load_for_resume(tmp_path / cut)
        assert (state["epoch"], state["step"], state["step_in_epoch"]) == (0, 3, 3)
        assert untimed(run(cut, resume=state, epochs=2, **longer)) == untimed(rows)
        assert_same_state(final_weights(tmp_path / cut, 2), final_weights(tmp_path / reference, 2))
    assert [row["epoch"] for row in limited] == [1, 2]  # the second cut at step 5 of 8
    assert ckpt.load_checkpoint(ckpt.epoch_checkpoint(tmp_path / "limited", 2))["step"] == 13
    # Validated on held-out images, a run whose only epoch was cut chooses no best (whole
    # epochs only): no best.pt, and no best error (it was infinite)
    held_out = apply_overrides(tiny_recipe(batch_size=16, epochs=1, iterations=3), [
        ("optimizer.base_batch_size", 16), ("data.val_split", 10)])
    result = train(held_out, tmp_path / "held-out", device="cpu", datasets=resume_data,
                   progress=False)
    assert result.best_val_top1_error is None and not result.validated_on_test_set
    assert not ckpt.best_checkpoint(tmp_path / "held-out").exists()


def test_a_run_the_iteration_limit_ended_inside_an_epoch_is_finished_when_resumed_as_it_is(
    resume_data, tmp_path
):
    """A requeued `canon train --resume` of such a run (ResNet CIFAR's 64k iterations end
    inside epoch 165) trains, validates and saves nothing, and leaves what canon eval wrote of
    its model where it is; its cut epoch's clock kept the training seconds alone, not the
    validation's, for a resume with a higher limit to add to."""
    recipe = apply_overrides(tiny_recipe(batch_size=16, epochs=2, iterations=3),
                             [("optimizer.base_batch_size", 16)])
    first = train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)
    saved = ckpt.epoch_checkpoint(tmp_path, 1)
    state = ckpt.load_checkpoint(saved)
    assert state["epoch_totals"][0]["seconds"] < first.metrics[-1]["seconds"]
    (tmp_path / "eval-center.json").write_text("of the run's model")
    saved_at = saved.stat().st_mtime_ns
    again = train(recipe, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data,
                  progress=False)
    assert again.metrics == first.metrics and saved.stat().st_mtime_ns == saved_at
    assert (tmp_path / "eval-center.json").read_text() == "of the run's model"
    assert not (tmp_path / "earlier-reports").exists()
    assert load_trained(tmp_path).source == tmp_path / ckpt.EXPORT_WEIGHTS


def test_a_taken_output_directory_is_refused_before_the_data_is_read(
    resume_data, tmp_path, monkeypatch
):
    """Not after a scan of ImageNet's files and a statistics pass."""
    recipe = tiny_recipe(epochs=1, batch_size=16)
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)

    def read_the_data(*args: object) -> None:
        raise AssertionError("set_up ran")

    monkeypatch.setattr("canon.engine.trainer.set_up", read_the_data)
    with pytest.raises(DataError, match="already holds a run"):
        train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)


def test_a_resume_refuses_another_training_set(sample_sets, resume_data, tmp_path):
    """Other images held out would put trained-on images in the validation set; another
    training set puts the checkpoint's steps elsewhere in its epochs."""
    recipe = tiny_recipe(epochs=1, batch_size=16)
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)
    _, state = ckpt.load_for_resume(tmp_path)
    longer = apply_overrides(recipe, [("train.epochs", 2)])
    with pytest.raises(ConfigError, match=r"data\.val_split 10: the checkpoint's run trained "
                                          "with 0"):
        train(apply_overrides(longer, [("data.val_split", 10)]), tmp_path, resume=state,
              device="cpu", datasets=resume_data, progress=False)
    with pytest.raises(ConfigError, match="its training set has 96 images where the "
                                          "checkpoint's run trained on 128"):
        train(longer, tmp_path, resume=state, device="cpu",
              datasets=spread_subsets(sample_sets, 96, 50), progress=False)


def test_going_on_from_an_older_checkpoint_takes_a_directory_of_its_own(
    resume_data, uninterrupted, tmp_path, capsys
):
    """Resuming epoch 1 of a run that has epoch 2 in that run's own directory would
    interleave two continuations: refused, nothing touched; in a new directory it goes on
    (bit-identically); into a directory holding another run only with overwrite."""
    run, branch = tmp_path / "run", tmp_path / "branch"
    recipe = tiny_recipe(epochs=2, batch_size=16)
    train(recipe, run, device="cpu", datasets=resume_data, progress=False)
    first = ckpt.epoch_checkpoint(run, 1)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    with pytest.raises(DataError, match=r"epoch-001\.pt is older than .*epoch-002\.pt.*"
                                        "--output-dir"):
        train(recipe, run, resume=first, device="cpu", datasets=resume_data, progress=False)
    with pytest.raises(SystemExit) as exit_:  # canon train --resume says the same
        main(["train", "--resume", str(first), "--device", "cpu"])
    assert exit_.value.code == 2 and "is older than" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    train(recipe, branch, resume=first, device="cpu", datasets=resume_data, progress=False)
    assert_same_state(final_weights(branch, 2), uninterrupted)
    longer, branch_end = tiny_recipe(epochs=3, batch_size=16), ckpt.epoch_checkpoint(branch, 2)
    with pytest.raises(DataError, match="already holds a run"):
        train(longer, run, resume=branch_end, device="cpu", datasets=resume_data,
              progress=False)
    train(longer, run, resume=branch_end, overwrite=True, device="cpu", datasets=resume_data,
          progress=False)
    assert [p.name for p in ckpt.resumable_checkpoints(run)] == ["epoch-003.pt"]


def test_a_run_killed_between_its_epoch_checkpoint_and_best_pt_gets_best_pt_back(
    resume_data, tmp_path, monkeypatch
):
    """save_epoch writes the epoch's checkpoint, deletes interrupted.pt, then copies best.pt:
    killed before the copy, the resume goes on from that epoch, not from the Ctrl-C earlier
    in it, and restores best.pt from it. (Copied first, best.pt was left alone by a kill in
    the first epoch, and no resume went on from that.)"""
    recipe = apply_overrides(tiny_recipe(epochs=2, batch_size=16), [("data.val_split", 50)])
    copy = ckpt.copy_checkpoint

    def stop(step: int) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False,
              on_step=stop)
    monkeypatch.setattr(ckpt, "copy_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data,
              progress=False)
    assert ckpt.resumable_checkpoints(tmp_path) == [ckpt.epoch_checkpoint(tmp_path, 1)]
    assert not ckpt.best_checkpoint(tmp_path).exists()
    monkeypatch.setattr(ckpt, "copy_checkpoint", copy)
    best_seen = []

    def look(step: int) -> None:
        if not best_seen:  # before epoch 2's first step ends, best.pt is epoch 1's again
            best_seen.append(ckpt.load_checkpoint(ckpt.best_checkpoint(tmp_path))["epoch"])

    train(recipe, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data,
          progress=False, on_step=look)
    assert best_seen == [1]


def test_a_finished_run_given_more_epochs_withdraws_its_export_until_it_ends(
    resume_data, tmp_path
):
    """Stopped in its new epoch, the run's model is its last checkpoint's, not the export of
    the run it was (which load_trained would take for the result); ended, it exports anew.
    What canon eval and canon visualize wrote of the earlier model goes into a folder named
    after its epochs, not left to read as the new model's."""
    recipe = tiny_recipe(epochs=1, batch_size=16)
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)
    assert (tmp_path / ckpt.EXPORT_WEIGHTS).is_file()
    reports = ["eval-center.json", "eval-center-per-class.csv", "eval-center-confusion.png",
               "visualize"]
    for name in reports[:3]:
        (tmp_path / name).write_text("of the 1-epoch model")
    (tmp_path / "visualize").mkdir()
    longer = apply_overrides(recipe, [("train.epochs", 2)])

    def ctrl_c(step: int) -> None:
        if step == 10:  # in epoch 2 of 8 steps each
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(longer, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data,
              progress=False, on_step=ctrl_c)
    assert not any((tmp_path / name).exists()
                   for name in (ckpt.EXPORT_WEIGHTS, ckpt.EXPORT_CONFIG, ckpt.EXPORT_NORMALIZATION))
    assert load_trained(tmp_path).source == ckpt.epoch_checkpoint(tmp_path, 1)
    aside = tmp_path / "earlier-reports" / "epoch-1"
    assert sorted(p.name for p in aside.iterdir()) == sorted(reports)
    assert not any((tmp_path / name).exists() for name in reports)
    (tmp_path / "eval-center.json").write_text("of the last checkpoint, epoch 1")
    train(longer, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data, progress=False)
    assert (aside.with_name("epoch-1-2") / "eval-center.json").is_file()
    assert load_trained(tmp_path).source == tmp_path / ckpt.EXPORT_WEIGHTS
    assert json.loads((tmp_path / ckpt.EXPORT_CONFIG).read_text())["epochs"] == 2


def test_values_changed_on_resuming_are_said_and_recorded(resume_data, tmp_path, capsys):
    """--set on a resume trains the rest with other values: said, and kept in recipe.yaml's
    header (which holds the latest values) for every resume that changed any and saved a
    checkpoint after, also by a run continued in another folder."""
    recipe = tiny_recipe(epochs=1, batch_size=16)
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)

    def stop(step: int) -> None:
        raise KeyboardInterrupt  # killed before its first checkpoint: it changed nothing

    with pytest.raises(KeyboardInterrupt):
        train(apply_overrides(recipe, [("train.epochs", 2), ("optimizer.lr", 0.7)]), tmp_path,
              resume=tmp_path, device="cpu", datasets=resume_data, progress=False,
              on_step=stop)
    changed = apply_overrides(recipe, [("train.epochs", 2), ("optimizer.lr", 0.5),
                                       ("description", "two\nlines")])
    train(changed, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data,
          progress=False)
    assert ("resumed with other recipe values than its checkpoint's: description: ") in (
        capsys.readouterr().out)
    elsewhere = tmp_path / "elsewhere"
    train(apply_overrides(changed, [("train.epochs", 3)]), elsewhere,
          resume=ckpt.epoch_checkpoint(tmp_path, 2), device="cpu", datasets=resume_data,
          progress=False)
    lines = (elsewhere / "recipe.yaml").read_text().splitlines()
    assert lines[0].startswith(RECIPE_HEADER) and lines[1:3] == [
        f"# changed on resuming at step 8: description: {json.dumps(recipe.description)} -> "
        '"two\\nlines"; optimizer.lr: 0.1 -> 0.5; train.epochs: 1 -> 2',
        "# changed on resuming at step 16: train.epochs: 2 -> 3"]
    assert load_recipe(elsewhere / "recipe.yaml").optimizer.lr == 0.5


def test_reports_set_aside_are_named_after_the_export_s_epochs(resume_data, tmp_path):
    """A finished 2-epoch run whose newest checkpoint is damaged resumes from epoch 1: its
    eval files were of the 2-epoch export, and their folder says so."""
    recipe = tiny_recipe(epochs=2, batch_size=16)
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)
    (tmp_path / "eval-center.json").write_text("of the 2-epoch export")
    epoch_2 = ckpt.epoch_checkpoint(tmp_path, 2)
    epoch_2.write_bytes(epoch_2.read_bytes()[:2000])
    with pytest.warns(ckpt.CheckpointWarning, match="epoch-002.pt is unreadable"):
        train(apply_overrides(recipe, [("train.epochs", 3)]), tmp_path, resume=tmp_path,
              device="cpu", datasets=resume_data, progress=False)
    assert (tmp_path / "earlier-reports" / "epoch-2" / "eval-center.json").is_file()


def test_best_pt_is_the_epoch_of_the_lowest_validation_error_also_across_a_resume(
    resume_data, tmp_path, monkeypatch
):
    """Validation errors of 60, 40, 50% make epoch 2 the best; a resume to a fourth epoch at
    45% keeps it (the best error so far comes back with the run), one at 30% replaces it."""
    import canon.engine.trainer as trainer

    scripted, real_validate = [60.0, 40.0, 50.0, 45.0, 30.0], trainer.validate

    def validate(*args, **kwargs):
        _, top5, scored = real_validate(*args, **kwargs)
        return scripted.pop(0), top5, scored

    monkeypatch.setattr(trainer, "validate", validate)
    recipe = apply_overrides(tiny_recipe(epochs=3, batch_size=16), [("data.val_split", 50)])
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)
    assert ckpt.load_checkpoint(ckpt.best_checkpoint(tmp_path))["epoch"] == 2
    for epochs, best in ((4, 2), (5, 5)):
        train(apply_overrides(recipe, [("train.epochs", epochs)]), tmp_path, resume=tmp_path,
              device="cpu", datasets=resume_data, progress=False)
        assert ckpt.load_checkpoint(ckpt.best_checkpoint(tmp_path))["epoch"] == best
    assert not scripted


def test_a_run_continued_in_another_directory_keeps_its_best_checkpoint(resume_data, tmp_path):
    """Its best is chosen over every epoch, the ones trained before the branch too: best.pt
    of those is there before the first new step, not only once a new epoch beats it."""
    recipe = apply_overrides(tiny_recipe(epochs=1, batch_size=16), [("data.val_split", 50)])
    train(recipe, tmp_path / "a", device="cpu", datasets=resume_data, progress=False)
    carried, longer = [], apply_overrides(recipe, [("train.epochs", 2)])
    for folder in ("b", "c"):
        def look(step: int, folder: str = folder) -> None:
            if step == 9:  # the first step after epoch 1's 8
                best = ckpt.best_checkpoint(tmp_path / folder)
                carried.append(ckpt.load_checkpoint(best)["epoch"])

        if folder == "c":  # the source's best.pt damaged: passed over for its epoch's own
            best = ckpt.best_checkpoint(tmp_path / "a")
            best.write_bytes(best.read_bytes()[:1000])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(longer, tmp_path / folder, resume=ckpt.epoch_checkpoint(tmp_path / "a", 1),
                  device="cpu", datasets=resume_data, progress=False, on_step=look)
        passed_over = [str(w.message) for w in caught if "passed over" in str(w.message)]
        assert len(passed_over) == (folder == "c") and all("a/checkpoints/best.pt" in message
                                                           for message in passed_over)
    assert carried == [1, 1]


def test_a_run_killed_before_its_last_metrics_row_gets_it_from_the_resume(resume_data, tmp_path):
    """Killed between the last epoch's checkpoint and metrics.csv: the resume has no epoch
    left to train, and still writes the file from the checkpoint (canon reproduce takes its
    last row for the run's result); a row past the checkpoint goes."""
    recipe = tiny_recipe(epochs=2, batch_size=16)
    train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False)
    whole = (tmp_path / "metrics.csv").read_text()
    for name in (ckpt.EXPORT_WEIGHTS, ckpt.EXPORT_CONFIG):
        (tmp_path / name).unlink()
    (tmp_path / "metrics.csv").write_text("".join(whole.splitlines(keepends=True)[:2]))
    train(recipe, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data, progress=False)
    assert (tmp_path / "metrics.csv").read_text() == whole
    assert (tmp_path / ckpt.EXPORT_WEIGHTS).is_file()
    ckpt.epoch_checkpoint(tmp_path, 2).unlink()  # as if it were damaged: epoch 1 goes on
    rows_seen = []
    train(recipe, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data, progress=False,
          on_step=lambda step: rows_seen.append(
              len((tmp_path / "metrics.csv").read_text().splitlines())))
    assert rows_seen[0] == 2  # the header and epoch 1's row, not epoch 2's from before
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3  # and epoch 2 again
    # Continued in another folder, failing before its first checkpoint there: it leaves no
    # metrics.csv that would refuse the same command again as a folder holding a run.
    branch = tmp_path / "branch"

    def fails(step: int) -> None:
        raise RuntimeError("bad data")

    for on_step in (fails, None):
        with pytest.raises(RuntimeError) if on_step else contextlib.nullcontext():
            train(recipe, branch, resume=ckpt.epoch_checkpoint(tmp_path, 1), device="cpu",
                  datasets=resume_data, progress=False, on_step=on_step)
    assert len((branch / "metrics.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_mid_epoch_saves_and_resumes_bit_identically(
    resume_data, uninterrupted, tmp_path, stop_signal
):
    def send_signal(step: int) -> None:
        if step == 5:  # inside epoch 1 of 8 steps
            signal.raise_signal(stop_signal)

    recipe = tiny_recipe(epochs=2, batch_size=16, workers=2)  # worker count must not matter
    with pytest.raises(TrainingInterrupted) as stop:
        train(recipe, tmp_path, device="cpu", datasets=resume_data, progress=False,
              on_step=send_signal)
    assert stop.value.checkpoint == ckpt.interrupted_checkpoint(tmp_path)
    assert stop.value.signal_number == stop_signal
    assert ckpt.load_checkpoint(stop.value.checkpoint)["step"] == 5
    train(recipe, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data, progress=False)
    assert_same_state(final_weights(tmp_path, 2), uninterrupted)
    assert not ckpt.interrupted_checkpoint(tmp_path).exists()


def test_accumulation_weighs_every_image_alike_when_a_micro_batch_is_short():
    """Micro-batches of 4 and (files skipped) 2 at batch 4 x accum 2: the gradient is the sum
    of the 6 images' over the step's 8, not the two micro-batches' means halved."""
    from types import SimpleNamespace

    from canon.engine.distributed import DistributedContext
    from canon.engine.precision import Precision
    from canon.engine.setup import _WithAux, new_totals
    from canon.engine.trainer import _accumulate

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.forward_with_aux = lambda images: (model(images), [])
    images, targets = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    cpu = torch.device("cpu")
    run = SimpleNamespace(
        recipe=tiny_recipe(batch_size=4, accum_steps=2, channels_last=False),
        ctx=DistributedContext(rank=0, local_rank=0, world_size=1, device=cpu),
        totals=new_totals(), train_module=_WithAux(model), precision=Precision("none", cpu),
        criterion=nn.CrossEntropyLoss())
    _, _, seen = _accumulate(run, iter([(images[:4], targets[:4]), (images[4:], targets[4:])]))
    assert seen == 6 and run.totals["skipped"] == 2
    expected = torch.autograd.grad(
        nn.functional.cross_entropy(model(images), targets, reduction="sum") / 8,
        model.weight)[0]
    torch.testing.assert_close(model.weight.grad, expected)


def test_fused_sgd_after_a_first_step_skipped_for_overflow_equals_plain_sgd(monkeypatch):
    """Fused SGD (canon's on GPUs; the CPU has the same kernel) makes momentum buffers with
    empty_like and fills them in its kernel, which a step GradScaler found inf in skips: the
    next step read uninitialised memory (here: NaN, as a reused GPU block may hold). canon's
    start from zeros, as a first step computes."""
    from canon.engine import optimization

    real_empty_like = torch.empty_like
    weights = []
    for fused in (None, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        monkeypatch.setattr(optimization, "fused_sgd", lambda *_, fused=fused: fused)
        optimizer, _ = optimization.make_optimizer(
            model, load_recipe("quickstart").optimizer, 128)
        assert optimizer.defaults["fused"] is fused
        scaler, images = torch.amp.GradScaler("cpu"), torch.randn(8, 4)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty_like",
                          lambda t, **options: real_empty_like(t, **options).fill_(math.nan))
            for overflow in (math.inf, 1.0):  # the first step skipped, the second taken
                optimizer.zero_grad()
                scaler.scale(model(images).sum() * overflow).backward()
                scaler.step(optimizer)
                scaler.update()
        weights.append(model.weight.detach())
    assert torch.isfinite(weights[1]).all()
    torch.testing.assert_close(weights[1], weights[0])


def test_a_step_whose_files_were_all_undecodable_changes_nothing_under_fp16():
    """Every micro-batch empty: no gradient, so no update, and fp16's loss scaler (which
    asserts on a step without a backward pass) is not stepped; the step still counts."""
    from types import SimpleNamespace

    from canon.engine.distributed import DistributedContext
    from canon.engine.precision import Precision
    from canon.engine.schedules import LearningRateSchedule
    from canon.engine.setup import _WithAux, new_totals
    from canon.engine.trainer import _optimizer_step

    model = nn.Linear(3, 2)
    model.forward_with_aux = lambda images: (model(images), [])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    recipe = tiny_recipe(batch_size=4, accum_steps=2, channels_last=False, amp="fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    cpu = torch.device("cpu")
    run = SimpleNamespace(
        recipe=recipe, ctx=DistributedContext(rank=0, local_rank=0, world_size=1, device=cpu),
        totals=new_totals(), train_module=_WithAux(model), precision=Precision("fp16", cpu),
        criterion=nn.CrossEntropyLoss(), optimizer=optimizer, graphed_step=None, frozen=[],
        average=None, step=0, step_in_epoch=0, epoch=0,
        schedule=LearningRateSchedule(optimizer, recipe.schedule, peak_lr=0.1, base_lr=0.1,
                                      steps_per_epoch=10, total_steps=10))
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long))
    loss = _optimizer_step(run, iter([empty, empty]))
    assert float(loss) == 0 and run.step == 1 and run.totals["skipped"] == 8
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_tensorboard_logs_each_steps_loss_and_lr_at_its_count(resume_data, tmp_path):
    """The n-th step's loss and lr at x = n, where epoch/* puts an epoch ending with it; the
    step schedule halves the lr from the first step of epoch 2, the 9th."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_recipe(epochs=2, batch_size=16, tensorboard=True), tmp_path, device="cpu",
          datasets=resume_data, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    lrs = {event.step: event.value for event in events.Scalars("train/lr")}
    assert sorted(lrs) == list(range(1, 17))
    assert lrs[8] == pytest.approx(2 * lrs[9]) and lrs[9] == lrs[16]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 17))
    assert [e.step for e in events.Scalars("epoch/lr")] == [8, 16]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    resume_data, tmp_path
):
    train(tiny_recipe(epochs=1, batch_size=16), tmp_path, device="cpu", datasets=resume_data,
          progress=False)
    _, state = ckpt.load_for_resume(tmp_path)
    exploding = apply_overrides(
        Recipe.from_dict(state["recipe"]), [("train.epochs", 2), ("optimizer.lr", 1e30)]
    )
    with pytest.raises(NonFiniteError, match=r"at optimizer step (1\d|20)\b") as stopped:
        train(exploding, tmp_path, resume=state, device="cpu", datasets=resume_data,
              progress=False)
    assert "fp16" not in str(stopped.value)  # a float32 run: no advice about fp16
    assert [p.name for p in ckpt.resumable_checkpoints(tmp_path)] == ["epoch-001.pt"]
    assert ckpt.load_checkpoint(ckpt.epoch_checkpoint(tmp_path, 1))["epoch"] == 1


def test_a_repeated_sigterm_still_saves_and_a_second_ctrl_c_stops_at_once(capsys):
    """Under torchrun a worker gets the scheduler's SIGTERM and torchrun's forwarded copy:
    the second must not kill it before its checkpoint."""
    flag = StopFlag()
    # Python's own SIGINT handler, which a process started in the background with SIGINT
    # ignored (`nohup cmd &` from a script) does not get: the flag puts back what was there.
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with flag.installed():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert flag.raised and flag.signal_number == signal.SIGTERM
            with pytest.raises(StoppedAtOnce):  # as Python's own handler, and marked so
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    assert capsys.readouterr().out.count("finishing this step") == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    quiet = StopFlag(announce=False)  # torchrun's ranks but 0: one notice, not one a process
    with quiet.installed():
        signal.raise_signal(signal.SIGTERM)
    assert quiet.raised and capsys.readouterr().out == ""


def test_divergence_advice_names_the_warm_up_key_the_recipe_uses():
    """warmup_iterations, where a recipe sets it, overrides warmup_epochs: advice to set the
    latter would change nothing for ResNet-110."""
    for name, advice in (("resnet110-cifar10", "schedule.warmup_iterations=800)"),
                         ("resnet18-imagenette5", "schedule.warmup_epochs=2)"),
                         ("resnet20-cifar10", "a warm-up (--set schedule.warmup_epochs=5)")):
        assert advice in divergence_remedy(SimpleNamespace(recipe=load_recipe(name))), name


def test_weights_that_overflow_are_never_checkpointed(resume_data, tmp_path):
    """The loss of the last step is finite, the update it makes is not: epoch 2 must not be
    saved (nor become best.pt), and the error names epoch 1's checkpoint to go back to."""
    # data.val_split: validated as on held-out training images, so best.pt is kept.
    recipe = apply_overrides(tiny_recipe(epochs=2, batch_size=16), [("data.val_split", 50)])
    torch.manual_seed(0)
    model = SmallConvNet()

    def overflow_at_the_end_of_epoch_2(step: int) -> None:
        if step == 16:  # 8 steps per epoch
            with torch.no_grad():
                model.fc.weight[0, 0] = math.inf

    with pytest.raises(NonFiniteError, match=r"weights became NaN or infinite by optimizer "
                       r"step 16;") as error:  # the step that made them so, counted from 1
        train(recipe, tmp_path, device="cpu", model=model, datasets=resume_data,
              progress=False, on_step=overflow_at_the_end_of_epoch_2)
    assert str(ckpt.epoch_checkpoint(tmp_path, 1)) in str(error.value)
    assert [p.name for p in ckpt.resumable_checkpoints(tmp_path)] == ["epoch-001.pt"]
    assert ckpt.load_checkpoint(ckpt.best_checkpoint(tmp_path))["epoch"] == 1
    # Gone on from in another folder: the error names the checkpoint it went on from.
    model = SmallConvNet()
    with pytest.raises(NonFiniteError, match="by optimizer step 16") as error:
        train(recipe, tmp_path / "on", resume=ckpt.epoch_checkpoint(tmp_path, 1), device="cpu",
              model=model, datasets=resume_data, progress=False,
              on_step=overflow_at_the_end_of_epoch_2)
    assert (f"it went on from, {ckpt.epoch_checkpoint(tmp_path, 1)}, is finite (canon train "
            f"--resume {ckpt.epoch_checkpoint(tmp_path, 1)} --output-dir {tmp_path / 'on'})"
            ) in str(error.value)
    # best.pt, named, is the newest epoch's state: the run goes on from it in its directory
    train(recipe, tmp_path, resume=ckpt.best_checkpoint(tmp_path), device="cpu",
          model=SmallConvNet(), datasets=resume_data, progress=False)
    assert ckpt.resumable_checkpoints(tmp_path)[0].name == "epoch-002.pt"


def test_a_run_validated_on_the_test_set_chooses_no_checkpoint_on_it(resume_data, tmp_path):
    """The sample (like CIFAR) validates on its test split: no best.pt, no "best" error; the
    final model is the result."""
    result = train(tiny_recipe(epochs=2, batch_size=16), tmp_path, device="cpu",
                   datasets=resume_data, progress=False)
    assert result.validated_on_test_set and result.best_val_top1_error is None
    assert not ckpt.best_checkpoint(tmp_path).exists()
    assert [p.name for p in ckpt.resumable_checkpoints(tmp_path)] == [
        "epoch-002.pt", "epoch-001.pt"]
    plateau = apply_overrides(tiny_recipe(epochs=1, batch_size=16), [("schedule.kind", "plateau")])
    with pytest.warns(UserWarning, match="plateau cuts the learning rate .* on the test set"):
        train(plateau, tmp_path / "plateau", device="cpu", datasets=resume_data, progress=False)


def test_curves_that_cannot_be_drawn_cost_a_warning_not_the_export(resume_data, tmp_path,
                                                                   monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.warns(UserWarning, match=r"curves\.png not drawn \(.*No space left.*metrics\.csv"):
        train(tiny_recipe(epochs=1, batch_size=16), tmp_path, device="cpu",
              datasets=resume_data, progress=False)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "curves.png").exists()


def test_an_iteration_limit_is_the_run_s_length_whatever_the_epochs(resume_data, tmp_path):
    """ResNet s4.2's 64k iterations on the 45k/5k split take more epochs than the recipe's
    165 (which fit 50k images): the limit, not the epochs, ends the run."""
    # 128 images at batch 16: 8 steps an epoch; 10 steps of quickstart's base batch 128 are
    # 80 of 16, so 10 epochs where the recipe says 3.
    result = train(tiny_recipe(epochs=3, batch_size=16, iterations=10), tmp_path, device="cpu",
                   datasets=resume_data, progress=False)
    assert [row["epoch"] for row in result.metrics] == list(range(1, 11))
    assert ckpt.load_checkpoint(ckpt.epoch_checkpoint(tmp_path, 10))["step"] == 80


def test_a_resume_takes_the_recipe_s_optimizer_values_and_refuses_another_model(
    resume_data, tmp_path
):
    """--set optimizer.weight_decay=0 on a resume is what the run goes on with (the
    checkpoint's groups held 5e-4); a checkpoint of another net is refused by name."""
    train(tiny_recipe(epochs=1, batch_size=16), tmp_path, device="cpu", datasets=resume_data,
          progress=False)
    state = ckpt.load_checkpoint(ckpt.epoch_checkpoint(tmp_path, 1))
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {5e-4}
    recipe = apply_overrides(tiny_recipe(epochs=2, batch_size=16),
                             [("optimizer.weight_decay", 0.0)])
    run = set_up(recipe, tmp_path, init_distributed("cpu"), None, resume_data, state)
    assert {g["weight_decay"] for g in run.optimizer.param_groups} == {0.0}
    assert run.optimizer.state_dict()["state"]  # the momentum buffers carried on
    other = apply_overrides(recipe, [("model.name", "resnet32")])
    with pytest.raises(ConfigError, match=r"cannot resume: the checkpoint's model \(resnet20\)"
                                          r" .* this run's resnet32"):
        set_up(other, tmp_path, init_distributed("cpu"), None, resume_data, state)
    # Fewer steps than it has trained: the export would be a model its recipe does not describe.
    shorter = apply_overrides(recipe, [("train.iterations", 1), ("optimizer.base_batch_size", 16)])
    with pytest.raises(ConfigError, match=r"the run has trained \d+ steps \(1 epoch\(s\) \+ 0 "
                                          r"steps\), more than the \d+ its recipe now asks for"):
        set_up(shorter, tmp_path, init_distributed("cpu"), None, resume_data, state)


def test_metrics_log_the_lr_each_epoch_trained_at(
    resume_data, tmp_path
):
    """A plateau cut at the end of epoch 2 shows from epoch 3's row on (the row of the epoch
    that triggered it trained at the rate before it)."""
    recipe = apply_overrides(tiny_recipe(epochs=3, batch_size=16), [
        ("schedule.kind", "plateau"), ("schedule.patience", 0), ("optimizer.lr", 1e-12)])
    result = train(recipe, tmp_path / "plateau", device="cpu", datasets=resume_data,
                   progress=False)
    rates = [row["lr"] for row in result.metrics]
    assert rates[0] == rates[1] == pytest.approx(10 * rates[2])


@pytest.fixture(scope="module")
def small_data(resume_data):
    return spread_subsets(resume_data, 64, 10)  # 4 steps of 16 per epoch


def test_the_trainer_ends_a_warmup_on_the_training_error_and_resumes_it_exactly(
    small_data, tmp_path
):
    """ResNet-110's warm-up (He et al. s4.2), ending at the first training error below 100%:
    at the first check, step 4 (the end of epoch 1; LOSS_CHECK_STEPS is 10)."""
    recipe = apply_overrides(tiny_recipe(epochs=2, batch_size=16), [
        ("schedule.warmup_mode", "constant"), ("schedule.warmup_iterations", 1000),
        ("schedule.warmup_until_train_error", 100.0),
    ])
    straight = tmp_path / "straight"
    result = train(recipe, straight, device="cpu", datasets=small_data, progress=False)
    state = final_weights(straight, 2)
    assert state["schedule"]["warmup_ended_at"] == 4
    peak = 0.1 * 16 / 128  # quickstart's lr, scaled to batch 16
    first, second = result.metrics
    assert first["lr"] == pytest.approx(0.1 * peak) and second["lr"] == pytest.approx(0.5 * peak)

    def send_signal(step: int) -> None:
        if step == 2:  # before the first check: the resumed run must count steps 1-2 too
            signal.raise_signal(signal.SIGINT)

    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(recipe, stopped, device="cpu", datasets=small_data, progress=False,
              on_step=send_signal)
    train(recipe, stopped, resume=stopped, device="cpu", datasets=small_data, progress=False)
    resumed = final_weights(stopped, 2)
    assert resumed["schedule"] == state["schedule"]
    assert_same_state(resumed, state)

    # An iteration limit at step 2, raised on resume: the warm-up is judged in the uncut run's
    # windows, not on the two steps before the cut.
    per_step = apply_overrides(recipe, [("optimizer.base_batch_size", 16),
                                        ("optimizer.lr", peak)])  # limits count steps
    straight = tmp_path / "straight-per-step"
    train(per_step, straight, device="cpu", datasets=small_data, progress=False)
    cut = tmp_path / "cut"
    train(apply_overrides(per_step, [("train.iterations", 2)]), cut, device="cpu",
          datasets=small_data, progress=False)
    train(per_step, cut, resume=cut, device="cpu", datasets=small_data, progress=False)
    assert final_weights(cut, 2)["schedule"] == final_weights(straight, 2)["schedule"]
    assert_same_state(final_weights(cut, 2), final_weights(straight, 2))


def test_polyak_averaging_starts_after_its_epochs_and_survives_a_resume(small_data, tmp_path):
    data = small_data
    recipe = tiny_recipe(epochs=2, batch_size=16, polyak_after_epochs=1)
    train(recipe, tmp_path / "straight", device="cpu", datasets=data, progress=False)
    assert final_weights(tmp_path / "straight", 1)["ema"] is None  # not begun: raw weights
    state = final_weights(tmp_path / "straight", 2)
    assert int(state["ema"]["n_averaged"]) == 4  # the steps of epoch 2
    exported = safetensors.torch.load_file(tmp_path / "straight" / "model.safetensors")
    weight = "conv1.0.weight"
    assert torch.equal(exported[weight], state["ema"][f"module.{weight}"])

    one_epoch = apply_overrides(recipe, [("train.epochs", 1)])
    with pytest.warns(UserWarning, match=r"train.polyak_after_epochs 1: the run ends after 1 "
                      r"epoch\(s\), before averaging begins"):
        train(one_epoch, tmp_path / "resumed", device="cpu", datasets=data, progress=False)
    train(recipe, tmp_path / "resumed", resume=tmp_path / "resumed", device="cpu",
          datasets=data, progress=False)
    resumed = final_weights(tmp_path / "resumed", 2)
    for key, tensor in state["ema"].items():
        assert torch.equal(resumed["ema"][key], tensor), key


def test_ranks_share_only_buffers_on_their_device(monkeypatch):
    """An NCCL group sends CUDA tensors only, and AveragedModel keeps its step count on the
    CPU: the ranks share the average's module buffers, not that count (each counts alike).
    The "meta" device stands in for a GPU here."""
    from canon.engine import trainer
    from canon.engine.distributed import DistributedContext
    from canon.engine.optimization import make_average

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("meta")
    sent = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: sent.append(tensor))
    for averaging in ({"ema_decay": 0.9}, {"polyak_after_epochs": 1}):
        average = make_average(model, tiny_recipe(**averaging).train)
        sent.clear()
        trainer._share_rank0_buffers(SimpleNamespace(
            model=model, average=average, ctx=DistributedContext(0, 0, 2, torch.device("meta"))))
        assert len(sent) == 2 * len(list(model.buffers()))  # the model's, and the average's
        assert {tensor.device for tensor in sent} == {torch.device("meta")}


class SmallConvNet(CanonModel):
    """A BN-free CanonModel (conv-ReLU-pool twice, linear head) for the accumulation check:
    with batch norm, K micro-batches see other batch statistics than one big batch."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(16, num_classes)

    @property
    def stages(self):
        return [("conv1", self.conv1), ("conv2", self.conv2)]

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)


class UniformHeads(SmallConvNet):
    """SmallConvNet with an auxiliary head, both scaled by weights that start at 0: uniform
    scores, so each head's first loss is ln 10, whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 10)
        self.scales = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.forward_with_aux(x)[0]

    def forward_with_aux(self, x):
        features = self.conv2(self.conv1(x)).mean((2, 3))
        return self.scales[0] * self.fc(features), [self.scales[1] * self.aux(features)]


def test_auxiliary_losses_are_added_at_the_recipe_s_weight(resume_data, tmp_path):
    """GoogLeNet s5: the auxiliary classifiers' losses are added with weight 0.3 (its
    recipe's train.aux_loss_weight): a first step's loss is ln 10 x (1 + weight)."""
    for weight in (0.3, 0.0):
        recipe = tiny_recipe(epochs=1, batch_size=128, aux_loss_weight=weight)  # one step
        result = train(recipe, tmp_path / str(weight), device="cpu", model=UniformHeads(),
                       datasets=resume_data, progress=False)
        assert result.metrics[-1]["step"] == 1
        assert result.metrics[-1]["train_loss"] == pytest.approx(math.log(10) * (1 + weight))


def test_k_micro_batches_of_b_over_k_equal_one_batch_of_b(resume_data, tmp_path):
    states = []
    for batch_size, accum in ((32, 1), (8, 4)):
        recipe = tiny_recipe(epochs=1, batch_size=batch_size, accum_steps=accum)
        torch.manual_seed(0)
        model = SmallConvNet()
        initial = model.fc.weight.detach().clone()
        run_dir = tmp_path / f"b{batch_size}x{accum}"
        train(recipe, run_dir, device="cpu", model=model, datasets=resume_data, progress=False)
        states.append(final_weights(run_dir, 1))
    one, accumulated = states
    assert one["step"] == accumulated["step"] == 4
    assert not torch.allclose(one["model"]["fc.weight"], initial)  # it did train
    for key, tensor in one["model"].items():
        torch.testing.assert_close(accumulated["model"][key], tensor, rtol=1e-5, atol=1e-6)


def test_bf16_ema_label_smoothing_no_bn_decay_and_filter_clamp_run_together(
    resume_data, tmp_path, monkeypatch
):
    recipe = apply_overrides(
        tiny_recipe(epochs=1, batch_size=16, accum_steps=2, amp="bf16", ema_decay=0.5,
                    label_smoothing=0.1, filter_rms_radius=0.1),
        [("optimizer.no_decay_bn_bias", True)],
    )
    data = spread_subsets(resume_data, 64, 10)
    smoothing, conv_dtypes, real_loss = [], set(), nn.CrossEntropyLoss.forward

    def recorded_loss(self, logits, targets):
        smoothing.append(self.label_smoothing)
        return real_loss(self, logits, targets)

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", recorded_loss)
    model = build_model(recipe, 10)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda conv, inputs, output: conv_dtypes.add(output.dtype))
    train(recipe, tmp_path, device="cpu", model=model, datasets=data, progress=False)
    assert smoothing and set(smoothing) == {0.1}
    assert conv_dtypes == {torch.bfloat16}  # autocast, in training and validation
    state = final_weights(tmp_path, 1)
    groups = state["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.0005, 0.0]
    assert state["ema"]["n_averaged"] == state["step"] == 2
    exported = safetensors.torch.load_file(tmp_path / "model.safetensors")
    weight = "conv1.0.weight"
    assert torch.equal(exported[weight], state["ema"][f"module.{weight}"])  # EMA is exported
    assert not torch.equal(exported[weight], state["model"][weight])
    for weights in (state["model"][weight], state["ema"][f"module.{weight}"]):
        rms = weights.pow(2).mean((1, 2, 3)).sqrt()
        assert rms.max() <= 0.1 + 1e-6  # ZFNet's filter RMS clamp, averaged after it
    from_checkpoint = load_trained(ckpt.epoch_checkpoint(tmp_path, 1)).model.state_dict()
    assert torch.equal(from_checkpoint[weight], exported[weight])  # the EMA weights, too


def test_run_directories_are_numbered_and_a_bare_resume_finds_this_recipe_s_latest(tmp_path):
    names = ("resnet20-cifar10", "resnet20-cifar10-2", "resnet20-cifar10-cosine")
    for age, name in enumerate(names):  # the -cosine run is the newest
        path = tmp_path / name / "checkpoints" / "epoch-001.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    assert new_run_dir(tmp_path, "resnet20-cifar10").name == "resnet20-cifar10-3"
    assert latest_run_dir(tmp_path, "resnet20-cifar10").name == "resnet20-cifar10-2"
    (tmp_path / "resnet20-cifar10-cosine" / "recipe.yaml").write_text(
        "name: resnet20-cifar10-cosine\n")
    torchrun = tmp_path / "resnet20-cifar10-d3da5421-3432"  # torchrun's runs/NAME-<run id>
    (torchrun / "checkpoints").mkdir(parents=True)
    (torchrun / "checkpoints" / "epoch-001.pt").write_bytes(b"")
    (torchrun / "recipe.yaml").write_text("# the resolved recipe\nname: resnet20-cifar10\n")
    assert latest_run_dir(tmp_path, "resnet20-cifar10") == torchrun
    with pytest.raises(DataError, match="no run of quickstart"):
        latest_run_dir(tmp_path, "quickstart")


def test_the_cuda_graph_step_trains_and_resumes_as_the_plain_one(
    resume_data, uninterrupted, tmp_path, monkeypatch
):
    """train.cuda_graph's static-buffer step (uncaptured on a CPU) changes nothing: an epoch,
    a resume from its checkpoint and a second epoch end bit-identical to the plain run."""
    steps = counted(monkeypatch, GraphedStep, "__call__")
    graphed = tiny_recipe(epochs=1, batch_size=16, cuda_graph=True)
    train(graphed, tmp_path, device="cpu", datasets=resume_data, progress=False)
    longer = apply_overrides(graphed, [("train.epochs", 2)])
    train(longer, tmp_path, resume=tmp_path, device="cpu", datasets=resume_data, progress=False)
    assert_same_state(final_weights(tmp_path, 2), uninterrupted)
    assert steps == [16]  # 8 a run: every step went through GraphedStep


def counted(monkeypatch, owner, name: str) -> list[int]:
    """Count the calls of `owner.name` (still made) in the one-element list returned."""
    calls, real = [0], getattr(owner, name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_a_compiled_model_trains_in_the_cuda_graph_step(resume_data, tmp_path, monkeypatch):
    """train.compile with train.cuda_graph: the compiled forward in the static-buffer step
    (uncaptured on a CPU) trains as the compiled one alone does, and as the eager one up to
    the generated kernels' rounding."""
    weights = {}
    compiles = counted(monkeypatch, torch, "compile")
    steps = counted(monkeypatch, GraphedStep, "__call__")
    for name, compiled, graph in (("eager", False, False), ("compiled", True, False),
                                  ("both", True, True)):
        torch.manual_seed(0)
        recipe = tiny_recipe(epochs=1, batch_size=16, compile=compiled, cuda_graph=graph)
        train(recipe, tmp_path / name, device="cpu", model=SmallConvNet(),
              datasets=resume_data, progress=False)
        weights[name] = final_weights(tmp_path / name, 1)["model"]
    assert compiles == [2] and steps == [8]
    for key, tensor in weights["compiled"].items():
        torch.testing.assert_close(weights["both"][key], tensor, msg=key)
        torch.testing.assert_close(weights["both"][key], weights["eager"][key], rtol=1e-4,
                                   atol=1e-5, msg=key)


def _bn_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(144, 5))


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images, targets = torch.randn(6, 3, 8, 8, generator=generator), torch.arange(6) % 5
    nn.functional.cross_entropy(model(images), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_warm_up_steps_before_a_capture_are_undone_in_place():
    """restored_after: weights, BN statistics and momentum come back, at the same addresses
    (a captured graph holds them), and the next step is the first step it would have been."""
    models = [_bn_net() for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=1e-3) for m in models]
    watched = models[1].state_dict()
    before = {key: tensor.clone() for key, tensor in watched.items()}
    with restored_after(models[1], optimizers[1]):
        for seed in range(3):
            _sgd_step(models[1], optimizers[1], 10 + seed)
        assert not torch.equal(watched["1.running_mean"], before["1.running_mean"])
    for key, tensor in models[1].state_dict().items():
        assert torch.equal(tensor, before[key]), key
        assert tensor.data_ptr() == watched[key].data_ptr(), key
    for model, optimizer in zip(models, optimizers, strict=True):
        _sgd_step(model, optimizer, 0)
    for key, tensor in models[0].state_dict().items():
        assert torch.equal(models[1].state_dict()[key], tensor), key


def test_cuda_graph_refuses_what_it_cannot_capture(resume_data, tmp_path):
    with pytest.raises(ConfigError, match=r"does not combine with train\.accum_steps > 1, "
                                          r"train\.ema_decay"):
        tiny_recipe(cuda_graph=True, accum_steps=2, ema_decay=0.9)
    model = _bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(images, targets):
        loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        return loss.detach(), torch.zeros(())

    graphed = GraphedStep(step, model, optimizer, 4, capture=False)
    for size in (3, 4, 3):  # a short first batch is refused too: it would fix the shape
        if size == 4:
            graphed(torch.randn(4, 3, 8, 8), torch.arange(4))
            continue
        with pytest.raises(DataError, match=r"every batch of 4 images of one size; got a "
                                            r"batch of \(3, 3, 8, 8\)"):
            graphed(torch.randn(size, 3, 8, 8), torch.arange(size))
    with pytest.raises(DataError, match=r"got a batch of \(4, 3, 9, 9\)"):
        graphed(torch.randn(4, 3, 9, 9), torch.arange(4))
    with pytest.raises(ConfigError, match="fused SGD"):
        GraphedStep(step, model, optimizer, 4, capture=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_a_captured_step_replays_what_the_eager_step_computes(resume_data, tmp_path,
                                                              monkeypatch, compiled):
    """On a GPU: ResNet-20's first three steps (the warm-up changing the lr at each) captured
    and replayed against the same steps uncaptured, TF32 off; compiled, against the compiled
    steps uncaptured. Only a few: cuDNN's kernels are not bitwise reproducible, and on an H200
    two eager runs of 16 steps parted by several units in some weights, where after 1 and 2
    steps graph and eager agreed within 1.2e-7. On an H100 (2026-12-06) the two parted by
    more than the tolerance (by how much went unreported): cuDNN's deterministic kernels
    alone now, so that kernels whose sums race (atomics) cannot tell the runs apart."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after each run
    weights = []
    for graph in (False, True):
        recipe = tiny_recipe(epochs=1, batch_size=16, cuda_graph=graph, iterations=3,
                             compile=compiled)
        recipe = apply_overrides(recipe, [("optimizer.base_batch_size", 16)])
        train(recipe, tmp_path / str(graph), device="cuda", datasets=resume_data,
              progress=False)
        assert not torch.backends.cudnn.benchmark
        weights.append(safetensors.torch.load_file(tmp_path / str(graph) / "model.safetensors"))
    for key, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][key], tensor, rtol=1e-4, atol=1e-5,
                                   msg=lambda message, key=key: f"{key}: {message}")
