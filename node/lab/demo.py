"""`swarm-node demo`: a small local swarm of real daemon processes, watched live, then judged.

Starts N `swarm-node join` processes on 127.0.0.1 (the first starts the swarm, the others
join through its printed join line), plus, by default, one baseline node (the strategy's
demo profile names it: training alone, or sharing nothing) for the same steps. Shows each
node's step, loss, throughput and peers every 2 s, then prints per-node loss curves, bytes
and round outcomes, and the verdict: the strategy's own measure, swarm against baseline
(demo_report.py). `--compare` runs several strategies one after the other and prints one
table. Nothing is left running, even on Ctrl-C.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from swarm_node.lab.demo_report import NodeSummary, Verdict, format_table, format_verdict, human_bytes, judge
from swarm_node.lab.launcher import LaunchError, NodeProcess, Swarm
from swarm_node.strategies import registry
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.registry import DEFAULT_STRATEGY

BASELINE_NODE = "baseline"  # the node name (and run-id suffix) of the baseline

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class DemoOptions:
    peers: int = 3
    strategy: str = DEFAULT_STRATEGY
    steps: int | None = None  # None: the strategy's demo profile says
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
        if self.strategy not in registry.available():
            return f"unknown strategy {self.strategy!r}; available: {', '.join(registry.available())}"
        if self.steps is not None and self.steps < 1:
            return "--steps must be at least 1"
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


def page_url(http: str | None) -> str:
    """The browser address of a node's page, from its HTTP address (host:port)."""
    return f"http://{http}/" if http else "(no HTTP address: --metrics-addr off)"


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


def _profile(strategy: str) -> tuple[DemoProfile, Callable[..., list[str]] | None]:
    """The strategy's demo profile and its `demo_lines`, or a default profile for a strategy
    that cannot be loaded (join then names the problem)."""
    try:
        cls = registry.load(strategy)
    except (registry.UnknownStrategy, ImportError):
        return DemoProfile(), None
    return cls.demo_profile, cls.demo_lines


def run_demo(opts: DemoOptions) -> int:
    code, _ = run_one(opts)
    return code


def run_compare(opts: DemoOptions, strategies: list[str]) -> int:
    """`demo --compare`: one demo per strategy, one after the other, then one table."""
    verdicts: list[Verdict] = []
    worst = 0
    for i, strategy in enumerate(strategies, 1):
        print(f"\n=== {i}/{len(strategies)}: {strategy}", flush=True)
        code, verdict = run_one(dataclasses.replace(opts, strategy=strategy, run_id=f"{opts.run_id}-{strategy}",
                                                    workdir=opts.workdir / strategy if opts.workdir else None))
        worst = max(worst, code)
        if code == 130:
            return code
        if verdict is not None:
            verdicts.append(verdict)
    print("\n" + format_table(verdicts))
    return worst


