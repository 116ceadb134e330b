"""The argument groups of `canon visualize` verbs (canon.visualize.commands): each adds a few
related options to a verb's parser; a factory takes what differs between verbs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Arguments = Callable[[argparse.ArgumentParser], None]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def layer_argument(fallback: str | None = None) -> Arguments:
    """--layer NAME: required, or optional with `fallback` saying what the verb then uses."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--layer", required=fallback is None, metavar="NAME",
            help="a layer's dotted name in model.named_modules(), e.g. features.conv5 "
            "(an unknown name lists them all)" + (f"; default: {fallback}" if fallback else ""),
        )

    return add


def batch_argument(default: int) -> Arguments:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                            help=f"images per forward pass (default {default})")

    return add


def data_arguments(batch_size: int, *, split: bool = True) -> Arguments:
    """--data, --split (unless the verb always reads the evaluation split), --batch-size and
    --workers."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", metavar="PATH|cifar10|cifar100|sample",
                            help="dataset name or folder; default: the one the run trained on")
        if split:
            parser.add_argument("--split", choices=("val", "train"), default="val",
                                help="the split to search (val: the evaluation split)")
        batch_argument(batch_size)(parser)
        parser.add_argument("--workers", type=non_negative_int, default=0, metavar="N",
                            help="data loader processes (default 0: load in this one)")

    return add


def feature_arguments(default: int) -> Arguments:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--features", type=positive_int, default=default, metavar="K",
            help=f"show the K channels whose strongest activation is largest (default {default})",
        )
        parser.add_argument("--channels", type=non_negative_int, nargs="+", default=[],
                            metavar="C", help="show these channels instead")

    return add


def image_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, metavar="IMAGE", help="an image file")


def top_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top", type=positive_int, default=9,
                        help="images per feature (default 9, as Zeiler & Fergus Fig. 2)")


def contrast_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--contrast", choices=("each", "shared"), default="each",
        help="each: every kernel stretched to the full grey range on its own (its pattern); "
        "shared: one range for all, so weak kernels look faint (their strength), written as "
        "filters-shared.png beside the other")


def images_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, nargs="+", default=[], metavar="IMAGE",
                        help="search these image files instead of --data")


def square_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=positive_int, metavar="N",
                        help="the grey square's side in pixels of the crop (default: 32 at a "
                        "224 input, scaled to the run's crop)")
    parser.add_argument("--stride", type=positive_int, metavar="N",
                        help="pixels between its positions (default: 8 at a 224 input, scaled)")
    parser.add_argument("--label", metavar="CLASS",
                        help="the correct class (name, id or index); default: the one the "
                        "image's folder names (ImageNet layout) if the model has it, else the "
                        "unoccluded image's top prediction")


def transform_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--transform", required=True, choices=("translate", "scale", "rotate"),
                        help="vertical shift (pixels), scale factor or rotation (degrees)")
    parser.add_argument("--values", type=float, nargs="+", metavar="V",
                        help="the amounts to apply; default: Fig. 5's ranges (shifts up to 60 "
                        "pixels at 224, scales 0.5-1.5, rotations 0-360)")
    parser.add_argument("--label", action="append", dest="labels", metavar="CLASS",
                        help="the true class (name, id or index): once for all images or "
                        "once per image; default: the one each image's folder names "
                        "(ImageNet layout) if the model has it, else its top prediction")


def max_images_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-images", type=positive_int, metavar="N",
                        help="spread N images over the split instead of using all")


def names_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="legend names, one per RUN (default: the run folders' names)")


def metric_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metric", choices=("top1", "top5"), default="top1",
                        help="the error to plot (training logs top-1 only, so top5 draws "
                        "validation curves alone)")
