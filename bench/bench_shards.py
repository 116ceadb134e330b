#!/usr/bin/env python3
"""Reading speed: tar shards (canon.data.shards.ShardImages) against canon's image-folder reader.

    python bench/bench_shards.py [FOLDER] [--repeats 3] [--limit N] [--shard-size 10MB]

FOLDER (default ../shared/data/imagenette2-160, 9,469 training JPEGs) is packed into a temporary
folder first (timed apart), by default in 10 MB shards: about 1,000 of its small JPEGs each, so
that there are shards to deal to the worker processes. Then each reader reads the training split
in a training order (the folder in a ShuffleSampler permutation, the shards in a shard
permutation through a 1,000-image shuffle buffer) and decodes every JPEG to a uint8 tensor, with
no transform: in the main process, then with 2 DataLoader worker processes. `--limit N` reads
the first N images of each pass (for trial runs). Reported: images per second, the median of
`--repeats` alternating passes, and the ratio shard / folder. The files are in the page cache
after the first pass, so this measures the readers' own cost, not what shards save on shared
storage.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from canon.data.folders import open_train_folder
from canon.data.pack_command import parse_size
from canon.data.packing import pack_folder
from canon.data.sampling import ShuffleSampler
from canon.data.shards import ShardImages

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-160"
BATCH = 64


def images_per_second(loader: DataLoader, limit: int | None) -> float:
    """One pass, timed from its first batch on (the worker processes' start-up is no part of
    reading); the loader's batches are image counts (collate_fn=len). That first batch hides
    more of the shards' work than of the folder's: each shard stream fills its 1,000-image
    shuffle buffer before it yields, the folder reads 64 images. A bias in the shards' favour,
    about 1-2% of a full pass by a review's estimate (2026-12-06), more with --limit."""
    batches = len(loader) if limit is None else -(-limit // BATCH)
    counts = islice(loader, batches)
    next(counts)
    start = time.perf_counter()
    count = sum(counts)
    return count / (time.perf_counter() - start)


def loader(dataset: Dataset, workers: int, **options) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=len, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, help="images per pass (default: all)")
    parser.add_argument("--shard-size", type=parse_size, default=10 * 10**6)
    args = parser.parse_args()
    if args.repeats < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--repeats and --limit must be at least 1")
    if not (args.folder / "train").is_dir():
        parser.error(f"{args.folder} has no train/ folder of class folders")
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates io
    torch.set_num_threads(1)
    folder = open_train_folder(args.folder)
    with tempfile.TemporaryDirectory() as temporary:
        started = time.perf_counter()
        index = pack_folder(args.folder, Path(temporary) / "shards", shard_bytes=args.shard_size,
                            splits=["train"], progress=False)
        packed = time.perf_counter() - started
        shards = len(index.splits["train"].shards)
        speeds: dict[str, list[float]] = {}
        for workers in (0, 2):
            for repeat in range(args.repeats):
                sampler = ShuffleSampler(folder, seed=0)
                sampler.set_epoch(repeat)
                images = ShardImages(Path(temporary) / "shards", "train", workers=workers)
                images.set_epoch(repeat)
                readers = [("shards", loader(images, workers)),
                           ("folder", loader(folder, workers, sampler=sampler))]
                for name, reader in readers[repeat % 2:] + readers[:repeat % 2]:  # in turns
                    speed = images_per_second(reader, args.limit)
                    speeds.setdefault(f"{name}, {workers} workers", []).append(speed)
    print(f"{len(folder)} training images under {args.folder}, packed into {shards} shards "
          f"of at most {args.shard_size:,} bytes in {packed:.1f} s")
    print(f"processor: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"thread per process; torch {torch.__version__}; median of {args.repeats} passes")
    median = {name: statistics.median(values) for name, values in speeds.items()}
    for name, value in median.items():
        print(f"{name + ':':<20} {value:8.0f} img/s")
    for workers in (0, 2):
        ratio = median[f"shards, {workers} workers"] / median[f"folder, {workers} workers"]
        print(f"ratio shard / folder, {workers} workers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
