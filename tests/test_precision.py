"""Autocast precision: the warning for bf16 on a CPU that only emulates it."""

from __future__ import annotations

import warnings

import pytest
import torch

from canon.engine import precision
from canon.engine.precision import Precision, SlowPrecisionWarning


def _cpu(monkeypatch: pytest.MonkeyPatch, machine: str, bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch):
    _cpu(monkeypatch, "x86_64", bf16=False, amx=False)
    with pytest.warns(SlowPrecisionWarning, match="canon bench train --device cpu --amp bf16"):
        Precision("bf16", torch.device("cpu"))


@pytest.mark.parametrize("machine, bf16, amx, mode, device", [
    ("x86_64", True, False, "bf16", "cpu"),    # avx512_bf16 (Zen 4, Cooper Lake)
    ("x86_64", False, True, "bf16", "cpu"),    # AMX (Sapphire Rapids)
    ("aarch64", False, False, "bf16", "cpu"),  # torch reports nothing for ARM's bf16
    ("x86_64", False, False, "none", "cpu"),
    ("x86_64", False, False, "bf16", "cuda"),
])
def test_no_warning_where_bf16_is_native_or_not_asked_for(monkeypatch, machine, bf16, amx,
                                                          mode, device):
    _cpu(monkeypatch, machine, bf16, amx)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        Precision(mode, torch.device(device))
