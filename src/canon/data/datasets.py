"""Datasets: ImageNet/ImageFolder trees (and Tiny-ImageNet's), CIFAR-10/100 in their pickled
format, the bundled sample.

Every dataset yields `(transform(image), label)` where `image` is the decoded picture as a
uint8 tensor 3 x H x W (RGB) and `transform` defaults to the identity. `.classes` holds human
names where known (from a synset mapping file next to the tree), else the folder names;
`.class_ids` the names labels index (folder names, e.g. wnids), which a trained model keeps so
that `open_eval_split` can label another folder by its classes.

Bad files never stop a run: zero-byte files and files without an image extension are skipped
when the tree is scanned, and files that fail to decode are skipped when read (the item comes
out as None, which `canon.data.loaders.collate` drops). Each skipped file gets one warning and
the scan reports a count; `strict=True` turns the first one into a DataError naming the file.
Truncated JPEGs count as undecodable: a half-grey picture is corrupt training data; so do
images above a pixel limit (decompression bombs), refused from their header.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from canon.data.config import MAX_IMAGE_PIXELS
from canon.errors import DataError
from canon.files import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
# Folder names of a dataset's splits; the evaluation split's in order of preference.
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid", "test")}
VAL_ANNOTATIONS = "val_annotations.txt"  # Tiny-ImageNet's labels of val/images/
# What PIL's format plugins raise on a bad file (UnidentifiedImageError is an OSError).
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
Transform = Callable[[torch.Tensor], object]


class BadImageWarning(UserWarning):
    """A file in an image tree that canon skipped."""


def canon_cache_dir() -> Path:
    """Where canon keeps downloads and statistics: $CANON_CACHE, else ~/.cache/canon."""
    return Path(os.environ.get("CANON_CACHE", Path.home() / ".cache" / "canon"))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode any image file to a uint8 RGB tensor 3 x H x W, or raise DataError.

    The header is read first (by `image_size`, else by PIL, which reads only that when it opens
    a file), and an image of more than `max_pixels` pixels (0: no limit of canon's own; PIL's,
    2 x PIL.Image.MAX_IMAGE_PIXELS, still holds) is refused before it is decoded: a
    decompression bomb's pixels never reach memory. Then torchvision.io (libjpeg-turbo,
    libpng, libwebp), the faster decoder (bench/bench_decode.py); PIL for what it rejects
    (e.g. CMYK/YCCK variants, BMP, TIFF). The format is sniffed from the bytes, so a PNG
    named .JPEG decodes as the PNG it is. 16-bit samples keep their high byte (as PIL does
    for 16-bit RGB PNGs).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    size = image_size(data)  # PNG, JPEG, WebP: from the bytes (~3 us; PIL's header ~60 us)
    if size is not None:
        _check_pixels(size, max_pixels, path)
        tensor = _decode_with_torchvision(data)
        if tensor is not None:
            return tensor
    # Other formats, headers image_size cannot parse, and files torchvision rejects: PIL reads
    # the header (and checks it again: its decoders read their own) and decodes.
    with _open_header(data, path) as image:
        _check_pixels(image.size, max_pixels, path)
        tensor = _decode_with_torchvision(data) if size is None else None
        return tensor if tensor is not None else _decode_with_pil(image, path)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0-3, 5-7, 9-11, 13-15): 0xC0-0xCF but DHT, JPG and DAC.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RST0-7, TEM: no length field


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG or WebP file's bytes (the formats
    torchvision.io decodes), without a PIL object; None for other formats and for malformed or
    cut-short headers, which PIL then reads (and reports)."""
    try:
        if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
            size = struct.unpack_from(">II", data, 16)
        elif data.startswith(b"\xff\xd8"):
            size = _jpeg_size(data)
        elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            size = _webp_size(data)
        else:
            return None
    except (struct.error, IndexError):  # cut short
        return None
    return size if size and size[0] > 0 and size[1] > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the markers from SOI to the first frame header, as libjpeg does."""
    at = 2
    while True:
        if data[at] != 0xFF:  # garbage between segments: leave it to PIL
            return None
        while data[at] == 0xFF:  # fill bytes
            at += 1
        marker = data[at]
        at += 1
        if marker in _JPEG_FRAMES:  # length, precision, height, width
            height, width = struct.unpack_from(">HH", data, at + 3)
            return width, height
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):  # stuffing, SOI, EOI, SOS before any frame
            return None
        (length,) = struct.unpack_from(">H", data, at)
        if length < 2:
            return None
        at += length


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The first chunk's: VP8 (lossy) frame size, VP8L (lossless) or VP8X (extended) canvas."""
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # after the 3-byte frame tag
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF  # top 2 bits: upscaling hint
    if chunk == b"VP8L" and data[20] == 0x2F:  # 14 bits each of width - 1, height - 1
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:  # flags, 3 reserved, 24 bits each of w-1, h-1
        width, height = (int.from_bytes(data[at : at + 3], "little") + 1 for at in (24, 27))
        return width, height
    return None


