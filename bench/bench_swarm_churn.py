"""Live churn throughput of the `swarm` pipeline strategy.

Real `swarm-node join --strategy swarm` processes on 127.0.0.1 (node/lab/launcher.py): `--trainers`
stage-0 peers plus `--servers-per-stage` servers on every other stage, tiny model, --threads 1.
Two phases, each a fresh swarm with the same flags and seed (the no-churn baseline is measured
in the same run): no-churn trains for a warm-up, then for a window of `--window-s` seconds;
churn does the same and, during the window, every 60 / (fraction x servers) seconds SIGKILLs
one random live SERVER (its whole process group, p2pd included) and starts a replacement (fresh
identity, `--stage auto`) `--replace-after-s` later. Trainers are never killed: they hold the
data, and killing one would make the phases compare different numbers of drivers.
Measured from /metrics polled every `--poll-s` (see `_window`): throughput, churn / no-churn
ratio (goal >= 0.8), lost micro-batches (goal 0), stalls, retries, recoveries.
Every wait has a deadline and every node is closed in a finally, so no p2pd is left. Rebalancing
is off (the phases compare the same assignment).
  .venv/bin/python bench/bench_swarm_churn.py [--quick] [--window-s 150] [--repeats 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from swarm_node.lab.launcher import LaunchError, NodeProcess, Swarm

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--record-ttl-s", "4", "--watchdog-interval-s", "1", "--status-interval-s", "60", "--seq-len", "32",
        "--batch-size", "8", "--d-model", "32", "--n-head", "4", "--data-max-bytes", "600000",
        "--round-timeout-s", "5", "--eval-every", "1000000", "--checkpoint-every", "1000000",
        "--shutdown-grace-s", "5", "--strategy", "swarm", "--micro-batches", "2", "--stage-average-interval-s", "5",
        "--rebalance-interval-s", "0", "--lr", "0.003"]
MB = "swarm_pipeline_microbatches_total"


# ---------------------------------------------------------------- metrics
def scrape(node: NodeProcess, timeout_s: float = 3.0) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """A node's /metrics as {sample name: [(labels, value)]}; None if it does not answer now
    (starting, killed, or too busy within timeout_s)."""
    if not _ready(node):
        return None
    try:
        code, body = node.http("/metrics", timeout_s=timeout_s)
    except OSError:
        return None
    if code != 200:
        return None
    try:
        return parse_metrics(body.decode(errors="replace"))
    except ValueError:  # a truncated body
        return None


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text exposition as {sample name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def total(m: dict | None, name: str, **labels: str) -> float:
    if not m:
        return 0.0
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def mb(m: dict | None, outcome: str) -> float:
    """Micro-batches a trainer drove with this outcome (ok, lost, abandoned)."""
    return total(m, MB, outcome=outcome)


def by_label(m: dict | None, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in (m or {}).get(name, []):
        out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + v
    return out


def cpu_s(node: NodeProcess) -> float:
    """CPU seconds (user + system) used so far by a node's live processes (python and p2pd)."""
    out = 0.0
    for pid in node.group_pids():
        try:
            t = psutil.Process(pid).cpu_times()
            out += t.user + t.system
        except psutil.Error:
            continue
    return out


def _ready(node: NodeProcess) -> bool:
    if node._info is not None:
        return True
    try:
        node.wait_info(timeout_s=0.01)
        return True
    except LaunchError:
        return False


# ---------------------------------------------------------------- one phase
@dataclass
class Phase:
    name: str
    churn: bool
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t in window, sum of ok over trainers)
    kills: list[dict] = field(default_factory=list)
    replacements: list[dict] = field(default_factory=list)
    min_stage_peers: list[int] = field(default_factory=list)


def snapshot(commit: str, dest: Path) -> dict[str, str]:
    """Lay out the swarm_node package as of `commit` under dest (pyproject's
    package-dir: node/ is swarm_node, protocol/ and strategies/ its subpackages) and return
    the environment that makes the peers import it: PYTHONPATH comes before the editable
    install's finder, so the peers run that commit whatever the working tree holds (other
    people edit it while a bench runs)."""
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "node", "protocol", "strategies"], cwd=ROOT,
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {commit} failed: {archive.stderr.decode(errors='replace')[:300]}")
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=60)
    pkg = dest / "pkg" / "swarm_node"
    pkg.parent.mkdir(parents=True)
    (src / "node").rename(pkg)
    (src / "protocol").rename(pkg / "protocol")
    (src / "strategies").rename(pkg / "strategies")
    return {"PYTHONPATH": str(dest / "pkg")}


