"""`ShardImages`: a split of a shard folder (`canon pack`, canon.data.packing) streamed as an
IterableDataset, so that training reads a few large files in sequence rather than a million
small ones from shared storage (issue 14).

Training (shuffle=True): each epoch permutes the split's shards from (seed, epoch), the same on
every rank. Of its first world_size x (shards // world_size), rank r takes those at positions
r, r + world_size, ...; each of the (shards mod world_size) left over is split by sample
ranges, rank r taking its r-th part (seeking past the others' data), so that every rank reads
about the same number of images and the epoch reads them all. DataLoader worker w of W takes
the rank's pieces at w, w + W, ...; each worker streams its pieces' samples through a shuffle
buffer seeded from (seed, epoch, rank, worker) and decodes only what leaves it. Each sample's
augmentation draws from a seed of its own, fixed by (seed, epoch, its place in the pack), as
SeededSamples does for folders. The stream is therefore a function of (seed, epoch, rank,
world_size, workers, batch_size) alone, and `set_epoch(epoch, start)` resumes it after `start`
samples without decoding them.

Ranks must take the same number of steps, so in training every rank stops after the same
count, `len(self)`, computed from the index: the fewest samples any rank can be dealt (the
smallest whole shards, and the world_size-th part of the smallest left over), less what does
not fill whole batches of the workers that read a piece. Each worker's share is a multiple of
batch_size, so every batch is full. `canon pack` makes shards of equal sample counts (to one),
so a rank's epoch leaves out less than a batch per loader worker and a sample per shard, which
ones changing from epoch to epoch. Evaluation (shuffle=False) reads every sample of the
rank's shards once, and its loader yields them in pack order whatever its batch size and number
of workers: worker w reads the loader's batches w, w + W, ... (seeking past the others'), which
a DataLoader takes from its workers in turn. So a model's scores pair up image by image with
another's read at another batch size (an ensemble's members).

Undecodable images come out as None (canon.data.loaders.collate drops them) unless strict; a
shard cut short or altered since it was packed is a DataError naming it.
"""

from __future__ import annotations

import io
import random
import tarfile
import warnings
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from canon.data.config import MAX_IMAGE_PIXELS
from canon.data.decoding import decode_image_bytes
from canon.data.folders import BadImageWarning, UndecodableImageWarning, check_known_classes
from canon.data.labeled import Transform
from canon.data.sampling import sample_seed, seeded
from canon.data.shard_index import OFFSET_EVERY, PackIndex, Shard, read_index
from canon.data.tar_reader import seek_past, tar_members
from canon.errors import ConfigError, DataError

READ_BYTES = 2**20
RawSample = tuple[int, str, bytes, int]  # place in the pack, member name, image bytes, label
Piece = tuple[int, int, int]  # a shard's index in the split, its first sample to read, the end
# The constructor's keyword arguments, which `reading` carries over.
_OPTIONS = ("transform", "shuffle", "shuffle_buffer", "seed", "rank", "world_size", "batch_size",
            "workers", "strict", "max_pixels", "class_ids")