def _open_header(data: bytes, path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns of images over half its own limit; max_pixels decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except PIL_ERRORS as error:
        raise DataError(f"{path}: {_unreadable_because(error)}") from None


def _check_pixels(size: tuple[int, int], max_pixels: int, path: Path) -> None:
    width, height = size
    pixels = width * height
    if max_pixels and pixels > max_pixels:
        raise DataError(
            f"{path}: {width} x {height} = {pixels:,} pixels, over the limit of "
            f"{max_pixels:,} (data.max_image_pixels; a decompression bomb?)"
        )
    # What PIL refuses when it opens a header (2 x its limit), also where image_size read it.
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if pil_limit and pixels > pil_limit:
        raise DataError(
            f"{path}: too large to decode ({width} x {height} = {pixels:,} pixels, over PIL's "
            f"limit of {pil_limit:,}: 2 x PIL.Image.MAX_IMAGE_PIXELS)"
        )


def _decode_with_torchvision(data: bytes) -> torch.Tensor | None:
    """uint8 3 x H x W, or None where torchvision cannot decode the file (PIL may)."""
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
    except (RuntimeError, ValueError, UserWarning):
        return None
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        return None
    return _high_byte(tensor) if tensor.dtype == torch.uint16 else tensor


def _decode_with_pil(image: Image.Image, path: Path) -> torch.Tensor:
    try:
        image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
        if image.mode.startswith("I"):  # 16-bit greyscale (I;16 TIFF, I PGM): convert clips
            grey = _high_byte(torch.from_numpy(np.asarray(image, dtype=np.int32)))
            return grey.expand(3, -1, -1).contiguous()
        rgb = image.convert("RGB")
    except PIL_ERRORS as error:
        raise DataError(f"{path}: {_unreadable_because(error)}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _high_byte(image: torch.Tensor) -> torch.Tensor:
    """16-bit samples (0..65535) to uint8 by their high byte, as PIL converts 16-bit RGB."""
    return (image.to(torch.int32).clamp(0, 65535) >> 8).to(torch.uint8)


def _unreadable_because(error: Exception) -> str:
    """A reason a user can read: PIL's UnidentifiedImageError names only a BytesIO object."""
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format (or its header is cut short)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to decode ({error})"
    text = str(error) or type(error).__name__
    return f"truncated ({text})" if "truncated" in text.lower() else f"corrupt image ({text})"


# ---------------------------------------------------------------------------------------------
# Dataset classes


class LabeledImages(Dataset):
    """Base: `classes`, `class_ids`, `labels`, `load_image(i)` (uint8 3 x H x W) and a settable
    transform."""

    classes: list[str]
    # What labels index, by name: folder names (ImageNet wnids) or, for arrays, the classes.
    # A trained model keeps them, so an evaluation split's labels can be matched to its outputs.
    class_ids: list[str]
    labels: list[int]

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
        self.classes = self.class_ids = classes
        self.name = name

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return f"ArrayImages({self.name}, {len(self)} images, {len(self.classes)} classes)"


class FolderImages(LabeledImages):
    """Image folder trees: `ROOT/<class>/<image>` (ImageNet's train/ and val/, any ImageFolder
    layout); Tiny-ImageNet's `ROOT/<class>/images/<image>` (a class folder whose only subfolder
    is images/) and its val/, `ROOT/images/<image>` labelled by `ROOT/val_annotations.txt`
    (lines `file<TAB>class<TAB>...`).

    `class_ids`: the classes labels index, in that order: the training split's when this
    folder is its validation split (the two must hold the same classes), or a model's when
    `require_all` is False (an evaluation folder may hold some of its classes, no others).
    Without them the folder's own sorted class names are the classes; there must be two at
    least. Images of more than `max_pixels` pixels count as undecodable (decode_image_file).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        class_ids: list[str] | None = None,
        require_all: bool = True,
        strict: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.strict, self.max_pixels = strict, max_pixels
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        annotations = self.root / VAL_ANNOTATIONS
        listed = _read_annotations(annotations) if annotations.is_file() else None
        found = sorted(listed) if listed is not None else _class_folders(self.root)
        self.class_ids = self._check_classes(found, class_ids, require_all)
        index_of = {name: i for i, name in enumerate(self.class_ids)}
        self.paths: list[Path] = []
        self.labels = []
        self.skipped: list[Path] = []
        digest = hashlib.sha256(str(self.root.resolve()).encode())
        for name in found:
            if listed is not None:
                paths = self._scan_listed(name, listed[name], digest)
            else:
                paths = self._scan_class(self.root / name, name, digest)
            self.paths.extend(paths)
            self.labels.extend([index_of[name]] * len(paths))
        if not self.paths:
            looked_in = self.root / ("images" if listed is not None else found[0])
            raise DataError(
                f"{self.root}: no image files ({looked_in} holds {_contents(looked_in)}); "
                f"expected {_layouts(self.root)}"
            )
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

    def _check_classes(
        self, found: list[str], class_ids: list[str] | None, require_all: bool
    ) -> list[str]:
        if class_ids is None:
            if len(found) < 2:
                raise DataError(
                    f"{self.root}: found 1 class folder ({found[0]}); classification needs at "
                    "least two"
                )
            return found
        if not require_all:
            check_known_classes(str(self.root), found, class_ids)
        elif set(found) != set(class_ids):
            raise DataError(
                f"{self.root}: train and val have different classes; only in train: "
                f"{_short_list(sorted(set(class_ids) - set(found)))}; only in val: "
                f"{_short_list(sorted(set(found) - set(class_ids)))}"
            )
        return list(class_ids)

    def _scan_class(self, folder: Path, name: str, digest) -> list[Path]:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        if [e.name for e in entries if e.is_dir() and e.name[0] != "."] == ["images"]:
            # Tiny-ImageNet: <class>/images/*.JPEG beside <class>_boxes.txt
            return self._scan_class(folder / "images", name, digest)
        paths = []
        for entry in entries:
            if entry.name[0] == "." or not entry.is_file():
                continue
            path = Path(entry.path)
            if self._keep(path, entry.stat().st_size, name, digest):
                paths.append(path)
        if not entries:
            warnings.warn(f"{folder}: empty class folder", BadImageWarning, stacklevel=3)
        return paths

    def _scan_listed(self, name: str, files: list[str], digest) -> list[Path]:
        paths = []
        for file in files:
            path = self.root / "images" / file
            try:
                size = path.stat().st_size
            except OSError:
                self._skip(path, f"listed in {VAL_ANNOTATIONS} but missing")
                continue
            if self._keep(path, size, name, digest):
                paths.append(path)
        return paths

    def _keep(self, path: Path, size: int, name: str, digest) -> bool:
        """Whether a file is worth decoding; skips others (with a warning) or, strict, raises."""
        if not path.name.lower().endswith(IMAGE_EXTENSIONS):
            self._skip(path, "not an image file name (extension)")
        elif size == 0:
            self._skip(path, "empty file (0 bytes)")
        else:
            digest.update(f"{name}/{path.name}:{size};".encode())
            return True
        return False

    def _skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise DataError(f"{path}: {reason} (strict mode: remove it, or run without strict)")
        self.skipped.append(path)
        warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=5)

    def load_image(self, index: int) -> torch.Tensor | None:
        path = self.paths[index]
        try:
            return decode_image_file(path, self.max_pixels)
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


def check_known_classes(where: str, found: list[str], class_ids: list[str]) -> None:
    """Refuse classes outside a model's `class_ids`: it has no output to score them with."""
    unknown = sorted(set(found) - set(class_ids))
    if unknown:
        raise DataError(
            f"{where}: class(es) {_short_list(unknown)} are not among the model's "
            f"{len(class_ids)} classes ({_short_list(class_ids, 5)}); evaluate it on "
            "classes it was trained on"
        )


def _class_folders(root: Path) -> list[str]:
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
    if not found:
        raise DataError(
            f"{root}: no class folders (it holds {_contents(root)}); expected {_layouts(root)}"
        )
    return found


def _read_annotations(path: Path) -> dict[str, list[str]]:
    """Tiny-ImageNet's val_annotations.txt: class -> the files of images/ it labels."""
    listed: dict[str, list[str]] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) < 2:
            if not line.strip():
                continue
            raise DataError(f"{path}:{number}: expected 'file<TAB>class<TAB>...', got {line!r}")
        listed.setdefault(parts[1].strip(), []).append(parts[0].strip())
    if not listed:
        raise DataError(f"{path}: empty; expected lines 'file<TAB>class<TAB>...'")
    return listed


def _layouts(root: Path) -> str:
    return (
        f"{root}/<class>/<image files>, {root}/<class>/images/<image files> or "
        f"{root}/images/<image files> with {root}/{VAL_ANNOTATIONS} (Tiny-ImageNet)"
    )


def _contents(folder: Path) -> str:
    """What a folder holds, for errors about a layout canon cannot read."""
    entries = [e for e in os.scandir(folder) if e.name[0] != "."] if folder.is_dir() else []
    if not entries:
        return "nothing"
    folders = sorted(e.name + "/" for e in entries if e.is_dir())
    files = sorted(e.name for e in entries if not e.is_dir())
    return (
        f"{len(files)} file(s): {_short_list(files, 3)}; "
        f"{len(folders)} folder(s): {_short_list(folders, 3)}"
    )


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


def open_image_folder(
    root: Path, *, strict: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[FolderImages, FolderImages]:
    """Train and val trees of an ImageNet-layout root; their class sets must match."""
    folders = {split: _split_folder(root, split) for split in SPLIT_NAMES}
    for split, folder in folders.items():
        if folder is None:
            raise _no_split_folder(root, split)
    train = FolderImages(folders["train"], strict=strict, max_pixels=max_pixels)
    val = FolderImages(
        folders["val"], class_ids=train.class_ids, strict=strict, max_pixels=max_pixels
    )
    return train, val


def _split_folder(root: Path, split: str) -> Path | None:
    """The first of SPLIT_NAMES[split] that `root` holds."""
    return next((root / name for name in SPLIT_NAMES[split] if (root / name).is_dir()), None)


def _no_split_folder(root: Path, split: str) -> DataError:
    return DataError(
        f"{root}: no {'/'.join(SPLIT_NAMES[split])} folder (it holds {_contents(root)}); "
        f"expected the ImageNet layout {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
    )


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
    dataset: str,
    *,
    cache: Path | None = None,
    strict: bool = False,
    download: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[LabeledImages, LabeledImages]:
    """Untransformed (train, validation) datasets for a DataConfig.dataset value."""
    source = _source(dataset, cache or canon_cache_dir(), download)
    if isinstance(source, Path):
        return open_image_folder(source, strict=strict, max_pixels=max_pixels)
    return source("train"), source("test")


def open_eval_split(
    dataset: str,
    class_ids: list[str] | None = None,
    *,
    cache: Path | None = None,
    strict: bool = False,
    download: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> LabeledImages:
    """The evaluation split alone of a DataConfig.dataset value (no training split is read).

    A folder's is its val/, validation/, valid/ or test/ subfolder (in that preference), or
    the folder itself when it has no train/ either (it holds the class folders); CIFAR's and
    the sample's is the test split. With `class_ids` (a trained model's, in its output order)
    labels index them, matched by name (folder name, e.g. wnid; CIFAR class name): the split
    may hold some of the model's classes but no others. Without, its own classes, sorted.
    """
    source = _source(dataset, cache or canon_cache_dir(), download)
    if not isinstance(source, Path):
        return source("test") if class_ids is None else _relabel(source("test"), class_ids)
    folder = _split_folder(source, "val")
    if folder is None and _split_folder(source, "train") is not None:
        raise _no_split_folder(source, "val")
    return FolderImages(
        folder or source, class_ids=class_ids, require_all=False, strict=strict,
        max_pixels=max_pixels,
    )


def _source(dataset: str, cache: Path, download: bool) -> Callable[[str], ArrayImages] | Path:
    """A DataConfig.dataset value as a reader of its "train" and "test" splits (the sample,
    CIFAR) or as the root of an image folder tree."""
    if dataset == "sample":
        return load_sample
    if dataset in CIFAR:
        folder = fetch_cifar(dataset, cache / "datasets", download=download)
        return partial(read_cifar, dataset, folder)
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset {dataset!r} is neither sample, cifar10, cifar100 nor an existing folder; "
            f"a folder must hold the ImageNet layout {root}/train/<class>/*.JPEG and "
            f"{root}/val/<class>/*.JPEG, or cifar-10-batches-py/ or cifar-100-python/"
        )
    found = find_cifar(root)
    return root if found is None else partial(read_cifar, *found)


def _relabel(split: ArrayImages, class_ids: list[str]) -> ArrayImages:
    """`split` with labels indexing `class_ids` (its classes matched by name)."""
    if split.class_ids == list(class_ids):
        return split
    check_known_classes(split.name, split.class_ids, class_ids)
    index_of = {name: i for i, name in enumerate(class_ids)}
    labels = [index_of[split.class_ids[label]] for label in split.labels]
    return ArrayImages(split.images, labels, list(class_ids), name=split.name)


def dataset_fingerprint(dataset: LabeledImages) -> str:
    """A short key that changes when the dataset's content does (for cached statistics)."""
    if isinstance(dataset, FolderImages):
        return dataset.fingerprint()
    if isinstance(dataset, ArrayImages):
        digest = hashlib.sha256(np.ascontiguousarray(dataset.images.numpy()))  # no copy
        digest.update(np.asarray(dataset.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]
    raise TypeError(f"cannot fingerprint {type(dataset).__name__}")
