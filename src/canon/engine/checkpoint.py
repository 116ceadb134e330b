"""Checkpoints: a run's complete training state, written atomically (canon.files) and read
back with `torch.load(weights_only=True)`, which runs no pickled code since the state holds only
tensors and plain containers; and the exported weights (safetensors) a trained model is loaded
from (canon.engine.trained)."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import subprocess
import uuid
import warnings
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn

from canon.data.normalize import EXPORT_TAG, NORMALIZATION_FILE
from canon.errors import DataError, first_line
from canon.files import atomic_write, folder_holder, sweep_partial_writes

# A run directory holds checkpoints/epoch-NNN.pt (the state after epoch NNN, or where the
# iteration limit ended the run inside it; the last train.keep_checkpoints are kept),
# checkpoints/interrupted.pt (the last step before Ctrl-C, SIGTERM or a file that stopped the
# run mid-epoch), checkpoints/best.pt (the epoch of lowest validation top-1 error), and the
# export.
# A state's "rng" and "epoch_totals" hold one entry per process of the run that wrote it.
CHECKPOINT_DIR = "checkpoints"
# Where --overwrite keeps the earlier run until the new one has a checkpoint
# (canon.engine.rundir.claim_run_dir).
REPLACED_DIR = ".replaced-run"
EXPORT_WEIGHTS = "model.safetensors"  # the trained weights (the EMA's when EMA is on)
EXPORT_CONFIG = "eval_config.json"  # model, classes, class_ids, data section, recipe, commit
EXPORT_NORMALIZATION = NORMALIZATION_FILE  # the mean (image) and std of the inputs
OUTPUT_DIR_ADVICE = "choose a writable --output-dir"  # what to do when a run file cannot be written

# What a resumable checkpoint must hold (dotted: nested), and of which kind.
_STATE_KINDS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "schedule": dict, "scaler": dict, "ema": (dict, type(None)),
    "epoch": int, "step": int, "step_in_epoch": int, "epoch_totals": list, "rng": list,
    "metrics": list, "model_name": str, "classes": list, "normalization": (dict, type(None)),
    "recipe.data": dict, "recipe.model": dict, "recipe.train": dict,
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


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint on the CPU; DataError naming the file if it is missing, unreadable
    (truncated, random bytes, bytes that fail their CRC) or not a canon training checkpoint
    (a key missing). `mmap` leaves the tensors in the file until they are used: for reading a
    checkpoint's counters (the CRCs are still checked: a damaged file is passed over alike)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    damaged = _damaged_record(path)
    if damaged is not None:
        raise DataError(f"{path} is damaged: its record {damaged} no longer matches the checksum "
                        "saved with it (a disk or copy error changed its bytes)"
                        + _run_folder_hint(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # damaged bytes surface as almost any error: IndexError, KeyError..
        raise _unreadable_checkpoint(path, error) from None
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a canon training checkpoint (it holds a "
                        f"{type(state).__name__})")
    if state and all(torch.is_tensor(value) for value in state.values()):
        raise DataError(f"{path} holds a bare state_dict (weights alone, as torch.save("
                        "model.state_dict()) writes), not a canon training checkpoint: for "
                        "torchvision's weights name torchvision:NAME; else load it into "
                        "canon.create_model(NAME) yourself")
    for key, kind in _STATE_KINDS.items():
        checked_field(state, key, kind, path)
    return state


def _unreadable_checkpoint(path: Path, error: Exception) -> DataError:
    disallowed = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and disallowed:
        return DataError(
            f"{path} holds objects other than tensors and plain values ({disallowed[1]}), so "
            "canon will not unpickle it (weights_only=True)"
        )
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        head = b""
    if head and head != b"PK\x03\x04":  # torch.save writes a zip archive
        return DataError(
            f"{path} is not a checkpoint (torch.save's zip archive): pass a run directory, a "
            "checkpoint .pt or a model.safetensors"
        )
    return unreadable_file(path, error)


def _damaged_record(path: Path) -> str | None:
    """The first record of torch.save's zip archive whose bytes fail the CRC-32 saved with
    them, which torch.load does not check (a flipped bit in a tensor loads as a wrong weight);
    None where all pass, or where the archive cannot be read that far (torch.load's error
    then says why). Records saved without a CRC (torch's compute_crc32 off: 0) pass."""
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                try:
                    with archive.open(record) as data:
                        while data.read(1 << 20):
                            pass
                except zipfile.BadZipFile:  # its bytes fail the CRC
                    return record.filename
    except Exception:  # a damaged header: torch.load says what it makes of it
        return None
    return None


def _run_folder_hint(path: Path) -> str:
    """For a checkpoint of a run: its folder, given instead, takes the newest readable one."""
    if path.parent.name != CHECKPOINT_DIR:
        return ""
    return f"; given the run folder {path.parent.parent} instead, canon passes over unreadable ones"


def unreadable_file(path: Path, error: Exception) -> DataError:
    return DataError(f"{path} is unreadable, probably truncated by a crash or a full disk "
                     f"({first_line(error)}){_run_folder_hint(path)}")


def checked_field(
    record: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path
) -> Any:
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


def checked_names(record: dict[str, Any], key: str, source: Path) -> list[str]:
    names = checked_field(record, key, list, source)
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


def _epoch_checkpoints(folder: Path) -> list[Path]:
    """epoch-NNN.pt files, oldest first; a user's epoch-005-backup.pt is not one."""
    found = [p for p in folder.glob("epoch-*.pt") if re.fullmatch(r"epoch-\d+\.pt", p.name)]
    return sorted(found, key=_epoch_number)


def run_epoch_checkpoints(run_dir: Path) -> list[Path]:
    """A run's epoch checkpoints, newest first."""
    return _epoch_checkpoints(run_dir / CHECKPOINT_DIR)[::-1]


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    """Interruption and epoch checkpoints of a run, newest first. interrupted.pt, when there,
    is the newest: the next epoch checkpoint deletes it."""
    epochs = run_epoch_checkpoints(run_dir)
    interrupted = interrupted_checkpoint(run_dir)
    return [interrupted, *epochs] if interrupted.is_file() else epochs


def replaced_run_note(run_dir: Path) -> str:
    """Where a run that --overwrite set aside waits, for the messages of a folder whose new
    run has no epoch checkpoint yet."""
    if not (run_dir / REPLACED_DIR).is_dir():
        return ""
    return (f". The run it replaced waits in {run_dir / REPLACED_DIR} until the new run has "
            "finished an epoch: it comes back if the new run fails, or was killed, before "
            f"writing any checkpoint (at the next `canon train --output-dir {run_dir}`); a new "
            "run stopped by Ctrl-C keeps it aside while it can be resumed")


def load_for_resume(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint at `path` (a run directory or a checkpoint file).

    A checkpoint that cannot be read (e.g. truncated) gets a warning naming it, and the next
    older one of the same run is tried; DataError when none is readable, when the run has no
    checkpoint yet, or when `path` does not exist. The state says which file it came from
    (RESUMED_FROM).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; resume from a run directory or a checkpoint file")
    if path.is_dir():
        candidates = resumable_checkpoints(path)
    else:  # the run's checkpoints older than the one named (none after best.pt, a copy)
        run = [p.resolve() for p in resumable_checkpoints(run_dir_of(path))]
        older = run[run.index(path.resolve()) + 1 :] if path.resolve() in run else []
        candidates = [path, *older]
    holder = None if candidates else folder_holder(path)
    if holder is not None:
        raise DataError(f"{path} is in use by another {holder}, which has not finished its "
                        "first epoch: there is no checkpoint to resume from yet; wait for it")
    if not candidates and not (path / "recipe.yaml").is_file():
        raise DataError(f"{path} holds no run (no recipe.yaml, no checkpoints); resume from a "
                        "run directory or a checkpoint file")
    if not candidates and best_checkpoint(path).is_file():
        raise DataError(
            f"{path / CHECKPOINT_DIR} keeps only best.pt (its epoch checkpoints were deleted): "
            f"to continue from that epoch, resume from the file, --resume {best_checkpoint(path)}"
        )
    if not candidates:
        raise DataError(
            f"no checkpoint to resume from in {path / CHECKPOINT_DIR}: the run has not finished "
            "its first epoch (it may still be running) or stopped before; if it stopped, "
            "start it again without --resume" + replaced_run_note(path)
        )
    errors = []
    for number, candidate in enumerate(candidates, 1):
        try:
            state = load_checkpoint(candidate)
            state[RESUMED_FROM] = str(candidate)
            return candidate, state
        except DataError as error:
            if len(candidates) == 1:  # the one file named: its own error says it all
                raise
            # The folder was given: its hint to give the folder instead would mislead.
            errors.append(str(error).removesuffix(_run_folder_hint(candidate)))
            if number < len(candidates):
                warnings.warn(f"{errors[-1]}; trying an older checkpoint", CheckpointWarning,
                              stacklevel=2)
    raise DataError("no readable checkpoint: " + "; ".join(errors) + ". Nothing of the run can "
                    "be resumed: start it again (canon train --overwrite replaces it)")


# The key load_for_resume adds to a state: the checkpoint file it was read from.
RESUMED_FROM = "resumed_from"


def run_dir_of(path: Path) -> Path:
    """The run directory a checkpoint file belongs to (or `path` itself for a directory)."""
    if path.is_dir():
        return path
    return holding_run_dir(path) or path.parent


def holding_run_dir(path: Path) -> Path | None:
    """The run directory whose checkpoints/ folder holds the file `path`, None where it lies
    in none (`epoch-002.pt` typed inside checkpoints/ is in one)."""
    folder = path.resolve().parent
    return folder.parent if folder.name == CHECKPOINT_DIR else None


def prune_epoch_checkpoints(
    run_dir: Path, keep: int, keep_epochs: Collection[int] = ()
) -> None:
    """Delete all but the newest `keep` epoch checkpoints and those of `keep_epochs` (best.pt
    is a separate copy), and the temporary files of checkpoint writes killed midway."""
    folder = run_dir / CHECKPOINT_DIR
    epochs = _epoch_checkpoints(folder)
    for old in epochs[:-keep]:
        if _epoch_number(old) not in keep_epochs:
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
        # A resume may see fewer GPUs (CUDA_VISIBLE_DEVICES): those it has get theirs.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"],
    ))
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss"])
    )


