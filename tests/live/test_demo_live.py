"""`swarm-node demo --strategy S` for every built-in strategy, with its demo profile, a short step
count and 2 peers: real daemons on loopback, through the CLI.

Each run must start, finish with exit 0 and print a verdict whose numbers are the run's own:
the swarm's figure is the mean of the peers' summary.json values (held-out loss, or SAPO's
mean reward per completion over the second half of the rounds), the baseline's figure is the
baseline node's, and "better"/"worse" follows from them. Whether the swarm beats its baseline at
the full demo length is measured in bench/bench_demo.py, not here (20 steps prove nothing).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swarm_node.strategies import registry

pytestmark = pytest.mark.timeout(300)

VERDICT = re.compile(r"^(held-out loss|reward per completion): swarm ([0-9.]+) vs (\S+) ([0-9.]+) after .*"
                     r"\((better|worse) by ([0-9.]+)\)$", re.M)
# Short runs. SAPO's steps are policy steps: 20 warm-start steps here, then 4 a round (6 rounds)
SHORT = {"sapo": ("44", ["--", "--sapo-warmstart-steps", "20"])}


def _late_mean(values: list[float]) -> float:
    tail = values[len(values) // 2:]
    return sum(tail) / len(tail)


def _measure(summary: dict, reward: bool) -> float | None:
    if reward:
        rows = [r["reward_mean"] for r in summary["strategy_stats"].get("history", [])]
        return _late_mean(rows) if rows else None
    return summary.get("val_loss")


@pytest.mark.parametrize("strategy", sorted(set(registry.BUILTIN) - {registry.BASELINE_STRATEGY}))
def test_the_demo_of_each_strategy_runs_and_its_verdict_is_the_runs_own(strategy, tmp_path: Path):
    work = tmp_path / "demo"
    steps, extra = SHORT.get(strategy, ("20", []))
    r = subprocess.run([sys.executable, "-m", "swarm_node", "demo", "--strategy", strategy, "--peers", "2",
                        "--steps", steps, "--workdir", str(work), *extra], capture_output=True, text=True, timeout=280)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    m = VERDICT.search(out)
    assert m, out[-3000:]
    measure, swarm_value, baseline_name, baseline_value, word, margin = m.groups()
    profile = registry.load(strategy).demo_profile
    reward = profile.measure == "reward"
    assert measure == ("reward per completion" if reward else "held-out loss")
    assert baseline_name == profile.baseline
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in work.iterdir() if p.is_dir()}
    assert set(summaries) == {"peer-1", "peer-2", "baseline"}, sorted(summaries)
    peers = [v for k, v in summaries.items() if k != "baseline" and _measure(v, reward) is not None]
    assert peers, "no peer reported the measure"
    expected_swarm = sum(_measure(v, reward) for v in peers) / len(peers)
    expected_base = _measure(summaries["baseline"], reward)
    assert float(swarm_value) == pytest.approx(expected_swarm, abs=6e-4)
    assert float(baseline_value) == pytest.approx(expected_base, abs=6e-4)
    better = expected_swarm < expected_base if not reward else expected_swarm > expected_base
    assert word == ("better" if better else "worse")
    assert float(margin) == pytest.approx(abs(expected_swarm - expected_base), abs=1e-3)
    assert summaries["baseline"]["strategy"] == profile.baseline
    # each daemon's page address (node.json, which names it, is gone once the node stopped)
    pages = {name: re.search(rf"^  {re.escape(name)}\s+http://127\.0\.0\.1:(\d+)/$", out, re.M) for name in summaries}
    assert all(pages.values()) and len({m.group(1) for m in pages.values()}) == 3, out[:2000]
    for line in registry.load(strategy).demo_lines(list(v for k, v in summaries.items() if k != "baseline"),
                                                   summaries["baseline"]):
        assert line in out  # the strategy's own lines, from these summaries
