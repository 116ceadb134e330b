"""A trained model ready to use: `load_trained` reads a run directory, its exported
model.safetensors (with eval_config.json) or a training checkpoint, and gives the model in eval
mode with its class names and the test-time preprocessing it was trained for."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from canon.data.config import DataConfig
from canon.data.datasets import anchored_dataset
from canon.data.decoding import decode_image_file
from canon.data.normalize import EXPORT_TAG, export_id, published_mean
from canon.data.preprocess import EvalPreprocess, eval_preprocess
from canon.devices import resolve_device
from canon.engine.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_NORMALIZATION,
    EXPORT_WEIGHTS,
    CheckpointWarning,
    best_checkpoint,
    checked_field,
    checked_names,
    interrupted_checkpoint,
    load_checkpoint,
    replaced_run_note,
    run_epoch_checkpoints,
    unreadable_file,
)
from canon.errors import CanonError, ConfigError, DataError, first_line
from canon.evaluation.ensemble import EnsembleMember, predict_ensemble
from canon.evaluation.protocols import evaluate, preprocess_for
from canon.models.factory import create_model
from canon.transfer.torchvision import load_torchvision

TORCHVISION = "torchvision:"  # a source naming torchvision's weights: torchvision:resnet50


@dataclass(frozen=True)
class TrainedModel:
    """A trained model ready for evaluation, with what its inputs need."""

    model: nn.Module
    classes: list[str]  # the name of each output, in order
    class_ids: list[str]  # the dataset's class folder names (ImageNet wnids), in the same order
    preprocess: EvalPreprocess  # the training run's test-time preprocessing
    data: DataConfig  # the recipe's data section
    source: Path
    name: str  # the registered model name (canon.create_model)
    # Its preprocessing subtracts the statistics stored with it (normalization.safetensors or
    # the checkpoint's), not the model class's own.
    stores_normalization: bool = False

    def evaluate(
        self, data: str | Path | None = None, protocol: str = "center", *,
        device: str = "auto", **options: Any,
    ) -> dict[str, Any]:
        """canon.evaluation.evaluate on `data` (default: the dataset it was trained on, its
        evaluation split), under this run's preprocessing and with its classes matched by
        name; `options` are evaluate's (batch_size, workers, strict, progress, ...). The
        result also names the checkpoint and the data."""
        data = data or self.data.dataset
        result = evaluate(
            self.model, data, protocol, device=resolve_device(device), data_config=self.data,
            preprocess=self.preprocess, class_ids=self.class_ids, **options,
        )
        return {**result, "checkpoint": str(self.source), "data": anchored_dataset(str(data))}

    def member(self) -> EnsembleMember:
        """This model as one net of an ensemble (canon.evaluation.ensemble)."""
        return EnsembleMember(str(self.source), self.model, self.class_ids,
                              preprocess=self.preprocess, data_config=self.data,
                              classes=self.classes)

    def predict(
        self, images: Sequence[str | Path | torch.Tensor], top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """The `top_k` (class name, probability) pairs for each image: a file, or a decoded
        uint8 RGB tensor 3 x H x W; centre crop, on the device the model is on."""
        return predict_ensemble([self.member()], decode_images(images, self.data), top_k)


def decode_images(
    images: Sequence[str | Path | torch.Tensor], data: DataConfig
) -> list[torch.Tensor]:
    """Files decoded (within data.max_image_pixels); tensors as they are."""
    pixels = getattr(getattr(images, "dtype", None), "kind", "USO") not in "USO"  # an array's
    if (isinstance(images, (str, Path)) or torch.is_tensor(images) or pixels
            or (not hasattr(images, "__iter__") and not hasattr(images, "__getitem__"))):
        raise ConfigError(f"images must be a list of files or tensors, got one "
                          f"{type(images).__name__}: pass [image]")  # one, a PIL image too
    images = list(images)  # a generator would be spent by the checks below
    for index, image in enumerate(images):
        if not isinstance(image, (str, Path)) and not torch.is_tensor(image):
            raise ConfigError(f"images[{index}] is a {type(image).__name__}: pass image files "
                              "or uint8 RGB tensors 3 x H x W (torchvision's pil_to_tensor "
                              "makes one of a PIL image)")
    folders = [str(image) for image in images if not torch.is_tensor(image)
               and Path(image).is_dir()]
    if folders:  # a result per image given: a folder's files would not say which is which
        raise ConfigError(f"{folders[0]} is a folder: pass its image files, one result each "
                          "(canon predict lists a folder's files for you)")
    limit = data.max_image_pixels
    return [image if torch.is_tensor(image) else decode_image_file(image, limit)
            for image in images]


def recorded_source(source: str | Path) -> str:
    """A model source as a result records it: a file or folder as its absolute path (the
    record may be read from elsewhere), torchvision:NAME as it is."""
    return str(source) if str(source).startswith(TORCHVISION) else str(Path(source).resolve())


def load_trained(path: str | Path) -> TrainedModel:
    """A trained model from a run directory (its export, else its best checkpoint, else its
    last epoch's: runs that validate on the test set keep no best), a model.safetensors file
    (eval_config.json beside it), a training checkpoint (.pt), or `torchvision:NAME[:WEIGHTS]`
    (torchvision's ImageNet weights in canon's model, canon.transfer.torchvision).

    A file that cannot be read is a DataError naming it (and the key at fault); a run
    directory whose export is unreadable falls back to that checkpoint with a
    CheckpointWarning. Runs from before class_ids were saved get their class names as ids.
    """
    if str(path).startswith(TORCHVISION):
        return _load_torchvision(str(path))
    path = Path(path)
    if not path.is_dir():
        return _load_export(path) if path.suffix == ".safetensors" else _load_from_checkpoint(path)
    exported, fallback = path / EXPORT_WEIGHTS, _checkpoint_to_use(path)
    if not exported.is_file() and not fallback.is_file():
        interrupted = interrupted_checkpoint(path)
        advice = (f"; it was stopped in its first epoch: `canon train --resume {path}` goes on, "
                  f"or name {interrupted} itself" if interrupted.is_file() else
                  ": name a run directory, a model.safetensors or a .pt checkpoint")
        raise DataError(f"{path} holds no trained model (no {EXPORT_WEIGHTS}, no epoch "
                        f"checkpoint in its checkpoints/){advice}" + replaced_run_note(path))
    if not exported.is_file():
        return _load_run_checkpoint(path, fallback)
    try:
        return _load_export(exported)
    except CanonError as error:
        if not fallback.is_file():
            raise
        warnings.warn(f"{error}; using {fallback} instead", CheckpointWarning, stacklevel=2)
        return _load_run_checkpoint(path, fallback)


def _load_torchvision(source: str) -> TrainedModel:
    name, _, weights = source.removeprefix(TORCHVISION).partition(":")
    loaded = load_torchvision(name, weights or "DEFAULT")
    preprocess = loaded.preprocess
    data = DataConfig(  # what fine-tuning and `canon eval --data` start from
        dataset="imagenet", augmentation="resnet", crop_size=preprocess.crop_size,
        resize_size=preprocess.resize_size, interpolation=preprocess.interpolation,
        # the constants the weights were trained with, which fine-tuning keeps
        mean=published_mean(preprocess.normalize) or "channel", divide_std=True,
    )
    loaded.model.run_preprocess = preprocess  # what canon.evaluate(model, ...) takes
    return TrainedModel(loaded.model, loaded.classes, loaded.class_ids, preprocess, data,
                        Path(source), loaded.model_name)


def _checkpoint_to_use(run_dir: Path) -> Path:
    """best.pt, else the last epoch's checkpoint (an interrupted state is not a model)."""
    best = best_checkpoint(run_dir)
    epochs = run_epoch_checkpoints(run_dir)
    return best if best.is_file() or not epochs else epochs[0]


def _load_run_checkpoint(run_dir: Path, chosen: Path) -> TrainedModel:
    """The run's `chosen` checkpoint (_checkpoint_to_use), else, when it cannot be read, the
    newest epoch checkpoint besides it, with a CheckpointWarning naming both."""
    try:
        return _load_from_checkpoint(chosen)
    except CanonError as error:
        others = [p for p in run_epoch_checkpoints(run_dir) if p != chosen]
        if not others:
            raise
        warnings.warn(f"{error}; using {others[0]} instead", CheckpointWarning, stacklevel=3)
        return _load_from_checkpoint(others[0])


def _load_export(path: Path) -> TrainedModel:
    config_path = path.with_name(EXPORT_CONFIG)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if not config_path.is_file():
        raise DataError(f"{path} needs {EXPORT_CONFIG} beside it (training writes both)")
    info = _json_object(config_path)
    norm_path = path.with_name(EXPORT_NORMALIZATION)
    if info.get("normalization") and not norm_path.is_file():
        raise DataError(
            f"{norm_path} is missing: the model's inputs were normalised with the training "
            f"set's mean and std it holds ({config_path} says so); copy it beside {path.name}, "
            "or load the run's checkpoint instead")
    normalization = _safetensors(norm_path) if norm_path.is_file() else None
    if normalization is not None:
        checked_field(normalization, "mean", torch.Tensor, norm_path)
        _check_same_export(norm_path, info, config_path)
    _check_same_export(path, info, config_path)
    classes = checked_names(info, "classes", config_path)
    return _assemble(
        path, name=checked_field(info, "model", str, config_path),
        num_classes=checked_field(info, "num_classes", int, config_path), classes=classes,
        class_ids=checked_names(info, "class_ids", config_path) if "class_ids" in info else classes,
        data=checked_field(info, "data", dict, config_path), weights=_safetensors(path),
        normalization=normalization,
        options=checked_field(info, "model_options", dict, config_path)
        if "model_options" in info else {},
    )


def _load_from_checkpoint(path: Path) -> TrainedModel:
    state = load_checkpoint(path)  # it has checked the kinds of model_name, ema, recipe.data
    classes = checked_names(state, "classes", path)
    if state["normalization"] is not None:
        checked_field(state, "normalization.mean", torch.Tensor, path)
    num_classes = checked_field(state, "recipe.model.num_classes", (int, type(None)), path)
    weights = state["model"]
    if state["ema"] is not None:  # the averaged weights are the ones validated and exported
        weights = {
            key.removeprefix("module."): value for key, value in state["ema"].items()
            if key != "n_averaged"
        }
    return _assemble(
        path, name=state["model_name"], num_classes=num_classes or len(classes),
        classes=classes,
        class_ids=checked_names(state, "class_ids", path) if "class_ids" in state else classes,
        data=state["recipe"]["data"], weights=weights, normalization=state["normalization"],
        # a model given to canon.train built with other options (checkpoints from before
        # these were saved hold models built with none)
        options=checked_field(state, "model_options", dict, path)
        if "model_options" in state else {},
    )


def _assemble(
    source: Path, *, name: str, num_classes: int, classes: list[str], class_ids: list[str],
    data: dict[str, Any], weights: dict[str, Any], normalization: dict[str, Any] | None,
    options: dict[str, Any] | None = None,
) -> TrainedModel:
    if len(class_ids) != len(classes) or (classes and len(classes) != num_classes):
        # A name per output, or predictions print misaligned names (or none: an IndexError).
        raise DataError(f"{source}: {len(classes)} class names and {len(class_ids)} class ids "
                        f"for a model of {num_classes} outputs (an edited or damaged "
                        f"{EXPORT_CONFIG} or checkpoint); load the run's own files")
    try:
        model = create_model(name, num_classes, **(options or {}))
    except TypeError as error:  # an option the model's builder does not take
        raise DataError(f"{source}: cannot build {name} with {options} ({error})") from None
    try:
        model.load_state_dict(weights)
    except Exception as error:  # wrong names or shapes, or values that are not tensors
        raise DataError(
            f"{source}: its weights do not fit {name} with {num_classes} classes "
            f"({first_line(error)})"
        ) from None
    damaged = next((key for key, value in model.state_dict().items()
                    if value.is_floating_point() and not torch.isfinite(value).all()), None)
    if damaged is not None:  # canon saves none such: the file was damaged after
        raise DataError(f"{source}: its weight {damaged} holds NaN or infinite values (a "
                        "damaged file); load the run's checkpoints/ or an earlier copy")
    model.eval()
    try:
        data_config = DataConfig.from_dict(data)
    except ConfigError as error:  # a key or value this canon does not know
        raise DataError(f"{source}: its data section: {error} (written by another version of "
                        "canon?)") from None
    if normalization is None:  # trained on ready tensors: fall back to the model's own
        preprocess = preprocess_for(model, data_config.image_fit())
    else:
        preprocess = eval_preprocess(
            data_config, mean=normalization["mean"], std=normalization.get("std")
        )
    model.run_preprocess = preprocess  # what canon.evaluate(model, ...) takes as its own
    return TrainedModel(model, classes, class_ids, preprocess, data_config, source, name,
                        stores_normalization=normalization is not None)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise unreadable_file(path, error) from None
    if not isinstance(info, dict):
        raise DataError(f"{path} holds a JSON {type(info).__name__}, not the object canon "
                        "train writes")
    return info


def _check_same_export(path: Path, info: dict[str, Any], config_path: Path) -> None:
    """Refuse a file that export_model wrote with another eval_config.json (or beside one from
    before the id); one without an id (rewritten by another tool) is warned of; exports from
    before the id are taken as they are."""
    tag = info.get(EXPORT_TAG)
    try:
        theirs = export_id(path)
    except Exception as error:  # as _safetensors: a truncated or foreign file
        raise unreadable_file(path, error) from None
    if tag is None and theirs is None:  # an export from before the id
        return
    if theirs is None:  # rewritten by another tool (an fp16 copy, pruning): no id to compare
        warnings.warn(f"{path} carries no export id (rewritten by another tool?): read with the "
                      f"{config_path.name} beside it", stacklevel=4)
    elif theirs != tag:
        raise DataError(f"{path} was not exported with {config_path} (another export's file, "
                        "renamed or copied beside it): keep each run's model.safetensors, "
                        f"{EXPORT_CONFIG} and {EXPORT_NORMALIZATION} together")


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except Exception as error:  # SafetensorError, OSError, ... for a truncated or foreign file
        raise unreadable_file(path, error) from None
