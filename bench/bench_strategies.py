"""Final held-out loss of each strategy on 4 real peer processes, and bytes on the wire.

Every configuration runs `--peers` `swarm-node join` processes on 127.0.0.1 with the same
tiny model, seed and number of local steps per peer (`solo` runs the same processes, each
alone). Reported per configuration:
  val   mean final held-out loss over the peers
  g     fraction of the solo-to-sync gap closed: (L_solo - L_x) / (L_solo - L_sync)
  B/s   averaging bytes sent per peer per inner step, and the ratio to the formula
        (all-reduce: 2(N-1)/N * |θ| * 4 B / H; NoLoCo: |θ| * 4 B / H per paired round)
  util  share of wall time in local steps: the solo peers' median step time x steps over the
        span of the run (goal for DiLoCo H=100: >= 0.97)
  B/sync event  averaging bytes a peer sent per committed round; DP/this: sync's bytes per
        step over this configuration's (how many times less traffic than data parallel)
`--rate 10mbit` runs each peer on its own network-namespace host with its upload capped (tbf).
Targets: DiLoCo H=10 g >= 0.85; H=50 and streaming g >= 0.5; NoLoCo within 0.15 of DiLoCo at
the same H and momentum. Tiny models understate DiLoCo.

  .venv/bin/python bench/bench_strategies.py [--steps 400] [--peers 4] [--only diloco-h10 ...] [--rate 10mbit]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from swarm_node.lab.launcher import NodeProcess, Swarm

MODEL = ["--n-layer", "1", "--d-model", "64", "--n-head", "4", "--seq-len", "32", "--batch-size", "8",
         "--data-max-bytes", "600000"]
BASE = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--status-interval-s", "60", "--log-level", "WARNING", "--round-timeout-s", "30", *MODEL]

CONFIGS: dict[str, list[str]] = {
    "solo": ["--strategy", "solo"],
    "sync": ["--strategy", "sync"],
    "diloco-h10": ["--strategy", "diloco", "--inner-steps", "10"],
    "diloco-h50": ["--strategy", "diloco", "--inner-steps", "50"],
    "diloco-h50-m0.5": ["--strategy", "diloco", "--inner-steps", "50", "--outer-momentum", "0.5"],
    "diloco-h100": ["--strategy", "diloco", "--inner-steps", "100"],
    "streaming-h50-p5": ["--strategy", "streaming-diloco", "--inner-steps", "50", "--fragments", "5",
                         "--overlap-steps", "2", "--mix-alpha", "0.5"],
    "noloco-h50-m0.5": ["--strategy", "noloco", "--inner-steps", "50", "--outer-momentum", "0.5"],
    "diloco-h10-int8": ["--strategy", "diloco", "--inner-steps", "10", "--compression", "int8"],
    "diloco-h10-e3m0": ["--strategy", "diloco", "--inner-steps", "10", "--compression", "e3m0"],
    "diloco-h100-int8": ["--strategy", "diloco", "--inner-steps", "100", "--compression", "int8"],
    "streaming-h100-p4": ["--strategy", "streaming-diloco", "--inner-steps", "100", "--fragments", "4",
                          "--overlap-steps", "2", "--mix-alpha", "0.5"],
    "noloco-h100-m0.5": ["--strategy", "noloco", "--inner-steps", "100", "--outer-momentum", "0.5"],
}


def run_peers(workdir: Path, name: str, common: list[str], peers: int, solo: bool, rate: str | None = None
              ) -> list[dict]:
    """Run `peers` `swarm-node join` processes to --max-steps (each alone when `solo`) and
    return their summary.json files. With `rate`, each peer is its own host in a network
    namespace whose link sends at most `rate` (tbf), instead of sharing loopback."""
    if rate is not None:
        return _run_peers_capped(workdir, name, common, peers, solo, rate)
    with Swarm(workdir, common) as sw:
        first = sw.add("p0", ["--run-id", f"{name}-0" if solo else name, "--min-peers", "1" if solo else str(peers)])
        first.wait_info()
        for i in range(1, peers):
            if solo:
                sw.add(f"p{i}", ["--run-id", f"{name}-{i}"])
            else:
                sw.add(f"p{i}", ["--run-id", name, "--min-peers", str(peers)], initial=first.join_maddr())
        return _wait_all(name, sw.nodes)


def _run_peers_capped(workdir: Path, name: str, common: list[str], peers: int, solo: bool, rate: str) -> list[dict]:
    from swarm_node.lab.netlab import NetLab

    nodes: list[NodeProcess] = []
    with NetLab(prefix="swb", subnet="10.78.0.0/24") as lab:
        try:
            for i in range(peers):
                host = lab.add_host(f"p{i}")
                lab.shape(f"p{i}", rate)  # egress of every peer: each upload, and so each download, is capped
                where = ["--host", host.ip, "--port", "31337", "--metrics-addr", f"{host.ip}:9108"]
                run = ["--run-id", f"{name}-{i}" if solo else name, "--min-peers", "1" if solo else str(peers)]
                join = ["--initial-peers", nodes[0].join_maddr()] if i and not solo else ["--new-swarm"]
                node = NodeProcess(f"p{i}", workdir / f"p{i}", [*common, *where, *run, *join], cmd_prefix=host.prefix())
                nodes.append(node.start())
                if i == 0:
                    node.wait_info()
            return _wait_all(name, nodes)
        finally:
            for n in nodes:
                n.close()


def _wait_all(name: str, nodes: list[NodeProcess]) -> list[dict]:
    for n in nodes:
        if n.proc.wait(3600) != 0:
            raise RuntimeError(f"{name}/{n.name} failed:\n{n.log_text()[-2000:]}")
    return [json.loads((n.state_dir / "summary.json").read_text()) for n in nodes]


def run_config(workdir: Path, name: str, args: list[str], peers: int, steps: int, opt: list[str],
               rate: str | None = None) -> dict:
    common = [*BASE, *opt, *args, "--max-steps", str(steps), "--eval-every", str(steps)]
    t0 = time.monotonic()
    sums = run_peers(workdir, name, common, peers, solo="solo" in args, rate=rate)
    # averaging channel only: DHT heartbeats and state downloads are not the method's cost
    return {"val": sum(s["val_loss"] for s in sums) / len(sums), "vals": [s["val_loss"] for s in sums],
            "rounds": sums[0]["rounds"], "utilization": sum(_utilization(s) for s in sums) / len(sums),
            "bytes_sent": [s["bytes_sent_by_channel"].get("averaging", 0) for s in sums],
            "ok_rounds": [int(s["rounds"].get("ok", 0)) for s in sums], "wall_s": round(time.monotonic() - t0, 1),
            "spans": [_span(s) for s in sums]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--no-baselines", action="store_true",
                    help="leave out solo and sync (no g column): for a parity check with --reference")
    ap.add_argument("--rate", default=None, metavar="RATE",
                    help="run each peer as its own host in a network namespace whose upload is capped at RATE "
                         "(tc tbf units: 10mbit, 100mbit, 1gbit; root); default: all on loopback, uncapped")
    ap.add_argument("--sync-steps", type=int, default=None,
                    help="steps for the sync baseline only (on a slow link data parallel takes seconds a step): "
                         "its bytes and utilization are per step; its loss is then not at equal tokens")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    ap.add_argument("--warmup", type=int, default=50, help="cosine warmup steps")
    ap.add_argument("--reference", action="store_true",
                    help="also run bench/ref_diloco.py's in-process reference of each config (same math, no "
                         "transport) and print live - reference (parity within ±0.05 nats)")
    args = ap.parse_args()
    opt = ["--lr", str(args.lr), "--lr-schedule", args.schedule]
    if args.schedule == "cosine":
        opt += ["--lr-warmup-steps", str(args.warmup)]
    names = args.only or list(CONFIGS)
    for needed in () if args.no_baselines else ("solo", "sync"):
        if needed not in names:
            names.insert(0, needed)
    print(f"env: python {platform.python_version()} torch {torch.__version__} cpus {os.cpu_count()} | "
          f"{args.peers} peers x {args.steps} steps each, tiny GPT (1 layer, d=64, seq 32, batch 8) | link: "
          f"{'each peer capped at ' + args.rate + ' (tbf, network namespaces)' if args.rate else 'loopback, uncapped'}",
          flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.monotonic()
            steps = args.sync_steps if name == "sync" and args.sync_steps else args.steps
            results[name] = run_config(Path(tmp) / name, name, CONFIGS[name], args.peers, steps, opt, args.rate)
            results[name]["steps"] = steps
            print(f"  {name:18s} val {results[name]['val']:.4f}  ({time.monotonic() - t0:.0f}s)", flush=True)
    numel = _num_params()
    solo, sync = (results[k]["val"] if k in results else float("nan") for k in ("solo", "sync"))
    print(f"\n{'config':18s} {'val loss':>9s} {'g (gap)':>8s} {'sent B/peer/step':>17s} {'formula':>10s} {'ratio':>6s}"
          f" {'util':>5s} {'B/sync event':>12s} {'DP/this':>8s} {'wall s':>7s}")
    if "solo" in results:
        # utilization against the solo peers' time per step (same model, box and contention, no
        # exchange): a capped link stretches every step of sync, which a median interval cannot see
        per_step = sorted(span / (args.steps - 1) for span, _ in results["solo"]["spans"])
        solo_step_s = per_step[len(per_step) // 2]
        for name, r in results.items():
            steps = r.get("steps", args.steps)
            r["utilization"] = sum(min(1.0, solo_step_s * (steps - 1) / span) for span, _ in r["spans"]) / len(r["spans"])
    dp = None
    if "sync" in results:
        dp = sum(results["sync"]["bytes_sent"]) / len(results["sync"]["bytes_sent"]) / results["sync"]["steps"]
    for name in names:
        r = results[name]
        g = (solo - r["val"]) / (solo - sync) if solo != sync else float("nan")
        sent = sum(r["bytes_sent"]) / len(r["bytes_sent"]) / r["steps"]
        formula = _formula(CONFIGS[name], numel, args.peers)
        events = sum(r["ok_rounds"]) / len(r["ok_rounds"])
        per_event = sum(r["bytes_sent"]) / len(r["bytes_sent"]) / events if events else float("nan")
        r.update(g=g, sent_per_step=sent, formula_per_step=formula, bytes_per_sync_event=per_event,
                 dp_ratio=dp / sent if dp and sent else None)
        ratio = f"{sent / formula:6.2f}" if formula else "     -"
        dp_ratio = f"{r['dp_ratio']:8.1f}" if r["dp_ratio"] else "       -"
        label = name if r["steps"] == args.steps else f"{name} ({r['steps']} st)"
        print(f"{label:18s} {r['val']:9.4f} {g:8.2f} {sent:17.0f} {formula or 0:10.0f} {ratio} {r['utilization']:5.2f}"
              f" {per_event:12.0f} {dp_ratio} {r['wall_s']:7.1f}")
    if args.reference:
        _print_reference(names, results, args)
    print(json.dumps({"steps": args.steps, "peers": args.peers, "params": numel, "rate": args.rate, "results": results}))
    return 0


def _print_reference(names: list[str], results: dict, args) -> None:
    spec = importlib.util.spec_from_file_location("ref_diloco", Path(__file__).with_name("ref_diloco.py"))
    ref = importlib.util.module_from_spec(spec)
    sys.modules["ref_diloco"] = ref  # dataclasses look their module up there
    spec.loader.exec_module(ref)
    rargs = ref.parse_args(["--steps", str(args.steps), "--replicas", str(args.peers), "--lr", str(args.lr),
                            "--schedule", args.schedule, "--warmup", str(args.warmup)])
    torch.set_num_threads(1)
    dataset = ref.ByteDataset.from_source("stdlib", max_bytes=rargs.data_max_bytes)
    print(f"\n{'config':18s} {'live':>7s} {'reference':>9s} {'live-ref':>8s}   (in-process, same math and settings)")
    for name in names:
        if name not in ref.CONFIGS:
            continue
        r = ref.run(ref.CONFIGS[name], rargs, dataset)
        results[name]["reference_val"] = r
        print(f"{name:18s} {results[name]['val']:7.3f} {r:9.3f} {results[name]['val'] - r:+8.3f}", flush=True)


def _span(summary: dict) -> tuple[float, float]:
    """(seconds from the first to the last step, median seconds between consecutive steps)."""
    t = [h[3] for h in summary["history"]]
    if len(t) < 3:
        return float("nan"), float("nan")
    gaps = sorted(b - a for a, b in zip(t, t[1:]))
    return t[-1] - t[0], gaps[len(gaps) // 2]


def _utilization(summary: dict) -> float:
    """Share of wall time spent in local steps: steps x median step interval / total span.
    The median interval is a pure compute step; intervals that cross a round also hold the
    round's communication, which is what utilization charges for."""
    t = [h[3] for h in summary["history"]]
    if len(t) < 3:
        return float("nan")
    gaps = sorted(b - a for a, b in zip(t, t[1:]))
    return min(1.0, gaps[len(gaps) // 2] * len(gaps) / (t[-1] - t[0]))


def _num_params() -> int:
    from swarm_node.train.model import GPTConfig, build_model

    return build_model(GPTConfig(seq_len=32, n_layer=1, n_head=4, d_model=64), 0).num_parameters()


def _formula(args: list[str], numel: int, n: int) -> float | None:
    """Expected averaging bytes sent per peer per inner step (fp32 payloads)."""
    strategy = args[args.index("--strategy") + 1]
    h = int(args[args.index("--inner-steps") + 1]) if "--inner-steps" in args else 1
    ratio = {"none": 1.0, "fp16": 0.5, "int8": 0.25, "e3m0": 0.125}[
        args[args.index("--compression") + 1] if "--compression" in args else "none"]
    if strategy in ("diloco", "streaming-diloco"):
        return 2 * (n - 1) / n * numel * 4 * ratio / h
    if strategy == "noloco":
        return numel * 4 * ratio / h
    if strategy == "sync":  # star: a follower sends its gradient once per step
        return numel * 4
    return None


if __name__ == "__main__":
    sys.exit(main())
