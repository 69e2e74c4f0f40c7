"""PageBook: the page's state, fed from the node's event loop and read by the HTTP threads.

The loop calls `observe(...)` every tick; the book samples at most once per
`sample_interval_s`, builds a complete `PageState` there (strategy state is only safe to read
on the loop) and swaps it in whole, so an HTTP thread only ever reads a finished document.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm_node.page.history import PageHistory, finite_or_none, loss_series
from swarm_node.page.state import PageNode, PagePanelJSON, PagePeer, PageState, RoundPoint
from swarm_node.page.warnings import WarningInputs, find_warnings
from swarm_node.status import NodeStatus

MAX_ROUND_POINTS = 300


@dataclass
class PageInputs:
    """What the node hands the book at one sample, besides its status snapshot."""
    memory_bytes: int = 0
    tx_total: float = 0.0
    rx_total: float = 0.0
    stragglers_total: float = 0.0
    rejections: dict[str, int] = field(default_factory=dict)  # reason -> cumulative count
    round_history: list[dict[str, Any]] = field(default_factory=list)  # the strategy's, entries with "at"
    step_history: list[list] = field(default_factory=list)  # the node's [step, train, val, t] rows
    panel: dict[str, Any] | None = None  # PagePanel.to_json()
    suspected: dict[str, float] = field(default_factory=dict)
    join_line: str = ""


class PageBook:
    def __init__(self, *, started_unix: float, state_dir: Path, ttl_s: float, sample_interval_s: float = 2.0,
                 max_points: int = 720, disk_usage: Callable[[Path], Any] = shutil.disk_usage) -> None:
        self.started_unix, self.state_dir, self.ttl_s = started_unix, Path(state_dir), ttl_s
        self.sample_interval_s = sample_interval_s
        self.history = PageHistory(max_points)
        self._disk_usage = disk_usage
        self._next_at = 0.0
        self._rejections: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._state: PageState | None = None

    def due(self, now_mono: float) -> bool:
        return now_mono >= self._next_at

    def observe(self, status: NodeStatus, inputs: PageInputs, now_mono: float | None = None) -> PageState:
        now_mono = time.monotonic() if now_mono is None else now_mono
        self._next_at = now_mono + self.sample_interval_s
        now = time.time()
        for reason, count in inputs.rejections.items():  # counters start at 0 with the process
            before = self._rejections.get(reason, (0, 0.0))
            if count > before[0]:
                self._rejections[reason] = (count, now)
        self.history.add(status.uptime_s, samples_per_s=status.samples_per_s, tx_total=inputs.tx_total,
                         rx_total=inputs.rx_total, stragglers=inputs.stragglers_total,
                         peers=sum(1 for p in status.peers if p.state != "leaving"))
        try:
            disk = self._disk_usage(self.state_dir)
            free, total = int(disk.free), int(disk.total)
        except OSError:
            free = total = None
        rounds = [RoundPoint(t=round(h["at"] - self.started_unix, 2), duration_s=float(h["duration_s"]),
                             outcome=str(h["outcome"]))
                  for h in inputs.round_history[-MAX_ROUND_POINTS:] if h.get("at") is not None]
        warnings = find_warnings(WarningInputs(
            phase=status.phase.value, waiting_for=status.waiting_for, rejections=dict(self._rejections),
            recent_outcomes=[str(h["outcome"]) for h in inputs.round_history[-5:]], suspected=dict(inputs.suspected),
            disk_free_bytes=free, disk_total_bytes=total, now=now))
        state = PageState(
            generated_at=round(now, 3), sample_interval_s=self.sample_interval_s,
            node=PageNode(peer_id=status.peer_id, short_id=status.peer_id[-8:], run_id=status.run_id,
                          version=status.version, strategy=status.strategy, role=status.role, device=status.device,
                          memory_bytes=int(inputs.memory_bytes), phase=status.phase.value, step=status.step,
                          samples_per_s=status.samples_per_s, train_loss=finite_or_none(status.train_loss),
                          val_loss=finite_or_none(status.val_loss), uptime_s=status.uptime_s, join_line=inputs.join_line,
                          waiting_for=status.waiting_for),
            peers=[PagePeer(peer_id=p.peer_id, short_id=p.peer_id[-8:], state=p.state, role=p.role, device=p.device,
                            samples_per_s=p.samples_per_s, step=p.step, is_self=p.is_self,
                            last_seen_s=0.0 if p.is_self else round(max(0.0, self.ttl_s - p.expires_in_s), 1))
                   for p in status.peers],
            loss=loss_series(inputs.step_history), rates=self.history.series(), rounds=rounds,
            panel=PagePanelJSON(**inputs.panel) if inputs.panel else None, warnings=warnings)
        with self._lock:
            self._state = state
        return state

    def state(self) -> PageState | None:
        with self._lock:
            return self._state

