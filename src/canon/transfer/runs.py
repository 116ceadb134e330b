"""`canon transfer`: a trained network (a run, a checkpoint, model.safetensors or
torchvision:NAME) carried to a new dataset, by a linear probe on its frozen features or by
fine-tuning. Either way the result is an ordinary run directory: `canon eval`, `canon predict`
and `--init-from` read it as they read a training run."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from canon.data.datasets import Images, anchored_dataset, open_split
from canon.data.normalize import PUBLISHED
from canon.devices import resolve_device
from canon.engine.checkpoint import export_model, model_info
from canon.engine.rundir import PROBE_REPORT, check_source_outside, claim_run_dir
from canon.engine.trained import TrainedModel, load_trained, recorded_source
from canon.engine.trainer import TrainResult, train
from canon.errors import ConfigError, DataError
from canon.files import atomic_write, make_folder, sweep_partial_writes
from canon.recipes import apply_overrides, flag_overrides
from canon.recipes.schema import Recipe
from canon.transfer.features import Features, extract_features, features_fingerprint
from canon.transfer.probe import train_linear_probe
from canon.validation import plain

MODES = ("linear-probe", "finetune")
FEATURE_CACHE = "features"

# Fine-tuning's defaults, canon's choices where a recipe says nothing (Kornblith et al. 2019
# s3 fine-tuned with SGD, momentum 0.9, batch 256 and a tuned lr; canon fixes one): the new
# classifier at lr 0.01 per 256 images (0.0025 at the batch of 64, by the linear scaling
# rule), the transferred layers at a tenth of it, a cosine decay over 10 epochs.
FINETUNE_DEFAULTS: dict[str, dict[str, Any]] = {
    "optimizer": {"lr": 0.01, "base_batch_size": 256, "momentum": 0.9, "weight_decay": 1e-4,
                  "backbone_lr_scale": 0.1},
    "schedule": {"kind": "cosine"},
    "train": {"epochs": 10, "batch_size": 64},
}


def transfer(
    source: str, data: str | Path, mode: str, out: str | Path, *,
    overrides: Sequence[str | tuple[str, Any]] = (), overwrite: bool = False, device: str = "auto",
    batch_size: int | None = None, workers: int | None = None, progress: bool = True,
) -> Path:
    """Carry `source` to the dataset `data` by `mode`, writing the run directory `out`.
    `overrides` are recipe `--set` assignments for fine-tuning; `batch_size` and `workers`
    (None: each mode's default) are the probe's feature batches and decoding processes, or
    fine-tuning's train.batch_size and train.workers (not also given by a --set)."""
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "finetune":
        given = flag_overrides([("--batch-size", "train.batch_size", batch_size),
                                ("--workers", "train.workers", workers)], overrides)
        return finetune(source, data, out, overrides=[*given, *overrides],
                        overwrite=overwrite, device=device, progress=progress).run_dir
    if overrides:
        raise ConfigError("--set applies to fine-tuning; a linear probe has no recipe")
    return linear_probe(source, data, out, overwrite=overwrite, device=device,
                        batch_size=64 if batch_size is None else batch_size,
                        workers=workers or 0, progress=progress)


def linear_probe(
    source: str, data: str | Path, out: str | Path, *, overwrite: bool = False,
    device: str = "auto", batch_size: int = 64, workers: int = 0, progress: bool = True,
) -> Path:
    """Features of both splits (cached in out/features/), the probe fitted on the training
    split's, its error on the evaluation split's; exported as the source network with the
    probe as its classifier."""
    out, data = Path(out), anchored_dataset(str(data))
    check_source_outside(out, source, "the source")
    trained = load_trained(source)
    trained.model.to(resolve_device(device))
    with claim_run_dir(out, resume=False, overwrite=overwrite):
        sweep_partial_writes(out / FEATURE_CACHE)  # a killed probe's: as big as the cache
        started = time.perf_counter()
        # Both opened first: a val class the training split lacks is refused before any
        # extraction. Labelled by the training split's classes, which the probe's outputs follow.
        train_images = open_split(data, "train")
        val_images = open_split(data, "val", class_ids=train_images.class_ids)
        train_set, val_set = (
            _cached_features(trained, data, split, images, out, batch_size, workers, progress)
            for split, images in (("train", train_images), ("val", val_images)))
        num_classes = len(train_set.classes)
        result = train_linear_probe(train_set.features, train_set.labels, num_classes)
        errors = result.classifier.errors(val_set.features, val_set.labels)
        model = trained.model.cpu()
        model.reset_classifier(num_classes)
        with torch.no_grad():
            model.classifier.weight.copy_(result.classifier.weight)
            model.classifier.bias.copy_(result.classifier.bias)
        report = {
            "source": recorded_source(trained.source), "mode": "linear-probe", "data": data,
            "train_images": len(train_set.labels), "val_images": len(val_set.labels),
            "l2": result.l2, "l2_search": result.search, **errors,
            "seconds": time.perf_counter() - started,
        }
        _export(out, trained, data, train_set, {"transfer": report, **errors})
        atomic_write(out / PROBE_REPORT, lambda t: t.write_text(json.dumps(report, indent=2)))
    print(f"linear probe of {trained.source} on {data}: top-1 error {errors['top1_error']:.2f}%, "
          f"top-5 {errors['top5_error']:.2f}% on {len(val_set.labels)} images (L2 {result.l2:g},"
          f" chosen on a fifth of the {len(train_set.labels)} training images); wrote {out}")
    return out


def finetune(
    source: str, data: str | Path, out: str | Path, *,
    overrides: Sequence[str | tuple[str, Any]] = (), overwrite: bool = False,
    device: str = "auto", progress: bool = True,
) -> TrainResult:
    """A training run of the source's network on `data`, started from its weights (all but
    the class layers, which get the new class count), under the source's data preprocessing
    and FINETUNE_DEFAULTS, then `overrides`."""
    trained = load_trained(source)
    return train(finetune_recipe(trained, source, str(data), overrides), out,
                 overwrite=overwrite, device=device, progress=progress)


def finetune_recipe(
    trained: TrainedModel, source: str, data: str, overrides: Sequence[str | tuple[str, Any]] = ()
) -> Recipe:
    """The source's network, data section and weights on `data`. Inputs are normalised as the
    source's were: by its published constants, or by the statistics of the set it trained on,
    read from the source (data.normalization_from), not computed anew on `data`; unless
    `overrides` change data.mean, divide_std or pixel_scale (then they hold, by statistics of
    `data` where they need them) or set data.normalization_from themselves."""
    stored = (str(trained.source.resolve())
              if trained.data.mean not in PUBLISHED and trained.stores_normalization else None)
    values = {
        "name": f"finetune-{trained.name}", "source": f"fine-tuned from {trained.source}",
        "description": f"{trained.name} fine-tuned on {data} from {trained.source}",
        "model": {"name": trained.name, "init_from": source,
                  "options": trained.model.build_options()},
        "data": {**plain(trained.data), "dataset": data, "val_split": 0,
                 **({"normalization_from": stored} if stored else {})},
        **FINETUNE_DEFAULTS,
    }
    recipe = apply_overrides(Recipe.from_dict(values, "fine-tuning recipe"), overrides)
    changed = any(getattr(recipe.data, key) != getattr(trained.data, key)
                  for key in ("mean", "divide_std", "pixel_scale"))
    if changed and stored is not None and recipe.data.normalization_from == stored:
        recipe = apply_overrides(recipe, [("data.normalization_from", None)])
    return recipe


def _cached_features(
    trained: TrainedModel, data: str, split: str, images: Images, out: Path, batch_size: int,
    workers: int, progress: bool,
) -> Features:
    """The features of `images` (split `split` of `data`), read back from out/features/ when
    this run computed them before from the same weights, preprocessing, images and classes (a
    re-run with --overwrite skips the network)."""
    path = out / FEATURE_CACHE / f"{split}.safetensors"
    if path.is_file():
        try:
            cached = Features.load(path)
        except DataError as error:  # canon's own cache: computed again, not a reason to stop
            warnings.warn(f"{error}; extracting the features again", stacklevel=2)
        else:
            if cached.fingerprint == features_fingerprint(trained, images):
                return cached
    features = extract_features(trained, images, f"{data} {split}", batch_size=batch_size,
                                workers=workers, progress=progress)
    make_folder(path.parent)
    features.save(path)
    return features


def _export(
    out: Path, trained: TrainedModel, data: str, train_set: Features, extra: dict[str, Any]
) -> None:
    """model.safetensors, normalization and eval_config.json as training writes them."""
    model = trained.model
    normalize = trained.preprocess.normalize
    data_section = plain(dataclasses.replace(trained.data, dataset=data, val_split=0))
    info = model_info(trained.name, model, len(train_set.classes), train_set.classes,
                      train_set.class_ids, data_section)
    export_model(out, model, {"mean": normalize.mean, "std": normalize.std}, {**info, **extra})
