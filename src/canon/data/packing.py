"""`pack_folder` (`canon pack`): an ImageNet-layout folder as tar shards in the WebDataset
convention, which canon.data.shards.ShardImages streams (issue 14).

`OUT/train-000000.tar`, ...: each sample is two members, `KEY.jpg` (the image file's bytes,
unchanged; `.png` etc. for other formats) and `KEY.cls` (its class index as text), with KEY
`<class id>/<file stem>`; then `OUT/index.json`, which names only finished shards (while a
split is packed, it names the splits kept from an earlier pack). The images and class order are
exactly those canon's folder reader (canon.data.folders) trains on. Validation shards keep its
order (classes, then file names); training shards hold the images in a fixed pseudo-random
order, since in class order each shard would hold a class or two, more than a reader's shuffle
buffer could mix.
"""

from __future__ import annotations

import json
import random
import re
import tarfile
import warnings
from collections.abc import Iterable
from functools import partial
from io import BytesIO
from itertools import accumulate, pairwise
from pathlib import Path

from tqdm import tqdm

from canon.data.folders import (
    SPLIT_NAMES,
    FolderImages,
    open_image_folder,
    open_train_folder,
    split_folder,
)
from canon.data.shard_index import (
    INDEX,
    OFFSET_EVERY,
    SHARD_NAME,
    PackIndex,
    Shard,
    SplitIndex,
    read_index,
)
from canon.errors import ConfigError, DataError
from canon.files import LOCK_FILE, atomic_write, locked_folder, make_folder, sweep_partial_writes

PACK_SEED = 0  # fixed: a pack is a function of the folder alone
_NAMES = rf"(?:index\.json|{SHARD_NAME.pattern})"
# and partial writes of them, and the lock of a pack writing them (or killed)
_OURS = re.compile(rf"{_NAMES}|\.{_NAMES}\.[a-z0-9_]{{8}}|{re.escape(LOCK_FILE)}")
_ADVICE = "choose a writable --out folder"


def pack_folder(
    root: str | Path,
    out: str | Path,
    *,
    shard_bytes: int = 1_000_000_000,
    splits: Iterable[str] = ("train", "val"),
    progress: bool = True,
) -> PackIndex:
    """Pack the `splits` of the ImageNet-layout folder `root` (train/<class>/*, val/<class>/*)
    into the fewest shards of at most `shard_bytes` (one image each at least) that hold equal
    image counts, within one, in `out`: a new or empty folder, or an earlier pack of the same
    folder, whose packed `splits` are replaced and whose other splits are kept (packed with
    another shard size or other classes, or beside an index it cannot read, they are refused,
    not deleted). Each shard is written under a temporary name and renamed when complete;
    index.json names the kept splits meanwhile, all of them last.
    `out` is locked for the pack (`.lock`): a second pack into it meanwhile is refused."""
    root, out, splits = Path(root), Path(out), list(splits)
    if shard_bytes <= 0:
        raise ConfigError(f"shard size {shard_bytes}: must be a positive number of bytes")
    if not splits or any(split not in SPLIT_NAMES for split in splits):
        raise ConfigError(f"splits {','.join(splits)}: choose among {', '.join(SPLIT_NAMES)}")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; pass an ImageNet-layout folder "
                        "(train/<class>/*.JPEG, val/<class>/*.JPEG)")
    # A split not packed now counts too: the pack would be one of its classes when it is.
    split_folders = [root / name for names in SPLIT_NAMES.values() for name in names]
    if any(out.resolve().is_relative_to(folder.resolve()) for folder in split_folders):
        raise DataError(f"{out}: inside the folder it packs (a class folder, once written); "
                        "choose an --out folder outside it")
    folders = _open_splits(root, splits)
    _check_out(out, root)
    make_folder(out, advice=_ADVICE)
    with locked_folder(out, user="canon pack", other="choose another --out folder",
                       advice=_ADVICE):  # the other would sweep its shards being written
        sweep_partial_writes(out, ("*.tar", INDEX))  # left by a pack that was killed
        classes = next(iter(folders.values()))
        kept = _other_splits(out, splits, shard_bytes, classes.class_ids)
        # The earlier index is stale until the shards are done: in its place meanwhile one of the
        # splits kept alone, so that a pack killed midway leaves those readable and keepable.
        _write_index(out, PackIndex(str(root.resolve()), shard_bytes, classes.class_ids,
                                    classes.classes, kept))
        with tqdm(total=sum(len(f) for f in folders.values()), desc="pack", unit="img",
                  disable=not progress) as bar:
            written = {
                split: SplitIndex(_SplitWriter(out, split, folder, shard_bytes, bar).write(),
                                  folder.fingerprint(), len(folder.skipped),
                                  folder.skipped_at_listing, folder.root.name)
                for split, folder in folders.items()
            }
        merged = {**kept, **written}
        written = {split: merged[split] for split in SPLIT_NAMES if split in merged}  # train first
        index = PackIndex(str(root.resolve()), shard_bytes, classes.class_ids, classes.classes,
                          written)
        _write_index(out, index)
        indexed = {shard.file for split in written.values() for shard in split.shards}
        for path in out.iterdir():  # an earlier pack's surplus shards
            if SHARD_NAME.fullmatch(path.name) and path.name not in indexed:
                path.unlink()
        return index


