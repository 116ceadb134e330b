"""From an experiment's finished runs to its table (our numbers beside the paper's), plots and
qualitative finding, one function per experiment (Experiment.analysis names it). The plots
come from canon.visualize (curves for Fig. 6, responses for Fig. 7) where it draws them.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from canon.data.datasets import validates_on_test_split
from canon.devices import resolve_device
from canon.engine.checkpoint import EXPORT_WEIGHTS
from canon.engine.trained import TrainedModel, load_trained
from canon.errors import DataError
from canon.evaluation.ensemble import evaluate_ensemble
from canon.reproduce.experiments import Experiment, Mode
from canon.reproduce.training import RunRecord, micro_datasets
from canon.visualize.curves import curves, draw_curves, run_series, series_rows
from canon.visualize.images import save_csv
from canon.visualize.plots import new_figure, save_figure
from canon.visualize.responses import responses as layer_responses


@dataclass(frozen=True)
class Finding:
    statement: str  # what the paper found, as a claim about our runs
    held: bool
    evidence: str  # our numbers behind it


@dataclass(frozen=True)
class Outcome:
    table: list[dict[str, Any]]  # one row per model (or run), the paper's columns beside ours
    findings: list[Finding]
    plots: list[Path]
    numbers: dict[str, Any] = field(default_factory=dict)  # more, for results.json


@dataclass(frozen=True)
class Context:
    experiment: Experiment
    mode: Mode
    device: str
    folder: Path  # where the report goes


Analysis = Callable[[list[RunRecord], Context], Outcome]


def _family(record: RunRecord) -> str:
    return _model_parts(record)[0]


def _depth(record: RunRecord) -> int:
    return _model_parts(record)[1]


def _model_parts(record: RunRecord) -> tuple[str, int]:
    """("plain" or "resnet", depth) from the model name: plain56, resnet110."""
    family, depth = re.fullmatch(r"([a-z]+)(\d+)", record.run.recipe.model.name).groups()
    return family, int(depth)


def _label(record: RunRecord, seeds: bool = False) -> str:
    """plain-56, ResNet-110; with `seeds`, the seed too."""
    family = {"plain": "plain", "resnet": "ResNet"}[_family(record)]
    return f"{family}-{_depth(record)}" + (f" seed {record.run.seed}" if seeds else "")


def _training_errors(records: list[RunRecord]) -> str:
    return ", ".join(f"{_label(r)} {r.train_error:.2f}%" for r in records)


def counting_noise(*rates: tuple[float, int | None]) -> float | None:
    """Twice the standard error, in points, of the difference of error rates, each (error in
    %, images) a binomial proportion over its images: a gap within it could come from which
    images were counted alone. None when a count is unknown. A floor on the noise: seeds move
    a run by more."""
    if any(images is None or images < 1 for _, images in rates):
        return None
    return 200 * math.sqrt(sum(error / 100 * (1 - error / 100) / images
                               for error, images in rates))


def paired_noise(first: torch.Tensor, second: torch.Tensor) -> float:
    """Twice the standard error, in points, of the gap between two error rates measured on
    the same images, from each image's correctness under each (1 or 0, or a mean over
    seeds): images both get right or both get wrong do not count, as in McNemar's test."""
    differences = first.double() - second.double()
    if len(differences) < 2:
        return math.inf
    return 200 * float(differences.std()) / math.sqrt(len(differences))


def _noise_note(noise: float | None, how: str = "of the two rates") -> str:
    return ("noise unknown (a run logged before canon counted its steps), so not judged"
            if noise is None
            else f"noise {noise:.2f} points (twice the standard error {how})")


