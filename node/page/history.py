"""PageHistory: what the page's rate charts draw, kept in memory and bounded.

The node samples its counters every few seconds (on the event loop) and keeps the last
`max_points` samples, so a long-running node holds a fixed window (720 × 2 s = 24 minutes by
default), not its whole life. Rates are differences of cumulative counters between samples;
a counter that went backwards (a restart of the process) starts over at zero rather than
drawing a negative rate.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from swarm_node.page.state import LossSeries, RateSeries

MAX_LOSS_POINTS = 400


@dataclass(frozen=True)
class _Sample:
    t: float
    samples_per_s: float
    tx_bps: float
    rx_bps: float
    stragglers: float
    peers: int


class PageHistory:
    def __init__(self, max_points: int = 720) -> None:
        self._lock = threading.Lock()
        self._samples: deque[_Sample] = deque(maxlen=max_points)
        self._last: tuple[float, float, float] | None = None  # (t, tx total, rx total)

    def add(self, t: float, *, samples_per_s: float, tx_total: float, rx_total: float, stragglers: float,
            peers: int) -> None:
        """One sample at `t` seconds since start, with cumulative byte counters."""
        tx_bps = rx_bps = 0.0
        if self._last is not None and t > self._last[0]:
            dt = t - self._last[0]
            tx_bps = max(0.0, tx_total - self._last[1]) / dt
            rx_bps = max(0.0, rx_total - self._last[2]) / dt
        self._last = (t, tx_total, rx_total)
        with self._lock:
            self._samples.append(_Sample(round(t, 2), round(samples_per_s, 3), round(tx_bps, 1), round(rx_bps, 1),
                                         stragglers, peers))

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def series(self) -> RateSeries:
        with self._lock:
            s = list(self._samples)
        return RateSeries(t=[x.t for x in s], samples_per_s=[x.samples_per_s for x in s], tx_bps=[x.tx_bps for x in s],
                          rx_bps=[x.rx_bps for x in s], stragglers=[x.stragglers for x in s], peers=[x.peers for x in s])


def loss_series(history: list[list], max_points: int = MAX_LOSS_POINTS) -> LossSeries:
    """The node's per-step history ([step, train, val, t] rows) thinned to at most `max_points`
    rows, plus up to `max_points` of those that carry a held-out loss (thinned apart, so that
    the sparse held-out curve keeps its shape); the first and the latest row are always kept."""
    rows = list(history)
    if len(rows) > max_points:
        with_val = [i for i, r in enumerate(rows) if r[2] is not None]
        keep = set(_thin(list(range(len(rows))), max_points)) | set(_thin(with_val, max_points))
        rows = [rows[i] for i in sorted(keep)]
    return LossSeries(step=[int(r[0]) for r in rows], t=[round(float(r[3]), 2) for r in rows],
                      train=[finite_or_none(r[1]) for r in rows], val=[finite_or_none(r[2]) for r in rows])


def finite_or_none(v: float | None) -> float | None:
    """A loss as the page draws it: NaN and inf (a diverged step) become a gap, not a point."""
    return float(v) if v is not None and math.isfinite(v) else None


def _thin(indices: list[int], n: int) -> list[int]:
    """At most n of `indices`, evenly spread, the first and the last included."""
    if len(indices) <= n:
        return indices
    stride = (len(indices) - 1) / (n - 1)
    return [indices[round(i * stride)] for i in range(n)]
