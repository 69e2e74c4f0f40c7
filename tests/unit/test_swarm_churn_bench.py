"""bench/bench_swarm_churn.py's own arithmetic, without processes (the live bench takes
minutes, far over the suite's budget, so it is not run here): the per-bucket rates and the
stall detector read from a counter series, the metrics totals, and the input checks."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_swarm_churn.py"
_spec = importlib.util.spec_from_file_location("bench_swarm_churn", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up there
_spec.loader.exec_module(bench)

METRICS = """# HELP swarm_pipeline_microbatches_total Micro-batches this trainer drove, by outcome.
# TYPE swarm_pipeline_microbatches_total counter
swarm_pipeline_microbatches_total{outcome="ok"} 41.0
swarm_pipeline_microbatches_total{outcome="lost"} 0.0
swarm_pipeline_microbatches_total{outcome="abandoned"} 2.0
# HELP swarm_pipeline_rpc_retries_total Pipeline calls re-sent.
# TYPE swarm_pipeline_rpc_retries_total counter
swarm_pipeline_rpc_retries_total{reason="error",stage="1"} 3.0
swarm_pipeline_rpc_retries_total{reason="error",stage="2"} 1.0
swarm_pipeline_rpc_retries_total{reason="no_peers",stage="2"} 2.0
# HELP swarm_pipeline_stage The pipeline stage this peer serves.
# TYPE swarm_pipeline_stage gauge
swarm_pipeline_stage 2.0
"""


def test_counter_series_gives_bucket_rates_and_the_longest_stall():
    # 2 s polls: steady 1/s, then the counter stands still from t=12 to t=22 (a stall), then moves
    samples = [(0, 0), (2, 2), (4, 4), (6, 6), (8, 8), (10, 10), (12, 12), (14, 12), (16, 12), (18, 12),
               (20, 12), (22, 12), (24, 14)]
    rates, gap = bench._buckets(samples, 10.0)
    assert rates == [1.0, 2 / 10]  # 0-10 and 10-20; the partial 20-24 is not a bucket
    assert gap == 10
    rates, gap = bench._buckets([(0, 0), (2, 3), (4, 6)], 10.0)
    assert rates == [] and gap == 0  # no full bucket yet; never stalled


def test_metrics_totals_by_label():
    m = bench.parse_metrics(METRICS)
    assert bench.mb(m, "ok") == 41 and bench.mb(m, "lost") == 0 and bench.mb(m, "abandoned") == 2
    assert bench.by_label(m, "swarm_pipeline_rpc_retries_total", "reason") == {"error": 4.0, "no_peers": 2.0}
    assert bench.total(m, "swarm_pipeline_rpc_retries_total", stage="2") == 3
    assert bench.total(m, "swarm_pipeline_stage") == 2
    assert bench.total(None, "swarm_pipeline_stage") == 0  # a node that did not answer


@pytest.mark.parametrize("argv", [["--stages", "1"], ["--churn-fraction", "0"], ["--repeats", "0"]])
def test_bad_arguments_are_refused_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert "need" in capsys.readouterr().err


def test_server_seconds_missing_pairs_each_kill_with_its_replacement():
    phase = bench.Phase("churn0", True)
    phase.kills = [{"t": 5.0, "peer": "s1a", "stage": 1}, {"t": 65.0, "peer": "s2b", "stage": 2},
                   {"t": 125.0, "peer": "r0", "stage": 1}]
    phase.replacements = [{"peer": "r0", "t": 15.0, "stage": 1, "serving_after_s": 20.0},  # back at 35
                          {"peer": "r1", "t": 75.0, "stage": 2, "serving_after_s": "<=70.0"},  # seen at the end only
                          {"peer": "r2", "t": 135.0, "stage": None, "serving_after_s": None}]  # never served
    assert bench._server_seconds_missing(phase, 150.0) == 30 + 85 + 25
