#!/usr/bin/env python3
"""JPEG decoding speed: torchvision.io (libjpeg-turbo) against PIL, on real ImageNet JPEGs.

    python bench/bench_decode.py [FOLDER] [--repeats 5]

FOLDER defaults to ../shared/data/imagenette2-160-mini (1,500 Imagenette JPEGs, shorter side
160 px). Files are read into memory first, so only decoding to a uint8 RGB tensor 3 x H x W is
timed, single-threaded; the median of `--repeats` alternating passes is reported, and the ratio
torchvision / PIL in images per second.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-160-mini"


def with_torchvision(data: bytes) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)


def with_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def images_per_second(decoders: dict, blobs: list[bytes], repeats: int) -> dict[str, float]:
    """Median pass of each decoder; passes alternate, so a busy machine slows both alike."""
    passes: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, decode in decoders.items():
            start = time.perf_counter()
            for data in blobs:
                decode(data)
            passes[name].append(time.perf_counter() - start)
    return {name: len(blobs) / statistics.median(times) for name, times in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder of JPEGs")
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates io
    torch.set_num_threads(1)
    blobs = [p.read_bytes() for p in sorted(args.folder.rglob("*.JPEG"))]
    if not blobs:
        raise SystemExit(f"no .JPEG files under {args.folder}")
    for data in blobs[:20]:  # the two decoders agree (same libjpeg family, same upsampling)
        difference = (with_torchvision(data).float() - with_pil(data).float()).abs().mean()
        assert difference < 2, f"decoders disagree by {difference:.2f} on average"
    speeds = images_per_second({"tv": with_torchvision, "pil": with_pil}, blobs, args.repeats)
    tv, pil = speeds["tv"], speeds["pil"]
    megapixels = sum(h * w for _, h, w in (with_pil(d).shape for d in blobs[:100])) / 100e6
    print(f"{len(blobs)} JPEGs under {args.folder} (mean {megapixels:.3f} Mpx), 1 thread")
    print(f"processor: {platform.processor() or platform.machine()}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, Pillow {Image.__version__}")
    print(f"torchvision.io.decode_image: {tv:8.0f} img/s")
    print(f"PIL Image.open + convert:    {pil:8.0f} img/s")
    print(f"ratio torchvision / PIL:     {tv / pil:8.2f}x")


if __name__ == "__main__":
    main()
