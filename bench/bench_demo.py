"""Does every strategy's demo, at its default settings, beat its baseline? Over several seeds.

Runs `swarm-node demo --strategy S` (3 real daemons + the strategy's baseline node, loopback)
for each strategy and seed, one after the other, with nothing but `--seed N` added, and
prints each run's verdict (the strategy's own measure, swarm against baseline, from the same
run), a table of margins per strategy and seed, and one JSON line. Seconds per demo are wall
clock on this machine: compare them only within one run of the bench.

  .venv/bin/python bench/bench_demo.py [--seeds 0 1] [--strategies sync diloco ...] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from swarm_node.lab.demo import DemoOptions, run_one
from swarm_node.strategies import registry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strategies", nargs="+",
                    default=[n for n in registry.available() if n != registry.BASELINE_STRATEGY])
    ap.add_argument("--steps", type=int, default=None, help="default: each strategy's demo profile")
    ap.add_argument("--workdir", type=Path, default=None, help="keep every node's state under this directory")
    ap.add_argument("extra", nargs="*", help="after --: flags for every node")
    args = ap.parse_args(argv)
    results: dict[str, dict[int, dict]] = {}
    for strategy in args.strategies:
        for seed in args.seeds:
            print(f"\n=== {strategy}, seed {seed}", flush=True)
            t0 = time.monotonic()
            code, v = run_one(DemoOptions(strategy=strategy, steps=args.steps, run_id=f"bench-{strategy}-{seed}",
                                          workdir=args.workdir / f"{strategy}-{seed}" if args.workdir else None,
                                          extra=["--seed", str(seed), *args.extra]))
            results.setdefault(strategy, {})[seed] = {
                "exit": code, "seconds": round(time.monotonic() - t0, 1), "measure": v.measure if v else None,
                "swarm": v.swarm if v else None, "baseline": v.baseline if v else None,
                "margin": v.margin if v else None, "beats": v.beats_baseline if v else None,
                "bytes_vs_sync": (v.bytes_sent_per_peer / v.sync_bytes_per_peer) if v and v.sync_bytes_per_peer else None}
    print(f"\n{'strategy':17s} {'measure':22s} " + " ".join(f"{'seed ' + str(s):>22s}" for s in args.seeds)
          + f" {'median s':>9s}  verdict")
    all_beat = True
    for strategy, by_seed in results.items():
        cells, beats = [], []
        for seed in args.seeds:
            r = by_seed[seed]
            beats.append(bool(r["beats"]))
            cells.append("failed" if r["margin"] is None else f"{r['swarm']:.3f} vs {r['baseline']:.3f} ({r['margin']:+.3f})")
        all_beat &= all(beats)
        measure = next((r["measure"] for r in by_seed.values() if r["measure"]), "-")
        secs = statistics.median(r["seconds"] for r in by_seed.values())
        print(f"{strategy:17s} {measure:22s} " + " ".join(f"{c:>22s}" for c in cells)
              + f" {secs:9.1f}  {'beats its baseline' if all(beats) else 'NOT on every seed'}")
    print(json.dumps({"bench": "demo", "seeds": args.seeds, "results": results, "all_beat": all_beat}))
    return 0 if all_beat else 1


if __name__ == "__main__":
    sys.exit(main())
