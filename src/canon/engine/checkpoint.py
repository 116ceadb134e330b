"""Checkpoints: complete training state, written atomically, read back with weights_only=True.

A run directory holds
```
checkpoints/epoch-NNN.pt     state after epoch NNN (the last `keep_checkpoints` are kept)
checkpoints/interrupted.pt   state at the last finished optimizer step before Ctrl-C
checkpoints/best.pt          the epoch with the lowest validation top-1 error
model.safetensors            the trained weights (the EMA weights when EMA is on)
normalization.safetensors    the mean (image) and std the training inputs were normalised by
eval_config.json             model name, classes, data section, recipe, commit, final errors
```
Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target (os.replace), so a crash mid-write never leaves a half-written checkpoint under a
real name. The state holds only tensors and plain containers (the recipe as a dict), so
`torch.load(weights_only=True)` reads it without running any pickled code. Its "rng" and
"epoch_totals" are lists with one entry per process of the run that wrote it (rank order).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import subprocess
import warnings
import zipfile
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
from canon.errors import DataError
from canon.evaluation.protocols import preprocess_for
from canon.files import atomic_write
from canon.registry import create_model

CHECKPOINT_DIR = "checkpoints"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "eval_config.json"
EXPORT_NORMALIZATION = "normalization.safetensors"


class CheckpointWarning(UserWarning):
    """A checkpoint that could not be read and was passed over for an older one."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(Path(path), lambda target: torch.save(state, target))


def copy_checkpoint(source: Path, target: Path) -> None:
    atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; DataError if it is missing, truncated or not canon's."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DataError(
            f"{path} holds objects other than tensors and plain values, so canon will not "
            f"unpickle it (weights_only=True): {str(error).splitlines()[-1][:200]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(
            f"checkpoint {path} is unreadable, probably truncated by a crash or a full disk "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise DataError(f"{path} is not a canon training checkpoint")
    return state


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
    older one of the same run is tried; DataError when none is readable.
    """
    path = Path(path)
    if path.is_dir():
        candidates = resumable_checkpoints(path)
    else:
        older = [p for p in resumable_checkpoints(run_dir_of(path)) if p != path]
        candidates = [path, *older]
    if not candidates:
        raise DataError(f"no checkpoint to resume from in {path / CHECKPOINT_DIR}")
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
    """Delete all but the newest `keep` epoch checkpoints (best.pt is a separate copy)."""
    epochs = sorted((run_dir / CHECKPOINT_DIR).glob("epoch-*.pt"), key=_epoch_number)
    for old in epochs[:-keep]:
        old.unlink()


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
    atomic_write(
        run_dir / EXPORT_WEIGHTS, lambda target: safetensors.torch.save_file(tensors, target)
    )
    if normalization is not None:
        stored = {k: v.contiguous() for k, v in normalization.items() if v is not None}
        atomic_write(
            run_dir / EXPORT_NORMALIZATION,
            lambda target: safetensors.torch.save_file(stored, target),
        )
    atomic_write(
        run_dir / EXPORT_CONFIG, lambda target: target.write_text(json.dumps(info, indent=2))
    )


@dataclass(frozen=True)
class TrainedModel:
    """A trained model ready for evaluation, with what its inputs need."""

    model: nn.Module
    classes: list[str]
    preprocess: EvalPreprocess  # the training run's test-time preprocessing
    data: DataConfig  # the recipe's data section
    source: Path

    @torch.inference_mode()
    def predict(self, paths: list[str | Path], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` (class name, probability) pairs for each image file, centre crop."""
        transform = center_transform(self.preprocess)
        batch = torch.stack([transform(decode_image_file(p)) for p in paths])
        probabilities = self.model(batch).float().softmax(1)
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
    model.safetensors file (eval_config.json beside it) or a training checkpoint (.pt)."""
    path = Path(path)
    if path.is_dir():
        exported = path / EXPORT_WEIGHTS
        path = exported if exported.is_file() else best_checkpoint(path)
    if path.suffix == ".safetensors":
        config_path = path.with_name(EXPORT_CONFIG)
        if not path.is_file() or not config_path.is_file():
            raise DataError(f"{path} needs {EXPORT_CONFIG} beside it (training writes both)")
        info = json.loads(config_path.read_text())
        weights = safetensors.torch.load_file(path)
        norm_path = path.with_name(EXPORT_NORMALIZATION)
        normalization = safetensors.torch.load_file(norm_path) if norm_path.is_file() else None
        name, classes, data = info["model"], info["classes"], info["data"]
        num_classes = info["num_classes"]
    else:
        state = load_checkpoint(path)
        weights, normalization = state["model"], state["normalization"]
        if state["ema"] is not None:  # the averaged weights are the ones validated and exported
            weights = {
                key.removeprefix("module."): value for key, value in state["ema"].items()
                if key != "n_averaged"
            }
        name, classes, data = state["model_name"], state["classes"], state["recipe"]["data"]
        num_classes = state["recipe"]["model"]["num_classes"] or len(classes)
    model = create_model(name, num_classes)
    model.load_state_dict(weights)
    model.eval()
    data_config = DataConfig.from_dict(data)
    if normalization is None:  # trained on ready tensors: fall back to the model's own
        preprocess = preprocess_for(model, data_config.augmentation)
    else:
        preprocess = eval_preprocess(
            data_config, mean=normalization["mean"], std=normalization.get("std")
        )
    return TrainedModel(model, list(classes), preprocess, data_config, path)
