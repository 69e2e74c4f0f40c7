"""bench/bench_pipeline.py (simulation driven by the real router and rebalancing code):
the goals hold on a short run — routing >= 0.95 of optimum with round-robin
<= 0.6, churn >= 0.8x of no churn with 0 micro-batches lost, rebalancing 5/1/3 -> 3/3/3 in
<= 3 moves and no move after that."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_pipeline.py"
_spec = importlib.util.spec_from_file_location("bench_pipeline", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_pipeline"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_routing_beats_round_robin():
    r = bench.routing(400.0, seed=1)
    assert r["router_fraction"] >= 0.95 and r["round_robin_fraction"] <= 0.6


def test_churn_loses_nothing():
    c = bench.churn(600.0, seed=1)
    assert c["lost"] == 0 and c["retries"] > 0 and c["ratio"] >= 0.8


def test_rebalancing_converges_without_oscillation():
    b = bench.rebalance(1200.0, seed=1)
    assert b["final"] == [3, 3, 3] and b["moves"] <= 3
    assert b["last_quarter_fraction"] >= 0.95 and b["no_rebalancing_fraction"] <= 0.4
    assert max(t for t, *_ in b["move_log"]) < 600  # converged early, then never moved again
