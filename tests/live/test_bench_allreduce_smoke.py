"""bench/bench_allreduce.py --smoke: 4 workers, 4 MB, ours vs gloo, end to end in < 60 s."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_bench_allreduce_smoke_is_correct_and_complete():
    # the bench bounds itself (deadline 55 s) and kills its workers; the p2pds die with them
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_allreduce.py"), "--smoke", "--deadline-s", "55"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["peers"] == 4 and res["numel"] == 1_000_000 and res["compression"] == "none"
    assert res["ours_complete"] is True
    assert res["ours_max_abs_err"] == 0.0 and res["gloo_max_abs_err"] == 0.0  # exact mean, both methods
    assert len(res["ours_s"]) == 1 and len(res["gloo_s"]) == 1
    assert res["ours_s_median"] > 0 and res["gloo_s_median"] > 0
    assert res["ours_tx_mb_per_worker"] == pytest.approx(2 * 3 / 4 * 4.0, rel=0.01)  # butterfly: 2(N-1)/N of the state
    assert res["p2pd_reaped"] == 4  # one p2pd per worker, all gone (checked inside the bench)
