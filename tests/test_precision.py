"""Autocast precision: the warning for a precision a CPU only emulates; validation out of fp16's
range."""

from __future__ import annotations

import warnings

import pytest
import torch

from canon.engine import precision
from canon.engine.distributed import DistributedContext
from canon.engine.precision import Precision, SlowPrecisionWarning
from canon.engine.trainer import validate


def _cpu(monkeypatch: pytest.MonkeyPatch, machine: str, bf16: bool = False, amx: bool = False,
         amx_fp16: bool = False) -> None:
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16)


@pytest.mark.parametrize("mode, needs", [("bf16", "avx512_bf16 or AMX"), ("fp16", "AMX-FP16")])
def test_a_precision_the_cpu_emulates_warns(monkeypatch, mode, needs):
    _cpu(monkeypatch, "x86_64")
    with pytest.warns(SlowPrecisionWarning, match=f"without {mode} instructions \\({needs}\\)"
                      f".*canon bench train --model M --device cpu --amp {mode}"):
        Precision(mode, torch.device("cpu"))


@pytest.mark.parametrize("machine, native, mode, device", [
    ("x86_64", {"bf16": True}, "bf16", "cpu"),      # avx512_bf16 (Zen 4, Cooper Lake)
    ("x86_64", {"amx": True}, "bf16", "cpu"),       # AMX (Sapphire Rapids)
    ("x86_64", {"amx_fp16": True}, "fp16", "cpu"),  # AMX-FP16 (Granite Rapids)
    ("aarch64", {}, "bf16", "cpu"),                 # torch reports nothing for ARM's bf16
    ("x86_64", {}, "none", "cpu"),
    ("x86_64", {}, "bf16", "cuda"),
])
def test_no_warning_where_the_precision_is_native_or_not_asked_for(monkeypatch, machine, native,
                                                                   mode, device):
    _cpu(monkeypatch, machine, **native)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        Precision(mode, torch.device(device))


def test_validation_of_an_fp16_run_scores_beyond_fp16_s_range():
    """Finite weights whose logits pass 65,504: fp16 would score them infinite and stop the run
    with the epoch unsaved; validation scores an fp16 run in float32."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(48.0).view(4, 12) * 100)
        model[1].bias.zero_()
    images, labels = torch.full((8, 3, 2, 2), 30.0), torch.tensor([3] * 6 + [0] * 2)
    ctx = DistributedContext(0, 0, 1, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPrecisionWarning)
        fp16 = Precision("fp16", ctx.device)
    with fp16.autocast():
        assert not torch.isfinite(model(images)).all()
    assert validate(model, [(images, labels)], ctx, fp16) == (25.0, 0.0, 8)
