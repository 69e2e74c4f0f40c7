"""SAPO: cumulative reward of 4 real peers over R rounds, for several I/J splits, same seeds.

Every configuration runs `--peers` `swarm-node join --strategy sapo` processes on 127.0.0.1
(real DHT, real rollout sidecars with gossipsub, real pulls). Peer k always gets
`--sapo-peer-seed k+1` and the run `--seed`, so its questions are the same in every
configuration; every peer generates and publishes Q = 8 groups of G = 8 completions per round
(the same generation compute) and trains on I of its own plus J external groups. Reported:
  reward   cumulative reward of the peers' own completions (summed over peers and rounds)
  x8/0     ratio to the 8/0 (no sharing) configuration measured in the same run
  pub/recv/used   rollout groups per peer per round (received: gossip + pull)
  gossip   mean fraction of manifest-named rollouts that gossip delivered before the deadline
  KB/rnd   rollout bytes sent + received per peer per round; s/rnd: mean round duration
Goal: 4/4 above 1.94x of 8/0, floor 1.3x on each of two seeds.

  .venv/bin/python bench/bench_sapo.py [--rounds 40] [--round-s 2.5] [--seeds 0] [--only 8/0 4/4]
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from swarm_node.lab.launcher import Swarm

CONFIGS: dict[str, list[str]] = {
    "8/0": ["--sapo-local-groups", "8", "--sapo-external-groups", "0"],
    "6/2": ["--sapo-local-groups", "6", "--sapo-external-groups", "2"],
    "4/4": ["--sapo-local-groups", "4", "--sapo-external-groups", "4"],
    "2/6": ["--sapo-local-groups", "2", "--sapo-external-groups", "6"],
    "4/4 neg=1": ["--sapo-local-groups", "4", "--sapo-external-groups", "4", "--sapo-negative-scale", "1"],
    # the local-selection ablation: the first I own groups instead of the informative ones
    "4/4 first": ["--sapo-local-groups", "4", "--sapo-external-groups", "4", "--sapo-local-select", "first"],
}
BASE = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--status-interval-s", "60", "--log-level", "WARNING", "--strategy", "sapo", "--n-layer", "2",
        "--d-model", "64", "--n-head", "4", "--seq-len", "32", "--data-max-bytes", "200000", "--lr", "1e-3",
        "--eval-every", "1000000", "--checkpoint-every", "1000000", "--sapo-questions", "8",
        "--sapo-group-size", "8", "--sapo-tasks", "add4", "--sapo-warmstart-steps", "150", "--sapo-ppo-epochs", "4"]


def slug(name: str) -> str:
    """A config name as a run id / directory name ('4/4 neg=1' -> '4-4-neg1')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", name.replace("/", "-").replace(" ", "-"))


def run_config(name: str, extra: list[str], *, peers: int, rounds: int, round_s: float, seed: int,
               workdir: Path) -> dict:
    common = [*BASE, "--seed", str(seed), "--sapo-round-s", str(round_s), "--sapo-rounds", str(rounds),
              "--min-peers", str(peers), "--run-id", f"sapo-bench-{seed}-{slug(name)}",
              *extra]
    t0 = time.monotonic()
    with Swarm(workdir, common) as sw:
        first = sw.add("p0", ["--sapo-peer-seed", "1"])
        first.wait_info(120)
        nodes = [first] + [sw.add(f"p{k}", ["--sapo-peer-seed", str(k + 1)], initial=first.join_maddr())
                           for k in range(1, peers)]
        limit = 120 + rounds * round_s * 3
        for n in nodes:
            try:
                n.proc.wait(max(1.0, limit - (time.monotonic() - t0)))
            except Exception:
                n.kill()
        stats = []
        for n in nodes:
            path = n.state_dir / "summary.json"
            if not path.exists():
                raise RuntimeError(f"{name}: {n.name} wrote no summary:\n{n.log_text()[-2000:]}")
            stats.append(json.loads(path.read_text())["strategy_stats"])
    rows = [r for s in stats for r in s["history"]]
    n_rows = max(1, len(rows))
    delivery = [r["gossip_delivery"] for r in rows if r["gossip_delivery"] is not None]
    return {
        "config": name, "seed": seed, "wall_s": round(time.monotonic() - t0, 1),
        "reward": sum(s["cumulative_reward"] for s in stats),
        "per_peer_reward": [s["cumulative_reward"] for s in stats],
        "rounds_per_peer": [s["rounds"] for s in stats],
        "published": sum(r["published"] for r in rows) / n_rows,
        "received": sum(r["received_gossip"] + r["received_pull"] for r in rows) / n_rows,
        "received_pull": sum(r["received_pull"] for r in rows) / n_rows,
        "used": sum(r["used"] for r in rows) / n_rows,
        "gossip_delivery": statistics.mean(delivery) if delivery else None,
        "bytes_per_round": sum(r["bytes"] for r in rows) / n_rows,
        "s_per_round": statistics.mean(r["duration_s"] for r in rows) if rows else None,
        # swarm rounds a peer was too slow to take part in (the round clock moved on)
        "skipped_rounds": sum(h[-1]["round"] - h[0]["round"] + 1 - len(h) for h in (s["history"] for s in stats) if h),
        "history": [s["history"] for s in stats],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--round-s", type=float, default=2.5)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json", type=Path, default=None, help="write all results (with per-round histories) here")
    args = p.parse_args()
    print(f"# bench_sapo: {args.peers} peers x {args.rounds} rounds of {args.round_s}s | {platform.node()} "
          f"| python {platform.python_version()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sapo-") as tmp:
        for seed in args.seeds:
            for name in args.only:
                r = run_config(name, CONFIGS[name], peers=args.peers, rounds=args.rounds, round_s=args.round_s,
                               seed=seed, workdir=Path(tmp) / f"{seed}-{slug(name)}")
                results.append(r)
                print(f"  done {name} seed {seed}: reward {r['reward']:.1f} in {r['wall_s']}s", flush=True)
                if args.json:  # after every configuration: a later failure loses nothing
                    args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'config':<10} {'seed':>4} {'reward':>8} {'x8/0':>6} {'pub':>5} {'recv':>5} {'pull':>5} {'used':>5} "
          f"{'gossip':>6} {'KB/rnd':>7} {'s/rnd':>6} {'skip':>4}")
    for r in results:
        base = next((b for b in results if b["config"] == "8/0" and b["seed"] == r["seed"]), None)
        ratio = f"{r['reward'] / base['reward']:.2f}" if base and base["reward"] > 0 else "-"
        g = f"{r['gossip_delivery']:.2f}" if r["gossip_delivery"] is not None else "-"
        print(f"{r['config']:<10} {r['seed']:>4} {r['reward']:>8.1f} {ratio:>6} {r['published']:>5.1f} "
              f"{r['received']:>5.1f} {r['received_pull']:>5.1f} {r['used']:>5.1f} {g:>6} "
              f"{r['bytes_per_round'] / 1024:>7.1f} {r['s_per_round'] or 0:>6.2f} {r['skipped_rounds']:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