def run_phase(workdir: Path, phase: Phase, args: argparse.Namespace, rng: random.Random,
              env: dict[str, str] | None = None) -> dict:
    S = args.stages
    common = [*BASE, "--stages", str(S), "--n-layer", str(S), "--seed", str(args.seed),
              "--run-id", f"churnbench-{phase.name}"]
    n_servers = args.servers_per_stage * (S - 1)
    interval = 60.0 / (args.churn_fraction * n_servers) if phase.churn else None
    t_start = time.monotonic()
    with Swarm(workdir / phase.name, common, env=env) as sw:
        try:
            trainers = [sw.add("t0", ["--stage", "0"])]
            trainers[0].wait_info(120)
            boot = _join_maddr(trainers[0], 60)
            trainers += [sw.add(f"t{i}", ["--stage", "0"], initial=boot) for i in range(1, args.trainers)]
            servers = [sw.add(f"s{k}{chr(97 + i)}", ["--stage", str(k)], initial=boot)
                       for k in range(1, S) for i in range(args.servers_per_stage)]
            for n in sw.nodes:
                n.wait_info(120)
            _wait_full(trainers, [args.trainers] + [args.servers_per_stage] * (S - 1), args.start_timeout_s)
            startup_s = time.monotonic() - t_start
            time.sleep(args.warmup_s)
            return _window(sw, trainers, servers, boot, phase, args, rng, interval, startup_s)
        except Exception:
            for n in sw.nodes:
                sys.stderr.write(f"--- {phase.name}/{n.name} log tail:\n{n.log_text()[-1500:]}\n")
            raise


