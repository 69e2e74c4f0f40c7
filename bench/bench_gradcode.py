"""Wall clock per step of gradient-coded vs wait-for-all data parallel, with injected stragglers.

Four real `swarm-node join` processes per configuration on 127.0.0.1, the same seed and data:
  uncoded      --gc-scheme none (each peer computes its own partition; every peer is needed)
  coded        --gc-scheme frc --gc-stragglers 1 (each peer computes 2 of 4 partitions)
each without stragglers and with them: every step, with probability --prob, one random peer
(seeded, the same on every peer) sleeps --delay-s before contributing (a real delay of the
process, not a simulated one). Configurations are interleaved over --repeats so machine noise
hits all alike; medians of the per-step wall clock (interval between applied steps at the
aggregator) are printed with ratios against the baselines measured in the same run.
Then, from the measured per-partition compute c and the fixed step overhead, a simple model says
where coding stops paying: coding costs s·c extra compute per step and saves the straggler wait;
with one straggler of delay D per step (probability p) wait-for-all pays p·D, so coding pays
when p·D > s·c.
  .venv/bin/python bench/bench_gradcode.py [--steps 40] [--repeats 1] [--delay-s 0.5] [--prob 0.5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from swarm_node.lab.launcher import Swarm

ARGS = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--record-ttl-s", "4", "--status-interval-s", "30", "--log-level", "WARNING", "--eval-every", "1000",
        "--checkpoint-every", "1000", "--n-layer", "1", "--d-model", "64", "--n-head", "4", "--seq-len", "32",
        "--batch-size", "8", "--data-max-bytes", "600000", "--round-timeout-s", "20", "--strategy", "gradcode",
        "--gc-stragglers", "1", "--seed", "1"]
PEERS = 4


def run(workdir: Path, scheme: str, steps: int, delay_s: float, prob: float, tag: str) -> dict:
    extra = ["--gc-scheme", scheme, "--max-steps", str(steps), "--run-id", tag, "--min-peers", str(PEERS)]
    if delay_s > 0:
        extra += ["--straggler-delay-s", str(delay_s), "--straggler-prob", str(prob)]
    with Swarm(workdir, [*ARGS, *extra]) as sw:
        first = sw.add("p0")
        first.wait_info()
        for i in range(1, PEERS):
            sw.add(f"p{i}", initial=first.join_maddr())
        for n in sw.nodes:
            if n.proc.wait(900) != 0:
                raise RuntimeError(f"{n.name} failed:\n{n.log_text()[-3000:]}")
        summaries = [json.loads((n.state_dir / "summary.json").read_text()) for n in sw.nodes]
    aggregator = min(summaries, key=lambda s: s["peer_id"])
    hashes = {s["param_hash"] for s in summaries}
    return {"step_s": aggregator["strategy_stats"]["median_step_interval_s"],
            "consistent": len(hashes) == 1,
            "skipped_pushes": sum(s["strategy_stats"]["skipped_pushes"] for s in summaries),
            "replayed": sum(s["strategy_stats"]["replayed_steps"] for s in summaries),
            "bytes_per_step": sum(s["bytes_sent_by_channel"].get("averaging", 0) for s in summaries) / PEERS / steps,
            "val_loss": aggregator["val_loss"]}


def partition_compute_s(repeats: int = 30) -> tuple[float, float]:
    """Median seconds of one coded gradient over 1 and over 2 partitions (the node's model and
    batch, one thread, in this process): the extra compute s·c of coding with s = 1."""
    import torch

    from swarm_node.train.data import ByteDataset
    from swarm_node.train.model import GPTConfig
    from swarm_node.train.trainer import TrainConfig, build_trainer

    torch.set_num_threads(1)
    trainer = build_trainer(GPTConfig(seq_len=32, n_layer=1, n_head=4, d_model=64), TrainConfig(batch_size=8, seed=1),
                            ByteDataset.from_source(max_bytes=600_000))
    out = []
    for parts in ([(0, 1.0)], [(0, 1.0), (1, 1.0)]):
        for step in range(3):  # warm-up (allocator, first-call overheads)
            trainer.compute_coded_gradients(step, parts)
        times = []
        for step in range(repeats):
            t0 = time.perf_counter()
            trainer.compute_coded_gradients(step, parts)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--delay-s", type=float, default=0.5)
    ap.add_argument("--prob", type=float, default=0.5)
    args = ap.parse_args(argv)
    configs = {"uncoded": ("none", 0.0), "uncoded+stragglers": ("none", args.delay_s),
               "coded": ("frc", 0.0), "coded+stragglers": ("frc", args.delay_s)}
    results: dict[str, list[dict]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory(prefix="bench-gradcode-") as tmp:
        for r in range(args.repeats):
            for name, (scheme, delay) in configs.items():
                t0 = time.monotonic()
                res = run(Path(tmp) / f"{name}-{r}".replace("+", "_"), scheme, args.steps, delay, args.prob,
                          f"b{r}{name.replace('+', '_')}")
                results[name].append(res)
                print(f"[{name} #{r}] {res['step_s'] * 1000:.0f} ms/step, consistent={res['consistent']}, "
                      f"skipped pushes={res['skipped_pushes']}, replayed={res['replayed']} "
                      f"({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    med = {k: statistics.median(r["step_s"] for r in v) for k, v in results.items()}
    base, coded = med["uncoded"], med["coded"]
    print(f"\n4 peers, straggler: 1 peer per step with p={args.prob} waits {args.delay_s}s; "
          f"{args.steps} steps x {args.repeats} repeat(s); median wall clock per step")
    print(f"{'config':<22}{'ms/step':>9}{'vs uncoded':>12}{'vs same, no stragglers':>24}{'consistent':>12}")
    for name in configs:
        same = base if name.startswith("uncoded") else coded
        ok = all(r["consistent"] for r in results[name])
        print(f"{name:<22}{med[name] * 1000:>9.0f}{med[name] / base:>12.2f}{med[name] / same:>24.2f}{str(ok):>12}")
    # The model's inputs, measured here: coding one more partition per step costs c2 - c1 of compute.
    c1, c2 = partition_compute_s()
    extra_compute = c2 - c1
    wait = med["uncoded+stragglers"] - base
    print(f"\nredundancy: each peer computes (s+1)/n = 2/4 of the data; one partition {c1 * 1000:.1f} ms, two "
          f"{c2 * 1000:.1f} ms, so s·c = {extra_compute * 1000:.1f} ms per step (in-process, 1 thread); "
          f"straggler wait paid by wait-for-all here = {wait * 1000:.0f} ms/step")
    print("where coding stops paying (model: coded ~ uncoded + s·c, wait-for-all ~ uncoded + p·D):")
    breakeven = extra_compute / max(args.prob, 1e-9)
    print(f"  break-even straggler delay D* = s·c / p = {breakeven * 1000:.1f} ms")
    for d in (0.5 * breakeven, 2 * breakeven, args.delay_s):
        wf = base + args.prob * d
        cd = base + extra_compute
        print(f"  D = {d * 1000:6.0f} ms: wait-for-all {wf * 1000:6.0f} ms, coded {cd * 1000:6.0f} ms -> "
              f"{'coding pays' if cd < wf else 'coding does not pay'} ({wf / cd:.2f}x)")
    out = {"median_step_s": med, "ratios": {k: med[k] / base for k in med},
           "coded_stragglers_vs_coded": med["coded+stragglers"] / coded, "partition_compute_s": [c1, c2],
           "waitall_stragglers_vs_uncoded": med["uncoded+stragglers"] / base,
           "bytes_per_peer_per_step": {k: statistics.median(r["bytes_per_step"] for r in v) for k, v in results.items()}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
