"""Trace-driven comparison of GC, SR-SGC and M-SGC (strategies/gradcode/sequential.py).

  .venv/bin/python bench/sim_sgc.py --n 16 --jobs 80 --seed 0 [--B 1 --W 3 --lam 4 --p-start 0.3
      --iid-p 0.1 --base-s 0.05 --compute-s 1.0 --straggle-s 1.0 --policy model]

Three seeded straggler traces, each run by all schemes (common random numbers): bursty
(`BurstyStragglerModel(B, W, lam).trace(...)`, conforming), none, and iid (every worker
straggles with probability --iid-p each round, which usually breaks the model: the fallback
path). Per scheme: load (units of 1/n), delay T, and the runtime simulated by
`sequential.simulate_runtime` (fallback rounds counted); ratio = runtime / GC runtime on the
same trace. GC is the (n, s = lam) code with rule "le"; GC(<s) is the authors' stricter
baseline. decoded / misses come from the raw trace with a master that never waits; repeats
count the SR-SGC redos and the M-SGC D2 slots spent on D1; rt_miss counts deadline misses under
the runtime model (always 0 with --policy model). Runtimes are simulated seconds, not wall
time; the last line is the same table as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without the install, too
try:
    from swarm_node.strategies.gradcode import sequential as sgc
except ImportError:  # pragma: no cover - only without the editable install
    from strategies import sequential_coding as sgc  # type: ignore[no-redef]


def _traces(args: argparse.Namespace) -> dict[str, np.ndarray]:
    rounds = args.jobs + args.W + args.B  # covers J + T for every scheme (T <= W-2+B)
    model = sgc.BurstyStragglerModel(args.B, args.W, args.lam)
    return {
        "bursty": model.trace(args.n, rounds, seed=args.seed, p_start=args.p_start),
        "none": sgc.no_stragglers(args.n, rounds),
        "iid": sgc.iid_trace(args.n, rounds, args.iid_p, seed=args.seed),
    }


def simulate(args: argparse.Namespace) -> list[dict]:
    delays = sgc.DelayModel(base_s=args.base_s, compute_s=args.compute_s, straggle_s=args.straggle_s)
    rows = []
    for scenario, trace in _traces(args).items():
        conforming = sgc.conforms(trace, args.B, args.W, args.lam)[0]
        def fresh() -> list[sgc.SequentialScheme]:
            return sgc.make_schemes(args.n, args.jobs, args.B, args.W, args.lam, gc_rules=("le", "lt"))
        raw = [sc.run(trace) for sc in fresh()]
        timed = [sgc.simulate_runtime(sc, trace, delays, policy=args.policy) for sc in fresh()]
        gc_runtime = timed[0].runtime_s  # GC with rule "le", the baseline
        for sc, r, t in zip(fresh(), raw, timed):
            rows.append({
                "scenario": scenario, "conforming": conforming, "scheme": sc.name,
                "load_n": float(sc.load * args.n), "T": sc.T, "runtime_s": t.runtime_s,
                "ratio_vs_gc": t.runtime_s / gc_runtime if gc_runtime else float("nan"),
                "decoded": r.jobs_decoded, "misses": r.deadline_misses, "repeats": t.run.repeats,
                "fallbacks": t.fallbacks, "rt_misses": t.run.deadline_misses,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="workers")
    p.add_argument("--jobs", type=int, default=80, help="J, the number of gradient jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--B", type=int, default=1, help="max burst length")
    p.add_argument("--W", type=int, default=3, help="window length")
    p.add_argument("--lam", type=int, default=4, help="max distinct stragglers per window")
    p.add_argument("--p-start", type=float, default=0.3, help="bursty trace: chance a worker starts a burst")
    p.add_argument("--iid-p", type=float, default=0.1, help="iid trace: straggle probability")
    p.add_argument("--base-s", type=float, default=0.05, help="per-round fixed delay")
    p.add_argument("--compute-s", type=float, default=1.0, help="c: compute time of one whole job")
    p.add_argument("--straggle-s", type=float, default=1.0, help="D: extra delay of a straggler")
    p.add_argument("--policy", choices=("model", "deadline"), default="model",
                   help="when the master waits for everyone: the round breaks the model (paper) / a job would miss")
    args = p.parse_args(argv)
    try:
        sgc.check_model_params(args.B, args.W, args.lam, args.n)
        if args.jobs < 1:
            raise ValueError("--jobs must be >= 1")
    except ValueError as e:
        p.error(str(e))

    t0 = time.perf_counter()
    rows = simulate(args)
    elapsed = time.perf_counter() - t0
    print(f"# python {platform.python_version()} numpy {np.__version__} cpus {os.cpu_count()} | "
          f"n={args.n} J={args.jobs} (B,W,lam)=({args.B},{args.W},{args.lam}) seed={args.seed} "
          f"base={args.base_s} c={args.compute_s} D={args.straggle_s} policy={args.policy} | "
          f"simulated in {elapsed:.2f} s")
    header = (f"{'trace':<8} {'scheme':<7} | {'load*n':>6} {'T':>2} | {'runtime_s':>9} {'ratio':>6} "
              f"{'fallbk':>6} {'repeats':>7} {'rt_miss':>7} | {'decoded':>7} {'misses':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        tag = r["scenario"] + ("" if r["conforming"] else "*")
        print(f"{tag:<8} {r['scheme']:<7} | {r['load_n']:>6.2f} {r['T']:>2} | {r['runtime_s']:>9.3f} "
              f"{r['ratio_vs_gc']:>6.3f} {r['fallbacks']:>6} {r['repeats']:>7} {r['rt_misses']:>7} | "
              f"{r['decoded']:>7} {r['misses']:>6}")
    print("# * = trace breaks the (B,W,lam) model. ratio = runtime / GC runtime on the same trace. "
          "decoded/misses: raw trace with a master that never waits")
    print(json.dumps({"args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
