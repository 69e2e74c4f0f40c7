"""Robust combination of peers' contributions: one scaled, sign-flipped or NaN vector bounded.

Rules (`--aggregation`, part of the run spec: the reducer's rule decides everyone's mean):
- mean: the weighted mean, unchanged.
- clipped: a contribution with a non-finite value is dropped; every other one is scaled down to
  at most `clip_factor` x the lower median of their L2 norms and weighs at most the lower median
  weight, then they are weighted-averaged. That removes scale attacks (in the vector or in a
  declared weight); a sign-flipped vector of honest norm still pulls the mean by up to 2/n.
- trimmed: clipped as above, then per coordinate the b = max(1, floor(trim x n)) largest and
  smallest values are dropped and the rest averaged without weights (Yin et al. 2018); with
  fewer than 2b + 1 contributions, clipped's mean.
The lower median makes two contributions bound each other by the smaller norm: with two, neither
can be told honest. Weight-0 contributions (joiners) are shape-checked and left out. Where the
vector is split among reducers (butterfly), each reducer judges its own segments: a vector
scaled in one segment is caught there, and no reducer sees the whole vector's norm.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import torch
from torch import Tensor

from swarm_node.protocol.averaging.mean import as_f32, check_scalar, weighted_mean


class Aggregation(str, Enum):
    MEAN = "mean"
    CLIPPED = "clipped"
    TRIMMED = "trimmed"


AGGREGATIONS = tuple(a.value for a in Aggregation)


@dataclass(frozen=True)
class AggregationRule:
    mode: Aggregation = Aggregation.MEAN
    clip_factor: float = 1.0  # bound = clip_factor x the lower median norm
    trim_fraction: float = 0.2  # per side, of the contributions

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Aggregation(self.mode))
        check_scalar("clip_factor", self.clip_factor, lo=1e-6, hi=1e6)
        check_scalar("trim_fraction", self.trim_fraction, lo=0.0, hi=0.49)

    @property
    def robust(self) -> bool:
        return self.mode is not Aggregation.MEAN


@dataclass(frozen=True)
class Contribution:
    peer: str
    vector: Tensor  # flat; any float dtype, read as fp32
    weight: float = 1.0


@dataclass(frozen=True)
class Combined:
    result: Tensor  # fp32, flat
    used: tuple[str, ...]  # the contributions that count (weight > 0, finite)
    clipped: tuple[str, ...] = ()  # scaled down to the norm bound
    dropped: tuple[str, ...] = ()  # a non-finite value: left out entirely
    trimmed: bool = False  # the coordinate-wise trim applied


def lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def combine(parts: Sequence[Contribution], rule: AggregationRule) -> Combined:
    """Combine flat contributions of one length under `rule` (in the order given).
    Raises ValueError for no contributions, mismatched lengths or bad weights."""
    if not parts:
        raise ValueError("combine of no contributions")
    n = parts[0].vector.numel()
    for p in parts:
        check_scalar("weight", p.weight, lo=0.0)
        if p.vector.numel() != n:
            raise ValueError(f"contribution of {p.peer[-8:]} has {p.vector.numel()} values, expected {n}")
    live = [p for p in parts if p.weight > 0]
    if not rule.robust:
        return Combined(_weighted([(as_f32(p.vector).reshape(-1), p.weight) for p in live], n),
                        tuple(p.peer for p in live))
    finite, dropped = [], []
    for p in live:
        x = as_f32(p.vector).reshape(-1)
        (finite if bool(torch.isfinite(x).all()) else dropped).append((p, x))
    if not finite:
        return Combined(torch.zeros(n), (), (), tuple(p.peer for p, _ in dropped))
    # a self-declared weight (sync's sample count) buys no more influence than the median one
    weight_cap = lower_median([p.weight for p, _ in finite]) if len(finite) > 1 else math.inf
    finite = [(Contribution(p.peer, p.vector, min(p.weight, weight_cap)), x) for p, x in finite]
    norms = [float(torch.linalg.vector_norm(x)) for _, x in finite]
    bound = rule.clip_factor * lower_median(norms)
    scaled, clipped = [], []
    for (p, x), norm in zip(finite, norms):
        if norm > bound:
            clipped.append(p.peer)
            x = x * (bound / norm) if norm > 0 else x
        scaled.append((p, x))
    used = tuple(p.peer for p, _ in scaled)
    dropped_ids = tuple(p.peer for p, _ in dropped)
    k = len(scaled)
    b = max(1, math.floor(rule.trim_fraction * k))
    if rule.mode is Aggregation.TRIMMED and k >= 2 * b + 1:
        stacked = torch.stack([x for _, x in scaled])
        kept = stacked.sort(dim=0).values[b:k - b]
        return Combined(kept.mean(dim=0), used, tuple(clipped), dropped_ids, trimmed=True)
    return Combined(_weighted([(x, p.weight) for p, x in scaled], n), used, tuple(clipped), dropped_ids)


def _weighted(items: list[tuple[Tensor, float]], n: int) -> Tensor:
    """The weighted mean of flat vectors; zeros when nothing weighs (only joiners, or nobody)."""
    if sum(w for _, w in items) <= 0:
        return torch.zeros(n)
    return weighted_mean(([x], w) for x, w in items)[0]


def combine_lists(parts: Sequence[tuple[str, Sequence[Tensor], float]], rule: AggregationRule
                  ) -> tuple[list[Tensor], Combined]:
    """`combine` over tensor lists (each peer's list flattened into one vector, so the norm bound
    sees the whole contribution), split back into the first list's shapes."""
    if not parts:
        raise ValueError("combine of no contributions")
    shapes = [t.shape for t in parts[0][1]]
    for peer, tensors, _ in parts:
        if [t.shape for t in tensors] != shapes:
            raise ValueError(f"contribution of {peer[-8:]} has other shapes than the first")
    flat = [Contribution(peer, torch.cat([as_f32(t).reshape(-1) for t in tensors]) if tensors else torch.zeros(0), w)
            for peer, tensors, w in parts]
    out = combine(flat, rule)
    pieces, start = [], 0
    for s in shapes:
        size = math.prod(s)
        pieces.append(out.result[start:start + size].reshape(s))
        start += size
    return pieces, out


@dataclass
class SuspicionLedger:
    """Per peer: how often its contributions were clipped or dropped. A peer caught in
    `threshold` of its last `window` combinations is suspected (bounded memory: `max_peers`)."""

    window: int = 5
    threshold: int = 3
    max_peers: int = 1024
    totals: Counter = field(default_factory=Counter)  # (peer, "clipped" | "dropped") -> count
    _recent: dict[str, deque] = field(default_factory=dict)

    def record(self, combined: Combined) -> list[str]:
        """Count one combination; returns the peers that became suspected with it."""
        newly = []
        caught = set(combined.clipped) | set(combined.dropped)
        for peer in (*combined.used, *combined.dropped):
            before = self.is_suspected(peer)
            recent = self._recent.setdefault(peer, deque(maxlen=self.window))
            recent.append(peer in caught)
            if not before and self.is_suspected(peer):
                newly.append(peer)
        for peer in combined.clipped:
            self.totals[(peer, "clipped")] += 1
        for peer in combined.dropped:
            self.totals[(peer, "dropped")] += 1
        while len(self._recent) > self.max_peers:
            self._recent.pop(next(iter(self._recent)))
        return newly

    def is_suspected(self, peer: str) -> bool:
        return sum(self._recent.get(peer, ())) >= self.threshold

    def suspected(self) -> list[str]:
        return sorted(p for p in self._recent if self.is_suspected(p))
