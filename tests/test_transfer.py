"""Starting from trained weights: --init-from, the linear probe, fine-tuning's per-group rates
and frozen stages, and features export, on real training runs and real PNG folders."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image
from sample_subsets import spread_subsets

import canon
import canon.engine.optimization
import canon.transfer.runs
from canon.cli import main
from canon.data import build_datasets
from canon.data.datasets import load_sample, open_dataset, open_split
from canon.data.labeled import LabeledImages
from canon.data.normalize import stored_normalization
from canon.engine.freezing import freeze_stages, frozen_stage_count
from canon.engine.initialize import copy_matching, initialize_from
from canon.engine.optimization import make_optimizer
from canon.engine.schedules import LearningRateSchedule
from canon.engine.trainer import clamp_filter_rms
from canon.errors import ConfigError, DataError
from canon.recipes.schema import OptimizerSection, ScheduleSection
from canon.transfer.features import Features, extract_features, features_fingerprint
from canon.transfer.probe import fit_logistic_regression, train_linear_probe
from canon.transfer.runs import finetune_recipe, linear_probe, transfer

SOURCE_CLASSES, TARGET_CLASSES = range(5), range(5, 10)


def write_png_folder(
    root: Path, cifar: dict[str, LabeledImages], classes: range, per_class: dict[str, int]
) -> Path:
    """CIFAR-10 images of `classes` as PNG files in the ImageNet layout: train/<class>/ and
    val/<class>/ (from CIFAR's training and test splits)."""
    for split, images in cifar.items():
        counts = dict.fromkeys(classes, 0)
        for index, label in enumerate(images.labels):
            if label in counts and counts[label] < per_class[split]:
                folder = root / split / images.classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                pixels = images.load_image(index).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.png")
                counts[label] += 1
    return root


@pytest.fixture(scope="module")
def folders(cifar10_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(five CIFAR-10 classes to train on, the other five to transfer to), as PNG folders."""
    root = tmp_path_factory.mktemp("transfer")
    train, test = open_dataset(str(cifar10_root), download=False)
    cifar = {"train": train, "val": test}
    source = write_png_folder(root / "source", cifar, SOURCE_CLASSES,
                              {"train": 250, "val": 100})
    target = write_png_folder(root / "target", cifar, TARGET_CLASSES,
                              {"train": 200, "val": 100})
    return source, target


@pytest.fixture(scope="module")
def source_run(folders, tmp_path_factory) -> Path:
    """ResNet-20 trained for three epochs on the five source classes (1,250 PNGs): its probe's error
    is 11 points below a random backbone's (16 with 3,000 PNGs); the test asks for 5."""
    out = tmp_path_factory.mktemp("runs") / "source"
    recipe = canon.load_recipe("quickstart", [
        f"data.dataset={folders[0]}", "train.epochs=3", "data.mean=channel",
        "train.keep_epochs=[1]", "train.keep_checkpoints=1",
    ])
    canon.train(recipe, out, device="cpu", progress=False)
    return out


def test_a_trained_backbone_transfers_better_than_a_random_one(
    folders, source_run, tmp_path, monkeypatch
):
    """The linear probe on features learnt from five CIFAR classes beats the probe on a randomly
    initialised ResNet-20 for the other five; the backbone stays bit-identical."""
    monkeypatch.chdir(folders[1].parent)  # a relative --data is recorded as the folder it is
    trained_probe = linear_probe(os.path.relpath(source_run), folders[1].name,
                                 tmp_path / "trained", device="cpu", progress=False)
    canon.train(canon.load_recipe("quickstart", [
        f"data.dataset={folders[0]}", "train.iterations=1", "optimizer.lr=1e-12",
    ]), tmp_path / "random", device="cpu", progress=False)
    random_source = tmp_path / "random" / "checkpoints" / "epoch-001.pt"
    random_probe = linear_probe(str(random_source), folders[1], tmp_path / "untrained",
                                device="cpu", progress=False)
    learnt = json.loads((trained_probe / "probe.json").read_text())
    chance = json.loads((random_probe / "probe.json").read_text())
    assert learnt["val_images"] == chance["val_images"] == 500
    assert learnt["data"] == str(folders[1].resolve())
    assert learnt["source"] == str(source_run / "model.safetensors")  # where it is, not relative
    assert learnt["top1_error"] < chance["top1_error"] - 5, (learnt, chance)

    before = canon.load_trained(source_run).model.state_dict()
    after = safetensors.torch.load_file(trained_probe / "model.safetensors")
    assert after["fc.weight"].shape == (5, 64)
    for name, tensor in before.items():
        if not name.startswith("fc."):
            assert torch.equal(after[name], tensor), name
    # an ordinary run directory: evaluation gives the probe's own error on the same images
    result = canon.load_trained(trained_probe).evaluate(device="cpu")
    assert result["images"] == 500
    assert result["top1_error"] == pytest.approx(learnt["top1_error"], abs=0.21)


def test_the_probe_chooses_l2_on_held_out_training_features():
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 2
    labels = torch.arange(300) % 3
    features = centers[labels] + torch.randn(300, 16)
    result = train_linear_probe(features, labels, 3, grid=(100.0, 1e-2))
    assert [row["l2"] for row in result.search] == [100.0, 1e-2]
    errors = [row["val_top1_error"] for row in result.search]
    assert result.l2 == result.search[errors.index(min(errors))]["l2"]  # ties: the stronger
    assert result.classifier.errors(features, labels)["top1_error"] < 5
    # The refit on all features takes the search's path to its strength (warm starts): from
    # zero, 150 iterations left weak strengths far from their optimum on real features. Here
    # on features where the weaker strength wins.
    torch.manual_seed(0)
    closer = torch.randn(3, 16)[labels] * 0.3 + torch.randn(300, 16)
    weak = train_linear_probe(closer, labels, 3, grid=(100.0, 1e-2))
    assert weak.l2 == 1e-2
    path = fit_logistic_regression(closer, labels, 3, 100.0)
    path = fit_logistic_regression(closer, labels, 3, 1e-2, start=path)
    assert torch.equal(weak.classifier.weight, path.weight)
    # the fit minimises its objective: no small step lowers it
    classifier = fit_logistic_regression(features, labels, 3, l2=0.1)

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> float:
        """Mean cross-entropy + l2/2 |W|^2, W the weights on standardised features."""
        standardised_weight = weight * features.std(0)
        logits = features @ weight.T + bias
        return float(torch.nn.functional.cross_entropy(logits, labels)
                     + 0.05 * standardised_weight.pow(2).sum())

    best = objective(classifier.weight, classifier.bias)
    for _ in range(5):
        nudge = 1e-2 * torch.randn_like(classifier.weight)
        assert objective(classifier.weight + nudge, classifier.bias) >= best - 1e-6


def test_init_from_copies_exactly_the_requested_layers(source_run, tmp_path, capsys):
    source = canon.load_trained(source_run).model.state_dict()
    model = canon.create_model("resnet20", num_classes=7)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = initialize_from(model, str(source_run), ("conv1", "conv2_x.0.*"))
    for name, tensor in model.state_dict().items():
        asked = name.startswith(("conv1.", "conv2_x.0."))
        assert torch.equal(tensor, source[name] if asked else fresh[name]), name
        assert (name in report.copied) == asked
        if not asked:
            assert report.kept[name] == "not in model.init_layers"
    with pytest.raises(ConfigError, match=r"fc.*\(5, 64\) in .* and \(7, 64\)"):
        initialize_from(canon.create_model("resnet20", num_classes=7), str(source_run), ("fc",))
    with pytest.raises(ConfigError, match=r"\['conv9'\] name no layer"):
        copy_matching(model, source, "x", ("conv9",))

    # a whole run: all tensors but the classifier of other classes, logged and written
    out = tmp_path / "init"
    main(["train", "--init-from", str(source_run), "--data", "sample", "--output-dir", str(out),
          "--device", "cpu", "--set", "train.iterations=1", "--set", "model.num_classes=10"])
    log = capsys.readouterr().out
    assert f"init_from {source_run}" in log
    assert "kept fc.weight: the classifier of other classes" in log
    written = json.loads((out / "init_from.json").read_text())
    assert set(written["kept"]) == {"fc.weight", "fc.bias"}
    assert len(written["copied"]) == len(source) - 2
    assert "init_from:" in (out / "recipe.yaml").read_text()


def test_init_from_a_network_of_another_kind_is_no_silent_fresh_start():
    """A source of which nothing fits (a ResNet's weights into a VGG) would leave the run
    training from scratch; a layer init_layers asks for must be in the source; a deeper
    source's extra blocks are named as unused, not passed over."""
    vgg = canon.create_model("vgg11", num_classes=10)
    resnet = canon.create_model("resnet20", num_classes=10).state_dict()
    with pytest.raises(ConfigError, match=r"init_from x copies nothing into VGG \(tensors "
                                          r"absent from the source: \d+\): is it a network"):
        copy_matching(vgg, resnet, "x")
    with pytest.raises(ConfigError, match=r"asks for features.conv1.conv1_1.weight, which x "
                                          r"does not hold; leave it out of init_layers"):
        copy_matching(vgg, resnet, "x", ("features.conv1.conv1_1",))
    deeper = canon.create_model("resnet32", num_classes=10).state_dict()
    report = copy_matching(canon.create_model("resnet20", num_classes=10), deeper, "x",
                           source_model="resnet32")
    assert len(report.copied) == len(resnet) and not report.kept
    assert report.unused and all(name.split(".")[1] in "345" for name in report.unused)
    assert report.summary().startswith(
        f"init_from x (a resnet32): copied {len(resnet)} tensors, 0 keep their fresh "
        f"initialisation; {len(report.unused)} of the source's have no place here")


def test_keep_epochs_keeps_those_checkpoints(source_run):
    kept = sorted(p.name for p in (source_run / "checkpoints").glob("epoch-*.pt"))
    assert kept == ["epoch-001.pt", "epoch-003.pt"]  # keep_checkpoints=1, plus keep_epochs [1]


def test_finetuning_moves_the_backbone_at_its_scaled_rate():
    """One SGD step (no momentum or decay): each parameter moves by -lr x its group's scale x
    its gradient; the classifier at the full lr, the rest at backbone_lr_scale of it."""
    torch.manual_seed(0)
    model = canon.create_model("resnet20", num_classes=5)
    config = OptimizerSection(lr=0.5, momentum=0, weight_decay=0, backbone_lr_scale=0.1,
                              scale_lr=False)
    optimizer, peak = make_optimizer(model, config, 128)
    LearningRateSchedule(optimizer, ScheduleSection(), peak_lr=peak, base_lr=0.5,
                         steps_per_epoch=1, total_steps=1).apply(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 3, 32, 32)).logsumexp(1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, parameter in model.named_parameters():
        rate = 0.5 if name.startswith("fc.") else 0.05
        torch.testing.assert_close(parameter.detach(), before[name] - rate * grads[name])


def test_googlenet_s_auxiliary_classifiers_are_classifiers_in_transfer():
    """Their last layers score the classes as fc does: not copied from a source of other
    classes, and trained at the classifier's rate, not the backbone's."""
    source = canon.create_model("googlenet", num_classes=10).state_dict()
    model = canon.create_model("googlenet", num_classes=10)
    report = copy_matching(model, source, "x", same_classes=False)
    fresh = {name for name, why in report.kept.items() if why == "the classifier of other classes"}
    assert fresh == {f"{head}.{p}" for head in ("fc", "aux1.fc2", "aux2.fc2")
                     for p in ("weight", "bias")}
    config = OptimizerSection(backbone_lr_scale=0.1)
    groups = make_optimizer(model, config, 256)[0].param_groups
    at_full_rate = {id(p) for group in groups if group["lr_scale"] == 1 for p in group["params"]}
    assert at_full_rate == {id(p) for name, p in model.named_parameters()
                            if name.startswith(("fc.", "aux1.fc2.", "aux2.fc2."))}


def test_zfnet_s_filter_clamp_leaves_frozen_filters_as_they_are():
    model = canon.create_model("resnet20")
    frozen = freeze_stages(model, 2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(100)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    clamp_filter_rms(model, 0.1, frozen)
    frozen_ids = {id(p) for p in frozen}
    for name, parameter in model.named_parameters():
        if parameter.dim() == 4:  # a convolution's filters
            rms = parameter.detach().pow(2).mean((1, 2, 3)).sqrt()
            if id(parameter) in frozen_ids:
                assert torch.equal(parameter, before[name]), name
            else:
                assert rms.max() <= 0.1 + 1e-6, name


def test_frozen_stages_unfreeze_one_by_one():
    recipe = canon.load_recipe("quickstart", ["model.frozen_stages=3",
                                              "train.unfreeze_every_epochs=2"])
    assert [frozen_stage_count(recipe, epoch) for epoch in range(8)] == [3, 3, 2, 2, 1, 1, 0, 0]
    model = canon.create_model("resnet20").train()
    frozen = freeze_stages(model, 2)
    stages = dict(model.stages)
    assert not any(m.training for m in stages["conv1"].modules())
    assert all(m.training for m in stages["conv3_x"].modules())
    assert {id(p) for p in frozen} == {
        id(p) for name in list(stages)[:2] for p in stages[name].parameters()}
    with pytest.raises(ConfigError, match=r"frozen_stages is 9.*4 stages"):
        freeze_stages(model, 9)


def test_too_many_frozen_stages_stop_a_run_before_it_reads_data(tmp_path):
    """Checked with the recipe, not at the first epoch: no statistics computed, no weights
    copied, no folder made."""
    with pytest.raises(ConfigError, match=r"frozen_stages is 9, but CifarResNet has 4 stages"):
        canon.train(canon.load_recipe("quickstart", ["model.frozen_stages=9"]), tmp_path / "run",
                    device="cpu")
    assert not (tmp_path / "run").exists()


def test_a_stage_unfrozen_after_the_first_step_trains_with_gpu_optimizer_settings(
    tmp_path, monkeypatch
):
    """On GPUs SGD runs fused; its kernel fails on a group whose parameters have momentum
    buffers but for those of a stage just unfrozen. CPU parameters taken for GPU ones here
    (torch's fused SGD runs on CPUs too)."""
    monkeypatch.setattr(canon.engine.optimization, "all_on_cuda", lambda model: True)
    recipe = canon.load_recipe("quickstart", [
        "model.frozen_stages=1", "train.unfreeze_every_epochs=1", "train.epochs=2",
        "train.iterations=null", "data.val_split=0"])
    data = spread_subsets(build_datasets(recipe.data), 64, 32)
    result = canon.train(recipe, tmp_path, device="cpu", datasets=data, progress=False)
    assert [row["epoch"] for row in result.metrics] == [1, 2]
    assert canon.engine.optimization.fused_sgd(canon.create_model("resnet20"), frozen_stages=0)


def test_a_source_s_normalisation_is_read_from_any_of_its_files(source_run, tmp_path):
    """data.normalization_from takes what `canon transfer` takes as a source."""
    expected = stored_normalization(source_run)
    checkpoint = sorted((source_run / "checkpoints").glob("*.pt"))[-1]
    renamed = shutil.copy(checkpoint, tmp_path / "source.pth")  # load_trained reads it too
    for source in (source_run / "model.safetensors", source_run / "normalization.safetensors",
                   checkpoint, renamed):
        read = stored_normalization(source)
        assert torch.equal(read.mean, expected.mean) and torch.equal(read.std, expected.std)
    with pytest.raises(DataError, match=rf"readable from {tmp_path}/normalization.safetensors "
                                        r".*set data.normalization_from to null"):
        stored_normalization(tmp_path)
    # Another export's normalisation copied beside the model: refused, not read as its own.
    copied = shutil.copytree(source_run, tmp_path / "copied",
                             ignore=shutil.ignore_patterns("checkpoints"))
    stored = safetensors.torch.load_file(copied / "normalization.safetensors")
    safetensors.torch.save_file(stored, copied / "normalization.safetensors",
                                metadata={"canon_export": "0" * 32})
    for source in (copied, copied / "model.safetensors"):
        with pytest.raises(DataError, match=r"normalization\.safetensors was not exported with "
                                            r".*model\.safetensors \(another export's file"):
            stored_normalization(source)
    safetensors.torch.save_file(stored, copied / "normalization.safetensors")  # no id: read
    assert torch.equal(stored_normalization(copied).mean, expected.mean)


def test_fine_tuning_normalises_as_its_source_unless_told_otherwise(source_run, folders):
    """By the source's stored statistics, not the target's; a --set of the normalisation
    holds (it was recorded in recipe.yaml yet the stored statistics used)."""
    trained, target = canon.load_trained(source_run), str(folders[1])
    recipe = finetune_recipe(trained, str(source_run), target)
    assert recipe.data.normalization_from == str((source_run / "model.safetensors").resolve())
    assert (trained.data.mean, trained.data.divide_std) == ("channel", True)
    for told in (["data.mean=imagenet"], ["data.divide_std=false", "data.pixel_scale=255"],
                 ["data.normalization_from=null"]):
        recipe = finetune_recipe(trained, str(source_run), target, told)
        assert recipe.data.normalization_from is None, told
    assert finetune_recipe(trained, str(source_run), target, ["data.mean=imagenet"]
                           ).data.mean == "imagenet"


def test_a_resume_reads_the_normalisation_it_started_with_from_its_checkpoint(monkeypatch):
    """The value the run started with: from the checkpoint resumed (the source may be gone);
    another, set on resuming, as set."""
    from canon.engine import setup
    from canon.engine.distributed import DistributedContext

    asked = []
    monkeypatch.setattr(setup, "build_datasets", lambda data, **options: asked.append(
        data.normalization_from))
    checkpoint = "/runs/finetune/checkpoints/epoch-002.pt"
    state = {"resumed_from": checkpoint, "recipe": {"data": {"normalization_from": "/runs/a"}}}
    for resumed_with in ("/runs/a", "/runs/b"):
        recipe = canon.load_recipe("quickstart", [f"data.normalization_from={resumed_with}"])
        setup._build_datasets(recipe, DistributedContext(0, 0, 1, torch.device("cpu")), state)
    assert asked == [checkpoint, "/runs/b"]


def test_finetune_and_features_through_the_cli(
    folders, source_run, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "finetuned"
    source_run = shutil.copytree(source_run, tmp_path / "source")  # deleted before the resume
    monkeypatch.chdir(folders[1].parent)
    main(["transfer", os.path.relpath(source_run), "--data", folders[1].name, "--mode",
          "finetune", "--output-dir", str(out), "--device", "cpu", "--set",
          "train.iterations=2", "--set", "model.frozen_stages=2", "--batch-size", "32"])
    # the same number of classes, but others: the classifier starts afresh
    assert "kept fc.weight: the classifier of other classes" in capsys.readouterr().out
    recipe = (out / "recipe.yaml").read_text()
    assert f"init_from: {source_run}" in recipe and "backbone_lr_scale: 0.1" in recipe
    assert "batch_size: 32" in recipe  # --batch-size is fine-tuning's train.batch_size
    assert f"dataset: {folders[1].resolve()}" in recipe  # --data as the folder it named
    # normalised by the source's channel mean, not by the five new classes' own
    assert f"normalization_from: {(source_run / 'model.safetensors').resolve()}" in recipe
    theirs = safetensors.torch.load_file(source_run / "normalization.safetensors")
    ours = safetensors.torch.load_file(out / "normalization.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    finetuned = safetensors.torch.load_file(out / "model.safetensors")
    source = canon.load_trained(source_run).model.state_dict()
    # the two frozen stages kept the source's weights and BN statistics exactly
    for name in source:
        if name.startswith(("conv1.", "conv2_x.")):
            assert torch.equal(finetuned[name], source[name]), name
    assert not torch.equal(finetuned["conv4_x.2.conv2.weight"], source["conv4_x.2.conv2.weight"])
    # Its data recorded whole, it resumes from any directory; its normalisation, the source's,
    # comes from its own checkpoint: the source may be gone.
    shutil.rmtree(source_run)
    monkeypatch.chdir(tmp_path)
    main(["train", "--resume", str(out), "--set", "train.iterations=3", "--device", "cpu"])
    resumed = capsys.readouterr().out
    assert "resuming at epoch 0 + 16 steps" in resumed and f"done: {out}" in resumed

    features_file = tmp_path / "val.safetensors"
    monkeypatch.chdir(folders[1].parent)
    main(["features", str(out), "--data", folders[1].name, "--split", "val",
          "--out", str(features_file), "--device", "cpu"])
    features = Features.load(features_file)
    assert features.data == f"{folders[1].resolve()} val"  # the folder it named, whole
    assert features.features.shape == (500, 64) and features.labels.bincount().tolist() == [100] * 5
    assert features.classes == ["dog", "frog", "horse", "ship", "truck"]
    direct = extract_features(canon.load_trained(out), open_split(str(folders[1]), "val"), "x")
    assert torch.equal(direct.features, features.features)

    # val without the training split's first class: labels still index the training classes
    partial = tmp_path / "partial"
    shutil.copytree(folders[1], partial)
    shutil.rmtree(partial / "val" / "dog")
    main(["features", str(out), "--data", str(partial), "--split", "val",
          "--out", str(features_file), "--device", "cpu"])
    features = Features.load(features_file)
    assert features.classes == ["dog", "frog", "horse", "ship", "truck"]
    assert features.labels.bincount().tolist() == [0] + [100] * 4


def test_a_fine_tuning_stopped_by_a_signal_says_how_to_go_on(
    folders, source_run, tmp_path, capsys, monkeypatch
):
    """As canon train's: the state saved, the command to resume it, the signal's exit status
    (it was a traceback and status 1)."""
    trainer = canon.transfer.runs.train

    def terminated_after_a_step(*args, **options):
        return trainer(*args, **options, on_step=lambda step: signal.raise_signal(signal.SIGTERM))

    monkeypatch.setattr(canon.transfer.runs, "train", terminated_after_a_step)
    out = tmp_path / "finetuned"
    with pytest.raises(SystemExit) as exit_:
        main(["transfer", str(source_run), "--data", str(folders[1]), "--mode", "finetune",
              "--output-dir", str(out), "--device", "cpu", "--batch-size", "32"])
    assert exit_.value.code == 128 + signal.SIGTERM
    interrupted = out / "checkpoints" / "interrupted.pt"
    assert (f"stopped; resume with: canon train --resume {out}  ({interrupted})"
            in capsys.readouterr().out)
    assert interrupted.is_file()


def test_bad_transfer_inputs_are_named_and_lose_nothing(tmp_path):
    """A missing init_from is refused before any data is read or directory made; a truncated
    features file is a DataError naming it; an unknown split or mode names the valid ones."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"model.init_from .*nowhere does not exist"):
        canon.train(canon.load_recipe("quickstart", [f"model.init_from={tmp_path / 'nowhere'}"]),
                    out, device="cpu", progress=False)
    assert not out.exists()
    features = Features(torch.rand(4, 3), torch.arange(4), list("abcd"), list("abcd"), "s", "d")
    path = tmp_path / "f.safetensors"
    features.save(path)
    assert torch.equal(Features.load(path).features, features.features)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=str(path)):
        Features.load(path)
    with pytest.raises(ConfigError, match="split must be 'train' or 'val', got 'test'"):
        open_split("sample", "test")
    with pytest.raises(ConfigError, match="--mode must be one of linear-probe, finetune"):
        transfer("x", "sample", "probe", tmp_path / "t")
    for given in ("train.workers=2", ("train.workers", 2)):  # as --set, or as a pair
        with pytest.raises(ConfigError, match=r"--workers and --set train.workers=\.\.\. both"):
            transfer("x", "sample", "finetune", tmp_path / "t", workers=1, overrides=[given])
    assert not (tmp_path / "t").exists()


def test_the_probe_labels_validation_by_the_training_classes(folders, source_run, tmp_path,
                                                             monkeypatch):
    """A validation split lacking one of the training classes is labelled by the training
    split's classes, which the probe's outputs follow: its error is the one `canon eval` gives
    (which matches classes by name)."""
    data = tmp_path / "data"
    shutil.copytree(folders[1], data)
    shutil.rmtree(data / "val" / "frog")
    out = linear_probe(str(source_run), data, tmp_path / "probe", device="cpu", progress=False)
    val = Features.load(out / "features" / "val.safetensors")
    train = Features.load(out / "features" / "train.safetensors")
    assert val.class_ids == train.class_ids == ["dog", "frog", "horse", "ship", "truck"]
    assert val.labels.bincount(minlength=5).tolist() == [100, 0, 100, 100, 100]
    probe = json.loads((out / "probe.json").read_text())
    result = canon.load_trained(out).evaluate(device="cpu")
    assert result["images"] == probe["val_images"] == 400
    assert result["top1_error"] == pytest.approx(probe["top1_error"], abs=0.26)
    # a validation class the training split lacks: refused before any features are extracted
    shutil.copytree(data / "val" / "ship", data / "val" / "plane")
    with monkeypatch.context() as patched:
        patched.setattr("canon.transfer.runs.extract_features",
                        lambda *args, **kwargs: pytest.fail("features extracted first"))
        with pytest.raises(DataError, match=r"val: class\(es\) plane are not among the 5"):
            linear_probe(str(source_run), data, tmp_path / "probe2", device="cpu",
                         progress=False)


def test_the_feature_cache_follows_the_weights(folders, source_run, tmp_path, monkeypatch):
    """Re-probing with --overwrite reads the cached features only while the source's weights
    are the same: a source retrained at the same path has its features extracted again."""
    source = tmp_path / "source"
    shutil.copytree(source_run, source, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "probe"
    linear_probe(str(source), folders[1], out, device="cpu", progress=False)
    first = Features.load(out / "features" / "train.safetensors")

    def extract_again(*args, **kwargs):
        raise AssertionError("features extracted again from the same weights")

    killed = out / "features" / ".train.safetensors.ab12cd34"  # a probe killed mid-write
    killed.write_bytes(b"half of a big file")
    with monkeypatch.context() as patched:
        patched.setattr("canon.transfer.runs.extract_features", extract_again)
        linear_probe(str(source), folders[1], out, overwrite=True, device="cpu", progress=False)
    assert not killed.exists()
    weights = safetensors.torch.load_file(source / "model.safetensors")
    first_conv = next(name for name, tensor in weights.items() if tensor.dim() == 4)
    weights[first_conv] *= 2
    with safetensors.safe_open(source / "model.safetensors", "pt") as exported:
        tag = exported.metadata()  # its export's id: the same run's weights, retrained
    safetensors.torch.save_file(weights, source / "model.safetensors", metadata=tag)
    linear_probe(str(source), folders[1], out, overwrite=True, device="cpu", progress=False)
    second = Features.load(out / "features" / "train.safetensors")
    assert second.fingerprint != first.fingerprint
    assert not torch.equal(second.features, first.features)
    # A damaged cache file (a disk filled up, an editor) is computed again, with a warning.
    cached, damaged = out / "features" / "train.safetensors", tmp_path / "damaged"
    damaged.write_bytes(cached.read_bytes()[:1000])
    damaged.replace(cached)  # a new file: `second` still maps the old one's bytes
    with pytest.warns(UserWarning, match=r"train.safetensors.*; extracting the features again"):
        linear_probe(str(source), folders[1], out, overwrite=True, device="cpu", progress=False)
    assert torch.equal(Features.load(cached).features, second.features)


def test_the_feature_cache_key_names_the_network_s_options(source_run):
    """GoogLeNet with and without LRN have the same tensors but not the same features."""
    trained, images = canon.load_trained(source_run), load_sample("test")
    with_lrn = canon.create_model("googlenet", num_classes=5)
    without = canon.create_model("googlenet", num_classes=5, lrn=False)
    without.load_state_dict(with_lrn.state_dict())
    keys = {features_fingerprint(dataclasses.replace(trained, model=model, name="googlenet"),
                                 images) for model in (with_lrn, without)}
    assert len(keys) == 2


def test_a_run_written_over_its_own_source_is_refused_and_the_source_kept(
    folders, source_run, capsys
):
    """transfer (either mode) or train --init-from into the folder holding the source, with
    --overwrite: the new run would delete the network it starts from."""
    files = sorted(p.relative_to(source_run) for p in source_run.rglob("*"))
    checkpoint = next((source_run / "checkpoints").glob("*.pt"))
    attempts = [
        ["transfer", str(source_run), "--data", str(folders[1]), "--mode", mode,
         "--output-dir", str(source_run), "--overwrite"] for mode in ("linear-probe", "finetune")
    ] + [["train", "--init-from", str(checkpoint), "--output-dir", str(source_run),
          "--overwrite", "--epochs", "1"],
         ["train", "--set", f"data.normalization_from={source_run}", "--output-dir",
          str(source_run), "--overwrite", "--epochs", "1"]]  # set aside before it is read
    for argv in attempts:
        with pytest.raises(SystemExit) as refused:
            main([*argv, "--device", "cpu"])
        assert refused.value.code == 2
        assert f"--output-dir {source_run} holds" in capsys.readouterr().err, argv
    assert sorted(p.relative_to(source_run) for p in source_run.rglob("*")) == files


def test_a_probe_stopped_by_ctrl_c_says_how_to_go_on_from_its_features(
    folders, source_run, tmp_path, monkeypatch, capsys
):
    """Without --output-dir a rerun would take the next free folder and extract them again.
    A Ctrl-C where nothing is kept (before any feature) is a one-line stop, as in any verb."""
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(canon.transfer.runs, "train_linear_probe", interrupted)
    argv = ["transfer", str(source_run), "--data", str(folders[1]), "--mode", "linear-probe",
            "--device", "cpu"]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    out = Path("runs") / "transfer-linear-probe"
    assert stopped.value.code == 130
    assert (f"stopped; the features extracted so far are kept in {out / 'features'}: the same "
            f"command with --output-dir {out} goes on from them") in capsys.readouterr().out
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "train.safetensors", "val.safetensors"]
    monkeypatch.setattr(canon.transfer.runs, "load_trained", interrupted)
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--output-dir", "elsewhere"])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.endswith("canon transfer: stopped\n")
