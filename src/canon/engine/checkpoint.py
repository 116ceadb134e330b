"""Checkpoints: complete training state, written atomically, read back with weights_only=True.

A run directory holds
```
checkpoints/epoch-NNN.pt     state after epoch NNN (the last `keep_checkpoints` are kept)
checkpoints/interrupted.pt   state at the last finished optimizer step before Ctrl-C
checkpoints/best.pt          the epoch with the lowest validation top-1 error
model.safetensors            the trained weights (the EMA weights when EMA is on)
normalization.safetensors    the mean (image) and std the training inputs were normalised by
eval_config.json             model name, classes, class_ids, data section, recipe, commit, errors
```
Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target (os.replace), so a crash mid-write never leaves a half-written checkpoint under a
real name (pruning and claiming the directory sweep such temporary files away). The state holds
only tensors and plain containers (the recipe as a dict), so `torch.load(weights_only=True)`
reads it without running any pickled code. Its "rng" and "epoch_totals" are lists with one
entry per process of the run that wrote it (rank order).
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn

from canon.data.config import DataConfig
from canon.data.datasets import decode_image_file
from canon.data.transforms import EvalPreprocess, center_transform, eval_preprocess
from canon.errors import CanonError, DataError
from canon.evaluation.protocols import preprocess_for
from canon.files import atomic_write, sweep_partial_writes
from canon.models.factory import create_model

CHECKPOINT_DIR = "checkpoints"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "eval_config.json"
EXPORT_NORMALIZATION = "normalization.safetensors"
OUTPUT_DIR_ADVICE = "choose a writable --output-dir"  # what to do when a run file cannot be written

# What a resumable checkpoint must hold (dotted: nested), and of which kind.
_STATE_KINDS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "schedule": dict, "scaler": dict, "ema": (dict, type(None)),
    "epoch": int, "step": int, "step_in_epoch": int, "epoch_totals": list, "rng": list,
    "metrics": list, "model_name": str, "classes": list, "normalization": (dict, type(None)),
    "recipe.data": dict, "recipe.model": dict,
}
_MISSING = object()


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be read and was passed over for an older one."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(Path(path), lambda target: _save_state(state, target), advice=OUTPUT_DIR_ADVICE)


def _save_state(state: dict[str, Any], target: Path) -> None:
    """torch.save through a Python file, so that a full disk surfaces as its OSError: torch's
    own writer, and its zip writer closing after a failed write, raise a RuntimeError."""
    with open(target, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as error:
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise


def copy_checkpoint(source: Path, target: Path) -> None:
    atomic_write(
        target, lambda temporary: shutil.copyfile(source, temporary), advice=OUTPUT_DIR_ADVICE
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; DataError naming the file if it is missing, unreadable
    (truncated, random bytes) or not a canon training checkpoint (a key missing)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged bytes surface as almost any error: IndexError, KeyError..
        raise _unreadable_checkpoint(path, error) from None
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a canon training checkpoint (it holds a "
                        f"{type(state).__name__})")
    for key, kind in _STATE_KINDS.items():
        _field(state, key, kind, path)
    return state


def _unreadable_checkpoint(path: Path, error: Exception) -> DataError:
    disallowed = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and disallowed:
        return DataError(
            f"{path} holds objects other than tensors and plain values ({disallowed[1]}), so "
            "canon will not unpickle it (weights_only=True)"
        )
    return _unreadable(path, error)


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(f"{path} is unreadable, probably truncated by a crash or a full disk "
                     f"({_first_line(error)})")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path) -> Any:
    """record[key] (a dotted key reaches into nested dicts), checked to be of `kind`;
    DataError naming `source` and the key otherwise."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
    if value is _MISSING or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise _invalid(source, key, " or ".join(
            "null" if k is type(None) else k.__name__ for k in kinds
        ))
    return value


def _names(record: dict[str, Any], key: str, source: Path) -> list[str]:
    names = _field(record, key, list, source)
    if not all(isinstance(name, str) for name in names):
        raise _invalid(source, key, "a list of names")
    return names


def _invalid(source: Path, key: str, expected: str) -> DataError:
    return DataError(
        f"{source} has no valid '{key}' ({expected} expected): it was not written by canon "
        "train, or it was damaged"
    )


