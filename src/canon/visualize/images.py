"""Pictures and the numbers behind them: per-tile contrast normalisation (as Krizhevsky et al.
2012, Fig. 3, and Zeiler & Fergus 2013, Figs. 2 and 6, show filters and projections), nearest-
neighbour upscaling of small tiles, plain and labelled grids, the crop a network saw, and
atomic PNG, JSON and CSV writes."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from canon.data.datasets import recorded_differences
from canon.data.preprocess import EvalPreprocess
from canon.errors import DataError
from canon.files import atomic_write

GRID_PADDING = 2  # pixels between tiles
TILE_SIDE = 48  # tiles smaller than this are enlarged by a whole factor, nearest neighbour


@dataclass
class Written:
    """What a visualisation wrote, and one line saying what it shows."""

    summary: str
    paths: list[Path] = field(default_factory=list)


def contrast_normalise(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile of N x C x H x W to uint8, its own minimum at 0 and maximum at 255; a constant
    tile becomes mid-grey (128), since it has no contrast to stretch."""
    flat = tiles.detach().float().flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).view(-1, 1, 1, 1)
    scaled = (tiles.float() - low.view(-1, 1, 1, 1)) / span.clamp_min(1e-12) * 255
    scaled = torch.where(span > 0, scaled, torch.full_like(scaled, 128.0))
    return scaled.round().clamp(0, 255).to(torch.uint8)


def as_rgb(tiles: torch.Tensor) -> torch.Tensor:
    """N x C x H x W with C = 1 or 3 as N x 3 x H x W (one channel repeated as grey)."""
    return tiles.expand(-1, 3, -1, -1) if tiles.shape[1] == 1 else tiles


def upscale(tiles: torch.Tensor, side: int = TILE_SIDE) -> torch.Tensor:
    """Tiles (... x H x W) enlarged by the whole factor that brings their shorter side to at
    least `side`, each pixel a block (nearest neighbour), so a 3x3 kernel stays 3x3 blocks."""
    factor = max(1, math.ceil(side / min(tiles.shape[-2:])))
    return tiles.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def tile_grid(tiles: torch.Tensor, columns: int) -> torch.Tensor:
    """uint8 N x 3 x H x W tiles in rows of `columns`, GRID_PADDING white pixels around each:
    the grid is 3 x (rows (H + p) + p) x (columns (W + p) + p)."""
    return make_grid(tiles, nrow=columns, padding=GRID_PADDING, pad_value=255)


def seen_crop(preprocess: EvalPreprocess, image: torch.Tensor) -> torch.Tensor:
    """The uint8 centre crop of `image` that preprocess.center normalises: what the network saw."""
    return preprocess.center_crop(image)[0]


def window(image: torch.Tensor, box: tuple[int, int, int, int], fill: float) -> torch.Tensor:
    """The part of C x H x W `image` inside box = (top, left, bottom, right), inclusive, which may
    reach outside the image; what lies outside is `fill`, so every window of a box size has
    that size."""
    top, left, bottom, right = box
    height, width = image.shape[-2:]
    above, before = max(-top, 0), max(-left, 0)
    padded = F.pad(image, (before, max(right + 1 - width, 0), above, max(bottom + 1 - height, 0)),
                   value=fill)
    return padded[:, top + above : bottom + above + 1, left + before : right + before + 1]


def save_png(path: Path, image: torch.Tensor) -> Path:
    """Write a uint8 3 x H x W (or H x W) tensor as a PNG, atomically."""
    array = image.permute(1, 2, 0).numpy() if image.dim() == 3 else image.numpy()
    picture = Image.fromarray(array.squeeze())
    atomic_write(path, lambda target: picture.save(target, format="PNG"))
    return path


def save_labelled_grid(
    path: Path, tiles: torch.Tensor, row_labels: Sequence[str], column_labels: Sequence[str],
    title: str,
) -> Path:
    """uint8 tiles R*C x 3 x H x W (row-major) as a figure with a title, each row and column
    labelled, drawn with matplotlib's Agg backend (no display)."""
    from matplotlib.figure import Figure  # a Figure without pyplot never opens a window

    rows, columns = len(row_labels), len(column_labels)
    grid = tile_grid(tiles, columns)
    height, width = tiles.shape[-2:]
    dpi, left, top, margin = 100, 1.0, 0.7, 0.1  # margins in inches: row labels, title
    grid_width, grid_height = grid.shape[2] / dpi, grid.shape[1] / dpi
    # At least 6 inches wide, so that the title fits above a narrow grid.
    figure_width = max(grid_width + left + margin, 6.0)
    figure_height = grid_height + top + margin
    figure = Figure(figsize=(figure_width, figure_height), dpi=dpi)
    left += (figure_width - grid_width - left - margin) / 2  # centred under the title
    axes = figure.add_axes((left / figure_width, margin / figure_height,
                            grid_width / figure_width, grid_height / figure_height))
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    step_x, step_y = width + GRID_PADDING, height + GRID_PADDING
    axes.set_xticks([GRID_PADDING + step_x * c + (width - 1) / 2 for c in range(columns)],
                    list(column_labels), fontsize=8)
    axes.set_yticks([GRID_PADDING + step_y * r + (height - 1) / 2 for r in range(rows)],
                    list(row_labels), fontsize=8)
    axes.xaxis.tick_top()
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.suptitle(title, fontsize=10, y=0.999, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, lambda target: target.write_bytes(buffer.getvalue()))
    return path


def check_not_another(path: Path, **subject: str) -> None:
    """Before the work: the result at `path` (a JSON written by a visualisation) is replaced
    only by one of the same `subject` (image and data as absolute paths, as the results
    record them; split); another's, e.g. an image of the same file name in another folder,
    is a DataError saying to name another folder. A relative path an earlier canon recorded
    is not compared (canon.data.datasets.recorded_differences)."""
    differ = recorded_differences(path, subject, plain=("split",))
    if differ:
        named = ", ".join(f"{key} {value}" for key, value in differ.items())
        raise DataError(f"{path} holds the result for {named}: name another folder with "
                        "--output-dir to keep both")


def save_json(path: Path, content: Any) -> Path:
    text = json.dumps(content, indent=2) + "\n"
    atomic_write(path, lambda target: target.write_text(text))
    return path


def save_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One row per dict, the header from the first dict's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda target: target.write_text(buffer.getvalue()))
    return path


def projection_windows(
    projections: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]]
) -> torch.Tensor:
    """Each projection N x C x H x W inside its receptive-field box (zero beyond the image),
    contrast-normalised on its own, as uint8 N x 3 x h x w."""
    windows = torch.stack([
        window(projection.float(), box, 0.0) for projection, box in
        zip(projections.cpu(), boxes, strict=True)
    ])
    return as_rgb(contrast_normalise(windows))


def patch_windows(
    crops: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]]
) -> torch.Tensor:
    """Each uint8 image inside its box (grey beyond the image), as N x 3 x h x w."""
    return torch.stack([window(crop, box, 128) for crop, box in zip(crops, boxes, strict=True)])


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Tiles N x 3 x h x w and N x 3 x h x w' as N x 3 x h x (w + GRID_PADDING + w')."""
    gap = torch.full((*left.shape[:3], GRID_PADDING), 255, dtype=torch.uint8)
    return torch.cat([left, gap, right], 3)