def _window(sw: Swarm, trainers: list[NodeProcess], servers: list[NodeProcess], boot: str, phase: Phase,
            args: argparse.Namespace, rng: random.Random, interval: float | None, startup_s: float) -> dict:
    """One measured window, from the peers' /metrics (never from logs):
      throughput   completed micro-batches per second, summed over the trainers, between the
                   window edges (`swarm_pipeline_microbatches_total{outcome="ok"}`); also the median
                   of per-bucket rates and the longest stretch with no completed micro-batch (a stall).
      lost         trainers' `...{outcome="lost"}`. The strategy only counts a micro-batch lost
                   after MICROBATCH_DEADLINE_S (120 s) with a stage empty, so stalls show such a
                   micro-batch long before its counter does.
      retries      trainers' `swarm_pipeline_rpc_retries_total` by reason (failovers).
      recoveries   `swarm_checkfree_recoveries_total` over every peer (the victims' values are read
                   just before their kill): a stage rebuilt because it emptied.
    A replacement picks its stage by `--stage auto` (an empty stage, else the one with the least
    capacity). On a box with fewer cores than peers the ratio also carries CPU share: a dead
    server frees CPU for the others, a starting one (import torch, p2pd) takes some."""
    alive = list(servers)
    pending: list[tuple[float, str]] = []  # (due, name) replacements to start
    victims_metrics: list[dict] = []
    n_new = 0
    cpu0 = {n.name: cpu_s(n) for n in sw.nodes}  # a replacement starts inside the window: from 0
    cpu_victims = 0.0
    t0 = time.monotonic()
    first = [scrape(t) for t in trainers]
    if any(m is None for m in first):
        raise LaunchError("a trainer did not answer /metrics at the window start")
    base_ok = sum(mb(m, "ok") for m in first)
    base_bad = {k: sum(mb(m, k) for m in first) for k in ("lost", "abandoned")}
    base_retries = [by_label(m, "swarm_pipeline_rpc_retries_total", "reason") for m in first]
    per_trainer0 = [mb(m, "ok") for m in first]
    next_kill = t0 + args.first_kill_s if interval else float("inf")
    last = first
    phase.samples.append((0.0, base_ok))
    while True:
        now = time.monotonic()
        if now - t0 >= args.window_s:
            break
        if now >= next_kill:
            # only peers serving a server stage: a replacement still starting is not a server yet
            scraped = [(n, scrape(n)) for n in alive if n.proc is not None and n.proc.poll() is None]
            cands = [(n, m) for n, m in scraped if m and total(m, "swarm_pipeline_stage") >= 1]
            if cands:
                v, m = rng.choice(cands)
                victims_metrics.append(m)
                stage = int(total(m, "swarm_pipeline_stage"))
                cpu_victims += cpu_s(v) - cpu0.get(v.name, 0.0)
                v.kill()
                v.close()
                alive.remove(v)
                phase.kills.append({"t": round(now - t0, 1), "peer": v.name, "stage": stage})
                pending.append((now + args.replace_after_s, f"r{n_new}"))
                n_new += 1
            next_kill += interval
        for due, name in [p for p in pending if p[0] <= now]:
            pending.remove((due, name))
            r = sw.add(name, ["--stage", "auto"], initial=boot)
            alive.append(r)
            phase.replacements.append({"peer": name, "t": round(now - t0, 1), "started": now, "stage": None,
                                       "serving_after_s": None})
        last = [scrape(t) or last[i] for i, t in enumerate(trainers)]
        phase.samples.append((time.monotonic() - t0, sum(mb(m, "ok") for m in last)))
        counts = [min(int(total(m, "swarm_stage_peers", stage=str(k))) for m in last) for k in range(args.stages)]
        phase.min_stage_peers = counts if not phase.min_stage_peers else \
            [min(a, b) for a, b in zip(phase.min_stage_peers, counts)]
        for rep in phase.replacements:
            if rep["stage"] is None:
                node = next(n for n in sw.nodes if n.name == rep["peer"])
                st = total(scrape(node), "swarm_pipeline_stage") if _ready(node) else -1
                if st >= 0:
                    rep["stage"], rep["serving_after_s"] = int(st), round(time.monotonic() - rep["started"], 1)
        time.sleep(max(0.0, args.poll_s - (time.monotonic() - now)))
    elapsed = time.monotonic() - t0
    end = [scrape(t) for t in trainers]
    end = [m or last[i] for i, m in enumerate(end)]
    live_nodes = [n for n in sw.nodes if n.proc is not None and n.proc.poll() is None]
    cpu = cpu_victims + sum(cpu_s(n) - cpu0.get(n.name, 0.0) for n in live_nodes)
    live = [scrape(n) for n in live_nodes]
    recov_metrics = [m for m in live if m] + victims_metrics
    ok = sum(mb(m, "ok") for m in end) - base_ok
    retries: dict[str, float] = {}
    for m, b in zip(end, base_retries):
        for reason, v in by_label(m, "swarm_pipeline_rpc_retries_total", "reason").items():
            retries[reason] = retries.get(reason, 0) + v - b.get(reason, 0)
    recoveries: dict[str, float] = {}
    for m in recov_metrics:
        for lab, v in m.get("swarm_checkfree_recoveries_total", []):
            key = f"stage{lab.get('stage')}:{lab.get('method')}"
            recoveries[key] = recoveries.get(key, 0) + v
    phase.samples.append((elapsed, ok + base_ok))
    rejected: dict[str, dict[str, float]] = {"trainers": {}, "servers": {}}
    averaging: dict[str, float] = {}
    trainer_ids = {id(m) for m in end}
    for m in [*end, *(m for m in recov_metrics if total(m, "swarm_pipeline_stage") != 0)]:
        # whole phase, not windowed: diagnostics (who rejects what; replica sync)
        side = rejected["trainers" if id(m) in trainer_ids else "servers"]
        for reason, v in by_label(m, "swarm_rejected_messages_total", "reason").items():
            side[reason] = side.get(reason, 0) + v
        for outcome, v in by_label(m, "swarm_stage_averaging_total", "outcome").items():
            averaging[outcome] = averaging.get(outcome, 0) + v
    rates, longest_gap = _buckets(phase.samples, args.bucket_s)
    missing = _server_seconds_missing(phase, elapsed)
    for rep in phase.replacements:
        started = rep.pop("started")
        if rep["stage"] is None:  # it may have started serving since the last poll
            m = dict(zip([n.name for n in live_nodes], live)).get(rep["peer"])
            if m and total(m, "swarm_pipeline_stage") >= 0:  # an upper bound: seen serving only now
                rep["stage"], rep["serving_after_s"] = int(total(m, "swarm_pipeline_stage")), \
                    f"<={time.monotonic() - started:.1f}"
    return {
        "phase": phase.name, "startup_s": round(startup_s, 1), "window_s": round(elapsed, 1),
        "microbatches": int(ok), "mb_per_s": round(ok / elapsed, 3),
        "per_trainer_mb_per_s": [round((mb(m, "ok") - b) / elapsed, 3)
                                 for m, b in zip(end, per_trainer0)],
        "swarm_cpu_s": round(cpu, 1), "mb_per_cpu_s": round(ok / cpu, 3) if cpu > 0 else None,
        "median_bucket_mb_per_s": round(statistics.median(rates), 3) if rates else None,
        "longest_gap_s": round(longest_gap, 1),
        "lost": int(sum(mb(m, "lost") for m in end) - base_bad["lost"]),
        "abandoned": int(sum(mb(m, "abandoned") for m in end) - base_bad["abandoned"]),
        "retries": int(sum(retries.values())), "retries_by_reason": {k: int(v) for k, v in retries.items() if v},
        "recoveries": {k: int(v) for k, v in recoveries.items() if v},
        "rejected_messages_phase": {side: {k: int(v) for k, v in d.items() if v} for side, d in rejected.items()},
        "stage_averaging_phase": {k: int(v) for k, v in averaging.items() if v},
        "server_seconds_missing": round(missing, 1),
        "mean_serving_servers": round(args.servers_per_stage * (args.stages - 1) - missing / elapsed, 2),
        "kills": phase.kills, "replacements": phase.replacements, "min_stage_peers_seen": phase.min_stage_peers,
    }


