"""What `swarm-node demo` concludes from a run: each node's summary.json, judged by the strategy's
demo profile against the baseline node of the same run.

`judge` turns the summaries into a `Verdict` (the strategy's own measure for the swarm and for
the baseline, rounds, bytes against what `sync` would have sent, and the strategy's own lines);
`format_verdict` prints one, `format_table` several side by side (`demo --compare`). Nothing
here names a strategy: the measure comes from the profile, the extra lines from the strategy's
`demo_lines`.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from swarm_node.strategies.demo_profile import DemoProfile

FP32_BYTES = 4


@dataclass
class NodeSummary:
    """One node's summary.json, as the demo reads it."""
    name: str
    data: dict[str, Any]

    @classmethod
    def read(cls, name: str, state_dir: Path) -> "NodeSummary | None":
        try:
            return cls(name, json.loads((state_dir / "summary.json").read_text()))
        except (OSError, ValueError):
            return None

    @property
    def step(self) -> int:
        return int(self.data.get("step") or 0)

    @property
    def val_loss(self) -> float | None:
        return self.data.get("val_loss")

    @property
    def stats(self) -> dict[str, Any]:
        return self.data.get("strategy_stats") or {}

    def rounds(self, outcome: str) -> int:
        return int((self.data.get("rounds") or {}).get(outcome, 0))

    @property
    def rounds_other(self) -> int:
        return sum(int(v) for k, v in (self.data.get("rounds") or {}).items() if k != "ok")

    def reward_per_round(self) -> list[float]:
        return [float(r["reward_mean"]) for r in self.stats.get("history", []) if "reward_mean" in r]


@dataclass
class Verdict:
    strategy: str
    measure: str  # "held-out loss" or "reward per completion"
    swarm: float | None  # the swarm's value of the measure (mean over the peers that report it)
    baseline: float | None  # the baseline node's value
    baseline_name: str
    lower_is_better: bool
    steps: list[int]  # the swarm peers' final steps
    baseline_steps: int
    rounds_ok: int  # summed over the swarm peers
    rounds_other: int
    bytes_sent_per_peer: float
    sync_bytes_per_peer: float | None  # what a sync peer would send for the same steps (fp32 gradients)
    lines: list[str] = field(default_factory=list)  # the strategy's own lines

    @property
    def margin(self) -> float | None:
        """How much better the swarm did than the baseline (negative: worse)."""
        if self.swarm is None or self.baseline is None:
            return None
        return (self.baseline - self.swarm) if self.lower_is_better else (self.swarm - self.baseline)

    @property
    def beats_baseline(self) -> bool | None:
        return None if self.margin is None else self.margin > 0


def _late_mean(values: list[float]) -> float | None:
    """Mean of the second half: where a run ends up, less noisy than its last value."""
    if not values:
        return None
    tail = values[len(values) // 2:]
    return sum(tail) / len(tail)


def judge(strategy: str, profile: DemoProfile, swarm: list[NodeSummary], baseline: NodeSummary | None,
          demo_lines: Callable[[list[dict], dict | None], list[str]] | None = None) -> Verdict:
    if profile.measure == "reward":
        measure, lower = "reward per completion", False
        measured = {n.name: _late_mean(n.reward_per_round()) for n in swarm}
        base = _late_mean(baseline.reward_per_round()) if baseline else None
    else:
        measure, lower = "held-out loss", True
        measured = {n.name: n.val_loss for n in swarm}  # a stage server reports none
        base = baseline.val_loss if baseline else None
    values = [v for v in measured.values() if v is not None]
    params = max((int(n.data.get("params") or 0) for n in swarm), default=0)
    # the steps of the peers that report the measure (a stage server counts its stage's steps)
    steps = [n.step for n in swarm if measured[n.name] is not None] or [n.step for n in swarm]
    sent = [float(n.data.get("bytes_sent") or 0) for n in swarm]
    return Verdict(
        strategy=strategy, measure=measure, swarm=sum(values) / len(values) if values else None, baseline=base,
        baseline_name=profile.baseline, lower_is_better=lower, steps=steps,
        baseline_steps=baseline.step if baseline else 0, rounds_ok=sum(n.rounds("ok") for n in swarm),
        rounds_other=sum(n.rounds_other for n in swarm), bytes_sent_per_peer=sum(sent) / len(sent) if sent else 0.0,
        sync_bytes_per_peer=(params * FP32_BYTES * statistics.median(steps)) if params and steps else None,
        lines=list(demo_lines([n.data for n in swarm], baseline.data if baseline else None)) if demo_lines else [])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def format_verdict(v: Verdict) -> str:
    out = []
    if v.margin is None:
        out.append(f"{v.measure}: no comparison (swarm {v.swarm}, {v.baseline_name} {v.baseline}): a node "
                   "reported no value")
    else:
        word = "better" if v.margin > 0 else "worse"
        out.append(f"{v.measure}: swarm {v.swarm:.3f} vs {v.baseline_name} {v.baseline:.3f} after "
                   f"{_steps_text(v)} ({word} by {abs(v.margin):.3f})")
    out.append(f"rounds committed: {v.rounds_ok} (other outcomes: {v.rounds_other}), over all swarm peers")
    if v.sync_bytes_per_peer:
        ratio = v.bytes_sent_per_peer / v.sync_bytes_per_peer
        out.append(f"bytes sent per peer: {human_bytes(v.bytes_sent_per_peer)}, {ratio:.2f}x what sync would send "
                   f"for these steps ({human_bytes(v.sync_bytes_per_peer)}: one fp32 gradient a step)")
    out += v.lines
    return "\n".join(out)


def _steps_text(v: Verdict) -> str:
    lo, hi = (min(v.steps), max(v.steps)) if v.steps else (0, 0)
    swarm = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"{swarm} steps (the {v.baseline_name} node: {v.baseline_steps})"


def format_table(verdicts: list[Verdict]) -> str:
    head = f"{'strategy':17s} {'measure':22s} {'peers':>8s} {'baseline':>15s} {'margin':>8s} {'verdict':8s} " \
           f"{'rounds ok':>9s} {'sent/peer':>10s} {'vs sync':>8s}"
    rows = [head, "-" * len(head)]
    for v in verdicts:
        num = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        verdict = {True: "better", False: "worse", None: "n/a"}[v.beats_baseline]
        vs_sync = f"{v.bytes_sent_per_peer / v.sync_bytes_per_peer:.2f}x" if v.sync_bytes_per_peer else "-"
        rows.append(f"{v.strategy:17s} {v.measure:22s} {num(v.swarm):>8s} {v.baseline_name[:6] + ' ' + num(v.baseline):>15s} "
                    f"{num(v.margin):>8s} {verdict:8s} {v.rounds_ok:>9d} {human_bytes(v.bytes_sent_per_peer):>10s} "
                    f"{vs_sync:>8s}")
    return "\n".join(rows)
