"""canon reproduce (issue 13): the experiments are data every recipe of which loads; the
degradation experiment runs end to end through the command line in micro mode (four tiny runs
on the bundled sample), writes its table and plots, trains nothing again when run again, and
resumes an interrupted run instead of restarting it; imagenette trains on a real JPEG folder
given by --data and sets its accuracy beside the leaderboard's."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import signal
import statistics
from pathlib import Path

import pytest
import torch

from canon.cli import main
from canon.engine.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_NORMALIZATION,
    EXPORT_WEIGHTS,
    epoch_checkpoint,
)
from canon.errors import CanonError, ConfigError, DataError
from canon.recipes import apply_overrides, dump_yaml, load_recipe
from canon.reproduce import runner, training
from canon.reproduce.analyses import ANALYSES, counting_noise, paired_noise
from canon.reproduce.experiments import EXPERIMENTS, MODES


def test_every_experiment_is_data_that_loads() -> None:
    for experiment in EXPERIMENTS.values():
        assert experiment.analysis in ANALYSES
        assert set(experiment.modes) == {"full", "quick", "micro"}
        for mode in experiment.modes.values():
            for name in experiment.recipes_in(mode.name):
                recipe = training.shortened_recipe(name, mode, seed=1)
                assert recipe.train.seed == 1
                original = load_recipe(name).train
                if original.iterations is None:  # counted in epochs: the mode may set them
                    assert mode.iterations is None
                else:
                    assert recipe.train.iterations == (mode.iterations or original.iterations)
    imagenette = EXPERIMENTS["imagenette"]
    assert [load_recipe(name).train.epochs for name in imagenette.recipes] == [5, 20]
    assert imagenette.recipes_in("quick") == ("resnet34d-imagenette5",)


def test_quick_mode_shortens_the_schedule_in_proportion_and_warms_up_every_net() -> None:
    quick = MODES["quick"]
    resnet56 = training.shortened_recipe("resnet56-cifar10", quick, seed=0)
    assert resnet56.train.iterations == 1170  # 30 epochs of the sample's 39 steps
    assert resnet56.schedule.milestones == (585, 878)  # 32k and 48k of 64k
    assert (resnet56.schedule.warmup_iterations, resnet56.schedule.warmup_mode,
            resnet56.schedule.warmup_start_factor) == (78, "linear", 0.1)
    # ResNet-110 keeps its own warm-up (lr 0.01 until 80% training error), shortened with the
    # rest: 400 of 64k iterations at the latest.
    resnet110 = training.shortened_recipe("resnet110-cifar10", quick, seed=0)
    assert resnet110.schedule.warmup_mode == "constant"
    assert resnet110.schedule.warmup_iterations == round(400 * 1170 / 64000)
    assert training.shortened_recipe("resnet56-cifar10", MODES["full"], seed=0).schedule == (
        load_recipe("resnet56-cifar10").schedule)


def test_quick_mode_starts_resnet_blocks_as_their_shortcuts_and_leaves_plain_nets_be() -> None:
    def zero_init(name: str, mode: str) -> bool:
        return training.shortened_recipe(name, MODES[mode], seed=0).model.zero_init_residual

    assert zero_init("resnet20-cifar10", "quick") and zero_init("resnet110-cifar10", "quick")
    assert not zero_init("plain56-cifar10", "quick")  # no shortcut to start as
    assert not zero_init("resnet56-cifar10", "full")  # the paper's initialisation


def test_list_names_every_experiment_and_bad_requests_are_refused(capsys, tmp_path) -> None:
    main(["reproduce", "--list"])
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)
    assert "--quick: the 5-epoch run alone" in out
    assert "trains plain20-cifar10, plain56-cifar10, resnet20-cifar10, resnet56-cifar10" in out
    for argv, message in ((["degradation", "--runs", "2", "--micro"], "--runs applies"),
                          (["degradation", "--quick", "--data", str(tmp_path)],
                           "--data applies where"),
                          (["imagenette", "--micro", "--output-dir", str(tmp_path)],
                           "pass --data /path/to/imagenette2-160"),
                          (["imagenette", "--micro", "--data", "sample"],  # 32 px CIFAR images
                           "--data sample: not a folder; imagenette trains on the folder"),
                          (["degradation", "--data", "cifar10"],  # refused when planned
                           "(cifar10); leave --data out for canon's copy of cifar10")):
        with pytest.raises(SystemExit) as stopped:
            main(["reproduce", *argv])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_degradation_micro_end_to_end_skips_finished_runs_and_resumes(
    tmp_path: Path, monkeypatch
) -> None:
    calls = []
    real_train = training.train

    def counted_train(recipe, run_dir, **options):
        calls.append((recipe.name, options["resume"]))
        return real_train(recipe, run_dir, **options)

    monkeypatch.setattr(training, "train", counted_train)
    argv = ["reproduce", "degradation", "--micro", "--output-dir", str(tmp_path),
            "--device", "cpu"]
    main(argv)

    recipes = EXPERIMENTS["degradation"].micro_recipes
    assert calls == [(name, None) for name in recipes]
    report = tmp_path / "degradation-micro"
    readme = (report / "README.md").read_text()
    # Its nets differ by less than the noise of 32 training images (its mode line says it
    # shows nothing), and the report says so: neither half holds, the ResNets' too (a deeper
    # ResNet within the noise of the shallower passed once, as too little data always lets).
    assert "**Finding not shown**" in readme and "- [ ] plain nets" in readme
    assert "- [ ] ResNets" in readme
    assert "noise" in readme and "twice the standard error of the two rates" in readme
    for net in ("plain-20", "plain-32", "ResNet-20", "ResNet-32"):
        assert f"| {net} |" in readme
    assert "| 8.75 |" in readme  # the paper's Table 6 error for ResNet-20, beside ours
    assert "final model on the test set" in readme
    # Fig. 6's two panels against iterations: each row of a run's curves at its step count
    assert (report / "degradation.png").stat().st_size > 0 and "](degradation.png)" in readme
    with open(report / "degradation-curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows[::2]] == ["plain-20", "plain-32", "ResNet-20", "ResNet-32"]
    for row in rows[1::2]:  # each run's second, last epoch
        run = f"{row['run'].lower().replace('-', '')}-cifar10-micro-seed0"
        steps = json.loads((tmp_path / "runs" / run / EXPORT_CONFIG).read_text())["steps"]
        assert float(row["step"]) == steps == 2 * float(rows[0]["step"])
    results = json.loads((report / "results.json").read_text())
    assert [run["status"] for run in results["runs"]] == ["trained"] * len(recipes)
    assert [run["train_images"] for run in results["runs"]] == [2 * 16] * len(recipes)
    assert results["environment"]["torch"] and len(results["findings"]) == 2
    commit = results["environment"]["commit"]
    assert [run["commit"] for run in results["runs"]] == [commit] * len(recipes)
    assert "different commits" not in readme
    runs = tmp_path / "runs"
    # as if trained by an earlier command at another commit (all zeros: it sorts first)
    recipe_file = runs / "plain20-cifar10-micro-seed0" / "recipe.yaml"
    header, _, body = recipe_file.read_text().partition("\n")
    recipe_file.write_text(f"{header.rpartition(' ')[0]} 0000000000abcdef-dirty\n{body}")

    # Again: every run has finished, so nothing is trained and no run file is rewritten.
    exports = {p: p.stat().st_mtime_ns for p in runs.glob(f"*/{EXPORT_WEIGHTS}")}
    calls.clear()
    with pytest.warns(UserWarning, match=r"last trained at 2 different commits \(0000000000-"):
        main(argv)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in runs.glob(f"*/{EXPORT_WEIGHTS}")} == exports
    results = json.loads((report / "results.json").read_text())
    assert {run["status"] for run in results["runs"]} == {"finished before"}
    trained_at = {run["run"]: run["commit"] for run in results["runs"]}
    assert trained_at.pop("plain20-cifar10-micro-seed0") == "0000000000abcdef-dirty"
    assert set(trained_at.values()) == {commit}
    readme = (report / "README.md").read_text()
    assert "| 0000000000-dirty |" in readme
    assert "**Note:** the runs were last trained at 2 different commits (0000000000-dirty" in readme

    # plain-32 as if killed during its second (last) epoch: only epoch 1's checkpoint left.
    run_dir = runs / "plain32-cifar10-micro-seed0"
    finished = _metrics(run_dir)
    assert len(finished) == 2
    for name in (EXPORT_WEIGHTS, EXPORT_NORMALIZATION, EXPORT_CONFIG):
        (run_dir / name).unlink()
    epoch_checkpoint(run_dir, 2).unlink()
    assert epoch_checkpoint(run_dir, 1).is_file()
    calls.clear()
    main(argv)
    assert calls == [("plain32-cifar10", run_dir)]  # resumed, not restarted
    resumed = _metrics(run_dir)
    assert [row["epoch"] for row in resumed] == ["1", "2"]
    # Epoch 1 comes from the checkpoint; epoch 2 is retrained exactly as before (CPU).
    for before, after in zip(finished, resumed, strict=True):
        assert after["train_loss"] == before["train_loss"]
        assert after["val_top1_error"] == before["val_top1_error"]
    statuses = {run["run"]: run["status"] for run in
                json.loads((report / "results.json").read_text())["runs"]}
    assert statuses.pop("plain32-cifar10-micro-seed0") == "resumed"
    assert set(statuses.values()) == {"finished before"}


def test_a_gap_is_a_finding_only_beyond_the_noise_of_its_images() -> None:
    """Two runs' error rates over their own images (binomial), or two models' on the same
    images (paired: only the images one gets right and the other wrong count)."""
    assert counting_noise((30.0, 1000), (20.0, 4000)) == pytest.approx(
        200 * math.sqrt(0.3 * 0.7 / 1000 + 0.2 * 0.8 / 4000))
    assert counting_noise((30.0, None), (20.0, 4000)) is None  # a run without step counts
    first, second = torch.zeros(100), torch.zeros(100)
    first[:10] = second[10:12] = 1  # 10 images right under the first alone, 2 the second
    first[50:80] = second[50:80] = 1  # 30 right under both
    differences = [1.0] * 10 + [-1.0] * 2 + [0.0] * 88
    assert paired_noise(first, second) == pytest.approx(
        200 * statistics.stdev(differences) / math.sqrt(100))
    assert paired_noise(first, first) == 0.0  # the same answers: no gap, no noise
    assert paired_noise(first[:1], second[:1]) == math.inf  # one image says nothing


def test_runs_scored_on_different_images_are_refused_by_name(tmp_path, monkeypatch) -> None:
    """Image-by-image noise pairs the runs' scores image for image: runs whose test images
    differ (a test set changed between them) are a DataError naming both, not a gap."""
    from canon.reproduce import analyses

    recipe = load_recipe("resnet20-cifar10")
    records = [training.RunRecord(training.PlannedRun(recipe, seed, tmp_path / f"s{seed}"),
                                  "finished before", None, 1, 1.0, None, 50.0, 50.0)
               for seed in (0, 1)]
    labels = {0: torch.tensor([0, 1, 2]), 1: torch.tensor([0, 1, 3])}
    monkeypatch.setattr(analyses, "_correct",
                        lambda record, context: (torch.ones(3), labels[record.run.seed]))
    with pytest.raises(DataError, match="ResNet-20 seed 0 and ResNet-20 seed 1 were tested on "
                                        "different images"):
        analyses._mean_correct(records, None)
    labels[1] = labels[0]
    correct, same = analyses._mean_correct(records, None)
    assert torch.equal(correct, torch.ones(3)) and torch.equal(same, labels[0])


def test_a_record_counts_the_images_behind_its_final_training_error(tmp_path) -> None:
    """The final epoch's optimizer steps x batch x accumulation, less the files it skipped:
    here a last epoch cut short by the iteration limit after 4 of its steps. A run logged
    before canon recorded steps has no count (its noise is unknown, its finding not judged)."""
    recipe = load_recipe("quickstart", [("train.batch_size", 16), ("train.accum_steps", 2)])
    run = training.PlannedRun(recipe, 0, tmp_path / "quickstart-seed0")
    run.run_dir.mkdir()
    header = "epoch,step,train_top1_error,val_top1_error,seconds,skipped_images\n"
    (run.run_dir / "metrics.csv").write_text(header + "1,10,50.0,60.0,3.0,0\n"
                                             "2,14,40.0,55.0,2.0,3\n")
    record = training._record(run, "finished before", None)
    assert (record.epochs, record.train_error, record.train_images) == (2, 40.0, 4 * 16 * 2 - 3)
    (run.run_dir / "metrics.csv").write_text("epoch,train_top1_error,val_top1_error,seconds\n"
                                             "1,50.0,60.0,3.0\n")
    assert training._record(run, "finished before", None).train_images is None


def test_jobs_train_runs_in_processes_of_their_own(tmp_path: Path, capsys, monkeypatch) -> None:
    """--jobs 2: the four degradation runs trained two at a time in two spawned processes,
    the report as from one process; a second call trains nothing, with --cuda-graph too (the
    same runs: the graph changes their speed, not what they compute), starts no process to
    read them, and counts no more processes at once than runs (--jobs 5, 4 runs)."""
    argv = ["reproduce", "degradation", "--micro", "--output-dir", str(tmp_path), "--device",
            "cpu", "--jobs", "2"]
    main(argv)
    assert "(4 run(s) trained now)" in capsys.readouterr().out
    results = json.loads((tmp_path / "degradation-micro" / "results.json").read_text())
    assert [run["status"] for run in results["runs"]] == ["trained"] * 4
    for run in results["runs"]:
        assert len(_metrics(tmp_path / "runs" / run["run"])) == 2
    # the threads each run trained with, which change a CPU run's numbers
    threads = max(1, torch.get_num_threads() // 2)
    assert (results["environment"]["torch_threads"], results["environment"]["jobs"]) == (
        threads, 2)
    readme = (tmp_path / "degradation-micro" / "README.md").read_text()
    assert f"{threads} torch threads a run, 2 runs at once" in readme
    assert "canon reproduce degradation --micro --jobs 2 --device cpu --output-dir" in readme
    monkeypatch.setattr(runner, "ProcessPoolExecutor", None)  # finished runs: read here
    main([*argv[:-1], "5", "--cuda-graph"])  # the same runs, faster where there is a GPU
    assert "(0 run(s) trained now)" in capsys.readouterr().out
    readme = (tmp_path / "degradation-micro" / "README.md").read_text()
    assert "canon reproduce degradation --micro --jobs 5 --device cpu --cuda-graph" in readme
    assert "torch threads a run, 4 runs at once" in readme
    recipe = tmp_path / "runs" / "plain20-cifar10-micro-seed0" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("\n  seed: 0", "\n  seed: 7"))
    with pytest.raises(SystemExit):  # one run's failure ends the call, named
        main(argv)
    assert "plain20-cifar10-micro-seed0 holds a run of another recipe (train.seed differ)" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv[:-1], "0"])
    assert "--jobs 0: train at least one run at a time" in capsys.readouterr().err


def test_a_pool_process_that_stops_or_fails_starts_no_queued_run(monkeypatch) -> None:
    """The stop is set in the run's own process, which may take its next queued run before
    the waiting process has seen it."""
    import multiprocessing

    from canon.engine.trainer import TrainingInterrupted

    for raised, expected in ((TrainingInterrupted(Path("ckpt.pt"), 15), (Path("ckpt.pt"), 15)),
                             (ConfigError("bad run"), None)):
        stopping = multiprocessing.get_context("spawn").Event()
        monkeypatch.setattr(runner, "_STOPPING", stopping)

        def failing(*args, error=raised, **options):
            raise error

        monkeypatch.setattr(runner, "ensure_run", failing)
        if expected is None:
            with pytest.raises(ConfigError, match="bad run"):
                runner._ensure_in_process("run", "mode", "cpu")
        else:
            assert runner._ensure_in_process("run", "mode", "cpu") == expected
        assert stopping.is_set()
        assert runner._ensure_in_process("next run", "mode", "cpu") is None


def test_a_run_that_failed_beside_a_stopped_one_is_said_with_the_stop(tmp_path, capsys) -> None:
    """--jobs: one run stopped with a checkpoint while another failed. The stop is raised (the
    same command resumes), and the failure, which resuming will meet again, is said too."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from canon.engine.stopping import StopFlag
    from canon.engine.trainer import TrainingInterrupted

    stopped, failed, finished = Future(), Future(), Future()
    stopped.set_result((tmp_path / "interrupted.pt", signal.SIGTERM))
    failed.set_exception(DataError("plain32's loss is NaN at step 7"))
    finished.set_result("a record")
    planned = [training.PlannedRun(None, 0, tmp_path / "runs" / "run-seed0")]
    with pytest.raises(TrainingInterrupted) as raised:
        runner._records([stopped, failed, finished], planned, StopFlag())
    assert raised.value.checkpoint == tmp_path / "interrupted.pt"
    assert "besides the stop, a run failed: DataError: plain32's loss is NaN at step 7" in \
        capsys.readouterr().err
    with pytest.raises(TrainingInterrupted):  # a stop alone says nothing more
        runner._records([stopped, finished], planned, StopFlag())
    assert capsys.readouterr().err == ""
    also_stopped = Future()  # two runs saved a checkpoint each: the folder of both is named
    also_stopped.set_result((tmp_path / "runs" / "b" / "interrupted.pt", signal.SIGTERM))
    with pytest.raises(TrainingInterrupted) as raised:
        runner._records([stopped, also_stopped], planned, StopFlag())
    assert raised.value.checkpoint == tmp_path / "runs"
    with pytest.raises(DataError, match="NaN at step 7"):  # alone, the failure is raised
        runner._records([failed, finished], planned, StopFlag())
    died = Future()
    died.set_exception(BrokenProcessPool("a process terminated abruptly"))
    with pytest.raises(CanonError, match=r"a run's process died .* resumes the runs"):
        runner._records([died, finished], planned, StopFlag())
    assert runner._records([finished], planned, StopFlag()) == ["a record"]