def _server_seconds_missing(phase: Phase, window_s: float) -> float:
    """Seconds of server time the window lacked: from each kill until its replacement (the
    i-th started after the i-th kill) was first seen serving, or the window's end. Polled,
    so each interval is late by up to one poll."""
    out = 0.0
    for i, kill in enumerate(phase.kills):
        rep = phase.replacements[i] if i < len(phase.replacements) else None
        back = window_s
        if rep is not None and isinstance(rep["serving_after_s"], float):
            back = min(window_s, rep["t"] + rep["serving_after_s"])
        out += max(0.0, back - kill["t"])
    return out


def _buckets(samples: list[tuple[float, float]], bucket_s: float) -> tuple[list[float], float]:
    """Rates over consecutive full buckets of >= bucket_s (a partial last one is dropped), and
    the longest time the counter stood still between samples (a lower bound on the longest
    stall, at the poll's resolution)."""
    rates, gap = [], 0.0
    (edge, edge_v), last_move = samples[0], samples[0][0]
    for (_, va), (tb, vb) in zip(samples, samples[1:]):
        if vb > va:
            last_move = tb
        gap = max(gap, tb - last_move)
        if tb - edge >= bucket_s:
            rates.append((vb - edge_v) / (tb - edge))
            edge, edge_v = tb, vb
    return rates, gap


