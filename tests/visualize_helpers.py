"""What the canon.visualize tests share: running `canon visualize` as a user does, and checking
the pictures it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from canon.cli import main


def run_verb(argv: list[str], capsys) -> list[str]:
    """`canon visualize ARGV` through canon's command line; the lines it printed (each file
    written, then the summary)."""
    main(["visualize", *argv])
    return capsys.readouterr().out.splitlines()


def assert_picture(path: str | Path, min_width: int, min_height: int, levels: int = 2) -> None:
    """A PNG of at least that size with at least `levels` grey levels (2: not blank)."""
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.width >= min_width and picture.height >= min_height
        grey = np.asarray(picture.convert("L"))
    assert len(np.unique(grey)) >= levels, f"{path} is blank or nearly"


def save_png(path: Path, image: torch.Tensor) -> Path:
    """A uint8 3 x H x W image as a PNG file."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path
