"""Run a churn scenario against a swarm of real `swarm-node join` processes, and judge it.

Two backends place the nodes: `LoopbackBackend` (no root; one fixed port per node on
127.0.0.1; network events are skipped with a warning, or refused with `strict=True`) and
`NetnsBackend` (root; one network namespace per node from `netlab.NetLab`).

Invariants: every observation comes from a node's `/status`, `/readyz` and `/metrics` over
HTTP, plus the `summary.json` a node writes when it drains (for its final param hash and
held-out loss); never from logs. With `stop_together`, the run ends by events, not by a step
count a fast machine could reach before the churn is over: once the scenario has settled,
every live peer is told (`swarm-node drain --at-step N`) to stop at one step N a little past
the furthest, and the replicas are compared there. Teardown always runs, also on exceptions and Ctrl-C: every
node's process group is killed, the lab is deleted, and the report says whether anything of
ours is still running. Every wait is bounded.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from swarm_node.control import EXIT_PAST_STEP
from swarm_node.lab.launcher import LaunchError, NodeProcess, leftover_launched_pids
from swarm_node.lab.scenario import Event, Scenario, ScenarioError

# Small and quick to react: one layer, 1 s heartbeats, 4 s record lifetime, 1 s watchdog.
DEFAULT_NODE_ARGS = [
    "--threads", "1", "--announce-interval-s", "1", "--record-ttl-s", "4", "--watchdog-interval-s", "1",
    "--status-interval-s", "5", "--n-layer", "1", "--d-model", "64", "--n-head", "4", "--seq-len", "32",
    "--batch-size", "8", "--data-max-bytes", "600000", "--round-timeout-s", "5", "--eval-every", "10",
    "--checkpoint-every", "10", "--shutdown-grace-s", "10", "--log-format", "console",
]
POLL_S = 1.0
CUT_OFF_STEP_SLACK = 1  # cut_off_holds: a step already in flight when the isolation is seen may still land
# stop_together: the common step lies this many seconds of steps ahead of the furthest peer; the
# `drain` call itself can take seconds to arrive on a loaded box, and a peer past the step by then
# (others already stopped at it) cannot be stopped together with them any more
STOP_MARGIN_S = 8.0
STOP_MARGIN_MIN_STEPS = 30
STOP_ATTEMPTS = 3  # drain requests, each after some peer was already past the previous step
STOP_WAIT_S = 60.0  # ... and every peer must have stopped this long after it is due
HTTP_TIMEOUT_S = 2.0
# consistency="phi_hash": every survivor must report a committed round after the churn settled; waited
# for at most this long beyond settle_s
PHI_EXTRA_WAIT_S = 20.0
# loss="reward" (SAPO): rounds each survivor must report after the churn settled, waited for at most
# REWARD_EXTRA_WAIT_S beyond settle_s (a loaded box may run rounds late, never forever)
REWARD_ROUNDS_AFTER = 6
REWARD_EXTRA_WAIT_S = 30.0
GOSSIP_RX = 'swarm_sapo_rollouts_received_total{path="gossip"}'


# ---------------------------------------------------------------------------------- backends
class LoopbackBackend:
    name = "loopback"

    def __init__(self) -> None:
        self._ports: dict[str, int] = {}

    def setup(self) -> None:
        pass

    def node_args(self, name: str) -> list[str]:
        if name not in self._ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self._ports[name] = s.getsockname()[1]
        return ["--host", "127.0.0.1", "--port", str(self._ports[name]), "--metrics-addr", "127.0.0.1:0"]

    def cmd_prefix(self, name: str) -> list[str]:
        return []

    def unsupported(self, event: Event) -> str | None:
        if event.is_network:
            return f"{event.action} needs the network-namespace lab (root, --netns); loopback has no per-node network"
        return None

    def apply(self, event: Event) -> None:
        raise ScenarioError(f"loopback cannot {event.action}")

    def close(self) -> list[str]:
        return []


class NetnsBackend:
    name = "netns"
    PORT = 31337

    def __init__(self, prefix: str = "swl", subnet: str = "10.77.0.0/24") -> None:
        from swarm_node.lab.netlab import NetLab

        self.lab = NetLab(prefix, subnet)

    def setup(self) -> None:
        self.lab.up()

    def node_args(self, name: str) -> list[str]:
        ip = self.lab.add_host(name).ip
        return ["--host", ip, "--port", str(self.PORT), "--metrics-addr", f"{ip}:9108"]

    def cmd_prefix(self, name: str) -> list[str]:
        return self.lab.host(name).prefix()

    def unsupported(self, event: Event) -> str | None:
        if event.action == "delay":
            ok, why = self.lab.netem_available()
            return None if ok else why
        return None

    def apply(self, event: Event) -> None:
        lab, t = self.lab, event.target
        if event.action == "partition":
            lab.partition(t)
        elif event.action == "heal":
            lab.heal(t)
        elif event.action == "loss":
            lab.loss(t, int(event.arg))
        elif event.action == "shape":
            lab.shape(t, event.arg)
        elif event.action == "delay":
            lab.delay(t, event.arg)

    def close(self) -> list[str]:
        from swarm_node.lab.netlab import lab_namespaces

        self.lab.down()
        return lab_namespaces(self.lab.prefix)


# ---------------------------------------------------------------------------------- results
@dataclass
class Fired:
    event: Event
    at_s: float | None = None  # seconds after training started; None if never reached
    skipped: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    strategy: str
    backend: str
    scenario: str
    fired: list[Fired] = field(default_factory=list)
    kills: int = 0
    kills_survived: int = 0
    rejoin_s: dict[str, float | None] = field(default_factory=dict)  # "heal n3" / "restart n1" -> seconds
    train_loss: dict[str, float | None] = field(default_factory=dict)  # start / before / end (polled)
    val_loss: dict[str, float | None] = field(default_factory=dict)  # before / end (summaries)
    nan_seen: bool = False
    final: dict[str, dict] = field(default_factory=dict)  # survivor -> step, param_hash, val_loss
    consistent: bool | None = None
    final_rounds: dict[str, Any] = field(default_factory=dict)  # phi_hash consistency: rounds compared
    reward: dict[str, Any] = field(default_factory=dict)  # loss="reward": before / end, per-survivor rounds after
    leftover: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "fired"}
        d["fired"] = [{"event": f.event.describe(), "at_s": f.at_s, "skipped": f.skipped, **f.detail}
                      for f in self.fired]
        d["ok"] = self.ok
        return d

    def format(self) -> str:
        def num(v: float | None, fmt: str = ".3f") -> str:
            return "-" if v is None else format(v, fmt)

        lines = [f"scenario {self.scenario} | strategy {self.strategy} | backend {self.backend} | "
                 f"{self.duration_s:.0f}s", "events:"]
        for f in self.fired:
            when = "never reached" if f.at_s is None and not f.skipped else (
                "SKIPPED: " + f.skipped if f.skipped else f"t={f.at_s:.1f}s")
            extra = " ".join(f"{k}={v}" for k, v in f.detail.items())
            lines.append(f"  {f.event.describe():32s} {when} {extra}".rstrip())
        lines.append(f"kills survived: {self.kills_survived}/{self.kills}")
        for what, s in self.rejoin_s.items():
            lines.append(f"re-join after {what}: {num(s, '.1f')} s" if s is not None else
                         f"re-join after {what}: NOT within the deadline")
        tl, vl = self.train_loss, self.val_loss
        lines.append(f"train loss: start {num(tl.get('start'))}, before churn {num(tl.get('before'))}, "
                     f"end {num(tl.get('end'))}")
        lines.append(f"held-out loss: before churn {num(vl.get('before'))}, end {num(vl.get('end'))}")
        if self.reward:
            rw = self.reward
            lines.append(f"reward (mean per completion): before churn {num(rw.get('before'))} "
                         f"({rw.get('rounds_before', 0)} rounds), end {num(rw.get('end'))}"
                         + (f" (restarted peers: {num(rw['end_restarted'])})" if rw.get("end_restarted") is not None
                            else ""))
            for name in sorted(rw.get("rounds_after", {})):
                lines.append(f"  {name}: {rw['rounds_after'][name]} rounds after the churn, external groups used "
                             f"{rw['external_used_after'][name]}, received by gossip {rw['gossip_after'][name]:.0f}")
        lines.append(f"NaN seen: {'YES' if self.nan_seen else 'no'}")
        for name, f in sorted(self.final.items()):
            lines.append(f"  {name}: step {f.get('step')} hash {str(f.get('param_hash'))[:12]} "
                         f"val {num(f.get('val_loss'))}")
        how = f" ({self.final_rounds['compared']} rounds compared)" if self.final_rounds else ""
        lines.append("survivors consistent: " + {None: "not checked (replicas differ by design, or < 2 survivors)",
                                                   True: "yes" + how, False: "NO" + how}[self.consistent])
        lines.append("left running: " + (", ".join(self.leftover) if self.leftover else "nothing"))
        lines.append("RESULT: " + ("ok" if self.ok else "FAILED\n  - " + "\n  - ".join(self.problems)))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- runner
@dataclass
class RunOptions:
    strategy: str
    peers: int
    scenario: Scenario
    netns: bool = False
    node_args: list[str] = field(default_factory=list)  # strategy flags + user flags (win over defaults)
    max_steps: int = 0
    # after the scenario settles, drain every live peer at one common step (see the module doc)
    stop_together: bool = False
    # a partitioned peer must not step once it knows it is cut off (sync, gradcode: the run-long quorum)
    cut_off_holds: bool = False
    duration_s: float = 0.0  # hard end, seconds after training started (0 = scenario + settle / max-steps)
    settle_s: float = 15.0  # without max-steps: how long to keep running after the last event
    consistency: str | None = None  # "param_hash" | "phi_hash" | None: see strategies.churn_profile.ChurnProfile
    loss: str = "val"  # which loss must fall: "val" (held-out), "train", or "reward" must rise (see strategies.churn_profile.ChurnProfile)
    workdir: Path | None = None
    run_id: str = "churn"
    strict: bool = False  # refuse a scenario with events this backend cannot do (else skip them)
    start_timeout_s: float = 120.0
    rejoin_timeout_s: float = 45.0
    timeout_s: float = 900.0  # the whole run
    progress: Callable[[str], None] = print
    netns_prefix: str = "swl"
    netns_subnet: str = "10.77.0.0/24"  # labs that run at the same time need their own prefix and subnet


@dataclass
class _Node:
    proc: NodeProcess
    alive: bool = True
    paused: bool = False
    terminating_since: float | None = None
    status: dict | None = None
    readyz: int | None = None
    metrics: str = ""
    restarted: bool = False


def _drain_reply(out: str) -> dict[str, Any]:
    """The JSON line `swarm-node drain --json` printed (empty if there is none)."""
    for line in reversed(out.strip().splitlines()):
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        if isinstance(reply, dict):
            return reply
    return {}


def pace_of(samples: list[tuple[float, str, int, float | None]], t_end: float, window_s: float) -> float:
    """Steps per second of the fastest peer: the median over its consecutive (time, step) samples
    in [t_end - window_s, t_end] that advanced (0.0 with fewer than one such interval)."""
    best = 0.0
    for name in {n for _, n, _, _ in samples}:
        pts = [(t, s) for t, n, s, _ in samples if n == name and t >= t_end - window_s]
        rates = sorted((s1 - s0) / (t1 - t0) for (t0, s0), (t1, s1) in zip(pts, pts[1:]) if t1 > t0 and s1 > s0)
        if rates:
            best = max(best, rates[len(rates) // 2])
    return best


class ChurnRunner:
    def __init__(self, opts: RunOptions):
        if opts.peers < 2:
            raise ScenarioError("a churn scenario needs at least 2 peers")
        self.o = opts
        self.names = [f"n{i}" for i in range(opts.peers)]
        opts.scenario.check_targets(self.names)
        self.backend = NetnsBackend(opts.netns_prefix, opts.netns_subnet) if opts.netns else LoopbackBackend()
        self.report = Report(opts.strategy, self.backend.name, opts.scenario.name)
        self.nodes: dict[str, _Node] = {}
        self.all_procs: list[NodeProcess] = []
        self.t0: float | None = None
        self.t0_wall = time.time()
        self.samples: list[tuple[float, str, int, float | None]] = []  # t, node, step, train loss
        self.rounds: dict[str, dict[int, tuple[float, str]]] = {}  # node -> outer round -> (t, phi hash), "ok" only
        # SAPO: node -> round -> (t first seen, mean reward per completion, external groups used); and
        # node -> [(t, rollouts received by gossip so far)] (a restarted process counts from 0 again)
        self.sapo_rounds: dict[str, dict[int, tuple[float, float, int]]] = {}
        self.gossip_rx: dict[str, list[tuple[float, float]]] = {}
        self.last_fire_s = 0.0
        self.watch: dict[str, dict] = {}  # "heal n3" -> what we wait for
        self.partitioned: dict[str, dict] = {}
        self.workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="swarm-node-churn-"))
        self.stop_target: int | None = None  # stop_together: the common drain step, once requested
        self.stop_deadline = 0.0

    # ---- public ------------------------------------------------------------------------
    def run(self) -> Report:
        started = time.monotonic()
        skipped = {id(e): why for e in self.o.scenario.events if (why := self.backend.unsupported(e))}
        for e in self.o.scenario.events:
            if id(e) in skipped:
                if self.o.strict:
                    raise ScenarioError(f"{e.describe()}: {skipped[id(e)]}")
                self.o.progress(f"warning: will skip `{e.describe()}`: {skipped[id(e)]}")
        try:
            self.backend.setup()
            self._start_swarm()
            self._loop(skipped)
            self._drain_all()
        finally:
            self._teardown()
            self.report.duration_s = round(time.monotonic() - started, 1)
        self._judge()
        return self.report

    # ---- starting ----------------------------------------------------------------------
    def _args(self, name: str, min_peers: int, initial: list[str]) -> list[str]:
        args = [*DEFAULT_NODE_ARGS, *self.backend.node_args(name), "--run-id", self.o.run_id,
                "--strategy", self.o.strategy, "--min-peers", str(min_peers)]
        if self.o.max_steps:
            args += ["--max-steps", str(self.o.max_steps)]
        args += ["--initial-peers", *initial] if initial else ["--new-swarm"]
        return [*args, *self.o.node_args]  # user flags last: argparse keeps the last value

    def _launch(self, name: str, min_peers: int, initial: list[str]) -> _Node:
        proc = NodeProcess(name, self.workdir / name, self._args(name, min_peers, initial),
                           cmd_prefix=self.backend.cmd_prefix(name))
        self.all_procs.append(proc)
        proc.start()
        node = _Node(proc)
        self.nodes[name] = node
        return node

    def _start_swarm(self) -> None:
        first = self._launch(self.names[0], self.o.peers, [])
        maddr = first.proc.wait_info(self.o.start_timeout_s)["join_maddrs"][0]
        for name in self.names[1:]:
            self._launch(name, self.o.peers, [maddr])
        self.o.progress(f"started {self.o.peers} {self.o.strategy} peers ({self.backend.name}); "
                        f"waiting until all train")
        deadline = time.monotonic() + self.o.start_timeout_s
        for n in self.nodes.values():
            n.proc.wait_for(lambda s: s["step"] >= 1, max(1.0, deadline - time.monotonic()), "training to start")
        self.t0 = time.monotonic()
        self.t0_wall = time.time()  # round histories in summary.json carry wall-clock times
        self.o.progress("all peers train: scenario clock starts")

    def _live_maddrs(self, exclude: str) -> list[str]:
        out = []
        for name, n in self.nodes.items():
            if name != exclude and n.alive and n.terminating_since is None and n.proc.proc.poll() is None:
                out += n.proc.info.get("join_maddrs", [])[:1]
        return out

    # ---- the loop ----------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - (self.t0 or time.monotonic())

    def _loop(self, skipped: dict[int, str]) -> None:
        events = list(self.o.scenario.events)
        self.report.fired = [Fired(e) for e in events]
        nxt, last_fire, last_print = 0, 0.0, -10.0
        hard_end = time.monotonic() + self.o.timeout_s
        while time.monotonic() < hard_end:
            tick = time.monotonic()
            self._poll()
            while nxt < len(events) and self._due(events[nxt]):
                f = self.report.fired[nxt]
                if id(events[nxt]) in skipped:
                    f.skipped = skipped[id(events[nxt])]
                else:
                    f.at_s = round(self.now(), 1)
                    self.o.progress(f"[t={f.at_s:5.1f}s] {events[nxt].describe()}")
                    self._fire(events[nxt], f)
                    self._poll()
                last_fire, nxt = self.now(), nxt + 1
                self.last_fire_s = last_fire
            self._update_watches()
            if self.now() - last_print >= 5:
                last_print = self.now()
                self.o.progress(self._progress_line())
            if self._finished(nxt == len(events), last_fire):
                if self.o.consistency == "phi_hash":
                    self._phi_burst()
                return
            time.sleep(max(0.0, POLL_S - (time.monotonic() - tick)))
        self.report.problems.append(f"the run did not finish within {self.o.timeout_s:.0f}s")

    def _finished(self, all_fired: bool, last_fire: float) -> bool:
        if self.o.duration_s and self.now() >= self.o.duration_s:
            return True
        if not all_fired or any(w["done_s"] is None for w in self.watch.values()):
            return False
        if self.o.max_steps:  # every live node stops by itself at --max-steps
            return not any(n.alive and n.proc.proc.poll() is None for n in self.nodes.values())
        if self.o.loss == "reward":  # judged on the rounds after the last re-join: settle from there
            since = self._settled_since()
            if self.now() < since + self.o.settle_s:
                return False
            live = [k for k, n in self.nodes.items() if n.alive and n.terminating_since is None]
            enough = all(len(self._sapo_after(k, since)) >= REWARD_ROUNDS_AFTER for k in live)
            return enough or self.now() >= since + self.o.settle_s + REWARD_EXTRA_WAIT_S
        if self.now() < last_fire + self.o.settle_s:
            return False
        if self.o.consistency == "phi_hash" and self.now() < last_fire + self.o.settle_s + PHI_EXTRA_WAIT_S:
            # judged on rounds committed after the churn settled: a loaded box may run them late
            since = self._settled_since()
            live = [k for k, n in self.nodes.items() if n.alive and n.terminating_since is None]
            if not all(any(t > since for t, _ in self.rounds.get(k, {}).values()) for k in live):
                return False
        if not self.o.stop_together:
            return True
        if self.stop_target is None:
            self._request_common_stop()
            return False
        running = [k for k, n in self.nodes.items() if n.alive and n.proc.proc.poll() is None]
        if running and time.monotonic() > self.stop_deadline:
            self.report.problems.append(f"{', '.join(running)} did not stop at the common step {self.stop_target}")
            return True
        return not running

    def _request_common_stop(self) -> None:
        """Tell every live peer, through its own control API (`swarm-node drain --at-step`), to
        drain at one step: the furthest peer's step plus what the swarm does in STOP_MARGIN_S at
        its recent pace. A peer already past it refuses (exit 75, training on), and then every
        live peer is asked again for a step past the furthest one reported, with twice the margin."""
        live = {k: n for k, n in self.nodes.items()
                if n.alive and n.terminating_since is None and n.proc.proc.poll() is None}
        furthest = max(((n.status or {}).get("step", 0) for n in live.values()), default=0)
        rate = self._recent_step_rate()
        margin_s = STOP_MARGIN_S
        for attempt in range(STOP_ATTEMPTS):
            self.stop_target = furthest + max(STOP_MARGIN_MIN_STEPS, math.ceil(rate * margin_s))
            self.stop_deadline = time.monotonic() + STOP_WAIT_S + (self.stop_target - furthest) / max(rate, 0.5)
            self.o.progress(f"[t={self.now():5.1f}s] asking {', '.join(live)} to drain together at step "
                            f"{self.stop_target} (furthest at {furthest}, {rate:.1f} steps/s)")
            past = self._send_drain(live, self.stop_target, last_try=attempt == STOP_ATTEMPTS - 1)
            if not past:
                return
            furthest = max(past.values())
            margin_s *= 2

    def _send_drain(self, live: dict, target: int, last_try: bool) -> dict[str, int]:
        """`drain --at-step target` to every peer in `live`; returns {peer: its step} of those that
        were already past it (a problem on the last try), and reports any other failure."""
        calls = {k: subprocess.Popen([*self.backend.cmd_prefix(k), sys.executable, "-m", "swarm_node", "drain",
                                      "--state-dir", str(n.proc.state_dir), "--at-step", str(target), "--json",
                                      "--reason", "churn runner: stop together"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for k, n in live.items()}
        past: dict[str, int] = {}
        for k, call in calls.items():
            try:
                out, _ = call.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                call.kill()
                out = "no answer within 30 s"
            if call.returncode == EXIT_PAST_STEP:
                past[k] = _drain_reply(out).get("current_step", target)
                if last_try:
                    self.report.problems.append(f"{k} was past every common step asked for (last {target})")
            elif call.returncode != 0:
                self.report.problems.append(f"drain --at-step {target} to {k} failed: {out.strip()[-300:]}")
        return past

    def _recent_step_rate(self, window_s: float = 20.0) -> float:
        """The swarm's training pace: for each live peer, the median steps per second between its
        consecutive samples of the last `window_s` that moved, then the fastest peer. Intervals
        without progress (a stall while a peer re-joins) and jumps (a state download) would make
        an average over the window too low or too high; a pace too low puts the common step
        behind peers that are already past it when the request arrives."""
        return pace_of(self.samples, self.now(), window_s)

    def _due(self, e: Event) -> bool:
        if e.at_s is not None:
            return self.now() >= e.at_s
        steps = [n.status["step"] for n in self.nodes.values() if n.alive and n.status]
        return bool(steps) and max(steps) >= e.at_step

    def _poll(self) -> None:
        t = self.now()
        for name, n in self.nodes.items():
            rc = n.proc.proc.poll()
            if rc is not None:
                if n.alive:
                    n.alive = False
                    # exit 0 is expected only at a step the run was told to stop at (--max-steps, or
                    # the common drain step): a node that just stops training is as broken as a crash
                    told_to_stop = self.o.max_steps > 0 or self.stop_target is not None
                    if n.terminating_since is None and (rc != 0 or not told_to_stop):
                        step = n.status.get("step") if n.status else None
                        self.report.problems.append(f"{name} exited on its own with code {rc} at t={t:.1f}s "
                                                    f"(step {step})")
                if n.terminating_since is not None:
                    took = time.monotonic() - n.terminating_since
                    n.terminating_since = None
                    self._detail_for("term", name)["exit_code"] = rc
                    self._detail_for("term", name)["drain_s"] = round(took, 1)
                    if rc != 0:
                        self.report.problems.append(f"term {name}: exit code {rc}, expected 0 (graceful drain)")
                continue
            if n.terminating_since is not None and time.monotonic() - n.terminating_since > 40:
                self.report.problems.append(f"term {name}: still running 40 s after SIGTERM; killed")
                n.proc.kill()
                continue
            if n.paused:
                continue
            if not self._has_info(n):
                continue  # still starting: its HTTP address is not known yet
            try:
                code, body = n.proc.http("/status", timeout_s=HTTP_TIMEOUT_S)
                if code == 200:
                    n.status = json.loads(body)
                n.readyz = n.proc.http("/readyz", timeout_s=HTTP_TIMEOUT_S)[0]
                n.metrics = n.proc.http("/metrics", timeout_s=HTTP_TIMEOUT_S)[1].decode(errors="replace")
            except (OSError, ValueError, LaunchError):
                continue  # starting, draining, or just slow: the next poll tries again
            loss = n.status.get("train_loss") if n.status else None
            metric_loss = _metric(n.metrics, "swarm_train_loss")
            if metric_loss is not None and not math.isfinite(metric_loss):
                self.report.nan_seen = True
            if n.status:
                self.samples.append((t, name, n.status["step"], loss))
                lr = n.status.get("last_round") or {}
                if lr.get("outcome") == "ok" and lr.get("phi_hash"):
                    # latest wins: an isolated peer may have committed a round number alone before it
                    # re-adopted the swarm's φ; what counts is what it reports once re-joined
                    self.rounds.setdefault(name, {})[int(lr["round"])] = (t, lr["phi_hash"])
                if lr.get("sapo_round") is not None:  # first sighting: when the round was done, near enough
                    self.sapo_rounds.setdefault(name, {}).setdefault(
                        int(lr["sapo_round"]), (t, float(lr.get("reward_mean") or 0.0), int(lr.get("external_used") or 0)))
            if (rx := _metric(n.metrics, GOSSIP_RX)) is not None:
                self.gossip_rx.setdefault(name, []).append((t, rx))
            if name in self.partitioned and n.status:
                iso = self.partitioned[name]
                iso["max_routing_table"] = max(iso.get("max_routing_table", 0), n.status["routing_table_size"]) \
                    if t - iso["since_s"] > 10 else iso.get("max_routing_table", 0)
                iso["min_routing_table"] = min(iso.get("min_routing_table", 99), n.status["routing_table_size"])
                if n.status["routing_table_size"] <= 1 and n.readyz == 503 and "isolated_after_s" not in iso:
                    iso["isolated_after_s"] = round(t - iso["since_s"], 1)  # the node knows it is cut off
                    iso["step_when_isolated"] = n.status["step"]
                if "isolated_after_s" in iso:
                    iso["steps_while_isolated"] = n.status["step"] - iso["step_when_isolated"]
                iso.setdefault("readyz_seen", set()).add(n.readyz)

    @staticmethod
    def _has_info(n: _Node) -> bool:
        if not (n.proc.state_dir / "node.json").exists():
            return False  # still starting; reading .info now would block the loop until it is up
        try:
            return bool(n.proc.info)
        except LaunchError:
            return False

    # ---- events ------------------------------------------------------------------------
    def _detail_for(self, action: str, target: str) -> dict:
        for f in reversed(self.report.fired):
            if f.event.action == action and f.event.target == target and f.at_s is not None:
                return f.detail
        return {}

    def _survivor_steps(self, exclude: str) -> int:
        return max((n.status["step"] for k, n in self.nodes.items() if k != exclude and n.alive and n.status),
                   default=0)

    def _fire(self, e: Event, f: Fired) -> None:
        name = e.target
        node = self.nodes.get(name)
        if e.action in ("kill", "term"):
            f.detail["survivors_step"] = self._survivor_steps(name)
            if e.action == "kill":
                node.proc.kill(group=True)
                node.alive = False
                left = node.proc.group_pids()
                f.detail["left_in_group"] = len(left)
                if left:
                    self.report.problems.append(f"kill {name}: {len(left)} processes survived killpg")
            else:
                if node.paused:
                    self._signal(node, signal.SIGCONT)
                node.terminating_since = time.monotonic()
                node.proc.proc.send_signal(signal.SIGTERM)
        elif e.action in ("pause", "resume"):
            self._signal(node, signal.SIGSTOP if e.action == "pause" else signal.SIGCONT)
            node.paused = e.action == "pause"
        elif e.action in ("restart", "join"):
            if node is not None and node.proc.proc.poll() is None:  # restart of a running node: drain it first
                self._signal(node, signal.SIGCONT)
                node.proc.terminate(30)
            new = self._launch(name, 1, self._live_maddrs(exclude=name))
            new.restarted = True
            key = f"{e.action} {name}"
            self.watch[key] = {"node": name, "since": time.monotonic(), "done_s": None, "want": "ready"}
        elif e.is_network:
            f.detail["survivors_step"] = self._survivor_steps(name)
            self.backend.apply(e)
            if e.action == "partition":
                self.partitioned[name] = {"since_s": self.now()}
            elif e.action == "heal":
                iso = self.partitioned.pop(name, {})
                f.detail.update({k: (sorted(v) if isinstance(v, set) else v) for k, v in iso.items() if k != "since_s"})
                f.detail["bootstrap_ok_before"] = _metric(node.metrics, 'swarm_bootstrap_attempts_total{outcome="ok"}')
                self.watch[f"heal {name}"] = {"node": name, "since": time.monotonic(), "done_s": None,
                                              "want": "rejoined", "boot_ok": f.detail["bootstrap_ok_before"] or 0.0}

    def _signal(self, node: _Node, sig: int) -> None:
        try:
            os.killpg(node.proc.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _update_watches(self) -> None:
        for key, w in self.watch.items():
            if w["done_s"] is not None:
                continue
            n = self.nodes[w["node"]]
            waited = time.monotonic() - w["since"]
            if waited > self.o.rejoin_timeout_s or not n.alive:
                w["done_s"] = -1.0
                self.report.rejoin_s[key] = None
                self.report.problems.append(f"{key}: not re-joined within {self.o.rejoin_timeout_s:.0f}s "
                                            f"(last status: {_brief(n.status)}, readyz {n.readyz})")
                continue
            s = n.status
            if not s or n.readyz != 200 or s["phase"] != "ready":
                continue
            others = sum(1 for k, o in self.nodes.items() if k != w["node"] and o.alive)
            if w["want"] == "rejoined":
                if s["routing_table_size"] < min(2, others):
                    continue
                # not a condition: a peer that dials the healed one also refills its table
                boot = _metric(n.metrics, 'swarm_bootstrap_attempts_total{outcome="ok"}')
                self._detail_for("heal", w["node"])["bootstrap_ok_after"] = boot
                self._detail_for("heal", w["node"])["routing_table_after"] = s["routing_table_size"]
            elif s["routing_table_size"] < min(1, others) or s["step"] < 1:
                continue
            w["done_s"], w["done_at_s"] = round(waited, 1), self.now()
            self.report.rejoin_s[key] = w["done_s"]
            self.o.progress(f"[t={self.now():5.1f}s] {key}: re-joined after {w['done_s']:.1f}s")

    def _progress_line(self) -> str:
        parts = []
        for name, n in self.nodes.items():
            if not n.alive:
                parts.append(f"{name}: down")
            elif n.paused:
                parts.append(f"{name}: paused")
            elif n.status:
                s = n.status
                loss = "-" if s.get("train_loss") is None else f"{s['train_loss']:.2f}"
                parts.append(f"{name}: step {s['step']} loss {loss} rt {s['routing_table_size']} {s['phase']}"
                             + (" PARTITIONED" if name in self.partitioned else ""))
            else:
                parts.append(f"{name}: starting")
        return f"[t={self.now():5.1f}s] " + " | ".join(parts)

    # ---- ending ------------------------------------------------------------------------
    def _drain_all(self) -> None:
        for n in self.nodes.values():
            if n.proc.proc.poll() is None:
                self._signal(n, signal.SIGCONT)
                n.proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for name, n in self.nodes.items():
            try:
                rc = n.proc.proc.wait(max(0.1, deadline - time.monotonic()))
                if n.alive and rc != 0:
                    self.report.problems.append(f"{name} exited with {rc} at the end (expected 0)")
            except Exception:
                self.report.problems.append(f"{name} did not drain within 40 s at the end; killed")
                n.proc.kill()

    def _teardown(self) -> None:
        for p in self.all_procs:
            try:
                p.close()
            except Exception:  # keep tearing down the others
                pass
        ours = {p.proc.pid for p in self.all_procs if p.proc is not None}
        left = [pid for p in self.all_procs for pid in p.group_pids()]
        left += [pid for pid in leftover_launched_pids() if pid in ours]
        self.report.leftover = [f"pid {pid}" for pid in sorted(set(left))]
        try:
            self.report.leftover += [f"namespace {ns}" for ns in self.backend.close()]
        except Exception as e:
            self.report.leftover.append(f"lab teardown failed: {e}")

    # ---- judging -----------------------------------------------------------------------
    def _judge(self) -> None:
        r = self.report
        fired = [f for f in r.fired if f.at_s is not None]
        for f in r.fired:
            if f.at_s is None and not f.skipped:
                r.problems.append(f"`{f.event.describe()}` never fired")
        # a kill is survived when the other peers kept stepping afterwards
        for f in fired:
            if f.event.action not in ("kill", "term"):
                continue
            r.kills += 1
            later = [step for t, name, step, _ in self.samples if t > f.at_s + 1 and name != f.event.target]
            if later and max(later) >= f.detail.get("survivors_step", 0) + 3:
                r.kills_survived += 1
            else:
                r.problems.append(f"{f.event.describe()}: the others did not keep training")
        first_event = min((f.at_s for f in fired), default=None)
        losses = [(t, v) for t, _, _, v in self.samples if v is not None]
        if losses:
            r.train_loss["start"] = _mean([v for t, v in losses[:3]])
            if first_event is not None:
                r.train_loss["before"] = _mean([v for t, v in losses if first_event - 5 <= t <= first_event])
            r.train_loss["end"] = _mean([v for t, v in losses if t >= losses[-1][0] - 5])
        # survivors: alive until the end (not killed or drained by the scenario)
        ended = [n for n, node in self.nodes.items() if not any(
            f.event.target == n and f.event.action in ("kill", "term") and f.at_s is not None
            and not self._came_back(n, f.at_s) for f in fired)]
        for name in ended:
            try:
                summ = json.loads((self.workdir / name / "summary.json").read_text())
            except (OSError, ValueError):
                r.problems.append(f"{name}: no summary.json after its drain")
                continue
            r.final[name] = {"step": summ.get("step"), "param_hash": summ.get("param_hash"),
                             "val_loss": summ.get("val_loss"), "restarted": self.nodes[name].restarted}
            if self.o.consistency == "phi_hash":
                # the node's own record of every round it committed (with its wall-clock time): rounds
                # commit faster than /status can be read from all peers, so samples alone may never
                # catch two peers on one round, however consistent they are
                for h in summ.get("round_history", []):
                    if h.get("outcome") == "ok" and h.get("phi_hash") and h.get("at") and h.get("round") is not None:
                        self.rounds.setdefault(name, {})[int(h["round"])] = (h["at"] - self.t0_wall, h["phi_hash"])
            v = summ.get("val_loss")
            if v is None or not math.isfinite(v):
                r.nan_seen = r.nan_seen or v is not None
            if first_event is not None and not self.nodes[name].restarted and r.val_loss.get("before") is None:
                step_at = min((s for t, n, s, _ in self.samples if n == name and t >= first_event), default=None)
                before = [h[2] for h in summ.get("history", []) if h[2] is not None and step_at and h[0] <= step_at]
                r.val_loss["before"] = before[-1] if before else None
        vals = [f["val_loss"] for f in r.final.values() if f["val_loss"] is not None]
        r.val_loss["end"] = _mean(vals) if vals else None
        if r.nan_seen:
            r.problems.append("a non-finite loss was seen")
        if self.o.cut_off_holds:
            for f in fired:
                moved = f.detail.get("steps_while_isolated") if f.event.action == "heal" else None
                if moved is not None and moved > CUT_OFF_STEP_SLACK:
                    r.problems.append(f"{f.event.target} took {moved} steps while cut off (expected to wait "
                                      f"below the quorum)")
        if not r.final:
            r.problems.append("no peer survived the scenario")
        if self.o.loss == "reward":
            before = end = None  # a GRPO loss need not fall: reward must rise (judged below)
            self._judge_reward(ended)
        elif self.o.loss == "train":
            before, end = r.train_loss.get("before"), r.train_loss.get("end")
        else:
            before = r.val_loss.get("before") or r.train_loss.get("before")
            end = r.val_loss.get("end") if r.val_loss.get("before") else r.train_loss.get("end")
        if before is not None and end is not None and not end < before:
            r.problems.append(f"loss did not fall through the churn: {before:.3f} -> {end:.3f}")
        if self.o.consistency == "param_hash" and (self.o.max_steps or self.o.stop_together) and len(r.final) >= 2:
            # only a common last step (--max-steps, or drain --at-step) stops every replica at one
            # step; a drain at an arbitrary moment may not
            steps = {f["step"] for f in r.final.values()}
            hashes = {f["param_hash"] for f in r.final.values()}
            r.consistent = len(steps) == 1 and len(hashes) == 1
            if not r.consistent:
                r.problems.append(f"survivors differ: steps {sorted(steps)}, {len(hashes)} distinct param hashes")
        elif self.o.consistency == "phi_hash" and len(r.final) >= 2:
            self._judge_phi(ended)
        if r.leftover:
            r.problems.append("left running: " + ", ".join(r.leftover))

    def _phi_burst(self, budget_s: float = 12.0, want: int = 3) -> None:
        """Rounds commit faster than a 1 s poll, so two peers rarely report the same round at a
        normal poll: read /status of every live peer back to back, briefly, until `want` rounds
        were reported by all of them (or the budget is spent)."""
        live = [n for n in self.nodes.values() if n.alive and not n.paused and n.proc.proc.poll() is None]
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline and len(live) >= 2:
            t = self.now()
            for n in live:
                try:
                    code, body = n.proc.http("/status", timeout_s=HTTP_TIMEOUT_S)
                    lr = json.loads(body).get("last_round") or {} if code == 200 else {}
                except (OSError, ValueError, LaunchError):
                    continue
                if lr.get("outcome") == "ok" and lr.get("phi_hash"):
                    self.rounds.setdefault(n.proc.name, {})[int(lr["round"])] = (t, lr["phi_hash"])
            common = set.intersection(*(set(self.rounds.get(n.proc.name, {})) for n in live))
            if len([k for k in common if all(self.rounds[n.proc.name][k][0] > self.last_fire_s for n in live)]) >= want:
                return
            time.sleep(0.05)

    def _settled_since(self) -> float:
        """When the churn was over: the last event, or the last re-join after it."""
        return max([self.last_fire_s, *(w["done_at_s"] for w in self.watch.values() if w.get("done_at_s"))])

    def _sapo_after(self, name: str, since: float) -> list[tuple[float, float, int]]:
        return [v for v in self.sapo_rounds.get(name, {}).values() if v[0] > since]

    def _gossip_between(self, name: str, t_from: float, t_to: float) -> float:
        """Rollouts `name` received by gossip between its last sample at or before t_from and its
        samples up to t_to. The counter restarts at 0 with a restarted process: a drop counts as
        a restart (what the new process has counted)."""
        samples = self.gossip_rx.get(name, [])
        prev = max(((t, v) for t, v in samples if t <= t_from), default=(t_from, 0.0))[1]
        got = 0.0
        for t, v in samples:
            if t_from < t <= t_to:
                got += v - prev if v >= prev else v
                prev = v
        return got

    def _judge_reward(self, survivors: list[str]) -> None:
        """SAPO (loss="reward"): its progress is reward, and it has no shared replica to agree on.
        Judged: (1) the mean reward per completion over the rounds after the churn settled is
        higher than over the rounds before the first event; (2) every survivor completed rounds
        after it (a peer stuck after a partition or a restart fails); (3) every survivor trained
        on other peers' rollouts after it and (4) received some by gossip (not only by pull: dead
        gossip after a restart or heal fails); (5) a partitioned peer got nothing by gossip while
        cut off (the lab really cuts the sidecar's traffic too). Per restart/heal the report says
        how long until that peer used external rollouts and received gossip again."""
        r = self.report
        fired = [f for f in r.fired if f.at_s is not None]
        first_event = min((f.at_s for f in fired), default=None)
        since = self._settled_since()
        before = [rew for rounds in self.sapo_rounds.values() for t, rew, _ in rounds.values()
                  if first_event is None or t <= first_event]
        after = {n: self._sapo_after(n, since) for n in survivors}
        # a restarted peer resumes its policy from its last checkpoint (up to --checkpoint-every steps
        # back): its reward is reported apart, and the rise is judged on the peers that kept theirs
        kept = [n for n in survivors if not self.nodes[n].restarted] or survivors
        end = [rew for n in kept for _, rew, _ in after[n]]
        restarted = [rew for n in survivors if n not in kept for _, rew, _ in after[n]]
        r.reward = {"before": _mean(before), "end": _mean(end), "end_restarted": _mean(restarted),
                    "rounds_before": len(before),
                    "rounds_after": {n: len(v) for n, v in after.items()},
                    "external_used_after": {n: sum(u for _, _, u in v) for n, v in after.items()},
                    "gossip_after": {n: self._gossip_between(n, since, math.inf) for n in survivors}}
        if not before:
            r.problems.append("no SAPO round was seen before the first event: no reward to compare")
        for n in survivors:
            if len(after[n]) < 2:
                r.problems.append(f"{n}: {len(after[n])} SAPO rounds after the churn (stuck?)")
            elif r.reward["external_used_after"][n] == 0:
                r.problems.append(f"{n}: trained on no external rollouts after the churn")
            if r.reward["gossip_after"][n] <= 0:
                r.problems.append(f"{n}: received no rollouts by gossip after the churn (gossip dead?)")
        rb, re_ = r.reward["before"], r.reward["end"]
        if rb is not None and re_ is not None and not re_ > rb:
            r.problems.append(f"reward did not rise through the churn: {rb:.3f} -> {re_:.3f}")
        for f in fired:
            name, act = f.event.target, f.event.action
            if act not in ("restart", "join", "heal"):
                continue
            used = sorted(t for t, _, u in self.sapo_rounds.get(name, {}).values() if t > f.at_s and u > 0)
            f.detail["external_after_s"] = round(used[0] - f.at_s, 1) if used else None
            got = [t for t, v in self.gossip_rx.get(name, []) if t > f.at_s
                   and self._gossip_between(name, f.at_s, t) > 0]
            f.detail["gossip_after_s"] = round(got[0] - f.at_s, 1) if got else None
            if act == "heal":
                cut = [p for p in fired if p.event.action == "partition" and p.event.target == name
                       and p.at_s < f.at_s]
                if cut:  # 3 s for what was already in flight when the partition began
                    during = self._gossip_between(name, cut[-1].at_s + 3, f.at_s)
                    f.detail["gossip_while_partitioned"] = during
                    if during > 0:
                        r.problems.append(f"{name} received {during:.0f} rollouts by gossip while partitioned")

    def _judge_phi(self, survivors: list[str]) -> None:
        """Every survivor committed rounds after the last event, and wherever two of them
        report the same round, they report the same φ hash."""
        r = self.report
        since = max([self.last_fire_s, *(w["done_at_s"] for w in self.watch.values() if w.get("done_at_s"))])
        seen = {n: {k: h for k, (t, h) in self.rounds.get(n, {}).items() if t > since}
                for n in survivors}
        quiet = [n for n, rounds in seen.items() if not rounds]
        common = set.intersection(*(set(v) for v in seen.values())) if not quiet else set()
        disagree = sorted(k for k in set().union(*seen.values())
                          if len({v[k] for v in seen.values() if k in v}) > 1)
        r.consistent = not quiet and bool(common) and not disagree
        r.final_rounds = {"compared": len(common), "last_common": max(common, default=None)}
        if quiet:
            r.problems.append(f"no committed round seen after the last event on: {', '.join(quiet)}")
        elif not common:
            r.problems.append("survivors never reported the same outer round after the last event")
        if disagree:
            r.problems.append(f"φ hash differs between survivors in rounds {disagree[:5]}")

    def _came_back(self, name: str, since_s: float) -> bool:
        return any(f.event.target == name and f.event.action == "restart" and f.at_s is not None
                   and f.at_s >= since_s for f in self.report.fired)


def _metric(text: str, name: str) -> float | None:
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text or "", re.MULTILINE)
    return float(m.group(1)) if m else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _brief(status: dict | None) -> str:
    if not status:
        return "none"
    return f"phase {status['phase']}, routing table {status['routing_table_size']}, step {status['step']}"


def run_scenario(opts: RunOptions) -> Report:
    return ChurnRunner(opts).run()
