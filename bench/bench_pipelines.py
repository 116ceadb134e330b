#!/usr/bin/env python3
"""Training-pipeline speed: canon's crop-first pipelines against the float-everything order.

    python bench/bench_pipelines.py [FOLDER] [--images 300] [--repeats 5]

canon's training pipelines (canon.data.transforms.training_transform) find the crop first
and rescale (a jittered shorter side: resample, in float) only the crop, so the float
conversion, the colour shift and the mean subtraction touch only crop_size x crop_size
pixels. The reference is the earlier order, built from the same public steps: rescale
(AlexNet's square in uint8, a shorter side in float), convert the whole image to float,
colour-shift it, subtract the mean image resized to it, and only then crop and flip. Both
see the same decoded Imagenette JPEGs (decoding is excluded: it is the same for both) with
the same seeds, on one thread; the median of `--repeats` alternating passes is reported in ms
per image, and the ratio reference / canon. The two agree to float rounding (checked on the
first images).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from canon.data import DataConfig, FolderImages, compute_stats
from canon.data.normalize import ToFloat, make_normalize
from canon.data.transforms import (
    Compose,
    RandomCrop,
    RandomFlip,
    RescaleShorter,
    RescaleSquare,
    make_fancy_pca,
    training_transform,
)

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-160-mini"
CONFIGS = {  # the data sections of recipes/_resnet-imagenet.yaml and recipes/alexnet.yaml
    "resnet": DataConfig(augmentation="resnet", crop_size=224, resize_size=256,
                         scale_range=(256, 480), mean="pixel", pca_std=0.1),
    "alexnet": DataConfig(augmentation="alexnet", crop_size=227, resize_size=256,
                          mean="pixel", divide_std=False, pca_std=0.1),
}


def float_everything(config: DataConfig, stats) -> Compose:
    """The reference order: every float step on the whole rescaled image, then the crop."""
    if config.augmentation == "alexnet":
        rescale = [RescaleSquare(config.resize_size), ToFloat()]
    else:
        rescale = [ToFloat(), RescaleShorter(*config.scale_range)]
    return Compose([*rescale, make_fancy_pca(config, stats),
                    make_normalize(config, stats), RandomCrop(config.crop_size), RandomFlip()])


def ms_per_image(pipelines: dict, images: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median pass of each pipeline; passes alternate, so a busy machine slows both alike."""
    passes: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, pipeline in pipelines.items():
            torch.manual_seed(0)
            start = time.perf_counter()
            for image in images:
                pipeline(image)
            passes[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(times) / len(images)
            for name, times in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=DEFAULT)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1 or args.images < 1:
        parser.error(f"--repeats and --images must be at least 1, got {args.repeats} and "
                     f"{args.images}")
    if not ((args.folder / "train").is_dir() and (args.folder / "val").is_dir()):
        parser.error(f"{args.folder} lacks train/ or val/ (folders of class folders)")
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates io
    torch.set_num_threads(1)
    train = FolderImages(args.folder / "train")
    step = max(1, len(train) // args.images)
    images = [train.load_image(i) for i in range(0, len(train), step)][: args.images]
    stats = compute_stats(FolderImages(args.folder / "val"), 256, progress=False)
    print(f"{len(images)} decoded JPEGs from {args.folder / 'train'}, 1 thread; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    for name, config in CONFIGS.items():
        pipelines = {"reference": float_everything(config, stats),
                     "canon": training_transform(config, stats)}
        for image in images[:5]:
            outputs = []
            for pipeline in pipelines.values():
                torch.manual_seed(1)
                outputs.append(pipeline(image))
            assert torch.allclose(*outputs, atol=1e-5), f"{name}: the pipelines disagree"
        speed = ms_per_image(pipelines, images, args.repeats)
        print(f"{name:8s} reference {speed['reference']:6.2f} ms/img   canon "
              f"{speed['canon']:6.2f} ms/img   ratio {speed['reference'] / speed['canon']:5.2f}x")


if __name__ == "__main__":
    main()
