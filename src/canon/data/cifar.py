"""CIFAR-10 and CIFAR-100 in their pickled python format (the datasets of He et al. s4.2):
reading the batches without running code from them, and downloading the published archive,
checked against its md5, and extracting it safely.
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from canon.data.labeled import ArrayImages
from canon.errors import CanonError, DataError
from canon.files import CACHE_ADVICE, STALE_SECONDS, cannot_write, download, file_digest

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}
CIFAR_SIZES = {"train": 50000, "test": 10000}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a CIFAR file cannot run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays as pickle protocol 5 saves them
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


# What to do about a missing or damaged file of a CIFAR folder.
_RECOPY = ("replace it from a complete copy (a copy in canon's cache is downloaded afresh once "
           "its folder is removed)")


def _read_pickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (the CIFAR folder is incomplete): {_RECOPY}") from None
    except OSError as error:  # a folder in its place, no permission, a failing disk
        raise DataError(f"{path}: cannot read it ({error})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a CIFAR pickle ({error}): {_RECOPY}") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: not a CIFAR pickle (expected a dict): {_RECOPY}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _entry(content: dict[str, object], key: str, path: Path) -> object:
    if key not in content:
        raise DataError(f"{path}: not a CIFAR pickle (no {key!r}; it holds "
                        f"{', '.join(map(str, content)) or 'nothing'})")
    return content[key]


def find_cifar(root: Path) -> tuple[str, Path] | None:
    """(name, folder) when `root` is, or holds, a CIFAR-10/100 folder."""
    for name, spec in CIFAR.items():  # one missing its meta file: read_cifar names it
        for folder in (root / spec["folder"], root):
            if folder.name == spec["folder"] and folder.is_dir():
                return name, folder
    return None


def read_cifar(name: str, folder: Path, split: str) -> ArrayImages:
    """One split ("train" or "test") of CIFAR-10/100 from its pickled batches."""
    spec = CIFAR[name]
    meta = _read_pickle(folder / spec["meta"])
    names = _entry(meta, spec["names_key"], folder / spec["meta"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    images, labels = [], []
    for part in spec[split]:
        batch = _read_pickle(folder / part)
        data = np.asarray(batch.get("data"))
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DataError(f"{folder / part}: 'data' is not N x 3072 uint8 (got {data.shape} "
                            f"{data.dtype})")
        part_labels = [int(x) for x in _entry(batch, spec["label_key"], folder / part)]
        if len(part_labels) != len(data):
            raise DataError(f"{folder / part}: {len(data)} images but {len(part_labels)} labels")
        if not all(0 <= label < len(classes) for label in part_labels):
            raise DataError(f"{folder / part}: labels outside 0..{len(classes) - 1}, the "
                            f"{len(classes)} classes of {spec['meta']}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(part_labels)
    array = torch.from_numpy(np.concatenate(images))
    if len(array) != CIFAR_SIZES[split]:
        raise DataError(
            f"{folder}: {split} split has {len(array)} images, expected {CIFAR_SIZES[split]}"
        )
    return ArrayImages(array, labels, classes, name=f"{name}-{split}")


def download_and_verify(url: str, destination: Path, md5: str) -> Path:
    """Fetch `url` to `destination` unless a file with this md5 is there; check the md5."""
    present = file_digest(destination, "md5") if destination.is_file() else None
    if present == md5:
        return destination
    # Offline, the user's copy is all there is: say why it was not used.
    damaged = ("" if present is None else
               f"; {destination} is there but damaged or incomplete (md5 {present}, published "
               f"{md5}): replace it with a good copy")
    download(url, destination, algorithm="md5", published=md5, name=destination.name,
             advice=damaged or f"; fetch it by hand and place it at {destination}",
             write_advice=CACHE_ADVICE)
    return destination


def extract_tar(archive: Path, destination: Path) -> None:
    """Unpack a tar archive, refusing members that would land outside `destination`."""
    with tarfile.open(archive) as tar:
        base = destination.resolve()
        for member in tar.getmembers():
            target = (destination / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(base):
                raise DataError(f"{archive}: unsafe member {member.name!r}; not extracting")
        tar.extractall(destination)


def fetch_cifar(name: str, cache: Path, *, download: bool) -> Path:
    """The CIFAR folder under `cache`, downloading and verifying the archive if needed."""
    spec = CIFAR[name]
    folder = cache / spec["folder"]
    if (folder / spec["meta"]).is_file():
        return folder
    if folder.exists():  # a copy cut short: its files are the user's to finish or remove
        raise DataError(
            f"{folder} has no {spec['meta']}: an incomplete copy of {name}; finish copying it "
            f"or remove the folder to download {name} afresh"
        )
    archive = cache / Path(spec["url"]).name
    if download:
        download_and_verify(spec["url"], archive, spec["md5"])
    elif not archive.is_file():  # offline, an archive placed there by hand will do
        raise DataError(
            f"{name} is not in {cache}; allow download (data.download: true), place "
            f"{archive.name} at {archive}, or point data.dataset at a folder holding "
            f"{spec['folder']}/"
        )
    elif file_digest(archive, "md5") != spec["md5"]:
        raise DataError(f"{archive} is damaged or incomplete (its md5 is not the published "
                        f"{spec['md5']}): replace it with a good copy, or allow download "
                        "(data.download: true)")
    _sweep_stale_unpacking(cache)
    try:
        with tempfile.TemporaryDirectory(dir=cache, prefix=_UNPACKING) as scratch:
            extract_tar(archive, Path(scratch))
            try:
                Path(scratch, spec["folder"]).replace(folder)
            except OSError:  # another process (reproduce --jobs) put its whole copy there first
                if not (folder / spec["meta"]).is_file():
                    raise
    except OSError as error:  # a full disk, a read-only cache
        if isinstance(error, CanonError):  # extract_tar's own (a DataError is an OSError)
            raise
        raise cannot_write(folder, error, CACHE_ADVICE) from None
    return folder


_UNPACKING = ".unpacking-"  # fetch_cifar's scratch folders in the cache


def _sweep_stale_unpacking(cache: Path) -> None:
    """Delete the scratch folders that unpackings killed midway left (STALE_SECONDS old: the
    cache may be shared with a process unpacking now)."""
    for scratch in cache.glob(f"{_UNPACKING}*"):
        try:
            if scratch.is_dir() and time.time() - scratch.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(scratch)
        except OSError:  # gone meanwhile, or another user's
            continue
