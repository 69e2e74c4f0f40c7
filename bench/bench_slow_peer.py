"""One peer 3x slower: what it costs the fast peers under each sync rule.

Every configuration (see CONFIGS) runs `--peers` real `swarm-node join` processes on 127.0.0.1;
in all but the baseline, one of them runs with `--compute-slowdown 3` (after each local step it
sleeps twice that step's compute time: a slower device that does not load the shared CPU). The
bench creates the identities first, so it knows the round leader (the lowest peer id): the slow
peer is the highest id, except in `quorum-slow-leader`, where the slow peer leads.

Per round attempt every peer records its local compute since the previous attempt and the wall
time (summary.json `round_history`). Reported as medians over a peer's rounds after the first
two (see `main`): fast peers' wall / compute per round (goal for quorum <= 1.2, judged against
the baseline's own overhead), fast peers' round wall / the slow peer's compute, the slow peer's
commit rate, noloco rounds paired with the slow peer vs a fast one, and utilization.

  .venv/bin/python bench/bench_slow_peer.py [--rounds 12] [--inner-steps 40] [--slowdown 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from swarm_node.identity import ensure_identity
from swarm_node.lab.launcher import Swarm

MODEL = ["--n-layer", "2", "--d-model", "128", "--n-head", "4", "--seq-len", "64", "--batch-size", "16",
         "--data-max-bytes", "400000"]
BASE = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--status-interval-s", "60", "--log-level", "WARNING", "--round-timeout-s", "30", "--eval-every", "1000000",
        "--checkpoint-every", "1000000", *MODEL]

# wait-for-all   diloco, the round waits for every expected peer (grace = timeout)
# quorum         diloco with `--round-grace-s`: the round goes on with those that joined
#                within the grace window after the first join
# quorum-slow-leader  the same with the slow peer as the leader: it coordinates the rounds it
#                is late for and downloads their result, so its readiness does not set
#                everyone's pace
# noloco         pairs only: a slow peer can delay its partner of that round, nobody else
CONFIGS: dict[str, tuple[list[str], str | None]] = {  # name -> (flags, which peer is slow: None/follower/leader)
    "baseline": (["--strategy", "diloco"], None),
    "wait-for-all": (["--strategy", "diloco"], "follower"),
    "quorum": (["--strategy", "diloco", "--round-grace-s", "1.0"], "follower"),
    "quorum-slow-leader": (["--strategy", "diloco", "--round-grace-s", "1.0"], "leader"),
    "noloco": (["--strategy", "noloco", "--outer-momentum", "0.5"], "follower"),
}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_config(workdir: Path, name: str, flags: list[str], slow: str | None, *, peers: int, rounds: int, h: int,
               slowdown: float) -> dict:
    names = [f"p{i}" for i in range(peers)]
    ids = {n: ensure_identity(workdir / n / "identity.key").peer_id for n in names}
    slow_name = {None: None, "follower": max(names, key=lambda n: ids[n]),
                 "leader": min(names, key=lambda n: ids[n])}[slow]
    common = [*BASE, *flags, "--inner-steps", str(h), "--max-steps", str(rounds * h), "--min-peers", str(peers),
              "--run-id", f"slow-{name}"]
    extra = {n: (["--compute-slowdown", str(slowdown)] if n == slow_name else []) for n in names}
    t0 = time.monotonic()
    with Swarm(workdir, common) as sw:
        first = sw.add(names[0], extra[names[0]])
        first.wait_info()
        for n in names[1:]:
            sw.add(n, extra[n], initial=first.join_maddr())
        for node in sw.nodes:
            if node.proc.wait(600 + rounds * h * 2) != 0:
                raise RuntimeError(f"{name}/{node.name} failed:\n{node.log_text()[-2000:]}")
        sums = {node.name: json.loads((node.state_dir / "summary.json").read_text()) for node in sw.nodes}
    hist = {n: s["round_history"][2:] for n, s in sums.items()}  # the first rounds hold start-up and adoption
    fast = [n for n in names if n != slow_name]
    ratio = [r["wall_s"] / r["compute_s"] for n in fast for r in hist[n] if r["outcome"] == "ok" and r["compute_s"] > 0]
    fast_wall = [r["wall_s"] for n in fast for r in hist[n] if r["outcome"] == "ok"]
    ok_rounds = [r for n in fast for r in hist[n] if r["outcome"] == "ok"]
    wall_sum = sum(r["wall_s"] for r in ok_rounds)
    out = {"config": name, "wall_s": round(time.monotonic() - t0, 1), "fast_w_over_c": _median(ratio),
           # compute utilization: time in local steps (forward, backward, optimizer) over wall time
           "fast_utilization": sum(r["compute_s"] for r in ok_rounds) / wall_sum if wall_sum > 0 else None,
           "fast_round_wall_s": _median(fast_wall),
           "fast_compute_s": _median([r["compute_s"] for n in fast for r in hist[n] if r["compute_s"] > 0]),
           "val_loss": statistics.mean(s["val_loss"] for s in sums.values() if s["val_loss"] is not None)
           if any(s["val_loss"] is not None for s in sums.values()) else None,
           "round_history": {n: sums[n]["round_history"] for n in names}, "slow": slow_name}
    if slow_name:
        sh = hist[slow_name]
        slow_compute = _median([r["compute_s"] * slowdown for r in sh if r["compute_s"] > 0])
        out["slow_compute_s"] = slow_compute
        out["fast_over_slow"] = (out["fast_round_wall_s"] / slow_compute) if slow_compute and fast_wall else None
        out["slow_ok"] = f"{sum(r['outcome'] == 'ok' for r in sh)}/{len(sh)}"
    if slow_name and "noloco" in flags:
        sid = ids[slow_name]
        with_slow = [r["wall_s"] / r["compute_s"] for n in fast for r in hist[n]
                     if r["peer"] == sid and r["compute_s"] > 0]
        with_fast = [r["wall_s"] / r["compute_s"] for n in fast for r in hist[n]
                     if r["peer"] and r["peer"] != sid and r["compute_s"] > 0]
        out["paired_with_slow"], out["paired_with_fast"] = _median(with_slow), _median(with_fast)
        out["n_paired"] = (len(with_slow), len(with_fast))
    return out


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def main() -> int:
    """Run the configurations and print, as medians over a peer's rounds after the first two:
      fast w/c       fast peers' wall / compute per round (1.0 = never waits; quorum goal <= 1.2,
                     judged against the baseline's own overhead measured in the same run)
      fast/slow      fast peers' round wall / the slow peer's compute per round (wait-for-all: ~1,
                     the straggler sets the pace)
      slow ok        rounds the slow peer committed / rounds it attempted
      noloco         fast peers' wall / compute in rounds paired with the slow peer vs with a fast one
      util           fast peers' time in local steps / wall time over their committed rounds (with
                     `--only baseline --inner-steps 100`: DiLoCo's H=100 utilization)"""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--inner-steps", type=int, default=40)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--slowdown", type=float, default=3.0)
    ap.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="run in this directory and keep the nodes' logs")
    args = ap.parse_args()
    print(f"# bench_slow_peer: {args.peers} peers, {args.rounds} rounds of H={args.inner_steps}, one peer "
          f"{args.slowdown:g}x slower | {platform.node()} | python {platform.python_version()}", flush=True)
    results = []
    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="bench-slow-")) as tmp:
        for name in args.only:
            flags, slow = CONFIGS[name]
            r = run_config(Path(tmp) / name, name, flags, slow, peers=args.peers, rounds=args.rounds,
                           h=args.inner_steps, slowdown=args.slowdown)
            results.append(r)
            print(f"  done {name} in {r['wall_s']}s", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    base = next((r for r in results if r["config"] == "baseline"), None)
    print(f"\n{'config':<18} {'fast w/c':>8} {'vs base':>7} {'fast wall':>9} {'fast cmp':>8} {'slow cmp':>8} "
          f"{'fast/slow':>9} {'slow ok':>7} {'w/ slow':>7} {'w/ fast':>7} {'util':>5} {'val':>6}")
    for r in results:
        vs = (r["fast_w_over_c"] / base["fast_w_over_c"]) if base and base["fast_w_over_c"] and r["fast_w_over_c"] \
            else None
        print(f"{r['config']:<18} {_f(r['fast_w_over_c']):>8} {_f(vs):>7} {_f(r['fast_round_wall_s']):>9} "
              f"{_f(r['fast_compute_s']):>8} {_f(r.get('slow_compute_s')):>8} {_f(r.get('fast_over_slow')):>9} "
              f"{r.get('slow_ok', '-'):>7} {_f(r.get('paired_with_slow')):>7} {_f(r.get('paired_with_fast')):>7} "
              f"{_f(r['fast_utilization']):>5} {_f(r['val_loss'], '{:.3f}'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