def _write_index(out: Path, index: PackIndex) -> None:
    text = json.dumps(index.to_dict(), indent=1) + "\n"
    atomic_write(out / INDEX, lambda path: path.write_text(text, encoding="utf-8"),
                 advice=_ADVICE)


def _other_splits(out: Path, splits: list[str], shard_bytes: int,
                  class_ids: list[str]) -> dict[str, SplitIndex]:
    """The splits of an earlier pack in `out` that this one does not pack; a DataError where
    they hold other classes or shards of another size, or where an index.json that cannot be
    read leaves their shards unaccounted for (_check_out has made sure of its source)."""
    try:
        earlier = read_index(out)
    except DataError as error:  # none, or one it cannot read: nothing to keep, but shards
        stranded = _shards_of_other_splits(out, splits)  # the sweep would delete
        if stranded:
            more = f" and {len(stranded) - 1} more" if len(stranded) > 1 else ""
            raise DataError(f"{error}. Packing {','.join(splits)} alone would delete "
                            f"{stranded[0]}{more} of the splits it does not pack: pack every "
                            "split (--splits train,val), or choose another --out folder"
                            ) from None
        return {}
    others = [name for name in earlier.splits if name not in splits]
    changed = ("other classes" if earlier.class_ids != class_ids
               else f"--shard-size {earlier.shard_bytes}" if earlier.shard_bytes != shard_bytes
               else None)
    if changed and others:  # refused, not deleted: a pack of ImageNet's train is hours
        same_size = (f"pack with --shard-size {earlier.shard_bytes} to keep them, "
                     if earlier.shard_bytes != shard_bytes and earlier.class_ids == class_ids
                     else "")
        raise DataError(f"{out}: its {', '.join(others)} split(s) were packed with {changed}, "
                        f"and would not go with this pack's {','.join(splits)}: {same_size}add "
                        f"them to --splits to pack them again, or choose another --out folder")
    return {name: earlier.splits[name] for name in others}


def _shards_of_other_splits(out: Path, splits: list[str]) -> list[str]:
    return sorted(path.name for path in out.glob("*-*.tar")
                  if SHARD_NAME.fullmatch(path.name) and path.name.split("-")[0] not in splits)


def _open_splits(root: Path, splits: list[str]) -> dict[str, FolderImages]:
    """The splits' folders as canon's folder reader sees them, with the training split's
    classes (val alone is packed with them too)."""
    if "val" not in splits:
        return {"train": open_train_folder(root)}
    if split_folder(root, "val") is not None and split_folder(root, "train") is None:
        raise DataError(f"{root}: no train/ folder; a val split is packed labelled by the "
                        f"training split's classes, so pack needs {root / 'train'} too "
                        "(canon eval reads a val-only folder as it is)")
    train, val = open_image_folder(root)
    return {split: folder for split, folder in (("train", train), ("val", val))
            if split in splits}


