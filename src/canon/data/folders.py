"""Image folder trees as datasets: ImageNet's layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`,
the data of every ImageNet paper, e.g. Krizhevsky et al. s2), any ImageFolder layout, and
Tiny-ImageNet's; with class names from a synset mapping file beside the tree, and bad files
skipped with a warning rather than stopping a run.
"""

from __future__ import annotations

import collections
import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from canon.data.config import MAX_IMAGE_PIXELS
from canon.data.decoding import decode_image_bytes, decode_image_file
from canon.data.imagenet_classes import imagenet_names, imagenet_wnids
from canon.data.labeled import LabeledImages, Transform
from canon.errors import DataError

# torchvision's ImageFolder's, and .gif and .jfif (a JPEG, as browsers save some).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
                    ".ppm", ".pgm")
SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "words.txt")
# Folder names of a dataset's splits; the evaluation split's in order of preference.
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid", "test")}
VAL_ANNOTATIONS = "val_annotations.txt"  # Tiny-ImageNet's labels of val/images/


class BadImageWarning(UserWarning):
    """A file in an image tree that canon skipped."""


class UndecodableImageWarning(BadImageWarning):
    """An image skipped when read for a batch, not when its tree was listed: under torchrun
    only the process that read it knows, so every process shows these (and rank 0 alone the
    others, which every process would repeat)."""


