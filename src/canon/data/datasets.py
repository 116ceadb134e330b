"""Datasets: ImageNet/ImageFolder trees, CIFAR-10/100 in their pickled format, the bundled sample.

Every dataset yields `(transform(image), label)` where `image` is the decoded picture as a
uint8 tensor 3 x H x W (RGB) and `transform` defaults to the identity. `.classes` holds human
names where known (from a synset mapping file next to the tree), else the folder names.

Bad files never stop a run: zero-byte files and files without an image extension are skipped
when the tree is scanned, and files that fail to decode are skipped when read (the item comes
out as None, which `canon.data.loaders.collate` drops). Each skipped file gets one warning and
the scan reports a count; `strict=True` turns the first one into a DataError naming the file.
Truncated JPEGs count as undecodable: a half-grey picture is corrupt training data.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from canon.errors import DataError
from canon.files import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation")}
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
Transform = Callable[[torch.Tensor], object]


class BadImageWarning(UserWarning):
    """A file in an image tree that canon skipped."""


def canon_cache_dir() -> Path:
    """Where canon keeps downloads and statistics: $CANON_CACHE, else ~/.cache/canon."""
    return Path(os.environ.get("CANON_CACHE", Path.home() / ".cache" / "canon"))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image_file(path: str | Path) -> torch.Tensor:
    """Decode any image file to a uint8 RGB tensor 3 x H x W, or raise DataError.

    torchvision.io (libjpeg-turbo, libpng, libwebp) first, since it is the faster decoder
    (bench/bench_decode.py); PIL for what it rejects (e.g. CMYK/YCCK variants, BMP, TIFF).
    The format is sniffed from the bytes, so a PNG named .JPEG decodes as the PNG it is.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # libjpeg reports corrupt data as a warning and returns a partial image; torchvision
            # 0.29 deprecates its decoders (they still work; 0.26 must be supported too).
            warnings.simplefilter("error", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tensor = decode_image(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
        if tensor.dim() == 3 and tensor.shape[0] == 3:
            return tensor
    except (RuntimeError, ValueError, UserWarning):
        pass
    return _decode_with_pil(data, path)


def _decode_with_pil(data: bytes, path: Path) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a decodable image ({error})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Dataset classes


class LabeledImages(Dataset):
    """Base: `classes`, `labels`, `load_image(i)` (uint8 3 x H x W) and a settable transform."""

    classes: list[str]
    labels: list[int]
    # The evaluation preprocessing (canon.data.transforms.EvalPreprocess) when built by
    # build_datasets; evaluation protocols use it to make their own views of the raw images.
    preprocess = None

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    def load_image(self, index: int) -> torch.Tensor | None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def with_transform(self, transform: Transform | None) -> LabeledImages:
        """A shallow copy sharing the images, with another transform."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone


class ArrayImages(LabeledImages):
    """Images held in memory as one uint8 tensor N x 3 x H x W (CIFAR, the bundled sample)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: list[int],
        classes: list[str],
        *,
        name: str,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise DataError(f"{name}: expected uint8 images N x 3 x H x W, got {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise DataError(f"{name}: labels outside 0..{len(classes) - 1}")
        self.images = images
        self.labels = labels
        self.classes = classes
        self.name = name

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"ArrayImages({self.name}, {len(self)} images, {len(self.classes)} classes)"


class FolderImages(LabeledImages):
    """`ROOT/<class>/<image>` trees (ImageNet's train/ and val/, any ImageFolder layout).

    `class_ids`: the training split's classes, when this folder is its validation split; the
    two must hold the same class folders, and labels follow the training split's order.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        class_ids: list[str] | None = None,
        strict: bool = False,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.strict = strict
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        found = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and e.name[0] != ".")
        if not found:
            raise DataError(
                f"{self.root}: no class folders; expected {self.root}/<class>/<image files>"
            )
        if class_ids is not None and set(found) != set(class_ids):
            raise DataError(
                f"{self.root}: train and val have different classes; only in train: "
                f"{_short_list(sorted(set(class_ids) - set(found)))}; only in val: "
                f"{_short_list(sorted(set(found) - set(class_ids)))}"
            )
        self.class_ids = class_ids if class_ids is not None else found
        index_of = {name: i for i, name in enumerate(self.class_ids)}
        self.paths: list[Path] = []
        self.labels = []
        self.skipped: list[Path] = []
        digest = hashlib.sha256(str(self.root.resolve()).encode())
        for name in found:
            for path in self._scan_class(self.root / name, digest):
                self.paths.append(path)
                self.labels.append(index_of[name])
        if not self.paths:
            raise DataError(f"{self.root}: no image files found in any class folder")
        if self.skipped:
            warnings.warn(
                f"{self.root}: skipped {len(self.skipped)} of "
                f"{len(self.paths) + len(self.skipped)} files (see the warnings above)",
                BadImageWarning,
                stacklevel=2,
            )
        self._fingerprint = digest.hexdigest()[:16]
        self.classes = class_names(self.root, self.class_ids)
        self._reported: set[Path] = set()

    def _scan_class(self, folder: Path, digest) -> list[Path]:
        paths = []
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        for entry in entries:
            if entry.name[0] == "." or not entry.is_file():
                continue
            path = Path(entry.path)
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                self._skip(path, "not an image file name (extension)")
            elif (size := entry.stat().st_size) == 0:
                self._skip(path, "empty file (0 bytes)")
            else:
                paths.append(path)
                digest.update(f"{folder.name}/{entry.name}:{size};".encode())
        if not entries:
            warnings.warn(f"{folder}: empty class folder", BadImageWarning, stacklevel=3)
        return paths

    def _skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise DataError(f"{path}: {reason} (strict mode: remove it, or run without strict)")
        self.skipped.append(path)
        warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=4)

    def load_image(self, index: int) -> torch.Tensor | None:
        path = self.paths[index]
        try:
            return decode_image_file(path)
        except DataError as error:
            if self.strict:
                message = f"{error} (strict mode: remove it, or run without strict)"
                raise DataError(message) from None
            if path not in self._reported:
                self._reported.add(path)
                warnings.warn(f"skipping {error}", BadImageWarning, stacklevel=2)
            return None

    def fingerprint(self) -> str:
        """Identifies this tree's content for caching statistics: its resolved root and the
        class, name and size of every file (recorded during the scan, no second pass)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"FolderImages({self.root}, {len(self)} images, {len(self.classes)} classes)"


def class_names(root: Path, class_ids: list[str]) -> list[str]:
    """Human names from a synset mapping file (`wnid name, synonyms`) beside the tree, if any."""
    for folder in (root, root.parent, root.parent.parent):
        for filename in SYNSET_FILES:
            mapping = folder / filename
            if mapping.is_file():
                names = _read_synsets(mapping)
                return [names.get(i, i) for i in class_ids]
    return list(class_ids)


def _read_synsets(path: Path) -> dict[str, str]:
    names = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            names[parts[0]] = parts[1].split(",")[0].strip()
    return names


def open_image_folder(root: Path, *, strict: bool = False) -> tuple[FolderImages, FolderImages]:
    """Train and val trees of an ImageNet-layout root; their class sets must match."""
    splits = {}
    for split, candidates in SPLIT_NAMES.items():
        folder = next((root / c for c in candidates if (root / c).is_dir()), None)
        if folder is None:
            raise DataError(
                f"{root}: no {'/'.join(candidates)} folder; expected the ImageNet layout "
                f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
            )
        splits[split] = folder
    train = FolderImages(splits["train"], strict=strict)
    val = FolderImages(splits["val"], class_ids=train.class_ids, strict=strict)
    return train, val


def _short_list(names: list[str], limit: int = 10) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------------------------
# CIFAR-10/100 in the pickled format


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
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (the CIFAR folder is incomplete)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a CIFAR pickle ({error})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: not a CIFAR pickle (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def find_cifar(root: Path) -> tuple[str, Path] | None:
    """(name, folder) when `root` is, or holds, a CIFAR-10/100 folder."""
    for name, spec in CIFAR.items():
        for folder in (root / spec["folder"], root):
            if folder.name == spec["folder"] and (folder / spec["meta"]).is_file():
                return name, folder
    return None


def read_cifar(name: str, folder: Path, split: str) -> ArrayImages:
    """One split ("train" or "test") of CIFAR-10/100 from its pickled batches."""
    spec = CIFAR[name]
    meta = _read_pickle(folder / spec["meta"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec["names_key"]]]
    images, labels = [], []
    for part in spec[split]:
        batch = _read_pickle(folder / part)
        data = np.asarray(batch.get("data"))
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DataError(f"{folder / part}: 'data' is not N x 3072 uint8 (got {data.shape})")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(int(x) for x in batch[spec["label_key"]])
    array = torch.from_numpy(np.concatenate(images))
    if len(array) != CIFAR_SIZES[split]:
        raise DataError(
            f"{folder}: {split} split has {len(array)} images, expected {CIFAR_SIZES[split]}"
        )
    return ArrayImages(array, labels, classes, name=f"{name}-{split}")


def download_and_verify(url: str, destination: Path, md5: str) -> Path:
    """Fetch `url` to `destination` unless a file with this md5 is there; check the md5."""
    if destination.is_file() and file_md5(destination) == md5:
        return destination

    def fetch(partial: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except OSError as error:
            raise DataError(
                f"cannot download {url} ({error}); fetch it by hand and place it at {destination}"
            ) from None
        actual = file_md5(partial)
        if actual != md5:
            raise DataError(f"{url}: md5 {actual} does not match the published {md5}; try again")

    atomic_write(destination, fetch)
    return destination


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if not download:
        raise DataError(
            f"{name} is not in {cache}; allow download (data.download: true) or point "
            f"data.dataset at a folder holding {spec['folder']}/"
        )
    archive = download_and_verify(spec["url"], cache / Path(spec["url"]).name, spec["md5"])
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        extract_tar(archive, Path(scratch))
        Path(scratch, spec["folder"]).replace(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The bundled sample


@lru_cache(maxsize=2)
def _sample_arrays(split: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    mosaic = decode_image_file(SAMPLE_DIR / f"{split}.webp")
    tile = 32
    rows, cols = mosaic.shape[1] // tile, mosaic.shape[2] // tile
    labels = tuple(int(x) for x in np.load(SAMPLE_DIR / f"{split}.labels.npy"))
    images = mosaic.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
    images = images.reshape(rows * cols, 3, tile, tile)[: len(labels)].contiguous()
    return images, labels


def load_sample(split: str) -> ArrayImages:
    """The bundled CIFAR-10 sample (see sample/PROVENANCE.md), decoded once per process."""
    classes = (SAMPLE_DIR / "classes.txt").read_text().splitlines()
    images, labels = _sample_arrays(split)
    return ArrayImages(images, list(labels), classes, name=f"sample-{split}")


# ---------------------------------------------------------------------------------------------
# Name or folder -> raw train/val datasets


def open_dataset(
    dataset: str, *, cache: Path | None = None, strict: bool = False, download: bool = True
) -> tuple[LabeledImages, LabeledImages]:
    """Untransformed (train, validation) datasets for a DataConfig.dataset value."""
    cache = cache or canon_cache_dir()
    if dataset == "sample":
        return load_sample("train"), load_sample("test")
    if dataset in CIFAR:
        folder = fetch_cifar(dataset, cache / "datasets", download=download)
        return read_cifar(dataset, folder, "train"), read_cifar(dataset, folder, "test")
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset {dataset!r} is neither sample, cifar10, cifar100 nor an existing folder; "
            f"a folder must hold the ImageNet layout {root}/train/<class>/*.JPEG and "
            f"{root}/val/<class>/*.JPEG, or cifar-10-batches-py/ or cifar-100-python/"
        )
    found = find_cifar(root)
    if found is not None:
        name, folder = found
        return read_cifar(name, folder, "train"), read_cifar(name, folder, "test")
    return open_image_folder(root, strict=strict)


def dataset_fingerprint(dataset: LabeledImages) -> str:
    """A short key that changes when the dataset's content does (for cached statistics)."""
    if isinstance(dataset, FolderImages):
        return dataset.fingerprint()
    if isinstance(dataset, ArrayImages):
        digest = hashlib.sha256(np.ascontiguousarray(dataset.images.numpy()))  # no copy
        digest.update(np.asarray(dataset.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]
    raise TypeError(f"cannot fingerprint {type(dataset).__name__}")
