"""Ensembles: the papers' headline results average the softmax outputs of several nets under
one test protocol (AlexNet s6, five CNNs; VGG s4.4, "averaging their soft-max class
posteriors"; GoogLeNet s7, seven models, "softmax probabilities are averaged over multiple crops
and over all the individual classifiers"; ResNet s4.1, six models). Each member scores the same
images through its own preprocessing (input size, mean), so nets trained differently combine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from canon.data.config import DataConfig
from canon.data.labeled import LabeledImages
from canon.data.preprocess import EvalPreprocess, center_transform
from canon.errors import ConfigError
from canon.evaluation.metrics import TopKErrors, posteriors_of, ranked
from canon.evaluation.protocols import (
    check_labelled_by,
    class_difference,
    evaluate,
    model_inputs,
    preprocess_for,
)


@dataclass(frozen=True)
class EnsembleMember:
    """One net of an ensemble and what its inputs need (canon.engine's TrainedModel has it all).

    `preprocess` None: for evaluation (a dataset name, folder or LabeledImages set), per
    `data_config` (from the statistics of its training split) or else the model's
    eval_config, as canon.evaluation.evaluate decides; for prediction, the model's
    eval_config."""

    name: str  # how results and errors call it, e.g. its run directory
    model: nn.Module
    class_ids: list[str]  # its outputs' classes by id, in order; the same for every member
    preprocess: EvalPreprocess | None = None
    data_config: DataConfig | None = None  # its recipe's data section
    classes: list[str] | None = None  # human names of its outputs; default: class_ids


def ensemble_probabilities(probabilities: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean of the members' N x K class probability matrices (same images, same classes),
    in float64 (posteriors_of's). A running sum over `probabilities`, which may be a
    generator: it holds the sum and one member's matrix (ImageNet: 400 MB each), not all."""
    total, count = None, 0
    for matrix in probabilities:
        if total is None:
            total = matrix.to(torch.float64, copy=True)  # the caller's stays as it is
        elif matrix.shape != total.shape:
            raise ValueError(f"probability matrices of different shapes: "
                             f"{tuple(total.shape)} and {tuple(matrix.shape)}")
        else:
            total += matrix
        count += 1
    if total is None:
        raise ValueError("an ensemble needs at least one probability matrix")
    return total / count


def evaluate_ensemble(
    members: Sequence[EnsembleMember],
    data: str | Path | LabeledImages,
    protocol: str = "center",
    *,
    keep_probabilities: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Top-1/top-5 error (percent) of each member and of their ensemble, the mean of the
    members' posteriors, on `data` under `protocol`.

    Each member is scored by canon.evaluation.evaluate with its own preprocessing and class
    ids on the same split (`data`: a dataset name or folder, whose split is labelled by the
    members' class ids; or a LabeledImages set whose class_ids are theirs); `options` are
    evaluate's (batch_size, device, workers, scales, strict, progress, ...). Members whose
    class ids differ, or that scored different images (their skipped files differ), are a
    ConfigError naming them. Returns top1_error, top5_error, images, skipped, protocol and
    `members`, each member's evaluate result with its name; with `keep_probabilities` also
    the ensemble's `probabilities` (N x K) and `labels` (N), as evaluate gives them, and
    `member_predictions` (M x N: each member's top-1 class index per image), to compare the
    members image by image.
    """
    _check_classes(members)
    if not isinstance(data, str | Path | LabeledImages):
        raise ConfigError(
            "each member of an ensemble makes its own views of raw images: pass a dataset name "
            f"or folder, or a LabeledImages set, not a {type(data).__name__} of ready tensors"
        )
    if isinstance(data, LabeledImages):
        check_labelled_by(data, members[0].class_ids, "the members'")
    results, predictions = [], []

    def scored() -> Iterator[torch.Tensor]:
        """Each member's probabilities in turn, its other results kept in `results`."""
        for member in members:
            result = evaluate(
                member.model, data, protocol, preprocess=_preprocess(member, data),
                data_config=member.data_config, class_ids=member.class_ids,
                keep_probabilities=True, **options,
            )
            if results and not torch.equal(result["labels"], results[0]["labels"]):
                raise ConfigError(
                    f"{members[0].name!r} and {member.name!r} scored different images "
                    f"({results[0]['images']} and {result['images']}): the image files each "
                    "skipped differ (see the warnings; strict=True stops at the first)"
                )
            results.append(result)
            probabilities = result.pop("probabilities")
            predictions.append(probabilities.argmax(1) if len(probabilities)  # none decoded:
                               else torch.empty(0, dtype=torch.long))  # 0 x 0, no classes
            yield probabilities

    ensemble = ensemble_probabilities(scored())
    labels = results[0]["labels"]
    errors = TopKErrors()
    errors.update(ensemble, labels)
    summary = {
        **errors.result(),
        "skipped": results[0]["skipped"],
        "protocol": results[0]["protocol"],
        "members": [
            {"name": member.name, **{k: v for k, v in result.items() if k != "labels"}}
            for member, result in zip(members, results, strict=True)
        ],
    }
    if keep_probabilities:
        summary.update(probabilities=ensemble, labels=labels,
                       member_predictions=torch.stack(predictions))
    return summary


@torch.inference_mode()
def predict_ensemble(
    members: Sequence[EnsembleMember], images: Sequence[torch.Tensor], top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """The `top_k` (class name, probability) pairs of each decoded image (uint8 RGB tensor
    3 x H x W), probabilities averaged over the members, each scoring its own centre crop on
    the device its model is on."""
    _check_classes(members)
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    if torch.is_tensor(images):  # a batch: `not images` would be ambiguous
        raise ConfigError(f"images must be a list of 3 x H x W tensors, got one tensor of shape "
                          f"{tuple(images.shape)}: pass list(batch)")
    if len(images) == 0:
        raise ConfigError("no images to predict: give at least one")
    for index, image in enumerate(images):  # a float or HWC tensor would be misread silently
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ConfigError(
                f"image {index} is a {image.dtype} tensor of shape {tuple(image.shape)}; "
                "predict takes decoded images as uint8 RGB tensors 3 x H x W (0-255), or files")
    probabilities = ensemble_probabilities(
        [_center_probabilities(member, images) for member in members]
    )
    top = ranked(probabilities, top_k)
    names = members[0].classes or members[0].class_ids
    return [
        [(names[i], p) for i, p in zip(indices.tolist(), values.tolist(), strict=True)]
        for indices, values in zip(top, probabilities.gather(1, top), strict=True)
    ]


@torch.inference_mode()
def _center_probabilities(member: EnsembleMember, images: Sequence[torch.Tensor]) -> torch.Tensor:
    transform = center_transform(member.preprocess or preprocess_for(member.model))
    batch = torch.stack([transform(image) for image in images])
    model = member.model
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return posteriors_of(model(model_inputs(model, batch, device))).cpu()
    finally:
        model.train(was_training)


def _preprocess(member: EnsembleMember, data: object) -> EvalPreprocess | None:
    """A LabeledImages set needs one to make its views with: without the member's own or a
    data_config (from which evaluate makes it, as for a dataset name or folder), its model's
    eval_config's."""
    if member.preprocess is None and member.data_config is None and isinstance(
        data, LabeledImages
    ):
        return preprocess_for(member.model)
    return member.preprocess


def _check_classes(members: Sequence[EnsembleMember]) -> None:
    """Averaging posteriors adds up output i of every member: it must be the same class."""
    if not members:
        raise ConfigError("an ensemble needs at least one member")
    first = members[0]
    for member in members[1:]:
        if member.class_ids != first.class_ids:
            raise ConfigError(
                f"{first.name!r} and {member.name!r} cannot be averaged: their classes differ "
                f"({class_difference(first.class_ids, member.class_ids)})"
            )
