"""Pipeline scheduling benches: a discrete-event simulation driven by the REAL routing and
rebalancing code (strategies/swarm/router.py, strategies/swarm/rebalance.py).

No network, no torch: peers are servers with a speed (samples/s) and a FIFO queue; a micro-batch
visits every stage in order; trainers keep `--inflight` micro-batches going (closed loop). A call
to a peer that dies before finishing fails after `--timeout-s` and is re-sent to another replica.
Scenarios (all ratios against a baseline measured in the same run; optimum = min over stages of
the sum of speeds):
  routing     3 stages x 3 peers, speeds 1:1:4 per stage: throughput / optimum, router and round-robin.
  churn       same swarm; every 60 s a random 25 % of the peers is SIGKILLed, each replaced 10 s
              later by one of the same speed: throughput / no-churn, micro-batches lost, retries.
  rebalance   3 stages with 5/1/3 equal-speed peers; every peer checks at random times in
              [0, 2T]; a move costs 10 s of state download: throughput in the first and
              last quarter / optimum (3.0), number of moves, final assignment.
    .venv/bin/python bench/bench_pipeline.py [--duration-s 1200] [--json]
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
from dataclasses import dataclass, field

from swarm_node.strategies.swarm.rebalance import rebalance_target
from swarm_node.strategies.swarm.router import StageRouter


@dataclass
class Peer:
    pid: str
    stage: int
    rate: float
    free_at: float = 0.0
    dies_at: float = float("inf")
    joins_at: float = 0.0


@dataclass
class Sim:
    peers: list[Peer]
    num_stages: int
    policy: str  # "router" | "round_robin"
    inflight: int = 12
    timeout_s: float = 5.0
    seed: int = 0
    rng: random.Random = field(init=False)
    routers: list[StageRouter] = field(init=False)
    now: float = 0.0
    completed: list[float] = field(default_factory=list)
    retries: int = 0
    lost: int = 0
    moves: int = 0
    _rr: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.routers = [StageRouter(initial_cost_s=0.5, rng=random.Random(self.seed + k)) for k in range(self.num_stages)]

    def alive(self, stage: int, t: float) -> list[Peer]:
        return [p for p in self.peers if p.stage == stage and p.joins_at <= t < p.dies_at]

    def refresh(self, t: float) -> None:
        for k in range(self.num_stages):
            self.routers[k].update({p.pid: (1e12, 0.0) for p in self.alive(k, t)})

    def pick(self, stage: int, t: float) -> Peer | None:
        alive = self.alive(stage, t)
        if not alive:
            return None
        if self.policy == "round_robin":
            i = self._rr.get(stage, 0)
            self._rr[stage] = i + 1
            return sorted(alive, key=lambda p: p.pid)[i % len(alive)]
        by_id = {p.pid: p for p in alive}
        for _ in range(len(self.routers[stage].peers) + 1):
            pid = self.routers[stage].pick(1.0)
            if pid in by_id:
                return by_id[pid]
            self.routers[stage].report_error(pid)  # the DHT view lagged: it is gone
        return None

    def run(self, duration: float, events: list[tuple[float, str, object]] = ()) -> None:
        """events: (time, kind, payload) with kind 'refresh' (router re-reads the DHT)."""
        q: list[tuple[float, int, str, object]] = []
        seq = itertools.count()
        for t, kind, payload in events:
            heapq.heappush(q, (t, next(seq), kind, payload))
        for _ in range(self.inflight):
            heapq.heappush(q, (0.0, next(seq), "mb", (0, 0.0)))  # (stage, started)
        t = 0.0
        while q:
            t, _, kind, payload = heapq.heappop(q)
            if t > duration:
                break
            if kind == "refresh":
                self.refresh(t)
                continue
            if kind == "call":
                callable_ = payload
                callable_(t)
                continue
            stage, started = payload
            if stage == self.num_stages:
                self.completed.append(t)
                heapq.heappush(q, (t, next(seq), "mb", (0, t)))
                continue
            p = self.pick(stage, t)
            if p is None:  # stage empty right now: wait and retry (never dropped)
                self.retries += 1
                heapq.heappush(q, (t + 1.0, next(seq), "mb", (stage, started)))
                continue
            finish = max(t, p.free_at) + 1.0 / p.rate
            if finish >= p.dies_at:  # the server dies with our call inside: time out, re-send
                self.retries += 1
                if self.policy == "router":
                    self.routers[stage].report_error(p.pid)
                heapq.heappush(q, (min(t + self.timeout_s, max(p.dies_at, t) + self.timeout_s), next(seq), "mb",
                                   (stage, started)))
                continue
            p.free_at = finish
            if self.policy == "router":
                self.routers[stage].report_ok(p.pid, 1.0, finish - t)
            heapq.heappush(q, (finish, next(seq), "mb", (stage + 1, started)))
        self.now = t

    def throughput(self, t0: float, t1: float) -> float:
        return sum(1 for c in self.completed if t0 <= c < t1) / max(t1 - t0, 1e-9)


def hetero_peers(prefix: str = "") -> list[Peer]:
    return [Peer(f"{prefix}s{k}p{i}", k, rate) for k in range(3) for i, rate in enumerate((1.0, 1.0, 4.0))]


def routing(duration: float, seed: int) -> dict:
    out = {}
    for policy in ("router", "round_robin"):
        sim = Sim(hetero_peers(), 3, policy, seed=seed)
        sim.refresh(0.0)
        sim.run(duration)
        out[policy] = sim.throughput(duration * 0.25, duration)
    optimum = 6.0
    return {"optimum": optimum, "router": round(out["router"], 3), "round_robin": round(out["round_robin"], 3),
            "router_fraction": round(out["router"] / optimum, 3), "round_robin_fraction": round(out["round_robin"] / optimum, 3)}


def churn(duration: float, seed: int) -> dict:
    base = Sim(hetero_peers(), 3, "router", seed=seed)
    base.refresh(0.0)
    base.run(duration)
    rng = random.Random(seed)
    peers = hetero_peers()
    events: list[tuple[float, str, object]] = [(t, "refresh", None) for t in range(0, int(duration) + 1, 1)]
    gen = itertools.count()
    sim = Sim(peers, 3, "router", seed=seed)
    for minute in range(1, int(duration // 60) + 1):
        t_kill = minute * 60.0
        # 25 % of the peers alive at that time, replaced 10 s later (a fresh id: a new process)
        alive = [p for p in peers if p.joins_at <= t_kill < p.dies_at]
        victims = rng.sample(alive, k=round(0.25 * len(alive)))
        for v in victims:
            v.dies_at = t_kill
            peers.append(Peer(f"new{next(gen)}", v.stage, v.rate, joins_at=t_kill + 10.0))
    sim.refresh(0.0)
    sim.run(duration, events)
    warm = 60.0
    ratio = sim.throughput(warm, duration) / base.throughput(warm, duration)
    return {"no_churn": round(base.throughput(warm, duration), 3), "churn": round(sim.throughput(warm, duration), 3),
            "ratio": round(ratio, 3), "lost": sim.lost, "retries": sim.retries,
            "killed_per_minute": round(0.25 * 9)}


def rebalance(duration: float, seed: int, T: float = 50.0, migrate_s: float = 10.0, delta: float = 0.05) -> dict:
    counts = (5, 1, 3)
    peers = [Peer(f"s{k}p{i}", k, 1.0) for k, n in enumerate(counts) for i in range(n)]
    sim = Sim(peers, 3, "router", seed=seed)
    rng = random.Random(seed)
    moves: list[tuple[float, str, int, int]] = []
    events: list[tuple[float, str, object]] = [(t, "refresh", None) for t in range(0, int(duration) + 1, 1)]

    def check(pid: str):
        def at(t: float) -> None:
            me = next(p for p in sim.peers if p.pid == pid and p.dies_at == float("inf"))
            if me.joins_at > t:
                return
            caps = [sum(p.rate for p in sim.peers if p.stage == k and p.dies_at == float("inf")) for k in range(3)]
            mates = [p for p in sim.peers if p.stage == me.stage and p.dies_at == float("inf")]
            if len(mates) < 2 or min(p.pid for p in mates) != pid:
                return
            target = rebalance_target(caps, me.stage, me.rate, delta, movable=lambda k: True)
            if target is None:
                return
            me.dies_at = t  # leaves its stage; joins the other after downloading its state
            sim.peers.append(Peer(pid, target, me.rate, joins_at=t + migrate_s))
            moves.append((round(t, 1), pid, me.stage, target))
            sim.refresh(t)
        return at

    t = 0.0
    for p in peers:
        t = rng.uniform(0, 2 * T)
        while t < duration:
            events.append((t, "call", check(p.pid)))
            t += rng.uniform(0, 2 * T)
    sim.refresh(0.0)
    sim.run(duration, events)
    final = [len([p for p in sim.peers if p.stage == k and p.dies_at == float("inf")]) for k in range(3)]
    q = duration / 4
    off = Sim([Peer(f"s{k}p{i}", k, 1.0) for k, n in enumerate(counts) for i in range(n)], 3, "router", seed=seed)
    off.refresh(0.0)
    off.run(duration)
    return {"start": list(counts), "final": final, "moves": len(moves), "move_log": moves,
            "first_quarter_fraction": round(sim.throughput(0, q) / 3.0, 3),
            "last_quarter_fraction": round(sim.throughput(duration - q, duration) / 3.0, 3),
            "no_rebalancing_fraction": round(off.throughput(duration - q, duration) / 3.0, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=1200.0, help="simulated seconds per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {"routing": routing(args.duration_s, args.seed), "churn": churn(args.duration_s, args.seed),
              "rebalance": rebalance(args.duration_s, args.seed)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    r, c, b = report["routing"], report["churn"], report["rebalance"]
    print(f"routing   (3 stages x speeds 1:1:4, optimum {r['optimum']}/s): router {r['router']}/s = "
          f"{r['router_fraction']:.3f} of optimum; round-robin {r['round_robin']}/s = {r['round_robin_fraction']:.3f}")
    print(f"churn     ({c['killed_per_minute']} of 9 peers killed per minute, replaced after 10 s): {c['churn']}/s vs "
          f"{c['no_churn']}/s without churn = {c['ratio']:.3f}x; lost {c['lost']}, retries {c['retries']}")
    print(f"rebalance ({b['start']} peers of speed 1, T=50 s, 10 s download): final {b['final']} after "
          f"{b['moves']} moves {b['move_log']}; throughput first quarter {b['first_quarter_fraction']:.3f}, "
          f"last quarter {b['last_quarter_fraction']:.3f} of optimum; without rebalancing "
          f"{b['no_rebalancing_fraction']:.3f}")


if __name__ == "__main__":
    main()