def test_a_stop_signal_to_a_pool_process_between_runs_or_in_set_up_ends_it_cleanly(
    monkeypatch, tmp_path: Path
) -> None:
    """Ctrl-C reaches every pool process. One waiting for a run, or setting one up (before
    its training's StopFlag), must not die of it: the pool would break and kill the others,
    their runs with it. It starts no queued run and reports the stop instead."""
    import multiprocessing

    run = training.PlannedRun(None, 0, tmp_path / "runs" / "resnet20-seed0")
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        for stop_signal, in_set_up in ((signal.SIGINT, False), (signal.SIGTERM, True)):
            monkeypatch.setattr(runner, "_SIGNAL", None)
            runner._pool_process(1, multiprocessing.get_context("spawn").Event())

            def setting_up(*args, sent=stop_signal, **options):
                signal.raise_signal(sent)
                raise AssertionError("went on after the signal")

            monkeypatch.setattr(runner, "ensure_run", setting_up)
            if not in_set_up:
                signal.raise_signal(stop_signal)  # waiting for its next run
            assert runner._ensure_in_process(run, "mode", "cpu") == (tmp_path / "runs",
                                                                   stop_signal)
            assert runner._ensure_in_process(run, "mode", "cpu") == (tmp_path / "runs",
                                                                   stop_signal)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_a_recipes_own_relative_folder_is_recorded_whole(
    tmp_path: Path, imagenette_root: Path, monkeypatch
) -> None:
    """As canon train records it: eval and resume then find it from any folder."""
    (tmp_path / "imagenette2-160").symlink_to(imagenette_root)
    monkeypatch.chdir(tmp_path)
    quick = EXPERIMENTS["imagenette"].mode("quick")
    recipe = training.shortened_recipe("resnet34d-imagenette5", quick, 0)
    assert recipe.data.dataset == str((tmp_path / "imagenette2-160").resolve())


