"""Stochastic wiring: pick the peer of a stage that should finish a task soonest.

Pure logic with an injectable clock (tests and bench/bench_pipeline.py drive it without a network).
  * Every peer p of a stage has a virtual finishing time v_p (seconds of work already
    assigned). `pick(size)` takes the peer with the smallest v_p (ties at random), adds
    size / throughput_p to it and returns it: work is shared in proportion to measured
    throughput, and a peer's queue shows up as a larger v_p. Before a peer has a measurement
    it is charged `size * initial_cost_s`; a newly seen peer starts at the current minimum v.
  * Throughput is an EMA of seconds-per-sample over whole RPCs (network + queue + compute),
    bias-corrected: s <- a*dt/m + (1-a)*s, s_hat = s / (1-(1-a)^k), throughput = 1/s_hat.
    A failed call does not update it.
  * Failures: a timeout bans nobody (v_p already grew, so the next pick goes elsewhere); any
    other error bans the peer until its current record expires (re-admitted when it
    re-announces with a later expiration). `update(peers)` replaces the candidate set with
    the DHT's current view; peers gone from it are dropped, their v forgotten.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

EMA_ALPHA = 0.1
BACKWARD_COST = 2.5  # a backward (with its recomputed forward) weighs this many forwards


class NoPeers(Exception):
    """No eligible peer serves this stage right now."""


@dataclass
class _Peer:
    vtime: float
    expires_at: float
    ema: float = 0.0  # seconds per sample, biased toward 0 until corrected
    updates: int = 0
    banned_until: float = 0.0  # record expiration at ban time; re-admitted by a later one
    announced_throughput: float = 0.0

    def seconds_per_sample(self, initial_cost_s: float) -> float:
        if self.updates == 0:
            if self.announced_throughput > 0:
                return 1.0 / self.announced_throughput
            return initial_cost_s
        return self.ema / (1.0 - (1.0 - EMA_ALPHA) ** self.updates)


@dataclass
class StageRouter:
    """Routing state for one stage. `clock` returns seconds (monotonic, or simulated)."""

    initial_cost_s: float = 0.01
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    peers: dict[str, _Peer] = field(default_factory=dict)

    def update(self, announced: Mapping[str, tuple[float, float]]) -> None:
        """announced: peer id -> (record expiration, announced throughput in samples/s)."""
        floor = self._min_vtime()
        for pid in list(self.peers):
            if pid not in announced:
                del self.peers[pid]
        for pid, (expires_at, thr) in announced.items():
            p = self.peers.get(pid)
            if p is None:
                self.peers[pid] = _Peer(vtime=floor, expires_at=expires_at, announced_throughput=thr)
                continue
            if p.banned_until and expires_at > p.banned_until:
                p.banned_until = 0.0  # re-announced after the ban: back in
                p.vtime = max(p.vtime, floor)
            p.expires_at, p.announced_throughput = expires_at, thr

    def _eligible(self, exclude: Iterable[str] = ()) -> list[tuple[str, _Peer]]:
        skip = set(exclude)
        return [(pid, p) for pid, p in self.peers.items() if not p.banned_until and pid not in skip]

    def _min_vtime(self) -> float:
        live = [p.vtime for _, p in self._eligible()]
        return min(live) if live else 0.0

    def pick(self, size: float, exclude: Iterable[str] = ()) -> str:
        cands = self._eligible(exclude)
        if not cands:
            raise NoPeers("no eligible peer for this stage")
        best = min(p.vtime for _, p in cands)
        ties = [pid for pid, p in cands if p.vtime <= best + 1e-12]
        pid = self.rng.choice(sorted(ties))
        p = self.peers[pid]
        p.vtime += size * p.seconds_per_sample(self.initial_cost_s)
        return pid

    def report_ok(self, pid: str, size: float, elapsed_s: float) -> None:
        p = self.peers.get(pid)
        if p is None or size <= 0:
            return
        p.ema = EMA_ALPHA * (elapsed_s / size) + (1 - EMA_ALPHA) * p.ema
        p.updates += 1

    def report_timeout(self, pid: str) -> None:
        """No ban: its virtual time already moved on, so the next pick prefers others."""

    def report_error(self, pid: str) -> None:
        p = self.peers.get(pid)
        if p is not None:
            p.banned_until = max(p.expires_at, 1e-9)

    def throughput(self, pid: str) -> float:
        p = self.peers.get(pid)
        return 0.0 if p is None else 1.0 / max(p.seconds_per_sample(self.initial_cost_s), 1e-12)

    def eligible_count(self) -> int:
        return len(self._eligible())


def round_robin(peers: list[str]) -> Callable[[], str]:
    """The baseline the bench compares against."""
    state = {"i": 0}

    def pick() -> str:
        pid = peers[state["i"] % len(peers)]
        state["i"] += 1
        return pid

    return pick
