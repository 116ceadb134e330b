"""`canon pack DATA --out SHARDS [--shard-size 1GB] [--splits train,val]`: an ImageNet-layout
folder as tar shards (canon.data.packing) that training streams, rather than reading a million
small files from shared storage. torch loads only when packing starts, so `--help` answers at
once.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def add_pack_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `pack` verb, on canon's top-level subparsers (sets `run`)."""
    help_text = "pack an ImageNet-layout folder into tar shards for fast streaming"
    parser = subparsers.add_parser("pack", help=help_text, description=help_text)
    parser.add_argument("data", type=Path, metavar="DATA",
                        help="the folder: DATA/train/<class>/*.JPEG, DATA/val/<class>/*.JPEG")
    parser.add_argument("--out", type=Path, required=True, metavar="SHARDS",
                        help="a new or empty folder (or an earlier pack of DATA, replaced)")
    parser.add_argument("--shard-size", type=parse_size, default=10**9, metavar="SIZE",
                        help="largest shard: bytes, or with a unit (500MB, 1GB, 1GiB); "
                        "the fewest shards that fit, equal in image count; default: 1GB")
    parser.add_argument("--splits", type=lambda text: text.split(","), default=["train", "val"],
                        metavar="LIST", help="comma-separated; default: train,val")
    parser.set_defaults(run=run_pack)


def parse_size(text: str) -> int:
    """'1GB' (10**9), '1GiB' (2**30), '500MB', '1.5GB' or plain bytes, as a whole byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match[2].upper()
    if unit not in _UNITS or float(match[1]) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a size such as 500MB, 1GB, 1GiB or a number of bytes"
        )
    return int(float(match[1]) * _UNITS[unit])


def run_pack(args: argparse.Namespace) -> None:
    """Pack DATA and print each split's shards, samples and bytes, and the time it took."""
    from canon.data.packing import pack_folder

    started = time.perf_counter()
    try:
        index = pack_folder(args.data, args.out, shard_bytes=args.shard_size, splits=args.splits)
    except KeyboardInterrupt as stop:  # canon's main says it with the stop
        raise KeyboardInterrupt(_left_behind(args.out, args.splits)) from stop
    for name, split in index.splits.items():
        skipped = f", {split.skipped} files skipped (see the warnings)" if split.skipped else ""
        kept = "" if name in args.splits else " (kept from the earlier pack)"
        print(f"{name}: {len(split.shards)} shards, {split.samples:,} images, "
              f"{_size(split.bytes)}{skipped}{kept}")
    print(f"packed into {args.out} in {time.perf_counter() - started:.1f} s")


def _left_behind(out: Path, splits: list[str]) -> str:
    """What a stopped pack left in `out`, and how to go on: until its shards are all written,
    the index names only the splits it does not pack (canon.data.packing)."""
    from canon.data.shard_index import read_index
    from canon.errors import DataError

    try:
        indexed = read_index(out).splits
    except DataError:  # none yet: a new folder
        indexed = {}
    missing = [split for split in splits if split not in indexed]
    if not missing:
        return f"the index of {out} still names {','.join(splits)}: run the same command again"
    return (f"{out} holds no {','.join(missing)} split(s) until a pack of them ends (the "
            "splits it does not pack are kept): run the same command again, which packs them "
            "from the start")


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 10**9 else f"{count / 1e6:.1f} MB"
