"""One byzantine peer in five, on real peer processes: what `--aggregation` saves, and what it costs.

Five `swarm-node join` processes on 127.0.0.1, same tiny model, seed and steps. In the byzantine
runs one of them sends its contribution multiplied by `--attack` (default -10: scaled and
sign-flipped; `--lab-contribution-scale`). It gets the highest peer id, so it never leads
(robust aggregation bounds a byzantine contributor; a byzantine leader is another attack, see the
README's trust section). Per strategy (sync: gradients every step; diloco H=10: pseudo-gradients):
  clean mean      the reference
  clean R         the cost of rule R on an honest swarm (loss, seconds per round)
  byzantine R     the honest peers' held-out loss with the attacker in, under mean / clipped / trimmed
Goal: byzantine clipped and trimmed within 0.05 nats of clean mean; byzantine mean is printed for
contrast. Loss is the mean over the four honest peers.

  .venv/bin/python bench/bench_byzantine.py [--steps 200] [--only sync diloco] [--attack -10]
      [--rules mean clipped trimmed] [--clip 1.0] [--trim 0.2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from swarm_node.identity import ensure_identity
from swarm_node.lab.launcher import Swarm

PEERS = 5
MODEL = ["--n-layer", "1", "--d-model", "64", "--n-head", "4", "--seq-len", "32", "--batch-size", "8",
         "--data-max-bytes", "600000"]
BASE = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--status-interval-s", "60", "--log-level", "WARNING", "--round-timeout-s", "30", *MODEL]
STRATEGIES = {"sync": ["--strategy", "sync"],
              "diloco": ["--strategy", "diloco", "--inner-steps", "10", "--outer-lr", "1.0", "--outer-momentum", "0"]}
RULES = ("mean", "clipped", "trimmed")


def _identities(workdir: Path) -> None:
    """Pre-made identities for p0..p4, in peer-id order: the byzantine p4 has the highest id, so
    it never leads."""
    made = sorted((ensure_identity(workdir / "keys" / f"k{i}.key") for i in range(PEERS)), key=lambda x: x.peer_id)
    for slot, ident in enumerate(made):
        d = workdir / f"p{slot}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "identity.key").write_bytes(ident.path.read_bytes())
        os.chmod(d / "identity.key", 0o600)


def run(workdir: Path, strategy: str, rule: str, attack: float | None, steps: int, robust: list[str]) -> dict:
    run_id = f"byz-{strategy}-{rule}-{'attack' if attack is not None else 'clean'}"
    common = [*BASE, *STRATEGIES[strategy], "--aggregation", rule, *robust, "--max-steps", str(steps),
              "--eval-every", str(steps), "--run-id", run_id, "--min-peers", str(PEERS)]
    _identities(workdir)
    t0 = time.monotonic()
    with Swarm(workdir, common) as sw:
        first = sw.add("p0")
        first.wait_info()
        for i in range(1, PEERS):
            extra = ["--lab-contribution-scale", str(attack)] if attack is not None and i == PEERS - 1 else []
            sw.add(f"p{i}", extra, initial=first.join_maddr())
        for n in sw.nodes:
            if n.proc.wait(3600) != 0:
                raise RuntimeError(f"{run_id}/{n.name} failed:\n{n.log_text()[-2000:]}")
        sums = [json.loads((n.state_dir / "summary.json").read_text()) for n in sw.nodes]
    wall = time.monotonic() - t0
    honest = sums[:PEERS - 1]
    rounds = max(1, sum(s["rounds"]["ok"] for s in honest) // len(honest))
    return {"val": sum(s["val_loss"] for s in honest) / len(honest), "vals": [s["val_loss"] for s in sums],
            "wall_s": wall, "rounds_ok": rounds, "s_per_round": wall / rounds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--attack", type=float, default=-10.0, help="the byzantine peer's contribution scale")
    ap.add_argument("--trim", type=float, default=0.2, help="--aggregation-trim (0.4 with 5 peers: the median)")
    ap.add_argument("--clip", type=float, default=1.0, help="--aggregation-clip")
    ap.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    args = ap.parse_args()
    print(f"env: python {platform.python_version()} torch {torch.__version__} cpus {os.cpu_count()} | {PEERS} peers x "
          f"{args.steps} steps, one byzantine (x{args.attack:g}) | clip {args.clip:g}, trim {args.trim:g} | tiny GPT "
          f"(1 layer, d=64)", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.only:
            for attack in (None, args.attack):
                for rule in dict.fromkeys(["mean", *args.rules]):  # clean mean: the reference
                    key = f"{strategy} {'byzantine' if attack is not None else 'clean'} {rule}"
                    robust = ["--aggregation-clip", str(args.clip), "--aggregation-trim", str(args.trim)]
                    r = run(Path(tmp) / key.replace(" ", "_"), strategy, rule, attack, args.steps, robust)
                    results[key] = r
                    print(f"  {key:28s} honest val {r['val']:.4f}  ({r['wall_s']:.0f}s, {r['s_per_round']:.2f} s/round)",
                          flush=True)
    print(f"\n{'strategy':8s} {'run':10s} {'rule':8s} {'val':>7s} {'vs clean mean':>14s} {'s/round':>8s} {'x clean':>8s}")
    for strategy in args.only:
        ref = results[f"{strategy} clean mean"]
        for kind in ("clean", "byzantine"):
            for rule in dict.fromkeys(["mean", *args.rules]):
                r = results[f"{strategy} {kind} {rule}"]
                print(f"{strategy:8s} {kind:10s} {rule:8s} {r['val']:7.4f} {r['val'] - ref['val']:+14.4f} "
                      f"{r['s_per_round']:8.2f} {r['s_per_round'] / ref['s_per_round']:8.2f}")
    print(json.dumps({"steps": args.steps, "attack": args.attack, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