def epoch_checkpoint(run_dir: Path, epoch: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"epoch-{epoch:03d}.pt"


def interrupted_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / "interrupted.pt"


def best_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / "best.pt"


def _epoch_number(path: Path) -> int:
    return int(path.stem.removeprefix("epoch-"))


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    """Interruption and epoch checkpoints of a run, newest first. interrupted.pt, when there,
    is the newest: the next epoch checkpoint deletes it."""
    folder = run_dir / CHECKPOINT_DIR
    epochs = sorted(folder.glob("epoch-*.pt"), key=_epoch_number, reverse=True)
    interrupted = interrupted_checkpoint(run_dir)
    return [interrupted, *epochs] if interrupted.is_file() else epochs


def load_for_resume(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint at `path` (a run directory or a checkpoint file).

    A checkpoint that cannot be read (e.g. truncated) gets a warning naming it, and the next
    older one of the same run is tried; DataError when none is readable, when the run has no
    checkpoint yet, or when `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; resume from a run directory or a checkpoint file")
    if path.is_dir():
        candidates = resumable_checkpoints(path)
    else:
        older = [p for p in resumable_checkpoints(run_dir_of(path)) if p != path]
        candidates = [path, *older]
    if not candidates:
        raise DataError(
            f"no checkpoint to resume from in {path / CHECKPOINT_DIR}: the run stopped before "
            "its first checkpoint was written; simply start it again, without --resume"
        )
    errors = []
    for candidate in candidates:
        try:
            return candidate, load_checkpoint(candidate)
        except DataError as error:
            errors.append(str(error))
            warnings.warn(f"{error}; trying an older checkpoint", CheckpointWarning, stacklevel=2)
    raise DataError("no readable checkpoint: " + "; ".join(errors))


def run_dir_of(path: Path) -> Path:
    """The run directory a checkpoint file belongs to (or `path` itself for a directory)."""
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent


def prune_epoch_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` epoch checkpoints (best.pt is a separate copy), and the
    temporary files of checkpoint writes killed midway."""
    folder = run_dir / CHECKPOINT_DIR
    epochs = sorted(folder.glob("epoch-*.pt"), key=_epoch_number)
    for old in epochs[:-keep]:
        old.unlink()
    sweep_partial_writes(folder)


def git_commit() -> str | None:
    """The commit of the canon source tree, with '-dirty' when it has uncommitted changes."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position, "has_gauss": has_gauss, "cached": cached,
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"],
    ))
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss"])
    )


def export_model(
    run_dir: Path,
    model: nn.Module,
    normalization: dict[str, torch.Tensor | None] | None,
    info: dict[str, Any],
) -> None:
    """model.safetensors, normalization.safetensors (the training set's mean and std the
    inputs were normalised with) and eval_config.json (`info`: model name, classes, data)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    _write_bytes(run_dir / EXPORT_WEIGHTS, safetensors.torch.save(tensors))
    if normalization is not None:
        stored = {k: v.contiguous() for k, v in normalization.items() if v is not None}
        _write_bytes(run_dir / EXPORT_NORMALIZATION, safetensors.torch.save(stored))
    _write_bytes(run_dir / EXPORT_CONFIG, json.dumps(info, indent=2).encode())


def _write_bytes(path: Path, content: bytes) -> None:
    # Written by Python, a full disk is an OSError (safetensors' own writer raises its own error).
    atomic_write(path, lambda target: target.write_bytes(content), advice=OUTPUT_DIR_ADVICE)


@dataclass(frozen=True)
class TrainedModel:
    """A trained model ready for evaluation, with what its inputs need."""

    model: nn.Module
    classes: list[str]  # the name of each output, in order
    class_ids: list[str]  # the dataset's class folder names (ImageNet wnids), in the same order
    preprocess: EvalPreprocess  # the training run's test-time preprocessing
    data: DataConfig  # the recipe's data section
    source: Path

    @torch.inference_mode()
    def predict(self, paths: list[str | Path], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` (class name, probability) pairs for each image file, centre crop, on
        the device the model is on."""
        transform = center_transform(self.preprocess)
        limit = self.data.max_image_pixels
        batch = torch.stack([transform(decode_image_file(p, limit)) for p in paths])
        device = next(self.model.parameters()).device
        probabilities = self.model(batch.to(device)).float().softmax(1).cpu()
        top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        return [
            [(self.classes[i], p) for i, p in zip(idx.tolist(), probs.tolist(), strict=True)]
            for idx, probs in zip(top.indices, top.values, strict=True)
        ]