def _correct(record: RunRecord, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's final model on its test images, centre crops: each image's top-1
    correctness (1 or 0) and label, in the test split's order."""
    micro = micro_datasets(record.run.recipe, context.mode)
    result = _final_model(record).evaluate(micro.val if micro else None, "center",
                                           device=context.device, keep_probabilities=True)
    labels = result["labels"]
    return (result["probabilities"].argmax(1) == labels).double(), labels


def _mean_correct(records: list[RunRecord], context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Each test image's top-1 correctness averaged over `records` (seeds of one net), and
    the labels, which every run must share."""
    scored = [_correct(record, context) for record in records]
    labels = scored[0][1]
    for record, (_, other) in zip(records[1:], scored[1:], strict=True):
        _check_same_images(labels, other, f"{_label(records[0], True)} and "
                                          f"{_label(record, True)}")
    return torch.stack([correct for correct, _ in scored]).mean(0), labels


def _check_same_images(labels: torch.Tensor, others: torch.Tensor, which: str) -> None:
    if not torch.equal(labels, others):
        raise DataError(f"{which} were tested on different images, so their errors do not "
                        "compare image by image: were their test sets changed between runs?")


def degradation(records: list[RunRecord], context: Context) -> Outcome:
    """Fig. 6: training (dashed) and test (bold) error against iterations, plain nets in the
    left panel and ResNets in the right; the finding is the final training error by depth."""
    table = [{"net": _label(r), "training error (%)": r.train_error,
              "test error (%)": r.test_error,
              "paper's test error (%)": r.run.recipe.reported.top1_error} for r in records]
    findings, panels = [], []
    figure = new_figure(13, 4.8)
    for axes, (family, nets, claim) in zip(
            figure.subplots(1, 2, sharey=True),
            (("plain", "plain nets", "higher training error than the shallower {}, by more "
              "than the noise"),
             ("resnet", "ResNets", "lower training error than the shallower {}, by more "
              "than the noise")),
            strict=True):
        group = sorted((r for r in records if _family(r) == family), key=_depth)
        panels.append((axes, nets, group, run_series([r.run.run_dir for r in group],
                                                     names=[_label(r) for r in group])))
        shallow, deep = group[0], group[-1]
        gap = deep.train_error - shallow.train_error
        noise = counting_noise((deep.train_error, deep.train_images),
                               (shallow.train_error, shallow.train_images))
        # A run logged before canon counted its steps leaves the noise unknown: not judged.
        held = noise is not None and (gap if family == "plain" else -gap) > noise
        findings.append(Finding(
            f"{nets}: the deeper {_label(deep)} ends with {claim.format(_label(shallow))}",
            held,
            f"final training error {_training_errors(group)}; {_noise_note(noise)}"))
    # By iteration as the paper, unless a run was logged before canon recorded steps.
    logged = all(run["step"] is not None for *_, series in panels for run in series)
    for axes, nets, group, series in panels:
        tested = all(validates_on_test_split(r.run.recipe.data) for r in group)
        draw_curves(axes, series, "top1", "iteration" if logged else "epoch",
                    "test" if tested else "validation")
        axes.set_title(nets)
    save_csv(context.folder / "degradation-curves.csv",
             series_rows([run for *_, series in panels for run in series]))
    return Outcome(table, findings, [save_figure(figure, context.folder / "degradation.png")])


def table6(records: list[RunRecord], context: Context) -> Outcome:
    """Table 6: the final test error by depth, mean and std over seeds, with parameters."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.run.recipe.name, []).append(record)
    table, means = [], []
    for name, group in groups.items():
        errors = [r.test_error for r in group]
        model = _final_model(group[0]).model
        means.append(statistics.fmean(errors))
        table.append({
            "net": _label(group[0]), "runs": len(errors), "test error (%)": means[-1],
            "std over runs": statistics.stdev(errors) if len(errors) > 1 else None,
            "paper's test error (%)": group[0].run.recipe.reported.top1_error,
            "paper's mean +- std (%)": _mean_and_std(context.experiment.paper_means.get(name)),
            "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
            "paper's params (M)": context.experiment.paper_params.get(name),
        })
    first, last = table[0], table[-1]
    by_depth = list(groups.values())  # in plan order: shallowest first
    (shallowest, labels), (deepest, deepest_labels) = (_mean_correct(by_depth[0], context),
                                                       _mean_correct(by_depth[-1], context))
    _check_same_images(labels, deepest_labels, f"{first['net']} and {last['net']}")
    noise = paired_noise(deepest, shallowest)
    gap = 100 * float(deepest.mean() - shallowest.mean())  # the same scores as the noise's
    finding = Finding(
        f"the deepest net ({last['net']}) ends with lower test error than the shallowest "
        f"({first['net']}), beyond the noise", gap > noise,
        ", ".join(f"{row['net']} {row['test error (%)']:.2f}%" for row in table)
        + f" on {len(deepest)} test images; {_noise_note(noise, 'of the gap, image by image')}")
    paper = _paper_points(groups, context)
    return Outcome(table, [finding], [_depth_plot(table, paper, context.folder / "table6.png")],
                   {"paper_plotted": paper})


def _mean_and_std(values: tuple[float, float] | None) -> str | None:
    """The paper's mean +- std over runs (ResNet-110's reported 6.43 is its best of 5)."""
    return None if values is None else f"{values[0]:.2f} +- {values[1]:.2f}"


def _paper_points(groups: dict[str, list[RunRecord]], context: Context
                  ) -> list[tuple[int, float, float]]:
    """(depth, error, std) of the paper's nets to plot beside ours, which are means over runs:
    its mean and std over runs where it gives them (ResNet-110: 6.61 +- 0.16, not its best
    run's 6.43), else its one reported error."""
    points = []
    for name, group in groups.items():
        reported = group[0].run.recipe.reported.top1_error
        mean, std = context.experiment.paper_means.get(name, (reported, 0.0))
        if mean is not None:
            points.append((_depth(group[0]), mean, std))
    return points


def _depth_plot(table: list[dict[str, Any]], paper: list[tuple[int, float, float]],
                path: Path) -> Path:
    figure = new_figure(6, 4)
    axes = figure.subplots()
    depths = [int(row["net"].split("-")[1]) for row in table]
    axes.errorbar(depths, [row["test error (%)"] for row in table],
                  yerr=[row["std over runs"] or 0 for row in table], marker="o", capsize=3,
                  label="canon (final model; mean and std over runs)")
    if paper:
        depth, error, std = zip(*paper, strict=True)
        axes.errorbar(depth, error, yerr=std, fmt="s--", capsize=3,
                      label="He et al. 2015, Table 6 (mean and std over runs where given)")
    axes.set(xlabel="depth (layers)", ylabel="CIFAR-10 test error (%)",
             title="ResNets on CIFAR-10 (Table 6)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def responses(records: list[RunRecord], context: Context) -> Outcome:
    """Fig. 7: the mean response std of each net's 3x3 layers, plain against residual."""
    result = layer_responses([r.run.run_dir for r in records], context.folder,
                             names=[_label(r) for r in records], device=context.device,
                             max_images=context.mode.test_images)
    mean_std = {run["name"]: statistics.fmean(layer["std"] for layer in run["layers"])
                for run in result["runs"]}
    table = [{"net": run["name"], "3x3 layers": len(run["layers"]),
              "mean response std": mean_std[run["name"]],
              "largest response std": max(layer["std"] for layer in run["layers"])}
             for run in result["runs"]]
    plain = {_depth(r): _label(r) for r in records if _family(r) == "plain"}
    resnets = sorted((r for r in records if _family(r) == "resnet"), key=_depth)
    pairs = [(plain[_depth(r)], _label(r)) for r in resnets if _depth(r) in plain]
    shallow, deep = _label(resnets[0]), _label(resnets[-1])
    # Quick mode's ResNets start each block's last BN at gamma 0 (the paper: 1): half their
    # 3x3 responses start at 0, a head start over the plain nets that the paper's lack.
    zero_started = [_label(r) for r in resnets if r.run.recipe.model.zero_init_residual]
    caveat = (f" (caveat: {', '.join(zero_started)} started each block's last BN gamma at 0, "
              "the paper's at 1, so part of the gap is that start)" if zero_started else "")
    findings = [
        Finding("each ResNet's layers respond more weakly than the plain net's of its depth",
                bool(pairs) and all(mean_std[res] < mean_std[p] for p, res in pairs),
                ", ".join(f"{res} {mean_std[res]:.3f} against {p} {mean_std[p]:.3f}"
                          for p, res in pairs) + caveat),
        Finding(f"the deeper {deep}'s layers respond more weakly than {shallow}'s",
                mean_std[deep] < mean_std[shallow],
                f"mean std {deep} {mean_std[deep]:.3f}, {shallow} {mean_std[shallow]:.3f}"),
    ]
    return Outcome(table, findings, [Path(result["png"])],
                   {"images": result["runs"][0]["images"]})


def ensembles(records: list[RunRecord], context: Context) -> Outcome:
    """The ensembling gain: each seeded net's test error against their averaged softmax's."""
    members = [_final_model(r).member() for r in records]
    micro = micro_datasets(records[0].run.recipe, context.mode)  # the images the runs saw
    test = micro.val if micro else records[0].run.recipe.data.dataset
    result = evaluate_ensemble(members, test, "center", device=resolve_device(context.device),
                               keep_probabilities=True)
    table = [{"net": _label(r, seeds=True), "top-1 error (%)": m["top1_error"],
              "top-5 error (%)": m["top5_error"]}
             for r, m in zip(records, result["members"], strict=True)]
    singles = [row["top-1 error (%)"] for row in table]
    table.append({"net": f"ensemble of {len(records)}", "top-1 error (%)": result["top1_error"],
                  "top-5 error (%)": result["top5_error"]})
    labels = result["labels"]  # every member's: evaluate_ensemble checks they scored alike
    members_correct = (result["member_predictions"] == labels).double().mean(0)
    ensemble_correct = (result["probabilities"].argmax(1) == labels).double()
    noise = paired_noise(ensemble_correct, members_correct)
    gain = 100 * float(ensemble_correct.mean() - members_correct.mean())  # as the noise's
    finding = Finding(
        f"the ensemble of {len(records)} has lower top-1 error than its nets on average, "
        "beyond the noise", gain > noise,
        f"ensemble {result['top1_error']:.2f}%, nets {statistics.fmean(singles):.2f}% on "
        f"average (best {min(singles):.2f}%), on {result['images']} test images; "
        f"{_noise_note(noise, 'of the gap, image by image')}")
    return Outcome(table, [finding], [_ensemble_plot(table, context.folder / "ensemble.png")],
                   {"images": result["images"]})


def _ensemble_plot(table: list[dict[str, Any]], path: Path) -> Path:
    figure = new_figure(6, 4)
    axes = figure.subplots()
    colours = ["C0"] * (len(table) - 1) + ["C3"]
    bars = axes.bar([row["net"] for row in table], [row["top-1 error (%)"] for row in table],
                    color=colours)
    axes.bar_label(bars, fmt="%.2f", fontsize=8)  # the differences are a few points
    axes.set(ylabel="top-1 test error (%)", title="seeded nets and their ensemble")
    axes.tick_params(axis="x", labelrotation=30)
    axes.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def imagenette(records: list[RunRecord], context: Context) -> Outcome:
    """canon's Imagenette recipes against the leaderboard: the final model's top-1 accuracy
    on the validation set after each schedule, on centre crops (as the leaderboard reports
    it), and beside it under AlexNet's ten-crop test protocol."""
    table, findings = [], []
    for record in records:
        recipe = record.run.recipe
        ours, board = 100 - record.test_error, 100 - recipe.reported.top1_error
        ten_crop, images = _ten_crop_accuracy(record, context)
        name = f"{recipe.model.labelled(_label(record))}, {record.epochs} epochs"
        table.append({"run": name, "top-1 accuracy (%)": ours, "leaderboard (%)": board,
                      "ours - leaderboard": ours - board, "top-1, ten-crop (%)": ten_crop,
                      "training error (%)": record.train_error,
                      "epochs s": record.epoch_seconds})
        # The leaderboard's figure is over the same images: a gap within the noise could
        # come from which of them one run gets right.
        noise = counting_noise((100 - ours, images), (100 - board, images))
        findings.append(Finding(
            f"{name} reaches the leaderboard's {board:.2f}% at {record.epochs} epochs",
            ours >= board, f"{ours:.2f}% top-1 on {recipe.data.crop_size} px centre crops, "
            f"{ours - board:+.2f} points, {'within' if abs(ours - board) <= noise else 'beyond'}"
            f" the noise of {images} images ({_noise_note(noise)}; {ten_crop:.2f}% with ten "
            "crops)"))
    result = curves([r.run.run_dir for r in records], context.folder / "curves",
                    names=[row["run"] for row in table])
    return Outcome(table, findings, [Path(result["png"])])


def _ten_crop_accuracy(record: RunRecord, context: Context) -> tuple[float, int]:
    """Top-1 accuracy (%) of the run's final model on the images it validated on, each scored
    by the mean softmax of its four corner and centre crops and their reflections (AlexNet
    s4.1): the papers' test protocol, not the leaderboard's; and how many images those are."""
    micro = micro_datasets(record.run.recipe, context.mode)
    result = _final_model(record).evaluate(
        micro.val if micro else None, "ten-crop", device=context.device)
    return 100 - result["top1_error"], result["images"]


def _final_model(record: RunRecord) -> TrainedModel:
    """The run's final model, its export; not a checkpoint in its place, as load_trained
    falls back to for a damaged export, which in a run that keeps best.pt is another epoch's."""
    export = record.run.run_dir / EXPORT_WEIGHTS
    try:
        return load_trained(export)
    except DataError as error:
        raise DataError(f"{error}. Delete {export} and run this command again: the run then "
                        "resumes from its last checkpoint and exports its final model again"
                        ) from None


ANALYSES: dict[str, Analysis] = {
    "degradation": degradation, "table6": table6, "responses": responses,
    "ensembles": ensembles, "imagenette": imagenette,
}