def _join_maddr(node: NodeProcess, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return node.join_maddr()
        except LaunchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_full(trainers: list[NodeProcess], want: list[int], timeout_s: float) -> None:
    """Until every trainer sees `want[k]` peers on every stage and has completed a micro-batch."""
    deadline = time.monotonic() + timeout_s
    seen: list = []
    while time.monotonic() < deadline:
        ms = [scrape(t) for t in trainers]
        seen = [[int(total(m, "swarm_stage_peers", stage=str(k))) for k in range(len(want))] for m in ms]
        if all(s == want for s in seen) and all(mb(m, "ok") >= 2 for m in ms):
            return
        time.sleep(1.0)
    raise LaunchError(f"the swarm did not fill up within {timeout_s:.0f}s: trainers see {seen}, want {want}")


# ---------------------------------------------------------------- main
def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _git(*a: str) -> str:
    try:
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _provenance(commit: str | None) -> dict:
    if commit:
        code = {"code": f"peers ran committed {commit}"}
    else:
        code = {"code": f"peers ran the working tree on {_git('rev-parse', '--short', 'HEAD')}",
                "dirty_code": _git("status", "--porcelain", "--", "strategies", "node", "protocol").splitlines()}
    return {**code, "python": platform.python_version(), "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--servers-per-stage", type=int, default=2)
    ap.add_argument("--window-s", type=float, default=150.0, help="measured seconds per phase")
    ap.add_argument("--warmup-s", type=float, default=20.0, help="seconds trained after the swarm is full, before "
                    "the window")
    ap.add_argument("--churn-fraction", type=float, default=0.25, help="share of the server peers killed per minute")
    ap.add_argument("--replace-after-s", type=float, default=10.0)
    ap.add_argument("--first-kill-s", type=float, default=5.0, help="first kill, seconds into the churn window")
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--bucket-s", type=float, default=10.0, help="bucket of the median rate")
    ap.add_argument("--start-timeout-s", type=float, default=180.0)
    ap.add_argument("--repeats", type=int, default=1, help="pairs of phases, alternating their order")
    ap.add_argument("--first", choices=("no-churn", "churn"), default="no-churn", help="phase run first in the "
                    "first pair (order effects: the box warms, other jobs come and go)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke size: 45 s windows, 10 s warm-up, one pair")
    ap.add_argument("--workdir", type=Path, default=None, help="keep state dirs and logs here (default: a temp dir)")
    ap.add_argument("--at-commit", default=None, metavar="REV", help="peers run the package as committed at REV "
                    "(e.g. HEAD), not the working tree")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.window_s, args.warmup_s, args.repeats = 45.0, 10.0, 1
    if args.stages < 2 or args.trainers < 1 or args.servers_per_stage < 1:
        ap.error("need --stages >= 2, --trainers >= 1 and --servers-per-stage >= 1")
    if not 0 < args.churn_fraction <= 4 or args.window_s <= 0 or args.repeats < 1:
        ap.error("need 0 < --churn-fraction <= 4, --window-s > 0, --repeats >= 1")
    rng = random.Random(args.seed)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="churnbench-") as tmp:
        root = args.workdir or Path(tmp)
        # resolved once, here: HEAD moves while a bench runs (others commit), the snapshot does not
        commit = _git("rev-parse", "--short", args.at_commit) if args.at_commit else None
        if args.at_commit and not commit:
            ap.error(f"--at-commit {args.at_commit}: no such revision")
        env = snapshot(commit, Path(tmp) / "code") if commit else None
        for rep in range(args.repeats):
            order = [False, True] if (rep % 2 == 0) == (args.first == "no-churn") else [True, False]
            res = {}
            for churn in order:
                name = f"{'churn' if churn else 'nochurn'}{rep}"
                res[churn] = run_phase(root, Phase(name, churn), args, rng, env)
            base, ch = res[False], res[True]
            pairs.append({"no_churn": base, "churn": ch,
                          "ratio": round(ch["mb_per_s"] / base["mb_per_s"], 3) if base["mb_per_s"] else None,
                          "cpu_ratio": round(ch["mb_per_cpu_s"] / base["mb_per_cpu_s"], 3)
                          if ch["mb_per_cpu_s"] and base["mb_per_cpu_s"] else None})
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "out")}
    report = {"config": config,
              "kills_per_min": round(args.churn_fraction * args.servers_per_stage * (args.stages - 1), 2),
              "pairs": pairs, "median_ratio": _median(ratios),
              "median_cpu_ratio": _median([p["cpu_ratio"] for p in pairs if p["cpu_ratio"] is not None]),
              "lost_total": sum(p[k]["lost"] for p in pairs for k in ("churn", "no_churn")),
              "provenance": _provenance(commit)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report)
    return report


def _print_table(report: dict) -> None:
    c = report["config"]
    print(f"swarm churn bench: {c['stages']} stages, {c['trainers']} trainers + {c['servers_per_stage']} "
          f"servers/stage, window {c['window_s']:.0f} s, {report['kills_per_min']} server kills/min, replaced "
          f"after {c['replace_after_s']:.0f} s ({report['provenance']['code']})")
    print(f"{'phase':<10} {'mb/s':>6} {'med/10s':>7} {'mb/cpu-s':>8} {'mb':>5} {'gap s':>6} {'lost':>4} "
          f"{'aband':>5} {'retry':>5} {'kills':>5}  recoveries; replacements (stage@serving after s)")
    for p in report["pairs"]:
        for k in ("no_churn", "churn"):
            r = p[k]
            reps = ",".join(f"{x['stage']}@{x['serving_after_s']}" for x in r["replacements"])
            print(f"{r['phase']:<10} {r['mb_per_s']:>6.2f} {r['median_bucket_mb_per_s'] or 0:>7.2f} "
                  f"{r['mb_per_cpu_s'] or 0:>8.3f} {r['microbatches']:>5} {r['longest_gap_s']:>6.1f} "
                  f"{r['lost']:>4} {r['abandoned']:>5} {r['retries']:>5} {len(r['kills']):>5}  "
                  f"{r['recoveries'] or '-'}; {reps or '-'}")
        print(f"  ratio churn/no-churn {p['ratio']}, per swarm CPU-second {p['cpu_ratio']}; churn retries by "
              f"reason {p['churn']['retries_by_reason']}")
    print(f"median ratio {report['median_ratio']} (goal >= 0.8), per CPU-second {report['median_cpu_ratio']}; "
          f"micro-batches lost {report['lost_total']} (goal 0)")


if __name__ == "__main__":
    main()