def test_a_run_of_another_recipe_is_refused(tmp_path: Path) -> None:
    """A run directory holding another mode's (or an edited recipe's) run is neither kept nor
    continued: its recipe.yaml is compared with the recipe planned."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    quick = training.shortened_recipe("resnet20-cifar10", MODES["quick"], 0)
    (run_dir / "recipe.yaml").write_text("name: resnet20-cifar10\ntrain: {iterations: 7}\n")
    (run_dir / EXPORT_WEIGHTS).write_bytes(b"")
    (run_dir / EXPORT_CONFIG).write_text("{}")
    planned = training.PlannedRun(quick, 0, run_dir)
    with pytest.raises(ConfigError, match=r"train\.iterations"):
        training.ensure_run(planned, MODES["quick"], device="cpu", progress=False)
    # Words about the recipe are not what it computes: a rewording keeps the run.
    reworded = quick.to_dict()
    reworded.update(description="reworded", source="elsewhere")
    reworded["reported"]["where"] = "another table"
    (run_dir / "recipe.yaml").write_text(dump_yaml(reworded))
    training._check_same_recipe(run_dir, quick, finished=True)
    # Other images: the message names both folders (a call that left out --data).
    (run_dir / "recipe.yaml").write_text(dump_yaml(
        apply_overrides(quick, [("data.dataset", "/data/cifar")]).to_dict()))
    with pytest.raises(ConfigError, match=rf"run holds a run on /data/cifar, not on "
                                          rf"{quick.data.dataset}: pass --data /data/cifar"):
        training._check_same_recipe(run_dir, quick, finished=True)
    on_a_folder = apply_overrides(quick, [("data.dataset", "/data/cifar")])
    (run_dir / "recipe.yaml").write_text(dump_yaml(quick.to_dict()))  # canon's own copy
    with pytest.raises(ConfigError, match=rf"run holds a run on {quick.data.dataset}, not on "
                                          r"/data/cifar: run without --data to go on"):
        training._check_same_recipe(run_dir, on_a_folder, finished=True)
    (run_dir / "recipe.yaml").write_text("train: [iterations: 7\n")  # damaged
    with pytest.raises(ConfigError, match=r"recipe.yaml: not valid YAML"):
        training.ensure_run(planned, MODES["quick"], device="cpu", progress=False)
    (run_dir / "recipe.yaml").unlink()  # another tool's results, or a run's copied in
    with pytest.raises(DataError, match=r"has a model or checkpoints but no recipe.yaml"):
        training.ensure_run(planned, MODES["quick"], device="cpu", progress=False)
    # Results but no checkpoint (one unwritten, or deleted): not the trainer's advice of an
    # --overwrite that canon reproduce does not take.
    (run_dir / EXPORT_WEIGHTS).unlink()
    (run_dir / "metrics.csv").write_text("epoch\n1\n")
    with pytest.raises(DataError, match=r"run holds results of a run but no checkpoint to "
                                        r"resume from: delete it to train it again"):
        training.ensure_run(planned, MODES["quick"], device="cpu", progress=False)


def test_ensembles_micro_scores_its_nets_on_the_images_they_validated_on(tmp_path,
                                                                        capsys) -> None:
    argv = ["reproduce", "ensembles", "--micro", "--runs", "2", "--output-dir", str(tmp_path)]
    main(argv)
    assert "(2 run(s) trained now)" in capsys.readouterr().out
    report = tmp_path / "ensembles-micro"
    result = json.loads((report / "results.json").read_text())
    assert result["numbers"]["images"] == 32
    for row, run in zip(result["table"], result["runs"], strict=False):  # its metrics.csv's
        assert row["top-1 error (%)"] == run["test_error"]
    # Another precision is another run, beside the first, which it leaves as it was.
    main([*argv, "--amp", "bf16"])
    assert "(2 run(s) trained now)" in capsys.readouterr().out
    runs = json.loads((tmp_path / "ensembles-micro-bf16" / "results.json").read_text())["runs"]
    assert [(run["run"], run["epochs"]) for run in runs] == [
        (f"resnet20-cifar10-micro-bf16-seed{seed}", 2) for seed in (0, 1)]
    assert load_recipe(Path(runs[0]["run_dir"]) / "recipe.yaml").train.amp == "bf16"
    # Its report goes beside the first one's, which keeps the recipes' own precision.
    assert "--amp bf16" in (tmp_path / "ensembles-micro-bf16" / "README.md").read_text()
    assert "--amp" not in (report / "README.md").read_text()
    assert load_recipe(tmp_path / "runs" / "resnet20-cifar10-micro-seed0" / "recipe.yaml"
                       ).train.amp == "none"


def test_cifar_table6_micro_gives_the_mean_and_std_over_seeds_beside_the_paper_s(
        tmp_path, monkeypatch) -> None:
    # The paper's own mean over runs goes beside its reported error (ResNet-110's 6.43 is
    # the best of five runs, their mean 6.61 +- 0.16); in micro mode, here for ResNet-20.
    table6 = dataclasses.replace(EXPERIMENTS["cifar-table6"],
                                 paper_means={"resnet20-cifar10": (8.5, 0.25)})
    monkeypatch.setitem(EXPERIMENTS, "cifar-table6", table6)
    main(["reproduce", "cifar-table6", "--micro", "--runs", "2", "--output-dir", str(tmp_path),
          "--device", "cpu"])
    result = json.loads((tmp_path / "cifar-table6-micro" / "results.json").read_text())
    errors = {}
    for run in result["runs"]:
        errors.setdefault(run["run"].split("-")[0], []).append(run["test_error"])
    resnet20, resnet32 = result["table"]
    for row, name in ((resnet20, "resnet20"), (resnet32, "resnet32")):
        assert row["runs"] == 2
        assert row["test error (%)"] == pytest.approx(sum(errors[name]) / 2)
    assert (resnet20["paper's test error (%)"], resnet32["paper's test error (%)"]) == (8.75, 7.51)
    assert resnet20["paper's mean +- std (%)"] == "8.50 +- 0.25"
    assert resnet32["paper's mean +- std (%)"] is None
    readme = (tmp_path / "cifar-table6-micro" / "README.md").read_text()
    assert "| 8.75 | 8.50 +- 0.25 |" in readme and (tmp_path / "cifar-table6-micro" /
                                                     "table6.png").stat().st_size > 0
    # Beside our means over runs, the plot sets the paper's mean where it gives one, not its
    # best run (Table 6's ResNet-110: 6.61 +- 0.16 over 5 runs, best 6.43).
    assert result["numbers"]["paper_plotted"] == [[20, 8.5, 0.25], [32, 7.51, 0.0]]


def test_ctrl_c_while_the_report_is_made_stops_cleanly(tmp_path, monkeypatch, capsys) -> None:
    def interrupted(records, context):
        raise KeyboardInterrupt

    monkeypatch.setitem(ANALYSES, "ensembles", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "ensembles", "--micro", "--runs", "2", "--output-dir",
              str(tmp_path)])
    assert exit_.value.code == 130
    assert "stopped before the report was written" in capsys.readouterr().out


def test_a_mode_that_leaves_a_run_unchanged_shares_the_full_mode_s_folder(imagenette_root):
    """imagenette's --quick is its 5-epoch run alone, unchanged: the full mode must find it
    trained, not train it again in a folder of its own; shortened runs keep theirs."""
    imagenette = EXPERIMENTS["imagenette"]
    quick, full = (training.plan_runs(imagenette, imagenette.mode(mode), None, Path("runs"),
                                      data=str(imagenette_root)) for mode in ("quick", "full"))
    assert [run.run_dir.name for run in quick] == ["resnet34d-imagenette5-seed0"]
    assert quick[0] == full[0]
    bf16 = training.plan_runs(imagenette, imagenette.mode("quick"), None, Path("runs"),
                              data=str(imagenette_root), amp="bf16")
    assert bf16[0].run_dir.name == "resnet34d-imagenette5-bf16-seed0"
    (shortened,) = training.plan_runs(EXPERIMENTS["degradation"], MODES["quick"], None,
                                      Path("runs"))[:1]
    assert shortened.run_dir.name == "plain20-cifar10-quick-seed0"


def test_imagenette_micro_trains_on_a_jpeg_folder_and_sets_it_beside_the_leaderboard(
    tmp_path: Path, imagenette_root: Path, capsys
) -> None:
    main(["reproduce", "imagenette", "--micro", "--data", str(imagenette_root),
          "--output-dir", str(tmp_path), "--device", "cpu"])
    assert "imagenette: finding not shown" in capsys.readouterr().out  # 2 steps learn nothing
    report = tmp_path / "imagenette-micro"
    readme = (report / "README.md").read_text()
    assert "| ResNet-34 (stem=deep, avg_down=True), 1 epochs |" in readme and "| 87.43 |" in readme
    assert "final model on the validation set" in readme and "## The reference: fast.ai" in readme
    assert f"--data {imagenette_root.resolve()}" in readme
    assert (report / "curves" / "curves-top1.png").stat().st_size > 0
    results = json.loads((report / "results.json").read_text())
    # Ten crops of the 10 validation images the run scored, not of the folder's 500.
    right = results["table"][0]["top-1, ten-crop (%)"] * 10 / 100
    assert 0 <= right <= 10 and right == pytest.approx(round(right))
    assert "ten-crop column scores the same models under AlexNet's" in readme
    ours = results["table"][0]["top-1 accuracy (%)"]  # beside the leaderboard's, on 10 images
    noise = counting_noise((100 - ours, 10), (100 - 87.43, 10))
    evidence = results["findings"][0]["evidence"]
    assert (f"{ours - 87.43:+.2f} points, {'within' if 87.43 - ours <= noise else 'beyond'} "
            f"the noise of 10 images (noise {noise:.2f} points") in evidence
    run = results["runs"][0]
    assert run["run"] == "resnet34d-imagenette5-micro-seed0" and run["epochs"] == 1
    recipe = load_recipe(Path(run["run_dir"]) / "recipe.yaml")
    assert recipe.data.dataset == str(imagenette_root.resolve())
    assert recipe.data.crop_size == 128
    # A damaged export is not replaced by best.pt, another epoch's model, in the report.
    export = tmp_path / "runs" / "resnet34d-imagenette5-micro-seed0" / EXPORT_WEIGHTS
    export.write_bytes(export.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        main(["reproduce", "imagenette", "--micro", "--data", str(imagenette_root),
              "--output-dir", str(tmp_path), "--device", "cpu"])
    assert f"Delete {export} and run this command again" in capsys.readouterr().err


def test_a_finished_run_saved_before_a_key_existed_is_kept_while_the_key_is_at_its_default(
    tmp_path: Path
) -> None:
    import yaml

    quick = training.shortened_recipe("resnet20-cifar10", MODES["quick"], 0)
    saved = quick.to_dict()
    del saved["train"]["data_on_device"]  # a run of a canon before that key
    del saved["model"]["options"]  # and of one before this model key
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved))
    training._check_same_recipe(tmp_path, quick, finished=True)
    off = apply_overrides(quick, [("train.data_on_device", False)])
    with pytest.raises(ConfigError, match=r"train\.data_on_device"):
        training._check_same_recipe(tmp_path, off, finished=True)
    with pytest.raises(ConfigError, match=r"train\.data_on_device"):  # not to continue it
        training._check_same_recipe(tmp_path, quick)


def test_responses_report_names_resnets_that_started_their_blocks_at_gamma_zero(
    tmp_path: Path, monkeypatch
) -> None:
    """Fig. 7's comparison is skewed where a ResNet's blocks start as their shortcuts (quick
    mode): its report says so beside the numbers, and says nothing where none did."""
    argv = ["reproduce", "responses", "--micro", "--output-dir", str(tmp_path), "--device",
            "cpu"]
    main(argv)
    first = tmp_path / "responses-micro" / "README.md"
    assert "gamma" not in first.read_text()

    zero_started = {name: (("model.zero_init_residual", True),)
                    for name in EXPERIMENTS["responses"].micro_recipes if "resnet" in name}
    micro = dataclasses.replace(MODES["micro"], recipe_overrides=zero_started)
    monkeypatch.setitem(MODES, "micro", micro)
    main(["reproduce", "responses", "--micro", "--output-dir", str(tmp_path / "zero"),
          "--device", "cpu"])
    readme = (tmp_path / "zero" / "responses-micro" / "README.md").read_text()
    assert "caveat: ResNet-20, ResNet-32 started each block's last BN gamma at 0" in readme