def new_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3, ... when taken: every run gets its own directory."""
    candidate, number = root / name, 1
    while candidate.exists():
        number += 1
        candidate = root / f"{name}-{number}"
    return candidate


def latest_run_dir(root: Path, name: str) -> Path:
    """The most recently written run of recipe `name` under `root` (for a bare --resume)."""
    numbered = [p for p in root.glob(f"{name}-*") if p.name[len(name) + 1 :].isdigit()]
    runs = [p for p in (root / name, *numbered) if resumable_checkpoints(p)]
    if not runs:
        raise DataError(
            f"no run of {name} with checkpoints under {root}/; pass --resume PATH "
            "(a run directory or a checkpoint file)"
        )
    return max(runs, key=lambda run: resumable_checkpoints(run)[0].stat().st_mtime_ns)


def load_trained(path: str | Path) -> TrainedModel:
    """A trained model from a run directory (its export, else its best checkpoint), a
    model.safetensors file (eval_config.json beside it) or a training checkpoint (.pt).

    A file that cannot be read is a DataError naming it (and the key at fault); a run
    directory whose export is unreadable falls back to checkpoints/best.pt with a
    CheckpointWarning. Runs from before class_ids were saved get their class names as ids.
    """
    path = Path(path)
    if not path.is_dir():
        return _load_export(path) if path.suffix == ".safetensors" else _load_from_checkpoint(path)
    exported, best = path / EXPORT_WEIGHTS, best_checkpoint(path)
    if not exported.is_file():
        return _load_from_checkpoint(best)
    try:
        return _load_export(exported)
    except CanonError as error:
        if not best.is_file():
            raise
        warnings.warn(f"{error}; using {best} instead", CheckpointWarning, stacklevel=2)
        return _load_from_checkpoint(best)


def _load_export(path: Path) -> TrainedModel:
    config_path = path.with_name(EXPORT_CONFIG)
    if not path.is_file() or not config_path.is_file():
        raise DataError(f"{path} needs {EXPORT_CONFIG} beside it (training writes both)")
    info = _json_object(config_path)
    norm_path = path.with_name(EXPORT_NORMALIZATION)
    normalization = _safetensors(norm_path) if norm_path.is_file() else None
    if normalization is not None:
        _field(normalization, "mean", torch.Tensor, norm_path)
    classes = _names(info, "classes", config_path)
    return _assemble(
        path, name=_field(info, "model", str, config_path),
        num_classes=_field(info, "num_classes", int, config_path), classes=classes,
        class_ids=_names(info, "class_ids", config_path) if "class_ids" in info else classes,
        data=_field(info, "data", dict, config_path), weights=_safetensors(path),
        normalization=normalization,
    )


def _load_from_checkpoint(path: Path) -> TrainedModel:
    state = load_checkpoint(path)  # it has checked the kinds of model_name, ema, recipe.data
    classes = _names(state, "classes", path)
    if state["normalization"] is not None:
        _field(state, "normalization.mean", torch.Tensor, path)
    num_classes = _field(state, "recipe.model.num_classes", (int, type(None)), path)
    weights = state["model"]
    if state["ema"] is not None:  # the averaged weights are the ones validated and exported
        weights = {
            key.removeprefix("module."): value for key, value in state["ema"].items()
            if key != "n_averaged"
        }
    return _assemble(
        path, name=state["model_name"], num_classes=num_classes or len(classes),
        classes=classes,
        class_ids=_names(state, "class_ids", path) if "class_ids" in state else classes,
        data=state["recipe"]["data"], weights=weights, normalization=state["normalization"],
    )


def _assemble(
    source: Path, *, name: str, num_classes: int, classes: list[str], class_ids: list[str],
    data: dict[str, Any], weights: dict[str, Any], normalization: dict[str, Any] | None,
) -> TrainedModel:
    model = create_model(name, num_classes)
    try:
        model.load_state_dict(weights)
    except Exception as error:  # wrong names or shapes, or values that are not tensors
        raise DataError(
            f"{source}: its weights do not fit {name} with {num_classes} classes "
            f"({_first_line(error)})"
        ) from None
    model.eval()
    data_config = DataConfig.from_dict(data)
    if normalization is None:  # trained on ready tensors: fall back to the model's own
        preprocess = preprocess_for(model, data_config.augmentation)
    else:
        preprocess = eval_preprocess(
            data_config, mean=normalization["mean"], std=normalization.get("std")
        )
    return TrainedModel(model, classes, class_ids, preprocess, data_config, source)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise _unreadable(path, error) from None
    if not isinstance(info, dict):
        raise DataError(f"{path} holds a JSON {type(info).__name__}, not the object canon "
                        "train writes")
    return info


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except Exception as error:  # SafetensorError, OSError, ... for a truncated or foreign file
        raise _unreadable(path, error) from None

