"""Smoke test of bench/sim_sgc.py: main() runs with tiny arguments and prints parseable ratios."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "sim_sgc.py"
_spec = importlib.util.spec_from_file_location("sim_sgc", _PATH)
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


def test_main_prints_a_row_per_trace_and_scheme_with_parseable_ratios(capsys):
    assert sim.main(["--n", "8", "--jobs", "12", "--seed", "1", "--B", "1", "--W", "2", "--lam", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    rows = [ln for ln in lines if "|" in ln and not ln.startswith(("#", "trace"))]
    assert len(rows) == len(summary["rows"]) == 3 * 4  # 3 traces x (GC, GC(<s), SR-SGC, M-SGC)
    ratios = {}
    for ln in rows:
        trace, scheme = ln.split("|")[0].split()
        ratios[(trace.rstrip("*"), scheme)] = float(ln.split("|")[2].split()[1])
    for trace in ("bursty", "none", "iid"):
        assert ratios[(trace, "GC")] == 1.0  # the baseline measured in the same run
    # n=8, lam=2, (1,2,2): loads GC 3, SR-SGC 2, M-SGC 1.5 (x 1/n); with no stragglers the order follows the load
    assert ratios[("none", "M-SGC")] < ratios[("none", "SR-SGC")] < 1.0
    assert ratios[("bursty", "M-SGC")] < ratios[("bursty", "SR-SGC")] < 1.0
    for row in summary["rows"]:
        assert row["rt_misses"] == 0  # policy "model": the master waits for everyone instead of missing
        if row["conforming"] and row["scheme"] != "GC(<s)":
            assert row["misses"] == 0 and row["fallbacks"] == 0 and row["decoded"] == 12
        assert row["ratio_vs_gc"] == pytest.approx(ratios[(row["scenario"], row["scheme"])], abs=5e-4)


def test_main_rejects_parameters_outside_the_model(capsys):
    with pytest.raises(SystemExit) as e:
        sim.main(["--B", "2", "--W", "2"])
    assert e.value.code == 2
    assert "1 <= B < W" in capsys.readouterr().err
