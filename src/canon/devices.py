"""Which device a run, an evaluation or a picture uses: the `device` arguments' shared rule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from canon.errors import ConfigError


def resolve_device(device: str) -> str:
    """"auto" becomes "cuda" when a GPU is visible, else "cpu"; a CPU or CUDA device name
    passes through. A name torch does not know, another device type, or CUDA where none is
    visible is a ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu or cuda")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asks for CUDA, but no CUDA device is visible")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine shows {torch.cuda.device_count()} "
                          f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


@contextlib.contextmanager
def cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """cuDNN's autotuned convolution kernels on CUDA (the fastest; GPU runs are not bitwise
    anyway), as canon's training and every contender of a benchmark use them; the setting as
    it was afterwards, so that neither a caller's later work nor a later contender inherits it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
