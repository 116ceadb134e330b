"""The index of a shard folder (`canon pack`, canon.data.packing): `index.json`, written when
the shards it names are complete, names every shard of every split with its sample count, size
and per-class counts, so that a reader knows each rank's share of an epoch before it opens a
shard.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from canon.errors import DataError

INDEX = "index.json"
FORMAT = "canon-shards"
VERSION = 1
OFFSET_EVERY = 64  # samples between the byte offsets a shard's entry records


@dataclass(frozen=True)
class Shard:
    """One tar file of a split: `samples` samples of `class_counts[c]` images of class c;
    `offsets`: where samples 0, OFFSET_EVERY, 2 x OFFSET_EVERY, ... begin in the file, so that
    a reader of part of a shard seeks near its first sample (empty in packs made before canon
    recorded them)."""

    file: str
    samples: int
    bytes: int
    class_counts: list[int]
    offsets: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SplitIndex:
    """A split's shards in pack order; `fingerprint` identifies the folder they were packed
    from (FolderImages.fingerprint); `skipped`: its files the folder scan skipped, of which
    `skipped_images` had an image file's name (FolderImages.skipped_at_listing: images that
    could not be read, which evaluation and statistics count; None where unknown: a pack made
    before canon recorded it, of a folder with skipped files); `folder`: the name of the folder
    packed (val may be packed from test/, whose images no run may choose its best epoch on;
    None in packs made before canon recorded it)."""

    shards: list[Shard]
    fingerprint: str
    skipped: int
    skipped_images: int | None = 0
    folder: str | None = None

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def class_counts(self) -> list[int]:
        return [sum(counts) for counts in zip(*(s.class_counts for s in self.shards), strict=True)]


@dataclass(frozen=True)
class PackIndex:
    """What `index.json` holds: the packed folder (`source`, resolved), the shard size asked
    for, the classes labels index (`class_ids`: folder names, ImageNet wnids; `classes`: human
    names as FolderImages.classes gives them when it is packed) and the splits."""

    source: str
    shard_bytes: int
    class_ids: list[str]
    classes: list[str]
    splits: dict[str, SplitIndex]

    def repack_command(self, root: Path, splits: str) -> str:
        """The `canon pack` that made the shards of `splits` in `root` (comma-separated): run
        again on the unchanged folder, it makes the same shards, byte for byte, so that a run
        on them goes on (canon.engine.setup checks the shards a run was dealt)."""
        return (f"`canon pack {shlex.quote(self.source)} --out {shlex.quote(str(root))} "
                f"--splits {splits} --shard-size {self.shard_bytes}`")

    def to_dict(self) -> dict:
        """The JSON form; each split also states its totals, for people reading the file."""
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        for name, split in self.splits.items():
            data["splits"][name].update(samples=split.samples, bytes=split.bytes,
                                        class_counts=split.class_counts)
        return data

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> PackIndex:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{where}: not a canon shard index (no format '{FORMAT}')")
        if data.get("version") != VERSION:
            raise DataError(
                f"{where}: shard index version {data.get('version')}, this canon reads "
                f"version {VERSION}; re-run canon pack with this canon"
            )
        try:
            splits = {
                name: SplitIndex([Shard(**s) for s in split["shards"]], split["fingerprint"],
                                 split["skipped"],
                                 split.get("skipped_images", 0 if not split["skipped"] else None),
                                 split.get("folder"))
                for name, split in data["splits"].items()
            }
            index = cls(data["source"], data["shard_bytes"], data["class_ids"], data["classes"],
                        splits)
        except (KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{where}: malformed shard index ({error!r}); re-run canon pack") \
                from None
        problems = _problems(index)
        if problems:  # a hand-edited index: a traceback, or a model of the wrong size, later
            raise DataError(f"{where}: {'; '.join(problems[:3])}; re-run canon pack")
        return index


# A shard's file name (canon.data.packing writes SPLIT-NNNNNN.tar).
SHARD_NAME = re.compile(r"(?:train|val)-\d{6}\.tar")


def _problems(index: PackIndex) -> list[str]:
    """What in `index` is not of its kind, or disagrees with the rest."""
    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def texts(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    problems = [f"{key} is {value!r}, not {kind}" for key, value, kind, good in (
        ("source", index.source, "a path", isinstance(index.source, str)),
        ("shard_bytes", index.shard_bytes, "a size", count(index.shard_bytes)),
        ("class_ids", index.class_ids, "a list of names", texts(index.class_ids)),
        ("classes", index.classes, "a list of names", texts(index.classes)),
    ) if not good]
    if problems:
        return problems
    if len(index.class_ids) != len(index.classes):
        problems.append(f"{len(index.class_ids)} class_ids but {len(index.classes)} classes")
    for name, split in index.splits.items():
        if not (isinstance(split.fingerprint, str) and count(split.skipped)
                and (split.skipped_images is None or count(split.skipped_images))
                and (split.folder is None or isinstance(split.folder, str))):
            problems.append(f"split {name}: fingerprint, skipped, skipped_images or folder of "
                            "another kind")
        for shard in split.shards:
            where = f"split {name}, shard {shard.file!r}"
            if not (isinstance(shard.file, str) and SHARD_NAME.fullmatch(shard.file)
                    and shard.file.startswith(f"{name}-")):
                problems.append(f"{where}: not a {name} shard's file name")
            elif not (count(shard.samples) and count(shard.bytes)
                      and isinstance(shard.offsets, list) and all(map(count, shard.offsets))):
                problems.append(f"{where}: samples, bytes or offsets are not counts")
            elif not (isinstance(shard.class_counts, list) and all(map(count, shard.class_counts))
                      and len(shard.class_counts) == len(index.class_ids)
                      and sum(shard.class_counts) == shard.samples):
                problems.append(f"{where}: class_counts are not {len(index.class_ids)} counts "
                                f"adding up to its {shard.samples!r} samples")
    return problems


def is_shard_folder(path: str | Path) -> bool:
    """Whether `path` is a folder of canon shards: its index.json names their format at the
    start (an image folder may hold an index.json of its own, and an archive of its images), or
    an index.json beside shards named as canon names them is damaged, or missing from a folder
    of such shards and no train/ (read_index then says so)."""
    try:
        with (Path(path) / INDEX).open("rb") as index:
            head = index.read(4096)
    except FileNotFoundError:
        return not (Path(path) / "train").is_dir() and _holds_shards(Path(path))
    except OSError:
        return False
    return FORMAT.encode() in head or _holds_shards(Path(path))


def _holds_shards(folder: Path) -> bool:
    return any(SHARD_NAME.fullmatch(p.name) for p in folder.glob("*.tar"))


def read_index(folder: str | Path) -> PackIndex:
    """The index of a shard folder, or a DataError saying how to make one."""
    path = Path(folder) / INDEX
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if _holds_shards(Path(folder)):
            raise DataError(
                f"{folder}: shards without their {INDEX} (a pack stopped before writing it, or "
                f"the file was removed); pack the images again with `canon pack DATA --out "
                f"{folder}`") from None
        raise DataError(
            f"{folder}: not a shard folder (no {INDEX}); make one with "
            f"`canon pack DATA --out {folder}`"
        ) from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); re-run canon pack") from None
    return PackIndex.from_dict(data, path)
