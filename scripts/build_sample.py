#!/usr/bin/env python3
"""Build canon's bundled sample (src/canon/data/sample/) from the full CIFAR-10.

    python scripts/build_sample.py [--shared ../shared/data] [--train-per-class 500]
                                   [--test-per-class 100]

Takes the first N training images of each class (data_batch_1..5 in order) and the first M
test images of each class (test_batch in order), and stores each split losslessly as one WebP
mosaic of 32 x 32 tiles (100 per row, row-major, in the order of the labels file) plus the
labels as a .npy file. Afterwards it decodes the mosaics again and checks every pixel. The
sample is deterministic: running this twice gives identical pixels and labels.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from canon.data.cifar import read_cifar
from canon.data.datasets import SAMPLE_DIR, load_sample

TILES_PER_ROW = 100


def first_per_class(labels: list[int], per_class: int, num_classes: int) -> list[int]:
    taken = {c: 0 for c in range(num_classes)}
    chosen = []
    for index, label in enumerate(labels):
        if taken[label] < per_class:
            taken[label] += 1
            chosen.append(index)
    return chosen


def write_mosaic(images: np.ndarray, path: Path) -> None:
    """N x 3 x 32 x 32 uint8 -> one lossless WebP, padded with black tiles to full rows."""
    rows = -(-len(images) // TILES_PER_ROW)
    padded = np.zeros((rows * TILES_PER_ROW, 3, 32, 32), dtype=np.uint8)
    padded[: len(images)] = images
    mosaic = padded.reshape(rows, TILES_PER_ROW, 3, 32, 32).transpose(0, 3, 1, 4, 2)
    mosaic = mosaic.reshape(rows * 32, TILES_PER_ROW * 32, 3)
    Image.fromarray(mosaic).save(path, lossless=True, quality=100, method=6, exact=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--shared", type=Path, default=default_shared)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        unpack = args.shared / "unpack_cifar10.py"
        subprocess.run([sys.executable, str(unpack), scratch], check=True)
        folder = Path(scratch) / "cifar-10-batches-py"
        splits = {"train": read_cifar("cifar10", folder, "train"),
                  "test": read_cifar("cifar10", folder, "test")}
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    (SAMPLE_DIR / "classes.txt").write_text("\n".join(splits["train"].classes) + "\n")
    expected = {}
    for split, full in splits.items():
        chosen = first_per_class(full.labels, per_class[split], len(full.classes))
        images = full.images[chosen].numpy()
        labels = np.asarray([full.labels[i] for i in chosen], dtype=np.uint8)
        write_mosaic(images, SAMPLE_DIR / f"{split}.webp")
        np.save(SAMPLE_DIR / f"{split}.labels.npy", labels)
        expected[split] = (images, labels)

    for split, (images, labels) in expected.items():
        sample = load_sample(split)
        if not torch.equal(sample.images, torch.from_numpy(images)):
            sys.exit(f"{split}: decoded pixels differ from the source")
        if sample.labels != labels.tolist():
            sys.exit(f"{split}: labels differ from the source")
        digest = hashlib.sha256(images.tobytes()).hexdigest()
        size = (SAMPLE_DIR / f"{split}.webp").stat().st_size
        print(f"{split}: {len(labels)} images, {size / 1e6:.2f} MB, pixels sha256 {digest}")


if __name__ == "__main__":
    main()
