"""`swarm-node demo`: a small local swarm of real daemon processes, watched live, then summarised.

Starts N `swarm-node join` processes on 127.0.0.1 (the first starts the swarm, the others
join through its printed join line), plus, by default, one `solo` node on the same model
as the baseline. Shows each node's step, loss, throughput and peers every second, stops
them with SIGTERM when they reach --steps, and prints per-peer loss curves, validation
loss, bytes sent, round outcomes and resyncs (state downloads after a RESYNC: a fresh
swarm, identical by seed, should show none). Nothing is left running, even on Ctrl-C.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarm_node.lab.launcher import LaunchError, NodeProcess, Swarm
from swarm_node.strategies.registry import BASELINE_STRATEGY, DEFAULT_STRATEGY

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class DemoOptions:
    peers: int = 3
    strategy: str = DEFAULT_STRATEGY
    steps: int = 60
    run_id: str = "demo"
    workdir: Path | None = None
    compare_solo: bool = True
    model: str = "builtin"  # as `join --model`: builtin, a Hugging Face directory, or package.module:function
    data: Path | None = None  # as `join --data` (default: the node's built-in corpus)
    extra: list[str] = field(default_factory=list)

    def node_args(self) -> list[str]:
        return (["--model", self.model] if self.model != "builtin" else []) + (
            ["--data", str(self.data)] if self.data is not None else [])

    def problem(self) -> str | None:
        """A setting that cannot work, named before any daemon starts."""
        if self.peers < 1:
            return "--peers must be at least 1"
        if self.model != "builtin":  # the check `join --model` makes, before any daemon starts
            from swarm_node.train.models import ModelError, check_model_setting

            try:
                check_model_setting(self.model)
            except ModelError as e:
                return f"--model: {e}"
        if self.data is not None and not self.data.exists():
            return f"--data {self.data}: no such file or directory"
        return None


def sparkline(values: list[float], width: int = 40) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) > width:  # average into `width` buckets
        step = len(vals) / width
        vals = [sum(vals[int(i * step):int((i + 1) * step)]) / max(1, len(vals[int(i * step):int((i + 1) * step)]))
                for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in vals)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _progress_line(nodes: list[NodeProcess], steps: int) -> str:
    parts = []
    for n in nodes:
        if n.proc is not None and n.proc.poll() is not None:
            parts.append(f"{n.name}: done")
            continue
        try:
            s = n.status()
        except (LaunchError, OSError, ValueError):
            parts.append(f"{n.name}: {'stopping' if (n.state_dir / 'summary.json').exists() else 'starting'}")
            continue
        loss = f"{s['train_loss']:.3f}" if s.get("train_loss") is not None else "-"
        others = len([p for p in s["peers"] if not p["is_self"]])
        wait = f" waiting({s['waiting_for']})" if s.get("waiting_for") else ""
        parts.append(f"{n.name}: step {s['step']}/{steps} loss {loss} {s['samples_per_s']:.0f}/s {others}p{wait}")
    return " | ".join(parts)


def run_demo(opts: DemoOptions) -> int:
    if (problem := opts.problem()) is not None:
        print(f"swarm-node demo: {problem}", file=sys.stderr)
        return 2
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="swarm-node-demo-"))
    keep = opts.workdir is not None
    common = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1",
              "--announce-interval-s", "2", "--status-interval-s", "30", "--max-steps", str(opts.steps),
              "--eval-every", str(max(1, opts.steps // 6)), "--log-level", "WARNING", *opts.node_args(),
              *opts.extra]
    swarm = Swarm(workdir, common)
    t0 = time.monotonic()
    print(f"starting {opts.peers} swarm-node daemons ({opts.strategy}, model {opts.model}) on 127.0.0.1"
          + (" and 1 solo baseline" if opts.compare_solo else "") + f"; state in {workdir}", flush=True)
    try:
        first = swarm.add("peer-1", ["--run-id", opts.run_id, "--strategy", opts.strategy,
                                     "--min-peers", str(opts.peers)])
        first.wait_info()
        join = first.join_maddr()
        print(f"peer-1 is up: To join this swarm: swarm-node join --initial-peers {join}", flush=True)
        for i in range(2, opts.peers + 1):
            swarm.add(f"peer-{i}", ["--run-id", opts.run_id, "--strategy", opts.strategy,
                                    "--min-peers", str(opts.peers)], initial=join)
        if opts.compare_solo:
            swarm.add(BASELINE_STRATEGY, ["--run-id", f"{opts.run_id}-{BASELINE_STRATEGY}", "--strategy", BASELINE_STRATEGY])
        for n in swarm.nodes:
            n.wait_info()
        print(f"all {len(swarm.nodes)} daemons running after {time.monotonic() - t0:.1f}s", flush=True)
        last = 0.0
        while any(n.proc.poll() is None for n in swarm.nodes):
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                print(f"[{time.monotonic() - t0:5.1f}s] " + _progress_line(swarm.nodes, opts.steps), flush=True)
            time.sleep(0.25)
            if time.monotonic() - t0 > 1800:
                raise LaunchError("demo did not finish within 30 minutes")
        failed = [n for n in swarm.nodes if n.proc.returncode != 0]
        for n in failed:
            print(f"{n.name} exited with {n.proc.returncode}; log tail:\n{n.log_text()[-2000:]}", file=sys.stderr)
        _print_summary(swarm.nodes, time.monotonic() - t0)
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping all daemons", file=sys.stderr)
        for n in swarm.nodes:
            n.terminate(timeout_s=15)
        return 130
    except LaunchError as e:
        print(f"swarm-node demo: {e}", file=sys.stderr)
        return 1
    finally:
        swarm.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _print_summary(nodes: list[NodeProcess], elapsed_s: float) -> None:
    import json

    print(f"\nsummary after {elapsed_s:.1f}s")
    print(f"{'node':8s} {'strategy':8s} {'steps':>5s} {'train':>7s} {'val':>7s} {'sent':>9s} {'recv':>9s} "
          f"{'rounds ok/other':>15s} {'resyncs':>7s}  train loss curve")
    sync_vals, solo_val = [], None
    for n in nodes:
        try:
            s = json.loads((n.state_dir / "summary.json").read_text())
        except (OSError, ValueError):
            print(f"{n.name:8s} (no summary)")
            continue
        ok = s["rounds"].get("ok", 0)
        other = sum(v for k, v in s["rounds"].items() if k != "ok")
        resyncs = s["rounds"].get("resync", 0)
        curve = sparkline([h[1] for h in s["history"]])
        val = s.get("val_loss")
        print(f"{n.name:8s} {s['strategy']:8s} {s['step']:5d} {s['train_loss'] or float('nan'):7.3f} "
              f"{val if val is not None else float('nan'):7.3f} {_human_bytes(s['bytes_sent']):>9s} "
              f"{_human_bytes(s['bytes_received']):>9s} {ok:>8d}/{other:<6d} {resyncs:>7d}  {curve}")
        if s["strategy"] == BASELINE_STRATEGY:
            solo_val = val
        elif val is not None:
            sync_vals.append(val)
    if sync_vals and solo_val is not None:
        mean = sum(sync_vals) / len(sync_vals)
        print(f"\nheld-out loss: swarm {mean:.3f} vs solo {solo_val:.3f} after the same number of steps "
              f"({'better' if mean < solo_val else 'worse'} by {abs(solo_val - mean):.3f})")