class ShardImages(IterableDataset):
    """A split of the shard folder `root`, as `(transform(image), label)` items (`image` uint8
    RGB 3 x H x W; None where it cannot be decoded), this rank's share (see the module).

    `batch_size` and `workers` must be the DataLoader's batch_size and num_workers in training
    (a worker process checks the latter): with them each worker's share is made of whole
    batches. In evaluation, the loader's batch_size keeps pack order (build_loader sets it).
    `class_ids` (a trained model's, in its output order): labels index them, matched by name;
    the split may hold some of them but no others. Without, the pack's classes.
    `shuffle_buffer` raw (undecoded) images per worker: about 110 KB each for ImageNet.
    `len()`: training, the samples every rank yields per epoch (a multiple of batch_size);
    evaluation, this rank's shards' samples.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        transform: Transform | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        workers: int = 0,
        strict: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        class_ids: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        index = read_index(self.root)
        if split not in index.splits:
            packing = next(self.root.glob(f"{split}-*.tar"), None) is not None
            raise DataError(
                f"{self.root}: no {split} split (it holds {', '.join(index.splits) or 'none'}); "
                + (f"its {split} shards are being packed, or a pack of them stopped before its "
                   "end: wait for it, or run it again" if packing else "pack it")
                + f" with {index.repack_command(self.root, split)}"
            )
        if not 0 <= rank < world_size or batch_size < 1 or workers < 0 or shuffle_buffer < 0:
            raise ConfigError(
                f"ShardImages: need 0 <= rank < world_size, batch_size >= 1, workers >= 0 and "
                f"shuffle_buffer >= 0; got rank {rank}, world_size {world_size}, batch_size "
                f"{batch_size}, workers {workers}, shuffle_buffer {shuffle_buffer}"
            )
        self.shards = index.splits[split].shards
        self._repack = (f"{index.repack_command(self.root, split)} (the same shards again, "
                        "byte for byte, so that a run on them goes on)")
        self.split, self._fingerprint = split, index.splits[split].fingerprint
        # Counted where a folder's are (evaluation, statistics): images the pack could not read.
        # Its other skipped files (no image's name) are no images; the folder's strict listing
        # refuses them too, but they change no count.
        skipped = index.splits[split].skipped_images
        if skipped is None:  # an earlier canon's pack of a folder with skipped files
            unknown = (f"{self.root}: packed by an earlier canon, which did not record how many "
                       f"of the {index.splits[split].skipped} file(s) of {split} it left out "
                       "were images")
            repack = index.repack_command(self.root, split)
            if strict:
                raise DataError(f"{unknown} (strict mode: re-pack it with {repack}, or run "
                                "without strict)")
            warnings.warn(f"{unknown}: skipped-image counts leave them out; re-pack it with "
                          f"{repack} to count them", BadImageWarning, stacklevel=2)
        elif strict and skipped:
            raise DataError(
                f"{self.root}: its pack left out {skipped} empty image file(s) of {split} "
                f"(strict mode: remove them from {index.source} and re-pack, or run without "
                "strict)")
        self.skipped_at_listing = skipped or 0
        # Classes of the pack this split holds no image of (canon.data.datasets warns of them)
        self.empty_classes = [name for name, count in zip(
            index.class_ids, index.splits[split].class_counts, strict=True) if not count]
        self.class_ids, self.classes, self._labels = _classes(self.root, index, split, class_ids)
        self.transform, self.shuffle, self.shuffle_buffer = transform, shuffle, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.workers = batch_size, workers
        self.strict, self.max_pixels = strict, max_pixels
        self._first = [0, *accumulate(s.samples for s in self.shards)]  # places in the pack
        # (epoch, start) in shared memory: persistent worker processes keep their own copy of
        # the rest of this object, and read these at each new iteration.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def reading(self, **options: Any) -> ShardImages:
        """This split read with other constructor keyword arguments, e.g. as a run's loader
        reads it (its batch size, workers, seed, rank and world size)."""
        return ShardImages(self.root, self.split,
                           **{**{name: getattr(self, name) for name in _OPTIONS}, **options})

    def with_transform(self, transform: Transform | None) -> ShardImages:
        """This split with another transform (as LabeledImages.with_transform)."""
        return self.reading(transform=transform)

    def check_files(self) -> None:
        """A DataError unless every shard of the split is there at the size index.json
        records. Training checks both splits before its first epoch, so that a missing val
        shard is not found after an epoch of training; reading a shard checks it again."""
        for shard in self.shards:
            _check_size(self.root / shard.file, shard, self._repack)

    def fingerprint(self) -> str:
        """The fingerprint of the folder split it was packed from (FolderImages.fingerprint):
        the same images, so the same cached statistics."""
        return self._fingerprint

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch `epoch` next, from sample `start` of this rank's stream on (the samples
        a run interrupted mid-epoch consumed: a whole number of batches with workers)."""
        if not 0 <= start <= len(self):
            raise ConfigError(
                f"ShardImages.set_epoch: start {start} is beyond this rank's {len(self)} "
                "samples an epoch: resume with the world size and train.workers the run had "
                "(they set how the shards are dealt)"
            )
        if self.workers and start % self.batch_size:
            raise ConfigError(
                f"ShardImages.set_epoch: start {start} is not a multiple of batch_size "
                f"{self.batch_size} (loader workers deal whole batches)"
            )
        self._position[0], self._position[1] = epoch, start

    def layout(self) -> list[list[str | int]]:
        """Each shard's file and sample count, in pack order: what deals the epochs besides
        the readers (a re-pack into other shards keeps the images, not the epochs)."""
        return [[shard.file, shard.samples] for shard in self.shards]

    def __len__(self) -> int:
        if not self.shuffle:
            return sum(stop - start for _, start, stop in self._rank_pieces(0))
        whole, left = divmod(len(self.shards), self.world_size)
        counts = sorted(shard.samples for shard in self.shards)
        fewest = sum(counts[:whole]) + sum(n // self.world_size for n in counts[:left])
        # Loader workers with a piece (the rest idle), each of which may end short of a batch.
        reading = min(max(self.workers, 1), whole + left)
        size = self.batch_size
        return max(0, -((reading * (size - 1) - fewest) // size)) * size

    def _rank_pieces(self, epoch: int) -> list[Piece]:
        """(shard, first sample, end) of each piece of this rank's share, in reading order:
        whole shards, then in training its parts of the shards left over (see the module)."""
        order = list(range(len(self.shards)))
        if not self.shuffle:
            return [(i, 0, self.shards[i].samples) for i in order[self.rank :: self.world_size]]
        random.Random(f"shards {self.seed} {epoch}").shuffle(order)
        whole = len(order) // self.world_size * self.world_size
        pieces = [(i, 0, self.shards[i].samples) for i in order[self.rank : whole :
                                                                self.world_size]]
        for i in order[whole:]:
            samples, rank, world = self.shards[i].samples, self.rank, self.world_size
            start, stop = rank * samples // world, (rank + 1) * samples // world
            if start < stop:  # a shard of fewer samples than ranks leaves some without
                pieces.append((i, start, stop))
        return pieces

    def __iter__(self) -> Iterator[tuple[object, int] | None]:
        epoch, start = self._position.tolist()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.shuffle:
            stream = self._training_stream(epoch, start, worker, workers)
        else:
            stream = self._raw(self._evaluation_pieces(start, worker, workers))
        for place, name, data, label in stream:
            yield self._item(place, name, data, label, epoch)

    def _training_stream(self, epoch: int, start: int, worker: int, workers: int
                         ) -> Iterator[RawSample]:
        """This worker's samples of the epoch, undecoded: its pieces of the rank's share through
        the shuffle buffer, as many as its whole batches hold, less the `start` already read."""
        if workers != max(self.workers, 1):
            raise ConfigError(
                f"ShardImages(workers={self.workers}) read by {workers} loader process(es): "
                "pass the DataLoader's num_workers"
            )
        pieces = self._rank_pieces(epoch)
        counts = [sum(stop - start for _, start, stop in pieces[w::workers])
                  for w in range(workers)]
        size = self.batch_size
        batches = _deal(len(self) // size, [c // size for c in counts])[0]
        # A DataLoader takes batches from its workers in turn, from worker 0 on, so a resumed
        # stream gives worker w the part of the one next in turn, w places on.
        done, turn = _deal(start // size, batches)
        part = (turn + worker) % workers
        skip = start if workers == 1 else min(done[part] * size, batches[part] * size)
        stream = self._raw(pieces[part::workers])
        if self.shuffle_buffer:
            stream = _shuffled(stream, self.shuffle_buffer,
                               random.Random(f"buffer {self.seed} {epoch} {self.rank} {part}"))
        return islice(stream, skip, batches[part] * size)

    def _evaluation_pieces(self, start: int, worker: int, workers: int) -> list[Piece]:
        """This worker's pieces of the rank's samples from `start` on: the batches of
        batch_size at worker, worker + workers, ... A DataLoader takes batches from its workers
        in turn, so they come out in pack order whatever the batch size and worker count."""
        shares = self._rank_pieces(0)
        ends = list(accumulate(stop - first for _, first, stop in shares))
        total, size, pieces = (ends[-1] if ends else 0), self.batch_size, []
        for begin in range(start + worker * size, total, workers * size):
            end, share = min(begin + size, total), bisect_right(ends, begin)
            while begin < end:  # the batch, cut where a shard ends
                index, first, stop = shares[share]
                offset = first - (ends[share] - (stop - first))  # rank stream to shard place
                cut = min(end, ends[share])
                if pieces and pieces[-1][0] == index and pieces[-1][2] == begin + offset:
                    pieces[-1] = (index, pieces[-1][1], cut + offset)  # read on, no seek
                else:
                    pieces.append((index, begin + offset, cut + offset))
                begin, share = cut, share + 1
        return pieces

    def _item(self, place: int, name: str, data: bytes, label: int, epoch: int):
        try:
            image = decode_image_bytes(data, name, self.max_pixels)
        except DataError as error:
            if self.strict:
                raise DataError(f"{error} (strict mode: re-pack without it, or run without "
                                "strict)") from None
            warnings.warn(f"skipping {error}", UndecodableImageWarning, stacklevel=2)
            return None
        if self.transform is None:
            return image, label
        with seeded(sample_seed(self.seed, epoch, place)):
            return self.transform(image), label

    def _raw(self, pieces: list[Piece]) -> Iterator[RawSample]:
        for piece in pieces:
            yield from self._read_piece(*piece)

    def _read_piece(self, index: int, start: int, stop: int) -> Iterator[RawSample]:
        """Samples start to stop of a shard, undecoded, in order: tar members KEY.EXT grouped
        by KEY, two per sample (canon pack's image and .cls); those before `start` are seeked
        past, from the shard's recorded offset nearest below it."""
        shard, path = self.shards[index], self.root / self.shards[index].file
        _check_size(path, shard, self._repack)  # again: it may have changed since
        count, key, members = start, None, {}
        # The last recorded offset at or before start, then the headers from there on.
        jumps = min(start // OFFSET_EVERY, len(shard.offsets) - 1) if shard.offsets else 0
        try:  # then sequential reads of 1 MiB
            with open(path, "rb", buffering=0) as raw:
                raw.seek(shard.offsets[jumps] if jumps else 0)
                seek_past(raw, 2 * (start - jumps * OFFSET_EVERY))
                file = io.BufferedReader(raw, READ_BYTES)
                for name, data in tar_members(file):
                    folder, _, base = name.rpartition("/")
                    stem, _, extension = base.partition(".")
                    if (folder, stem) != key and members:
                        yield self._sample(path, index, count, members)
                        count, members = count + 1, {}
                        if count == stop < shard.samples:
                            return
                    key = folder, stem
                    members[extension] = name, data
                if members:
                    yield self._sample(path, index, count, members)
                    count += 1
        except (tarfile.TarError, EOFError, OSError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"{path}: unreadable shard ({error}); re-pack it with "
                            f"{self._repack}") from None
        if count != shard.samples:
            raise DataError(f"{path}: {count} samples, index.json says {shard.samples}; "
                            f"re-pack it with {self._repack}")

    def _sample(self, path: Path, index: int, count: int, members: dict) -> RawSample:
        label = members.pop("cls", (None, None))[1]
        if label is None or len(members) != 1:
            raise DataError(f"{path}: sample {count} has members {sorted(members)}, not one image "
                            f"and a .cls; re-pack it with {self._repack}")
        ((name, data),) = members.values()
        number = label.decode("ascii", "replace").strip()
        if not number.isdigit() or int(number) >= len(self._labels):
            raise DataError(f"{path}: sample {count} ({name}) has class {number!r}, not one of "
                            f"index.json's {len(self._labels)}; re-pack it with {self._repack}")
        return self._first[index] + count, f"{path}:{name}", data, self._labels[int(number)]


def _check_size(path: Path, shard: Shard, repack: str) -> None:
    """DataError unless shard file `path` is there at the size index.json records; `repack`:
    the command that makes it again."""
    found = path.stat().st_size if path.is_file() else None
    if found != shard.bytes:
        what = "missing" if found is None else f"{found:,} bytes"
        raise DataError(f"{path}: {what}, index.json says {shard.bytes:,} bytes (cut short or "
                        f"replaced since it was packed); re-pack it with {repack}")


def _classes(
    root: Path, index: PackIndex, split: str, class_ids: list[str] | None
) -> tuple[list[str], list[str], list[int]]:
    """(the class ids labels index, their names, the label of each packed label): the pack's
    own, or `class_ids` matched by name (refused if the split holds a class outside them)."""
    if class_ids is None or list(class_ids) == index.class_ids:
        return index.class_ids, index.classes, list(range(len(index.class_ids)))
    counts = index.splits[split].class_counts
    held = [name for name, count in zip(index.class_ids, counts, strict=True) if count]
    check_known_classes(str(root), held, class_ids)
    position = {name: i for i, name in enumerate(class_ids)}
    names = dict(zip(index.class_ids, index.classes, strict=True))
    labels = [position.get(name, -1) for name in index.class_ids]  # -1: a class never read
    return list(class_ids), [names.get(name, name) for name in class_ids], labels


def _deal(total: int, capacities: list[int]) -> tuple[list[int], int]:
    """`total` units dealt in turn to slots of the given capacities (holding `total` at least),
    as a DataLoader takes batches from its workers, and the slot next in turn."""
    dealt, slot = [0] * len(capacities), 0
    while total:
        if dealt[slot] < capacities[slot]:
            dealt[slot], total = dealt[slot] + 1, total - 1
        slot = (slot + 1) % len(capacities)
    return dealt, slot


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Items through a buffer of `size`: each arriving one takes the place of a random one,
    which leaves; what remains at the end leaves in random order."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer
