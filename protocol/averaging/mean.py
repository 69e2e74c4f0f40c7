"""Weighted means of tensor lists, the arithmetic every averaging path shares.

Invariants: inputs of any float dtype/device are read as fp32 CPU values, sums accumulate in
fp32 in the order given (so members that pass contributions in one order agree to the last
bit), and no input is mutated. Weight-0 contributions are checked for shape, then skipped.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def as_f32(t: Tensor) -> Tensor:
    """fp32 CPU view of `t`'s values (may BE `t` when it already is one: never mutate it)."""
    return t.detach().to(device="cpu", dtype=torch.float32)


def check_same_shapes(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} tensors vs {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{what}: tensor {i} has shape {tuple(x.shape)} vs {tuple(y.shape)}")


def check_scalar(name: str, value: float, *, lo: float | None = None, hi: float | None = None) -> float:
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} must be finite and within [{lo}, {hi}]")
    return value


def weighted_mean(payloads: Iterable[tuple[Sequence[Tensor], float]]) -> list[Tensor]:
    """sum_i w_i * x_i / sum_i w_i, per tensor, accumulated in fp32 in the given order.

    Weights must be finite and >= 0; weight-0 entries are validated (structure) but skipped,
    so adding one changes no bit of the result. Raises ValueError when there is nothing to
    average or every weight is 0.
    """
    payloads = [(list(tensors), check_scalar("weight", w, lo=0.0)) for tensors, w in payloads]
    if not payloads:
        raise ValueError("weighted_mean of no payloads")
    ref = payloads[0][0]
    for tensors, _ in payloads[1:]:
        check_same_shapes(ref, tensors, "weighted_mean payloads")
    total = sum(w for _, w in payloads)  # Python float: exact for sample counts
    if total <= 0:
        raise ValueError("weighted_mean: every weight is 0 (nothing to average)")
    acc = [torch.zeros(t.shape, dtype=torch.float32) for t in ref]
    for tensors, w in payloads:
        if w == 0:
            continue
        for a, t in zip(acc, tensors):
            a += as_f32(t) if w == 1 else as_f32(t) * w  # unfused: product rounded, then sum
    return [a / total for a in acc]