def _check_out(out: Path, root: Path) -> None:
    """Refuse to write into anything but a new or empty folder or a pack of `root`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: a file, not a folder; choose a new --out folder")
    others = sorted(path.name for path in out.iterdir() if not _OURS.fullmatch(path.name))
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise DataError(f"{out}: not empty and not a canon pack (it holds {', '.join(others[:3])}"
                        f"{more}); choose a new or empty --out folder")
    try:
        source = json.loads((out / INDEX).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return  # no index: a pack killed before it wrote one
    if source != str(root.resolve()):
        raise DataError(f"{out}: holds a pack of {source}; choose another --out folder, or "
                        f"delete this one to pack {root} there")


class _SplitWriter:
    """A split's images into shards `SPLIT-NNNNNN.tar`: the fewest that fit in shard_bytes
    with equal image counts (within one), so that no rank's stream is cut short by a small
    last shard (canon.data.shards.ShardImages.__len__ counts the smallest ones)."""

    def __init__(self, out: Path, split: str, folder: FolderImages, shard_bytes: int,
                 bar: tqdm) -> None:
        self.out, self.split, self.bar = out, split, bar
        self.class_count = len(folder.class_ids)
        order = list(range(len(folder)))
        if split == "train":
            random.Random(PACK_SEED).shuffle(order)
        keys = _keys(folder)
        self.samples = [(keys[i], folder.paths[i], folder.labels[i]) for i in order]
        self.sizes = [sum(_member_bytes(info) for info, _ in _members(*sample, read=False))
                      for sample in self.samples]
        self.bounds = _even_bounds(self.sizes, shard_bytes)
        largest = _tar_bytes(max(self.sizes, default=0))
        if len(self.sizes) > 1 and largest > shard_bytes:  # _even_bounds: one image a shard
            warnings.warn(f"a shard size of {shard_bytes:,} bytes holds not even {split}'s "
                          f"largest image (a tar file of it takes {largest:,} bytes): its "
                          f"{len(self.sizes):,} shards hold one image each; shards of 100 MB to "
                          "1 GB stream best (--shard-size 1GB)", stacklevel=3)

    def write(self) -> list[Shard]:
        shards = []
        for number, (start, stop) in enumerate(pairwise(self.bounds)):
            path = self.out / f"{self.split}-{number:06d}.tar"
            counts, offsets = [0] * self.class_count, []
            atomic_write(path, partial(self._fill, samples=self.samples[start:stop],
                                       counts=counts, offsets=offsets), advice=_ADVICE)
            shards.append(Shard(path.name, sum(counts), path.stat().st_size, counts, offsets))
        return shards

    def _fill(self, temporary: Path, samples: list[tuple[str, Path, int]],
              counts: list[int], offsets: list[int]) -> None:
        """Write the shard; count its images by class, and note where every OFFSET_EVERY-th
        begins as written (a file changed since the scan that sized the shards has other
        bytes than its scanned size)."""
        with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as tar:
            for number, (key, path, label) in enumerate(samples):
                if number % OFFSET_EVERY == 0:
                    offsets.append(tar.offset)
                for info, data in _members(key, path, label):
                    tar.addfile(info, BytesIO(data))
                counts[label] += 1
                self.bar.update()


def _members(key: str, path: Path, label: int, read: bool = True
             ) -> list[tuple[tarfile.TarInfo, bytes]]:
    """An image's tar members, `KEY.EXT` and `KEY.cls` (headers as TarInfo() makes them:
    mtime 0, no owner, so that packing the same folder twice gives the same bytes); with
    read=False the image's member has its size but no data."""
    try:
        data = path.read_bytes() if read else b""
        size = len(data) if read else path.stat().st_size
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error}); fix or remove "
                        "it and pack again") from None
    extension = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    label_text = str(label).encode()
    members = []
    for name, content, length in ((f"{key}.{extension}", data, size),
                                  (f"{key}.cls", label_text, len(label_text))):
        info = tarfile.TarInfo(name)
        info.size = length
        members.append((info, content))
    return members


def _even_bounds(sizes: list[int], shard_bytes: int) -> list[int]:
    """Where each shard's samples start, then the end: the fewest shards of equal sample
    counts (within one) whose tar files, of samples taking `sizes` bytes, hold at most
    shard_bytes; one sample each where even that does not fit."""
    prefix = list(accumulate(sizes, initial=0))
    total = len(sizes)
    count = max(1, -(-_tar_bytes(prefix[-1]) // shard_bytes))
    while count < total:
        bounds = [k * total // count for k in range(count + 1)]
        if all(_tar_bytes(prefix[b] - prefix[a]) <= shard_bytes for a, b in pairwise(bounds)):
            return bounds
        count += 1
    return list(range(total + 1))


def _keys(folder: FolderImages) -> list[str]:
    """`<class id>/<file stem>` per image, dots made underscores (a key ends at its first dot)
    and made unique by a suffix _2, _3, ... where two files differ only in extension or dots."""
    keys, taken = [], set()
    for path, label in zip(folder.paths, folder.labels, strict=True):
        key = base = f"{folder.class_ids[label]}/{path.stem}".replace(".", "_")
        copy = 1
        while key in taken:
            copy += 1
            key = f"{base}_{copy}"
        taken.add(key)
        keys.append(key)
    return keys


def _member_bytes(info: tarfile.TarInfo) -> int:
    """What a member takes in the tar file: its header(s), its data padded to whole blocks."""
    header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    return len(header) + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_bytes(members: int) -> int:
    """A tar file's size: its members, two zero blocks, padded to whole records."""
    return -(-(members + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
