"""Mixed precision of the local forward pass: autocast dtypes and the fp16 loss scale.

Contract: master weights, optimizer state and the gradients a trainer hands out stay fp32 under
every precision; only the forward pass and the loss run under `torch.autocast`. fp16 needs a
loss scale so small activation gradients do not flush to zero in backward; `LossScale` is a
plain dynamic scale (halve on overflow, double after `growth_interval` clean steps) kept apart
from any optimizer, because strategies exchange the gradients between backward and the step.
Whether a device type can autocast a dtype is probed once, not assumed from the torch version.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision this torch build or device cannot run."""


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of `precision` (None = plain fp32)."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise PrecisionError(f"unknown precision {precision!r} (fp32, bf16 or fp16)") from None


@functools.cache
def can_autocast(device_type: str, dtype: torch.dtype) -> bool:
    """True when a matmul under `torch.autocast(device_type, dtype)` really runs in `dtype`.
    Older builds warn and silently disable autocast for a pair they lack; this catches that."""
    try:
        available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
        if available is not None and not available(device_type):
            return False
        a = torch.ones(2, 2, device=device_type)
        with torch.autocast(device_type, dtype=dtype):
            return (a @ a).dtype == dtype
    except (RuntimeError, AssertionError, AttributeError):
        return False


def check_precision(precision: str, device_type: str) -> None:
    """Raise `PrecisionError` (one line) when `precision` cannot run on `device_type`."""
    dtype = autocast_dtype(precision)
    if dtype is not None and not can_autocast(device_type, dtype):
        raise PrecisionError(f"precision {precision} is not supported on {device_type} by torch "
                             f"{torch.__version__}; use fp32 or bf16")


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """`torch.autocast` for `dtype`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


@dataclass
class LossScale:
    """Dynamic loss scale of fp16 training. Powers of two, so scaling and unscaling are exact."""

    scale: float = 2.0**16
    growth_interval: int = 2000  # clean steps before the scale doubles
    min_scale: float = 1.0  # below this an overflow is the model's, not the scale's
    clean_steps: int = 0

    def update(self, finite: bool) -> None:
        """Record one backward: halve on a non-finite gradient, grow after a clean run."""
        if not finite:
            self.scale = max(self.min_scale, self.scale / 2.0)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def state(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


__all__ = ["PRECISIONS", "LossScale", "PrecisionError", "autocast", "autocast_dtype", "can_autocast",
           "check_precision"]