class FolderImages(LabeledImages):
    """Image folder trees: `ROOT/<class>/<image>`, subfolders of a class folder included
    (ImageNet's train/ and val/, any ImageFolder layout); Tiny-ImageNet's
    `ROOT/<class>/images/<image>` (beside `<class>_boxes.txt`) and its val/,
    `ROOT/images/<image>` labelled by `ROOT/val_annotations.txt` (lines
    `file<TAB>class<TAB>...`).

    `class_ids`: the classes labels index, in that order: the training split's when this
    folder is its validation split (the two must hold the same classes), or a model's when
    `require_all` is False (an evaluation folder may hold some of its classes, no others).
    Without them the folder's own sorted class names are the classes; there must be two at
    least. Images of more than `max_pixels` pixels count as undecodable (decode_image_file).

    Bad files never stop a run: zero-byte files and files without an image extension are
    skipped when the tree is scanned, and files that fail to decode when read (the item comes
    out as None). Each skipped file gets one BadImageWarning (an UndecodableImageWarning when
    read) and the scan reports a count; those with an image file's name are
    `skipped_at_listing`. `strict=True` turns the first one into a DataError naming the file.
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
        digest = hashlib.sha256(_name_bytes(str(self.root.resolve())))
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
        # Counted as images where their names say so; a README.txt in a class folder is not.
        self.skipped_at_listing = sum(p.name.lower().endswith(IMAGE_EXTENSIONS)
                                      for p in self.skipped)
        if self.skipped:  # a file emptied or removed is a change of content as well
            digest.update(_name_bytes("".join(f"skipped {p};" for p in self.skipped)))
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
                f"{short_list(sorted(set(class_ids) - set(found)))}; only in val: "
                f"{short_list(sorted(set(found) - set(class_ids)))}"
            )
        return list(class_ids)

    def _scan_class(self, folder: Path, name: str, digest) -> list[Path]:
        """A class folder's image files, in its subfolders too (as torchvision's ImageFolder
        reads them), in name order; Tiny-ImageNet's <class>_boxes.txt beside images/ quietly
        left out."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:  # permissions, or removed since it was listed
            self._skip(folder, f"cannot read the folder ({error.strerror or error})")
            entries = []
        visible = [e for e in entries if e.name[0] != "."]
        if [e.name for e in visible if e.is_dir()] == ["images"] and all(
                e.is_dir() or e.name.endswith("_boxes.txt") for e in visible):
            visible = [e for e in visible if e.is_dir()]
        paths = []
        for entry in visible:
            path = Path(entry.path)
            if entry.is_dir() and entry.is_symlink():  # a loop would never end
                self._skip(path, "a link to a folder inside a class folder (not followed)")
            elif entry.is_dir():
                paths += self._scan_class(path, f"{name}/{entry.name}", digest)
            elif not entry.is_file():
                self._skip(path, "a link to nothing")
            elif self._keep(path, _status(entry), name, digest):
                paths.append(path)
        if not paths and "/" not in name:  # the class folder itself, not one of its own
            warnings.warn(f"{folder}: empty class folder (no image file in it)",
                          BadImageWarning, stacklevel=3)
        return paths

    def _scan_listed(self, name: str, files: list[str], digest) -> list[Path]:
        paths = []
        for file in files:
            path = self.root / "images" / file
            try:
                status = path.stat()
            except OSError:
                self._skip(path, f"listed in {VAL_ANNOTATIONS} but missing")
                continue
            if self._keep(path, status, name, digest):
                paths.append(path)
        return paths

    def _keep(self, path: Path, status: os.stat_result | str, name: str, digest) -> bool:
        """Whether a file is worth decoding; skips others (with a warning) or, strict, raises.
        A status that is a string says why the file could not be read."""
        if isinstance(status, str):
            self._skip(path, status)
        elif not path.name.lower().endswith(IMAGE_EXTENSIONS):
            self._skip(path, "not an image file name (extension)")
        elif status.st_size == 0:
            self._skip(path, "empty file (0 bytes)")
        else:  # a file rewritten at the same size changes its modification time
            digest.update(_name_bytes(f"{name}/{path.name}:{status.st_size}:{status.st_mtime_ns};"))
            return True
        return False

    def _skip(self, path: Path, reason: str) -> None:
        if self.strict:
            raise DataError(f"{path}: {reason} (strict mode: remove it, or run without strict)")
        self.skipped.append(path)
        warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=5)

    def load_image(self, index: int) -> torch.Tensor | None:
        path = self.paths[index]
        return self._decoded(path, lambda: decode_image_file(path, self.max_pixels))

    def image_from_bytes(self, index: int, data: bytes) -> torch.Tensor | None:
        """load_image, from the bytes of image `index`'s file read already."""
        path = self.paths[index]
        return self._decoded(path, lambda: decode_image_bytes(data, path, self.max_pixels))

    def _decoded(self, path: Path, decode: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """decode(), or None for a bad file (reported once), or a DataError when strict."""
        try:
            return decode()
        except DataError as error:
            if self.strict:
                message = f"{error} (strict mode: remove it, or run without strict)"
                raise DataError(message) from None
            if path not in self._reported:
                self._reported.add(path)
                warnings.warn(f"skipping {error}", UndecodableImageWarning, stacklevel=2)
            return None

    def fingerprint(self) -> str:
        """Identifies this tree's content for caching statistics: its resolved root and the
        class, name, size and modification time of every file (recorded during the scan, no
        second pass)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"FolderImages({self.root}, {len(self)} images, {len(self.classes)} classes)"


def _status(entry: os.DirEntry) -> os.stat_result | str:
    """The file's status, or why there is none."""
    try:
        return entry.stat()
    except FileNotFoundError:
        return "removed while the folder was read"
    except OSError as error:
        return f"cannot read ({error.strerror or error})"


def check_known_classes(where: str, found: list[str], class_ids: list[str]) -> None:
    """Refuse classes outside `class_ids` (a trained model's outputs, or under transfer the
    training split's classes): they have no label to score them with."""
    unknown = sorted(set(found) - set(class_ids))
    if unknown:
        advice = ("keep only those classes in it" if len(unknown) < len(found) else
                  "it shares none of them: is it the dataset the model was trained for?")
        raise DataError(
            f"{where}: class(es) {short_list(unknown)} are not among the {len(class_ids)} "
            f"classes it is scored against ({short_list(class_ids, 5)}: the model's outputs, "
            f"or under transfer the training split's); {advice}"
        )


def _class_folders(root: Path) -> list[str]:
    entries = list(os.scandir(root))
    found = sorted(e.name for e in entries if e.is_dir() and e.name[0] != ".")
    if not found:
        raise DataError(
            f"{root}: no class folders (it holds {_contents(root)}); expected {_layouts(root)}"
        )
    loose = sorted(e.name for e in entries if not e.is_dir() and e.name[0] != "."
                   and e.name not in SYNSET_FILES)  # class_names reads those
    if loose:  # an unextracted class archive (ImageNet's train tar holds one per class)
        archives = [name for name in loose if name.endswith((".tar", ".tgz", ".tar.gz", ".zip"))
                    and name.split(".")[0] not in found]
        hint = (f"; extract {short_list(archives, 3)} into its class folder(s)"
                if archives else "")
        warnings.warn(f"{root}: {len(loose)} file(s) beside its class folders are not read "
                      f"({short_list(loose, 3)}): images go in a class folder{hint}",
                      BadImageWarning, stacklevel=3)
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
    try:
        entries = [e for e in os.scandir(folder) if e.name[0] != "."] if folder.is_dir() else []
    except OSError as error:
        return f"nothing canon can read ({error.strerror or error})"
    if not entries:
        return "nothing"
    folders = sorted(e.name + "/" for e in entries if e.is_dir())
    files = sorted(e.name for e in entries if not e.is_dir())
    return (
        f"{len(files)} file(s): {short_list(files, 3)}; "
        f"{len(folders)} folder(s): {short_list(folders, 3)}"
    )


def class_names(root: Path, class_ids: list[str]) -> list[str]:
    """Human names from a synset mapping file (`wnid name, synonyms`) beside the tree, else
    torchvision's names of ImageNet-1k's classes for folders named by their wnids; other
    folders keep their names. A name two classes share (the mapping's first synonyms: two
    "crane"s, two "maillot"s) gets its wnid: predictions must tell them apart."""
    for folder in (root, root.parent, root.parent.parent):
        for filename in SYNSET_FILES:
            mapping = folder / filename
            if mapping.is_file():
                names = _read_synsets(mapping)
                return _distinct([names.get(i, i) for i in class_ids], class_ids)
    if set(class_ids) & set(imagenet_wnids()):
        return _distinct([imagenet_names().get(i, i) for i in class_ids], class_ids)
    return list(class_ids)


def _distinct(names: list[str], class_ids: list[str]) -> list[str]:
    shared = {name for name, count in collections.Counter(names).items() if count > 1}
    return [f"{name} ({wnid})" if name in shared else name
            for name, wnid in zip(names, class_ids, strict=True)]


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
    folders = {split: split_folder(root, split) for split in SPLIT_NAMES}
    for split, folder in folders.items():
        if folder is None:  # a run without a validation folder can hold some images out
            raise _no_split_folder(root, split, "; or train on train/ alone, holding "
                                   "data.val_split=N of its images out to validate on"
                                   if split == "val" else "")
    train = open_train_folder(root, strict=strict, max_pixels=max_pixels)
    val = FolderImages(
        folders["val"], class_ids=train.class_ids, strict=strict, max_pixels=max_pixels
    )
    return train, val


def open_train_folder(
    root: Path, *, strict: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
) -> FolderImages:
    """The train tree of an ImageNet-layout root alone (no val/ needed)."""
    folder = split_folder(root, "train")
    if folder is None:
        raise _no_split_folder(root, "train")
    return FolderImages(folder, strict=strict, max_pixels=max_pixels)


def open_eval_folder(
    root: Path,
    class_ids: list[str] | None = None,
    *,
    strict: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> FolderImages:
    """The evaluation split of a folder (see canon.data.datasets.open_eval_split): its first
    SPLIT_NAMES["val"] subfolder, else the folder itself when it has no train/ either."""
    folder = split_folder(root, "val")
    if folder is None and split_folder(root, "train") is not None:
        raise _no_split_folder(root, "val")
    return FolderImages(
        folder or root, class_ids=class_ids, require_all=False, strict=strict,
        max_pixels=max_pixels,
    )


def _name_bytes(text: str) -> bytes:
    """File names as the bytes they are on disk: a name that is not UTF-8 (Python holds its
    bytes as surrogates) has no strict UTF-8 encoding."""
    return text.encode("utf-8", "surrogateescape")


def split_folder(root: Path, split: str) -> Path | None:
    """The first of SPLIT_NAMES[split] that `root` holds."""
    return next((root / name for name in SPLIT_NAMES[split] if (root / name).is_dir()), None)


def _no_split_folder(root: Path, split: str, alternative: str = "") -> DataError:
    parent_split = next((name for names in SPLIT_NAMES.values() for name in names
                         if root.name == name and split_folder(root.parent, split)), None)
    hint = (f"; {root} is itself the {parent_split}/ split of {root.parent}: give that folder"
            if parent_split else "")
    return DataError(
        f"{root}: no {'/'.join(SPLIT_NAMES[split])} folder (it holds {_contents(root)}); "
        f"expected the ImageNet layout {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
        + (hint or alternative)
    )


def short_list(names: list[str], limit: int = 10) -> str:
    """`names` for a message: the first `limit` of them, and how many more."""
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