def model_info(
    name: str, model: nn.Module, num_classes: int, classes: list[str], class_ids: list[str],
    data: dict[str, Any],
) -> dict[str, Any]:
    """What eval_config.json must hold for canon.engine.trained.load_trained to rebuild the
    model: its name, class count and other build options, its classes, and its data section
    (with normalization.safetensors, its test-time preprocessing; the model class's own
    eval_config would misstate a run's crop, resize and mean); writers add their own details
    beside these."""
    return {"model": name, "num_classes": num_classes, "model_options": model.build_options(),
            "classes": classes, "class_ids": class_ids, "data": data}


def export_model(
    run_dir: Path,
    model: nn.Module,
    normalization: dict[str, torch.Tensor | None] | None,
    info: dict[str, Any],
) -> None:
    """model.safetensors, normalization.safetensors (the training set's mean and std the
    inputs were normalised with) and eval_config.json (`info`: model name, classes, data;
    and which normalization file the model needs, so that its loss is an error, not a
    silently different input)."""
    # One id in all three files: a model.safetensors renamed or copied beside another run's
    # eval_config.json is then found out, not read with that run's classes and statistics.
    tag = {EXPORT_TAG: uuid.uuid4().hex}
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    _write_bytes(run_dir / EXPORT_WEIGHTS, safetensors.torch.save(tensors, metadata=tag))
    if normalization is not None:
        stored = {k: v.contiguous() for k, v in normalization.items() if v is not None}
        _write_bytes(run_dir / EXPORT_NORMALIZATION, safetensors.torch.save(stored, metadata=tag))
    info = {**info, **tag,
            "normalization": EXPORT_NORMALIZATION if normalization is not None else None}
    _write_bytes(run_dir / EXPORT_CONFIG, json.dumps(info, indent=2).encode())


def withdraw_export(run_dir: Path) -> int | None:
    """Delete a run's export, weights first, and return the epochs its eval_config.json
    recorded (None without one): a run resumed in place to train further makes it an earlier
    model's, and load_trained would take it for the run's result if the run were killed
    before exporting its own. Until then the run's checkpoints stand for it."""
    try:
        epochs = json.loads((run_dir / EXPORT_CONFIG).read_text()).get("epochs")
    except (OSError, ValueError, AttributeError):
        epochs = None
    for name in (EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_NORMALIZATION):
        (run_dir / name).unlink(missing_ok=True)
    return epochs if isinstance(epochs, int) else None


def _write_bytes(path: Path, content: bytes) -> None:
    # Written by Python, a full disk is an OSError (safetensors' own writer raises its own error).
    atomic_write(path, lambda target: target.write_bytes(content), advice=OUTPUT_DIR_ADVICE)
