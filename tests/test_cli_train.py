"""`canon train`, `canon eval`, `canon predict` end to end on the bundled sample (real CIFAR-10
images), with the training cut to a few steps by an iteration limit; undecodable files skipped
or (--strict) refused; TensorBoard events."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import canon
import canon.evaluation.ensemble
from canon.cli import _scales_said, build_parser, main
from canon.data import BadImageWarning, decode_image_file, open_dataset
from canon.data.config import DataConfig
from canon.data.loaders import build_datasets
from canon.data.preprocess import center_transform
from canon.data.views import PROTOCOLS
from canon.engine.checkpoint import CheckpointWarning, load_checkpoint
from canon.engine.rundir import plan_run
from canon.engine.stopping import StoppedAtOnce
from canon.engine.trained import load_trained
from canon.engine.trainer import TrainingInterrupted
from canon.errors import DataError
from canon.files import printable
from canon.recipes import Recipe, load_recipe, parse_yaml


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`canon train` as the README runs it (quickstart, default runs/ directory), then a bare
    `--resume` that raises the iteration limit. The limits count steps of quickstart's
    optimizer.base_batch_size (128), so at batch 64 they make 4 steps of epoch 1's 78, then
    80: the rest of epoch 1 and 2 steps of epoch 2."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["train", "--device", "cpu", "--set", "train.iterations=2"])
        main(["train", "--resume", "--device", "cpu", "--set", "train.iterations=40"])
    return root / "runs" / "quickstart"


def test_train_writes_a_complete_run_directory_and_resumes(trained_run):
    for name in ("recipe.yaml", "metrics.csv", "curves.png", "model.safetensors",
                 "normalization.safetensors", "eval_config.json",
                 "checkpoints/epoch-001.pt", "checkpoints/epoch-002.pt"):
        assert (trained_run / name).is_file(), name
    assert not (trained_run / "checkpoints" / "best.pt").exists()  # it validates on test images
    info = json.loads((trained_run / "eval_config.json").read_text())
    assert info["model"] == "resnet20" and info["steps"] == 80 and len(info["classes"]) == 10
    assert info["class_ids"] == info["classes"]  # the sample's labels are its class names
    rows = list(csv.reader((trained_run / "metrics.csv").open()))
    assert len(rows) == 3  # header + 2
    for value in rows[1] + rows[2]:  # 44.2, not 44.199999999999996
        assert value == f"{float(value):.7g}"
    header = (trained_run / "recipe.yaml").read_text().splitlines()[0]
    assert header.startswith("# the resolved recipe of this run: canon ") and "commit" in header


def test_a_resume_refuses_a_recipe_other_than_the_run_s(trained_run, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(trained_run), "--recipe", "resnet20-cifar10"])
    assert (f"--resume {trained_run} continues a run of quickstart, not of --recipe "
            "resnet20-cifar10: drop --recipe") in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bare --resume of the run that --output-dir names
        main(["train", "--resume", "--output-dir", str(trained_run), "--recipe",
              "resnet20-cifar10"])
    assert (f"the run in {trained_run} continues a run of quickstart, not of --recipe "
            "resnet20-cifar10: drop --recipe") in capsys.readouterr().err


def test_a_checkpoint_outside_a_run_directory_resumes_only_into_an_output_dir(
    trained_run, tmp_path, capsys, monkeypatch
):
    """Its folder (Downloads, say) is no run's: the resumed run's recipe.yaml, metrics.csv and
    export would go over whatever files of those names are there, unasked."""
    loose = tmp_path / "Downloads" / "epoch-002.pt"
    loose.parent.mkdir()
    shutil.copy(trained_run / "checkpoints" / "epoch-002.pt", loose)
    (loose.parent / "metrics.csv").write_text("a user's own\n")
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(loose), "--device", "cpu"])
    assert (f"{loose} is not in a run's checkpoints/ folder, so there is no run directory to "
            "go on in: pass --output-dir DIR") in capsys.readouterr().err
    assert (loose.parent / "metrics.csv").read_text() == "a user's own\n"
    assert sorted(path.name for path in loose.parent.iterdir()) == ["epoch-002.pt", "metrics.csv"]
    with monkeypatch.context() as patch:  # typed from inside a run's checkpoints/: its run
        patch.chdir(trained_run / "checkpoints")
        assert plan_run(None, resume="epoch-002.pt").run_dir == trained_run


def test_eval_names_the_scales_of_the_protocols_that_resize_to_several() -> None:
    assert _scales_said("center", {"scales": [36]}) == ""  # its views record the one scale too
    assert _scales_said("144-crop", {"scales": [256, 288]}) == " at scales 256, 288"
    assert _scales_said("multi-scale+dense", {"scales": [224, 256]}) == " at scales 224, 256"
    assert _scales_said("multi-scale", {"members": []}) == ""  # an ensemble's: its members


def test_eval_prints_errors_and_writes_json(trained_run, tmp_path, capsys):
    main(["eval", str(trained_run), "--protocol", "center", "--batch-size", "250"])
    out = capsys.readouterr().out
    assert "top-1 error" in out and "top-5 error" in out and "at scales" not in out
    result = json.loads((trained_run / "eval-center.json").read_text())
    assert result["images"] == 1000 and result["protocol"] == "center"
    assert 0 <= result["top5_error"] <= result["top1_error"] <= 100
    # The exported model under the run's own preprocessing scores as the last validation did.
    last_epoch = list(csv.DictReader((trained_run / "metrics.csv").open()))[-1]
    assert result["top1_error"] == pytest.approx(float(last_epoch["val_top1_error"]), abs=0.01)

    # On another dataset (some of its classes, as PNGs): a file of its own beside that one.
    _, test_images = open_dataset("sample")
    other = tmp_path / "my photos"
    for index in range(4):
        folder = other / "val" / test_images.classes[test_images.labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test_images.images[index].permute(1, 2, 0).numpy()).save(
            folder / f"{index}.png")
    main(["eval", str(trained_run), "--data", str(other)])
    assert json.loads((trained_run / "eval-center-my_photos.json").read_text())["images"] == 4
    assert json.loads((trained_run / "eval-center.json").read_text())["images"] == 1000
    # Another folder of that name: not written over the first one's result, named instead.
    namesake = tmp_path / "elsewhere" / "my photos"
    shutil.copytree(other, namesake)
    with pytest.raises(SystemExit):
        main(["eval", str(trained_run), "--data", str(namesake)])
    assert (f"eval-center-my_photos.json holds the result on {other}, other images than "
            f"{namesake}: name another file with --output") in capsys.readouterr().err
    # An earlier canon's result, its folder as typed relative to a directory unknown: replaced.
    result = trained_run / "eval-center-my_photos.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "data": "my photos"}))
    main(["eval", str(trained_run), "--data", str(namesake)])
    assert json.loads(result.read_text())["data"] == str(namesake)
    capsys.readouterr()
    scaled = tmp_path / "multi-scale.json"  # scales chosen on the command line, and said
    main(["eval", str(trained_run), "--data", str(other), "--protocol", "multi-scale",
          "--scales", "32", "40", "--output", str(scaled)])
    assert "multi-scale+center at scales 32, 40 on " in capsys.readouterr().out
    assert json.loads(scaled.read_text())["scales"] == [32, 40]

    # A run not exported yet is read from its checkpoints; its result still lands beside them.
    unexported = tmp_path / "unexported"
    shutil.copytree(trained_run, unexported, ignore=shutil.ignore_patterns("eval-*"))
    (unexported / "model.safetensors").unlink()
    main(["eval", str(unexported), "--batch-size", "250"])
    assert json.loads((unexported / "eval-center.json").read_text())["images"] == 1000
    assert not (unexported / "checkpoints" / "eval-center.json").exists()
    # A checkpoint named: its result beside it, named after it, the run's own left as it was.
    own = (unexported / "eval-center.json").read_text()
    for epoch in (1, 2):
        main(["eval", str(unexported / "checkpoints" / f"epoch-00{epoch}.pt"), "--batch-size",
              "250"])
    for epoch in (1, 2):
        result = json.loads((unexported / "checkpoints" / f"eval-center-epoch-00{epoch}.json"
                             ).read_text())
        assert result["checkpoint"].endswith(f"epoch-00{epoch}.pt")
    assert (unexported / "eval-center.json").read_text() == own


def test_torchvision_models_results_are_named_after_them() -> None:
    """Each torchvision:NAME[:WEIGHTS] its own file here, no colon in it."""
    from canon.cli import _default_eval_output

    names = [_default_eval_output(
        SimpleNamespace(protocol="center", sources=[source]),
        [SimpleNamespace(source=Path(source), data=SimpleNamespace(dataset="imagenet"))],
        "/data/imagenette/val").name
        for source in ("torchvision:resnet50", "torchvision:vgg16",
                       "torchvision:resnet50:IMAGENET1K_V1")]
    assert names == ["eval-center-val-torchvision_resnet50.json",
                     "eval-center-val-torchvision_vgg16.json",
                     "eval-center-val-torchvision_resnet50_IMAGENET1K_V1.json"]


def test_a_loaded_model_alone_is_evaluated_with_its_run_s_preprocessing(trained_run):
    """canon.evaluate(trained.model, ...) without preprocess= takes the run's own (the
    sample's mean image), not the model class's eval_config (CIFAR's channel constants)."""
    trained = load_trained(trained_run)
    own = trained.evaluate("sample", device="cpu", batch_size=500, keep_probabilities=True)
    alone = canon.evaluate(trained.model, "sample", batch_size=500, keep_probabilities=True)
    assert torch.equal(alone["probabilities"], own["probabilities"])
    info = json.loads((trained_run / "eval_config.json").read_text())
    assert "eval_config" not in info  # it stated the class's 32/32 and CIFAR constants


def test_predict_prints_top5_class_names_with_probabilities(
    trained_run, tmp_path, capsys, monkeypatch
):
    _, test_images = open_dataset("sample")
    paths = []
    for index in (0, 1):  # the second named in Latin-1, not UTF-8: printed with its byte escaped
        paths.append(tmp_path / os.fsdecode(f"image{index}".encode() + b"\xe9" * index + b".png"))
        Image.fromarray(test_images.images[index].permute(1, 2, 0).numpy()).save(paths[-1])
    main(["predict", str(trained_run / "checkpoints" / "epoch-002.pt"), *map(str, paths),
          "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(paths[0]) and lines[6] == printable(paths[1])
    assert lines[6].endswith("/image1\\xe9.png")  # the byte as an escape, printable anywhere
    assert len(lines) == 12
    main(["predict", str(trained_run / "checkpoints" / "epoch-002.pt"), *map(str, paths),
          "--device", "cpu", "--batch-size", "1"])  # one image at a time: the same output
    assert capsys.readouterr().out.splitlines() == lines
    main(["predict", str(trained_run / "checkpoints" / "epoch-002.pt"), "--device", "cpu",
          str(paths[0]), "--top", "5", str(paths[1])])  # options between the positionals
    assert capsys.readouterr().out.splitlines() == lines
    # Big images are scored in smaller batches: their decoded pixels stay within bounds.
    scored, predict_ensemble = [], canon.evaluation.ensemble.predict_ensemble
    with monkeypatch.context() as patch:
        patch.setattr("canon.cli.PREDICT_PIXELS", 32 * 32)  # one sample image's
        patch.setattr("canon.evaluation.ensemble.predict_ensemble",
                      lambda members, images, top: scored.append(len(images))
                      or predict_ensemble(members, images, top))
        main(["predict", str(trained_run / "checkpoints" / "epoch-002.pt"), *map(str, paths),
              "--device", "cpu"])
    assert scored == [1, 1] and capsys.readouterr().out.splitlines() == lines
    cut = tmp_path / "cut.png"  # a truncated file between the two: skipped, named, counted
    cut.write_bytes(paths[0].read_bytes()[:100])
    with pytest.warns(BadImageWarning, match="cut.png"):
        main(["predict", str(trained_run), str(paths[0]), str(cut), str(paths[1]),
              "--device", "cpu", "--batch-size", "2"])
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == str(paths[0]) and shown[6] == lines[6] and len(shown) == 13
    assert shown[-1].startswith("skipped 1 image file(s), empty, missing or undecodable")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(trained_run), str(cut), "--device", "cpu", "--strict"])
    assert exit_.value.code == 2 and "cut.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_, pytest.warns(BadImageWarning):  # none decoded
        main(["predict", str(trained_run), str(cut), "--device", "cpu"])
    assert exit_.value.code == 2 and "none of the 1 image file(s)" in capsys.readouterr().err
    unfinished = shutil.copytree(trained_run, tmp_path / "unfinished")  # no export yet
    (unfinished / "model.safetensors").unlink()
    main(["predict", str(unfinished), str(paths[0]), "--device", "cpu"])
    assert (f"{unfinished}: no exported model yet; predicting with {unfinished / 'checkpoints'}"
            in capsys.readouterr().err)
    damaged = shutil.copytree(trained_run, tmp_path / "damaged")  # an export, unreadable
    (damaged / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.warns(CheckpointWarning, match="model.safetensors is unreadable"):
        main(["predict", str(damaged), str(paths[0]), "--device", "cpu"])
    assert "no exported model yet" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(unfinished / "model.safetensors"), str(paths[0])])
    assert f"{unfinished / 'model.safetensors'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(trained_run), str(paths[0]), "--batch-size", "0"])
    assert exit_.value.code == 2
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a second model's path mistyped
        main(["predict", str(trained_run), str(tmp_path / "runz"), str(paths[0])])
    assert exit_.value.code == 2 and f"no such file: {tmp_path / 'runz'}" in capsys.readouterr().err
    folder = tmp_path / "photos"  # a folder of images: its files, found recursively, by name
    (folder / "nested").mkdir(parents=True)
    for index, path in enumerate(paths):
        (folder / ("nested" if index else "") / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "._image0.png").write_bytes(b"macOS metadata")  # hidden, as a dataset's are
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "copy.png").write_bytes(paths[0].read_bytes())
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")  # reported, not dropped
    (folder / "album").symlink_to(folder / "nested")  # not followed, but said so
    with (pytest.warns(BadImageWarning, match="gone.png"),
          pytest.warns(BadImageWarning, match=r"album: a link to a folder \(not followed")):
        main(["predict", str(trained_run), str(folder), "--device", "cpu"])
    by_folder = capsys.readouterr().out.splitlines()
    assert by_folder[0] == str(folder / paths[0].name)
    assert by_folder[6] == printable(folder / "nested" / paths[1].name)
    assert by_folder[1:6] + by_folder[7:12] == lines[1:6] + lines[7:]
    assert len(by_folder) == 13 and by_folder[-1].startswith("skipped 1 image file(s)")
    # A subfolder it cannot read (simulated: root reads every folder) is warned of.
    scandir = os.scandir

    def unreadable(place):
        if os.fspath(place) == str(folder / "nested"):
            raise PermissionError(13, "Permission denied", str(place))
        return scandir(place)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", unreadable)
        with pytest.warns(BadImageWarning, match=f"skipping the folder {folder / 'nested'}: "
                                                 "cannot read it"):
            main(["predict", str(trained_run), str(folder), "--device", "cpu"])
        assert len(capsys.readouterr().out.splitlines()) == 7  # image0 alone, and the skip
        with pytest.raises(SystemExit):  # or refused, under --strict
            main(["predict", str(trained_run), str(folder), "--device", "cpu", "--strict"])
        assert f"the folder {folder / 'nested'}: cannot read it" in capsys.readouterr().err
    for arguments, problem in (([str(folder)], "canon predict needs a model: models first"),
                               ([str(trained_run)], "canon predict needs images: models first"),
                               ([str(trained_run), str(folder / "nested" / "none")],
                                "no such file"),
                               ([str(trained_run), str(tmp_path / "runs")], "holds no image"),
                               ([str(trained_run), str(paths[0]), str(trained_run)],
                                f"{trained_run}: a model after the images; name every model")):
        (tmp_path / "runs").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_:
            main(["predict", *arguments, "--device", "cpu"])
        assert exit_.value.code == 2 and problem in capsys.readouterr().err
    probabilities = [float(line.split("%")[0]) for line in lines[1:6]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 100.01
    assert all(line.split("%")[1].strip() in test_images.classes for line in lines[1:6])


def test_an_ensemble_of_two_runs_through_eval_and_predict(
    trained_run, tmp_path, capsys, monkeypatch
):
    """`canon eval A B` reports each model and the mean of their softmax outputs, with
    --per-class a CSV and a confusion matrix; `canon predict A B IMAGE` averages likewise."""
    first = trained_run / "checkpoints" / "epoch-001.pt"
    output = tmp_path / "ensemble.json"
    main(["eval", str(trained_run), str(first), "--per-class", "--output", str(output),
          "--batch-size", "250", "--device", "cpu"])
    result = json.loads(output.read_text())
    assert [m["name"] for m in result["members"]] == [
        str(trained_run / "model.safetensors"), str(first)]
    assert result["images"] == 1000 and "probabilities" not in result
    models = [load_trained(trained_run), load_trained(first)]
    _, test_images = open_dataset("sample")
    batch = [torch.stack([center_transform(m.preprocess)(test_images.load_image(i))
                          for i in range(1000)]) for m in models]
    with torch.inference_mode():
        mean = sum(m.model(x).softmax(1) for m, x in zip(models, batch, strict=True)) / 2
    wrong = (mean.argmax(1) != torch.tensor(test_images.labels)).double().mean().item()
    assert result["top1_error"] == pytest.approx(100 * wrong, abs=1e-6)
    rows = list(csv.DictReader((tmp_path / "ensemble-per-class.csv").open()))
    assert len(rows) == 10 and sum(int(row["images"]) for row in rows) == 1000
    with Image.open(tmp_path / "ensemble-confusion.png") as picture:
        assert min(picture.size) > 200
    # A result written again without --per-class takes the earlier one's report with it.
    main(["eval", str(trained_run), str(first), "--output", str(output), "--batch-size", "250",
          "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ensemble.json"]
    # Files of a user's named alike are neither deleted nor replaced.
    mine = {tmp_path / "mine-per-class.csv": b"my notes\n",
            tmp_path / "mine-confusion.png": b"\x89PNG\r\n\x1a\nmy picture"}
    for path, content in mine.items():
        path.write_bytes(content)
    evaluated = ["eval", str(first), "--output", str(tmp_path / "mine.json"), "--device", "cpu"]
    main(evaluated)
    assert all(path.read_bytes() == content for path, content in mine.items())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*evaluated, "--per-class"])
    assert "mine-per-class.csv exists and is not canon's per-class report" in \
        capsys.readouterr().err
    assert all(path.read_bytes() == content for path, content in mine.items())
    for path in mine:
        path.unlink()
    (tmp_path / "mine.json").unlink()
    # The default output (ensemble-PROTOCOL.json, here) of another ensemble is not replaced.
    monkeypatch.chdir(tmp_path)
    other = {"protocol": "center", "top1_error": 50.0, "data": "sample",
             "sources": ["/runs/a", "/runs/b"]}
    (tmp_path / "ensemble-center.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        main(["eval", str(trained_run), str(first), "--device", "cpu"])
    assert ("ensemble-center.json holds the result of another ensemble (/runs/a, /runs/b): "
            "name another file with --output" in capsys.readouterr().err)
    assert json.loads((tmp_path / "ensemble-center.json").read_text()) == other
    (tmp_path / "ensemble-center.json").unlink()
    # The same ensemble again, named in another order and relative to here: replaced.
    shutil.copy(output, tmp_path / "ensemble-center.json")
    main(["eval", os.path.relpath(first), str(trained_run), "--device", "cpu",
          "--batch-size", "500"])
    assert "wrote ensemble-center.json" in capsys.readouterr().out
    (tmp_path / "ensemble-center.json").unlink()
    path = tmp_path / "image.png"
    Image.fromarray(test_images.images[0].permute(1, 2, 0).numpy()).save(path)
    capsys.readouterr()
    main(["predict", str(trained_run), str(first), str(path), "--top", "1", "--device", "cpu"])
    name, probability = mean[0].max(0).indices.item(), mean[0].max().item()
    assert capsys.readouterr().out.splitlines()[1].split() == [
        f"{probability:.2%}", models[0].classes[name]]


def test_eval_maps_a_folder_s_classes_to_the_model_s_by_name(
    trained_run, image_folder, tmp_path, capsys
):
    subset = tmp_path / "two-classes"  # sorted, its classes would be labels 0 and 1
    for name in ("cat", "truck"):
        shutil.copytree(image_folder / "val" / name, subset / "val" / name)
    main(["eval", str(trained_run), "--data", str(subset), "--output", str(tmp_path / "e")])
    result = json.loads((tmp_path / "e").read_text())
    trained = load_trained(trained_run)
    transform, wrong = center_transform(trained.preprocess), 0
    with torch.inference_mode():
        for name in ("cat", "truck"):
            for path in sorted((subset / "val" / name).glob("*.png")):
                logits = trained.model(transform(decode_image_file(path))[None])
                wrong += int(trained.classes[logits.argmax(1).item()] != name)
    assert result["images"] == 10
    assert result["top1_error"] == pytest.approx(100 * wrong / 10)
    broken = tmp_path / "broken"  # no file decodes: an error, and no JSON of NaNs
    for name in ("cat", "truck"):
        (broken / "val" / name).mkdir(parents=True)
        (broken / "val" / name / "0.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_, pytest.warns(BadImageWarning):
        main(["eval", str(trained_run), "--data", str(broken), "--per-class", "--output",
              str(tmp_path / "broken.json")])
    assert exit_.value.code == 2 and not (tmp_path / "broken.json").exists()
    assert "none of the 2 image file(s) of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_, pytest.warns(BadImageWarning):  # an ensemble's
        main(["eval", str(trained_run), str(trained_run), "--data", str(broken), "--output",
              str(tmp_path / "broken.json")])
    assert exit_.value.code == 2 and "none of the 2 image file(s) of" in capsys.readouterr().err


def test_eval_of_a_run_whose_folder_moved_names_the_way_on(trained_run, tmp_path, capsys):
    """Copied to another machine, or its images moved: not a 'no such folder' for a path the
    user never typed."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    config = json.loads((run / "eval_config.json").read_text())
    config["data"]["dataset"] = str(tmp_path / "moved-away")
    (run / "eval_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--device", "cpu"])
    assert capsys.readouterr().err.endswith(
        f"the run trained on {tmp_path / 'moved-away'}, which is not there any more: if its "
        "images moved, evaluate with --data NEWPATH (the same images, or the same shards)\n")


def test_version_and_a_recipe_shown_with_its_citations(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"canon {canon.__version__}"
    main(["recipes", "show", "resnet110-cifar10"])
    text = capsys.readouterr().out
    lines = text.splitlines()
    lr = next(line for line in lines if line.strip().startswith("lr:"))
    assert lr.split("#")[0].split() == ["lr:", "0.1"]
    assert lr.endswith('# s4.2: "start with a learning rate of 0.1" (_resnet-cifar10.yaml)')
    assert any(line.split() == ["nesterov:", "false", "#", "canon", "default"] for line in lines)
    # What it prints is the resolved recipe itself, as YAML.
    assert Recipe.from_dict(parse_yaml(text)) == load_recipe("resnet110-cifar10")


def test_a_second_run_into_a_run_directory_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--device", "cpu", "--set", "train.iterations=1", "--output-dir", str(run)]
    main(args)
    first = run / "checkpoints" / "epoch-001.pt"
    written = first.stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == written
    main([*args, "--overwrite"])
    out = capsys.readouterr().out
    # quickstart: 5,000 images at batch 64; train.iterations counts steps of batch 128.
    assert "train.iterations 1 -> 2" in out
    assert "1 epoch(s) of 78 steps, stopping at step 2 (train.iterations), 2 steps into " \
        "epoch 1" in out


def test_help_and_the_recipes_need_no_torch():
    """`canon --help`, `canon recipes` and `canon recipes show` answer at once: importing
    torch and torchvision alone takes seconds."""
    code = (
        "import sys\nfrom canon.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "main(['recipes'])\nmain(['recipes', 'show', 'alexnet'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_output_into_a_closed_pipe_stops_quietly():
    """`canon recipes show googlenet | head -1`: the reader goes away; canon stops with the
    shell's status for it (141), not a BrokenPipeError traceback."""
    shown = subprocess.Popen([sys.executable, "-m", "canon", "recipes", "show", "googlenet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shown.stdout.close()  # before canon has written a line
    assert shown.stderr.read() == b"" and shown.wait(timeout=60) == 141


def test_eval_help_lists_every_protocol_evaluate_accepts():
    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    help_text = next(action.help for action in sub._actions if action.dest == "protocol")
    for protocol in PROTOCOLS:
        assert protocol in help_text


def test_visualize_output_help_names_only_the_runs_a_verb_takes():
    """evolution reads a run directory only: its help offers no .pt or torchvision default."""
    visualize = build_parser()._subparsers._group_actions[0].choices["visualize"]
    verbs = visualize._subparsers._group_actions[0].choices
    helps = {name: next(a.help for a in verbs[name]._actions if a.dest == "output_dir")
             for name in ("evolution", "curves", "filters")}
    assert "CHECKPOINT" not in helps["evolution"] and "torchvision" not in helps["evolution"]
    assert "torchvision" not in helps["curves"] and "several RUNs" in helps["curves"]
    assert "filters-CHECKPOINT" in helps["filters"] and "torchvision:NAME" in helps["filters"]


def _leaf_parsers(parser, prog=()):
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield prog, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*prog, name))


def test_a_second_ctrl_c_names_the_checkpoint_left_to_resume_from(tmp_path, monkeypatch, capsys):
    """It stops at once, without interrupted.pt: the last epoch's checkpoint is what is left,
    and without one, nothing (a one-line stop). A first Ctrl-C in set-up, before the stop flag
    is there, lost no steps: a one-line stop too, checkpoints or not."""
    import canon.engine.trainer

    run = tmp_path / "run"
    epoch = run / "checkpoints" / "epoch-001.pt"
    raised = StoppedAtOnce

    def stopped(*args, **kwargs):
        raise raised

    monkeypatch.setattr(canon.engine.trainer, "train", stopped)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output-dir", str(run)])
    assert exit_.value.code == 130 and capsys.readouterr().err.endswith("canon train: stopped\n")
    epoch.parent.mkdir(parents=True)
    epoch.write_bytes(b"")  # a checkpoint of epoch 1, then the second Ctrl-C
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output-dir", str(run)])
    assert exit_.value.code == 130
    assert (f"stopped at once (the steps since it are lost); resume with: canon train --resume "
            f"{run}  ({epoch})") in capsys.readouterr().out
    raised = KeyboardInterrupt  # in set-up: not the run it replaces to resume
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output-dir", str(run), "--overwrite"])
    captured = capsys.readouterr()
    assert exit_.value.code == 130 and "at once" not in captured.out
    assert captured.err.endswith("canon train: stopped\n")


def test_a_stopped_torchrun_run_is_resumed_by_the_same_torchrun_command(
        tmp_path, monkeypatch, capsys):
    """Its checkpoint's steps are of the global batch of as many processes: `canon train
    --resume` alone would be refused."""
    import canon.engine.trainer

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(tmp_path / "interrupted.pt", signal.SIGTERM)

    monkeypatch.setattr(canon.engine.trainer, "train", stopped)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 143
    assert "resume with: the same torchrun command with --resume" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # verbs that would run whole on every process
        main(["eval", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "run it without torchrun" in capsys.readouterr().err


def test_every_verb_takes_its_options_between_its_positionals_and_names_itself_in_errors(
        capsys):
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) > 20
    for verbs, leaf in leaves:
        # argparse raises TypeError where a parser cannot parse intermixed arguments, and
        with contextlib.suppress(SystemExit):  # exits where a required one is missing
            leaf.parse_known_intermixed_args([])
        with pytest.raises(SystemExit) as exit_:
            main([*verbs, "--no-such-option"])
        assert exit_.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith(f"canon {' '.join(verbs)}: error:"), error
    with pytest.raises(SystemExit):
        main(["--no-such-option"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "canon: error: unrecognized arguments: --no-such-option")


def test_bad_input_gets_a_one_line_error(trained_run, tmp_path, capsys):
    features = ["features", str(trained_run), "--data", "sample", "--out",
                str(tmp_path / "f.safetensors")]
    cases = [
        (["train", "--recipe", "resnet5O"], "did you mean"),
        (["train", "--set", "train.epoch=3"], "valid keys"),
        (["train", "--recipe", "alexnet"], "the images are ImageNet's (which canon cannot "
                                            "download): pass --data /path/to/imagenet"),
        (["train", "--data", str(tmp_path / "missing")], "neither sample, cifar10"),
        (["train", "--set", "model.num_classes=5", "--output-dir", str(tmp_path / "nc")],
         "model.num_classes is 5, but the training set has 10 classes (sample)"),
        (["eval", str(tmp_path)], "holds no trained model (no model.safetensors, no epoch "
         "checkpoint in its checkpoints/): name a run directory"),
        (["eval", str(trained_run), "--device", "bogus"], "unknown device 'bogus'"),
        (["predict", str(tmp_path / "mistyped"), str(trained_run / "curves.png")],
         f"no such file: {tmp_path / 'mistyped'} (models first"),
        ([*features, "--device", "meta"], "device 'meta' is not supported"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", str(trained_run), "--device", "cuda"], "no CUDA device"))
    # outputs that would replace a run's weights or a user's file, or cannot be written
    weights = trained_run / "model.safetensors"
    (tmp_path / "afile").write_text("mine")
    (trained_run / "eval-dense.json").write_text("notes")  # where eval's default output goes
    cases += [
        (["eval", str(trained_run), "--protocol", "dense"], "eval-dense.json exists and is not "
         "an evaluation's JSON: choose another --output"),
        (["eval", str(trained_run), "--output", str(weights)], "is not an evaluation's JSON"),
        ([*features[:-1], str(weights)], "is not a features file"),
        ([*features[:-1], str(tmp_path / "f.npy")], "name the file FILE.safetensors"),
        (["eval", str(trained_run), "--output", str(tmp_path)], "is a folder"),
        (["eval", str(trained_run), "--output", str(tmp_path / "afile" / "x.json")],
         "afile is a file, not a folder"),
    ]
    if Path("/proc/self").is_dir():  # a folder nobody writes in, root included (Linux)
        cases.append((["eval", str(trained_run), "--output", "/proc/eval.json"],
                      "--output /proc/eval.json: cannot write in /proc"))
    cases += [  # numbers argparse checks, before any work
        (["eval", str(trained_run), "--workers", "-1"], "--workers: must be at least 0"),
        ([*features, "--batch-size", "0"], "--batch-size: must be at least 1"),
        (["transfer", str(trained_run), "--data", "sample", "--workers", "-2"],
         "--workers: must be at least 0"),
        (["predict", str(trained_run), str(weights), "--top", "0"], "--top: must be at least 1"),
        (["stats", "sample", "--size", "0"], "--size must be a pixel count from 1 to 1024"),
        (["stats", "sample", "--size", "1000000"], "got 1000000"),  # not an allocator's error
    ]
    before = weights.read_bytes()
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert expected in capsys.readouterr().err, argv
    assert weights.read_bytes() == before and (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "nc").exists()
    assert (trained_run / "eval-dense.json").read_text() == "notes"
    (trained_run / "eval-dense.json").unlink()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A small ImageNet-layout tree (train/<class>/*.png, val/<class>/*.png) of sample images."""
    root = tmp_path_factory.mktemp("folder-dataset")
    for split, data, per_class in zip(("train", "val"), open_dataset("sample"), (16, 5),
                                      strict=True):
        written: dict[int, int] = {}
        for index, label in enumerate(data.labels):
            if written.get(label, 0) == per_class:
                continue
            written[label] = written.get(label, 0) + 1
            folder = root / split / data.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            array = data.images[index].permute(1, 2, 0).numpy()
            Image.fromarray(array).save(folder / f"{index:05d}.png")
    return root


def test_a_real_sigterm_then_resume_equals_an_uninterrupted_run(image_folder, tmp_path):
    args = [
        "train", "--data", str(image_folder), "--epochs", "4", "--batch-size", "16",
        "--device", "cpu", "--set", "schedule.kind=step", "--set", "schedule.step_size=1",
    ]
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        [sys.executable, "-m", "canon", *args, "--output-dir", str(stopped)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )
    for line in process.stdout:
        if line.startswith("epoch   1/4"):
            # As SLURM preempts a job: every process of it, the loader workers too. Lands
            # somewhere in epoch 2.
            os.killpg(process.pid, signal.SIGTERM)
            break
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "resume with: canon train --resume" in output
    saved = load_checkpoint(stopped / "checkpoints" / "interrupted.pt")
    assert saved["epoch"] >= 1 and saved["step"] > 10  # 10 steps per epoch
    main([*args, "--resume", str(stopped)])
    main([*args, "--output-dir", str(tmp_path / "straight")])
    resumed = load_checkpoint(stopped / "checkpoints" / "epoch-004.pt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch-004.pt")
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key


def test_loader_workers_start_where_processes_are_spawned(image_folder, tmp_path):
    """Where loader workers are spawned, not forked (macOS, Python 3.14's forkserver, each run
    of `canon reproduce --jobs`), what they are sent is pickled: the run trains as anywhere."""
    code = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
            "from canon.cli import main; main(sys.argv[1:])")
    args = ["train", "--data", str(image_folder), "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "--workers", "1", "--output-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def folder_with_bad_files(image_folder, tmp_path_factory):
    """4 training and 2 test images per class of image_folder, one of each replaced by bytes
    that are no PNG."""
    root = tmp_path_factory.mktemp("bad-files")
    bad = []
    for split, per_class in (("train", 4), ("val", 2)):
        for folder in sorted((image_folder / split).iterdir()):
            for path in sorted(folder.glob("*.png"))[:per_class]:
                target = root / split / folder.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                broken = not bad or bad[-1].parts[-3] != split
                target.write_bytes(b"not a PNG" if broken else path.read_bytes())
                bad += [target] if broken else []
    return root, bad


def test_undecodable_files_are_skipped_and_counted_or_refused_with_strict(
    folder_with_bad_files, trained_run, tmp_path, capsys, monkeypatch
):
    root, (bad_train, bad_val) = folder_with_bad_files
    run = tmp_path / "run"
    train = ["train", "--data", str(root), "--epochs", "1", "--batch-size", "8", "--device",
             "cpu", "--output-dir", str(run)]
    with pytest.warns(BadImageWarning) as warned, monkeypatch.context() as patch:
        patch.chdir(root.parent)  # --data relative to it, recorded whole for eval and resume
        main([*train[:1], "--data", root.name, *train[3:], "--tensorboard"])
    assert load_recipe(run / "recipe.yaml").data.dataset == str(root.resolve())
    named = " ".join(str(warning.message) for warning in warned)
    assert str(bad_train) in named and str(bad_val) in named
    assert "epoch 1: 1 of the 20 validation images could not be decoded" in named
    assert "undecodable skipped: 1 training, 1 validation" in capsys.readouterr().out
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",skipped_images,val_skipped_images") and rows[1].endswith(",1,1")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    evaluate = ["eval", str(trained_run), "--data", str(root), "--output", str(tmp_path / "e")]
    with pytest.warns(BadImageWarning, match=bad_val.name):
        main(evaluate)
    assert "skipped 1 image file(s), empty, missing or undecodable" in capsys.readouterr().out

    stats = ["stats", str(root), "--cache", str(tmp_path / "cache"), "--size", "32"]
    with pytest.warns(BadImageWarning, match=bad_train.name):
        main(stats)  # cached, counting the skipped file: --strict must not pass from it
    with pytest.raises(DataError, match=bad_train.name):  # nor may training's statistics
        build_datasets(DataConfig(dataset=str(root)), root_cache=tmp_path / "cache", strict=True)
    # (in a loader worker too: torch wraps its error in the worker's traceback)
    for argv, bad in (([*train, "--overwrite"], bad_train), (evaluate, bad_val),
                      (stats, bad_train), ([*stats, "--workers", "1", "--refresh"], bad_train)):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--strict"])
        assert exit_.value.code == 2
        printed = capsys.readouterr().err
        error = printed.splitlines()[-1]  # after the progress bar
        assert error.startswith(f"canon {argv[0]}: error: ") and str(bad) in error
        assert "Traceback" not in printed and "Caught DataError" not in printed


def test_a_validation_image_that_stops_a_strict_run_loses_no_training(image_folder, tmp_path,
                                                                      capsys):
    """The epoch it validates is saved, to validate again once the file is mended."""
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    bad = sorted((root / "val").glob("*/*.png"))[0]
    good = bad.read_bytes()
    bad.write_bytes(b"not a PNG")
    run = tmp_path / "run"
    train = ["train", "--data", str(root), "--epochs", "2", "--batch-size", "16", "--device",
             "cpu", "--strict", "--output-dir", str(run)]
    with pytest.raises(SystemExit):
        main(train)
    error = capsys.readouterr().err.splitlines()[-1]
    assert str(bad) in error and "the 10 steps before it are saved in" in error
    saved = load_checkpoint(run / "checkpoints" / "interrupted.pt")
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (0, 10, 10)
    bad.write_bytes(good)
    main(["train", "--resume", str(run), "--device", "cpu", "--strict"])
    assert "resuming at epoch 0 + 10 steps" in capsys.readouterr().out
    assert [row.split(",")[0] for row in (run / "metrics.csv").read_text().splitlines()[1:]] \
        == ["1", "2"]


def test_a_run_whose_folder_moved_is_told_to_resume_with_data(quickstart_run, tmp_path,
                                                             capsys):
    """A journey found the bare 'neither sample, cifar10, cifar100 nor an existing folder'
    for the folder the checkpoint recorded: it names the way on."""
    run = tmp_path / "run"
    shutil.copytree(quickstart_run, run)
    newest = run / "checkpoints" / "epoch-002.pt"
    state = load_checkpoint(newest)
    state["recipe"]["data"]["dataset"] = str(tmp_path / "moved-away")
    torch.save(state, newest)
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(run), "--epochs", "3", "--device", "cpu"])
    assert capsys.readouterr().err.endswith(
        f"the run trained on {tmp_path / 'moved-away'}, which is not there any more: if its "
        "images moved, resume with --data NEWPATH (the same images, or the same shards)\n")


def test_a_run_that_cannot_start_reads_no_data_and_leaves_no_directory(
    image_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("CANON_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train = ["train", "--data", str(image_folder), "--device", "cpu", "--output-dir", str(run)]
    with pytest.raises(SystemExit):
        main([*train, "--model", "nosuch"])
    assert "unknown model 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # which would win is not for canon to guess
        main([*train, "--epochs", "1", "--set", "train.iterations=100"])
    assert "--epochs 1 replaces the iteration limit" in capsys.readouterr().err
    for given in ("optimizer.lr=0.2", "optimizer={lr: 0.2}"):  # a mapping's key too
        with pytest.raises(SystemExit):
            main([*train, "--lr", "0.1", "--set", given])
        assert ("--lr and --set optimizer.lr=... both set optimizer.lr: pass one of them"
                in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main([*train, "--epochs", "1", "--set", "train={iterations: 100}"])
    assert "--epochs 1 replaces the iteration limit" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a thousand loader processes on a few cores stall
        main([*train, "--workers", "1000"])
    assert "train.workers 1000: this process has" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # found at the first step once, after a statistics pass
        main([*train, "--recipe", "vgg11", "--set", "data.crop_size=112"])
    assert "data.crop_size 112: vgg11 takes inputs of 224 px" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*train, "--set", "model.options={shortcut: A, widths: [8, 8]}"])
    assert "model.options {'shortcut': 'A', 'widths': [8, 8]} do not fit" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an option the builder takes, given a value it cannot
        main([*train, "--model", "zfnet", "--set", "model.options.widths=5"])
    assert "model.options {'widths': 5} do not fit zfnet's builder" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
        with pytest.raises(SystemExit):
            main([*train, "--tensorboard"])
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not run.exists() and not (tmp_path / "cache").exists()  # no statistics computed


def test_a_training_split_of_undecodable_files_is_a_data_error_naming_it(
    image_folder, tmp_path, capsys, monkeypatch
):
    """Whether statistics are computed first (the quickstart's per-pixel mean) or not (a
    published mean), a training split none of whose files decodes stops with its name."""
    monkeypatch.setenv("CANON_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "broken"
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for index in range(2):
            (root / "train" / name / f"{index}.jpg").write_text("not a JPEG")
        (root / "val" / name).mkdir(parents=True)
        shutil.copy(next((image_folder / "val").glob("*/*.png")), root / "val" / name)
    train = ["train", "--data", str(root), "--epochs", "1", "--batch-size", "2", "--device",
             "cpu", "--output-dir", str(tmp_path / "run")]
    for extra, expected in (([], f"no decodable images to compute statistics from in "
                                 f"{root / 'train'}"),
                            (["--set", "data.mean=imagenet", "--overwrite"],
                             f"no training image of {root} could be decoded in epoch 1")):
        with pytest.warns(BadImageWarning), pytest.raises(SystemExit) as exit_:
            main([*train, *extra])
        assert exit_.value.code == 2
        assert expected in capsys.readouterr().err.splitlines()[-1]


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(
    image_folder, trained_run, tmp_path, capsys
):
    """--overwrite onto a finished run, with a training folder none of whose files decodes:
    the new run fails in its first epoch, and the earlier run is back as it was. A new run
    that gets going replaces it for good."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / "train" / name).mkdir(parents=True)
        (broken / "train" / name / "0.jpg").write_text("not a JPEG")
        (broken / "val" / name).mkdir(parents=True)
        shutil.copy(next((image_folder / "val").glob("*/*.png")), broken / "val" / name)
    train = ["train", "--batch-size", "2", "--device", "cpu", "--output-dir", str(run),
             "--overwrite", "--set", "data.mean=imagenet", "--set", "train.epochs=1"]
    with pytest.warns(BadImageWarning), pytest.raises(SystemExit):
        main([*train, "--data", str(broken)])
    assert "could be decoded in epoch 1" in capsys.readouterr().err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
    main([*train, "--data", str(image_folder), "--set", "train.iterations=1"])
    assert not (run / ".replaced-run").exists()
    assert load_recipe(run / "recipe.yaml").data.dataset == str(image_folder)