def run_one(opts: DemoOptions) -> tuple[int, Verdict | None]:
    if (problem := opts.problem()) is not None:
        print(f"swarm-node demo: {problem}", file=sys.stderr)
        return 2, None
    profile, lines = _profile(opts.strategy)
    steps = opts.steps or profile.steps
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="swarm-node-demo-"))
    keep = opts.workdir is not None
    common = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1",
              "--announce-interval-s", "2", "--status-interval-s", "30", "--max-steps", str(steps),
              "--eval-every", str(max(1, steps // 6)), "--log-level", "WARNING", *opts.node_args()]
    # flags after `--` come last, for every node: they win
    peer_args, baseline_args = [*profile.node_args, *opts.extra], [*profile.baseline_args, *opts.extra]
    swarm = Swarm(workdir, common)
    t0 = time.monotonic()
    print(f"starting {opts.peers} swarm-node daemons ({opts.strategy}, model {opts.model}, {steps} steps) on "
          f"127.0.0.1" + (f" and 1 {profile.baseline} baseline" if opts.compare_solo else "") + f"; state in {workdir}",
          flush=True)
    if profile.node_args:
        print(f"demo settings of {opts.strategy}: {' '.join(profile.node_args)} (flags after -- override them)")
    if profile.baseline_args and opts.compare_solo:
        print(f"baseline ({profile.baseline}): {' '.join(profile.baseline_args)}")
    if profile.shows:
        print(f"what it shows: {profile.shows}")
    try:
        first = swarm.add("peer-1", ["--run-id", opts.run_id, "--strategy", opts.strategy,
                                     "--min-peers", str(opts.peers), *peer_args])
        first.wait_info()
        join = first.join_maddr()
        print(f"peer-1 is up: To join this swarm: swarm-node join --initial-peers {join}", flush=True)
        for i in range(2, opts.peers + 1):
            swarm.add(f"peer-{i}", ["--run-id", opts.run_id, "--strategy", opts.strategy,
                                    "--min-peers", str(opts.peers), *peer_args], initial=join)
        if opts.compare_solo:
            swarm.add(BASELINE_NODE, ["--run-id", f"{opts.run_id}-{BASELINE_NODE}", "--strategy", profile.baseline,
                                      "--min-peers", "1", *baseline_args])
        for n in swarm.nodes:
            n.wait_info()
        print(f"all {len(swarm.nodes)} daemons running after {time.monotonic() - t0:.1f}s; their pages:", flush=True)
        for n in swarm.nodes:
            print(f"  {n.name:9s} {page_url(n.info.get('http'))}", flush=True)
        last = 0.0
        while any(n.proc.poll() is None for n in swarm.nodes):
            if time.monotonic() - last >= 2.0:
                last = time.monotonic()
                print(f"[{time.monotonic() - t0:5.1f}s] " + _progress_line(swarm.nodes, steps), flush=True)
            time.sleep(0.25)
            if time.monotonic() - t0 > 1800:
                raise LaunchError("demo did not finish within 30 minutes")
        failed = [n for n in swarm.nodes if n.proc.returncode != 0]
        for n in failed:
            print(f"{n.name} exited with {n.proc.returncode}; log tail:\n{n.log_text()[-2000:]}", file=sys.stderr)
        verdict = _summarise(opts.strategy, profile, lines, swarm.nodes, time.monotonic() - t0)
        return (1 if failed else 0), verdict
    except KeyboardInterrupt:
        print("\ninterrupted: stopping all daemons", file=sys.stderr)
        for n in swarm.nodes:
            n.terminate(timeout_s=15)
        return 130, None
    except LaunchError as e:
        print(f"swarm-node demo: {e}", file=sys.stderr)
        return 1, None
    finally:
        swarm.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _summarise(strategy: str, profile: DemoProfile, lines, nodes: list[NodeProcess], elapsed_s: float) -> Verdict:
    print(f"\nsummary after {elapsed_s:.1f}s")
    print(f"{'node':8s} {'strategy':16s} {'steps':>5s} {'train':>7s} {'val':>7s} {'sent':>9s} {'recv':>9s} "
          f"{'rounds ok/other':>15s} {'resyncs':>7s}  train loss curve")
    read = {n.name: NodeSummary.read(n.name, n.state_dir) for n in nodes}
    for name, s in read.items():
        if s is None:
            print(f"{name:8s} (no summary)")
            continue
        d = s.data
        curve = sparkline([h[1] for h in d["history"]])
        print(f"{name:8s} {d['strategy']:16s} {s.step:5d} {_num(d['train_loss']):>7s} "
              f"{_num(s.val_loss if profile.measure == 'val_loss' else None):>7s} "
              f"{human_bytes(d['bytes_sent']):>9s} "
              f"{human_bytes(d['bytes_received']):>9s} {s.rounds('ok'):>8d}/{s.rounds_other:<6d} "
              f"{s.rounds('resync'):>7d}  {curve}")
    peers = [s for name, s in read.items() if name != BASELINE_NODE and s is not None]
    verdict = judge(strategy, profile, peers, read.get(BASELINE_NODE), demo_lines=lines)
    print("\n" + format_verdict(verdict))
    return verdict


def _num(x: float | None) -> str:
    """A loss for the table: '-' where the node has none (a stage server, a policy's byte model)."""
    return "-" if x is None or x != x else f"{x:.3f}"
