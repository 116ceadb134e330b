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


def cpu_lacks_bf16() -> bool:
    """True on an x86 CPU without bf16 instructions (avx512_bf16 or AMX), where oneDNN
    emulates bf16 convolutions: a ResNet-34 step ran 3.1x slower than float32 on a 2-core Xeon
    VM (README, "bf16 on a CPU"). Other architectures report nothing torch can read, so they
    are not judged."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if has_bf16 is None or has_amx is None:
        return False
    return not (has_bf16() or has_amx())


class Precision:
    """`cache` off for a step captured in a CUDA graph, which autocast's cast cache would
    break (torch's CUDA graphs notes)."""

    def __init__(self, mode: str, device: torch.device, cache: bool = True) -> None:
        if mode not in AMP_MODES:
            raise ConfigError(f"--amp must be bf16 or fp16 (or none), got {mode!r}")
        if mode == "bf16" and device.type == "cpu" and cpu_lacks_bf16():
            warnings.warn("--amp bf16 on a CPU without bf16 instructions (avx512_bf16 or AMX): "
                          "torch emulates them, slower than float32; `canon bench train "
                          "--device cpu --amp bf16` measures both", SlowPrecisionWarning,
                          stacklevel=2)
        self.mode, self.device, self.cache = mode, device, cache
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.mode],
                              cache_enabled=self.cache)

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
