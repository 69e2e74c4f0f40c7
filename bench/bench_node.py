"""Node start-to-ready time, and the per-step overhead of `sync` over `solo`.

Spawns real daemons on 127.0.0.1 (like the tests), alternating baseline and candidate
runs (solo, sync, solo, sync, ...) so machine noise hits both alike, and prints medians
and ratios plus one JSON line. Absolute numbers are for this machine only: quote ratios.

  .venv/bin/python bench/bench_node.py [--repeats 2] [--steps 60] [--peers 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from swarm_node.lab.launcher import NodeProcess, Swarm

ARGS = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--status-interval-s", "30", "--log-level", "WARNING", "--eval-every", "1000"]


def step_times(node: NodeProcess, skip: int) -> list[float]:
    hist = json.loads((node.state_dir / "summary.json").read_text())["history"]
    t = [h[3] for h in hist]
    return [b - a for a, b in zip(t, t[1:])][skip:]


def time_to_ready(workdir: Path) -> float:
    node = NodeProcess("ready", workdir, [*ARGS, "--new-swarm", "--strategy", "solo", "--max-steps", "0"])
    t0 = time.monotonic()
    node.start()
    try:
        node.wait_info()
        node.wait_for(lambda s: s["phase"] == "ready", 60, "ready", poll_s=0.05)
        return time.monotonic() - t0
    finally:
        node.terminate(20)
        node.close()


def run_swarm(workdir: Path, strategy: str, peers: int, steps: int, tag: str) -> list[float]:
    common = [*ARGS, "--strategy", strategy, "--max-steps", str(steps), "--run-id", tag, "--min-peers", str(peers)]
    with Swarm(workdir, common) as sw:
        a = sw.add("p0")
        a.wait_info()
        for i in range(1, peers):
            sw.add(f"p{i}", initial=a.join_maddr())
        for n in sw.nodes:
            assert n.proc.wait(600) == 0, n.log_text()[-2000:]
        return step_times(a, skip=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--peers", type=int, default=3)
    args = ap.parse_args()
    print(f"env: python {platform.python_version()} torch {torch.__version__} cpus {os.cpu_count()} "
          f"device cpu peers {args.peers} steps {args.steps}")
    ready, solo, sync = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            ready.append(time_to_ready(Path(tmp) / f"ready{r}"))
            # baseline: `peers` solo nodes side by side (same CPU contention, no exchange)
            solo += run_swarm(Path(tmp) / f"solo{r}", "solo", args.peers, args.steps, f"b-solo{r}")
            sync += run_swarm(Path(tmp) / f"sync{r}", "sync", args.peers, args.steps, f"b-sync{r}")
            print(f"repeat {r}: ready {ready[-1]:.2f}s | step median solo {statistics.median(solo) * 1e3:.1f} ms, "
                  f"sync {statistics.median(sync) * 1e3:.1f} ms", flush=True)
    res = {"start_to_ready_s_median": statistics.median(ready),
           "solo_step_ms_median": statistics.median(solo) * 1e3, "sync_step_ms_median": statistics.median(sync) * 1e3}
    res["sync_over_solo_step_ratio"] = res["sync_step_ms_median"] / res["solo_step_ms_median"]
    res["sync_overhead_ms_median"] = res["sync_step_ms_median"] - res["solo_step_ms_median"]
    print(f"start-to-ready median {res['start_to_ready_s_median']:.2f}s | step median: solo "
          f"{res['solo_step_ms_median']:.1f} ms, sync x{args.peers} {res['sync_step_ms_median']:.1f} ms "
          f"-> ratio {res['sync_over_solo_step_ratio']:.2f} (+{res['sync_overhead_ms_median']:.1f} ms/step)")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
