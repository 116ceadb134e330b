"""Mixed precision at the edge of the training loop: autocast, and loss scaling for fp16.

bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does, through torch's
GradScaler (skips steps whose gradients overflowed and adapts the scale). Weights, optimizer
state and the loss reduction stay fp32 in every mode.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from typing import Any

import torch

from canon.errors import ConfigError
from canon.recipes.schema import AMP_MODES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SlowPrecisionWarning(UserWarning):
    """Autocast asked for in a precision the device computes more slowly than float32."""


# The x86 instructions (torch.cpu's checks) that multiply each autocast precision natively.
# Without them oneDNN emulates it: bf16 matrices multiplied at a fifth of float32's rate on a
# 2-core Xeon VM, and fp16 at 0.5-0.7% on it and on a Zen 4 (README, "bf16 on a CPU").
_NATIVE_ON_X86 = {
    "bf16": {"avx512_bf16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"},
    "fp16": {"AMX-FP16": "_is_amx_fp16_supported"},
}


def cpu_emulates(mode: str) -> bool:
    """True on an x86 CPU without instructions for autocast precision `mode` ("bf16" or
    "fp16"). Other architectures report nothing torch can read, so they are not judged."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    checks = [getattr(torch.cpu, check, None) for check in _NATIVE_ON_X86[mode].values()]
    if None in checks:
        return False
    return not any(check() for check in checks)


class Precision:
    """`cache` off for a step captured in a CUDA graph, which autocast's cast cache would
    break (torch's CUDA graphs notes)."""

    def __init__(self, mode: str, device: torch.device, cache: bool = True) -> None:
        if mode not in AMP_MODES:
            raise ConfigError(f"--amp must be bf16 or fp16 (or none), got {mode!r}")
        if mode != "none" and device.type == "cpu" and cpu_emulates(mode):
            needs = " or ".join(_NATIVE_ON_X86[mode])
            warnings.warn(f"--amp {mode} on a CPU without {mode} instructions ({needs}): torch "
                          "emulates them, slower than float32; `canon bench train --model M "
                          f"--device cpu --amp {mode}` measures both", SlowPrecisionWarning,
                          stacklevel=2)
        self.mode, self.device, self.cache = mode, device, cache
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.mode],
                              cache_enabled=self.cache)

    def scoring(self) -> contextlib.AbstractContextManager:
        """Autocast for validation: bf16's, but float32 for fp16, whose range (to 65,504) an
        eval-mode net, normalising by running statistics, can leave where the training-mode
        one stayed in it; GradScaler guards only the backward."""
        return contextlib.nullcontext() if self.mode == "fp16" else self.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
