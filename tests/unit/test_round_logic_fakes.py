"""Round-logic scenarios in one event loop: the real DiLoCo, Streaming DiLoCo and NoLoCo
strategies (RoundCoordinator, LeaderElection, StateService) over `InMemoryNetwork` with a tiny
model. Stand-ins: peer records (`Swarm`), and the compute thread as a plain call (a gate on it
models SIGSTOP). The first three replace live tests; over real daemons the same paths run in the
namespace churn scenarios (kills; a partitioned peer back with a stale φ) and test_node_live.py.

Shown:
- diloco_swarm_keeps_its_progress_when_a_frozen_leader_comes_back: the followers of a frozen
  leader commit rounds of two; thawed, it adopts their φ (work rule), never the reverse.
- diloco_quorum_goes_on_without_a_slow_leader_which_then_downloads_the_commit: rounds commit
  without a slow leader (grace window from the first join); it is told, cuts its steps short
  and downloads the commit.
- streaming_diloco_retries_the_fragment_round_its_dead_leader_aborted: the leader dies at the
  commit vote; the members abort, then commit the same round number under the next leader.
- noloco_three_peers_pair_up_and_the_odd_one_skips: pairs exchange θ, the odd one skips.
"""
from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.config import NodeConfig
from swarm_node.metrics import NodeMetrics
from swarm_node.strategies.base import Progress, Strategy
from swarm_node.strategies.lowcomm.diloco import DiLoCoStrategy
from swarm_node.strategies.lowcomm.noloco import NoLoCoStrategy
from swarm_node.strategies.lowcomm.streaming import StreamingDiLoCoStrategy
from swarm_node.train.data import ByteDataset
from swarm_node.train.model import GPTConfig
from swarm_node.train.trainer import TrainConfig, build_trainer
from tests.fakes.transport import InMemoryNetwork
from tests.fakes.context import settings

TINY = GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16)
DATA = ByteDataset(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
RUN_ID = "run"
# round_timeout_s: without round_grace_s the leader's window is grace = timeout, and its own join
# waits max(0.5, grace + timeout - 1): below 1 s that ends before the window does (rounds of one).
# record_ttl_s: how long a peer that failed a round is skipped as leader.
FAST = dict(allreduce_transport="p2p", round_timeout_s=1.5, record_ttl_s=0.6)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, as the live nodes run (--threads 1): on a loaded box a thread pool
    per step makes a peer's steps, and so everyone's rounds, stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Record:
    """A peer's heartbeat record as others read it, live from its strategy (no announce lag)."""

    def __init__(self, strategy: Strategy):
        self._s = strategy

    @property
    def strategy(self) -> str:
        return self._s.name

    @property
    def state(self) -> str:
        return self._s.ctx.progress.state

    @property
    def step(self) -> int:
        return self._s.ctx.trainer.step


class Swarm:
    """The peers of one test, and what stands in for the DHT. A peer sees the records of the
    peers it can reach: a cut link or a kill hides a record at once, as if its TTL had expired."""

    def __init__(self, net: InMemoryNetwork):
        self.net = net
        self.peers: dict[str, Strategy] = {}  # peer id -> strategy
        self.names: dict[str, str] = {}  # peer id -> name
        self.gone: set[str] = set()
        # True: a record shows once its peer is past its start-up download (as when the live test
        # starts the others after the first, which waits for --min-peers meanwhile)
        self.online_only = False
        self.logs: dict[str, list[str]] = {}
        self.gates: dict[str, asyncio.Event] = {}  # cleared: the peer's compute thread is stopped
        # peer -> async hook(fn) run at its compute calls until it returns True (a fault at a step)
        self.before_compute: dict[str, Callable] = {}

    def add(self, name: str, cls: type[Strategy], strategy: str, *, delay_fn: Callable[[], float] = lambda: 0.0,
            **cfg) -> Strategy:
        t = self.net.transport(name, run_id=RUN_ID)
        gate = asyncio.Event()
        gate.set()

        async def compute(fn, *args):  # the single compute thread, inline; a gate models SIGSTOP
            hook = self.before_compute.get(me)
            if hook is not None and await hook(fn):
                del self.before_compute[me]
            await gate.wait()
            delay_s = delay_fn()
            if delay_s:
                await asyncio.sleep(delay_s)  # a slower device
            return fn(*args)

        async def on_step():
            await asyncio.sleep(0)  # let the other peers run between two local steps

        log = logging.getLogger(f"test.round_logic.{name}.{id(self)}")
        log.setLevel(logging.DEBUG)
        log.propagate = False
        lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
        log.addHandler(handler)
        me = t.peer_id
        membership = SimpleNamespace(
            others=lambda: [SimpleNamespace(peer_id=p, record=_Record(s)) for p, s in self.peers.items()
                            if p != me and p not in self.gone and not self.net.is_cut(me, p)
                            and (not self.online_only or s.ctx.progress.state == "online")],
            now=time.monotonic, left_since=lambda since, strategy=None: 0)
        ctx = SimpleNamespace(**settings(NodeConfig(strategy=strategy, **cfg), cls), spec=SimpleNamespace(run_id=RUN_ID, seq_len=16),
                              peer_id=me, transport=t, peers=membership, metrics=NodeMetrics(strategy),
                              trainer=build_trainer(TINY, TrainConfig(batch_size=2, seed=0), DATA, peer=len(self.peers)),
                              compute=compute, progress=Progress(), should_stop=lambda: False, on_step=on_step, log=log)
        ctx.deadlines = Deadlines(ctx.node.round_timeout_s)
        s = cls(ctx)
        self.peers[me], self.names[me], self.logs[me], self.gates[me] = s, name, lines, gate
        return s

    def ids(self) -> list[str]:
        return sorted(self.peers)

    def freeze(self, peer: str) -> None:
        """As SIGSTOP (p2pd included): its links go black (messages wait) and its compute stops."""
        self.gates[peer].clear()
        for other in self.peers:
            if other != peer:
                self.net.partition(peer, other)

    def thaw(self, peer: str) -> None:
        self.net.heal()
        self.gates[peer].set()

    def kill(self, peer: str) -> None:
        self.gone.add(peer)
        self.net.kill(peer)

    async def run(self) -> dict[str, asyncio.Task]:
        for s in self.peers.values():
            await s.start()
        return {p: self.net.spawn(p, s.run()) for p, s in self.peers.items()}


def run(coro, limit_s: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, limit_s))


async def wait_until(cond: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def oks(s: Strategy) -> list[dict]:
    return [r for r in s.round_history if r["outcome"] == "ok"]


def history(s: Strategy) -> list[tuple]:
    return [(r["round"], r["outcome"], r["group_size"]) for r in s.round_history]


# ---------------------------------------------------------------------- diloco: frozen leader
def test_diloco_swarm_keeps_its_progress_when_a_frozen_leader_comes_back():
    """1. Three diloco peers (H=2) commit rounds of three. The leader (lowest id) is frozen: its
       links go black (messages wait, as on a SIGSTOPped p2pd) and its compute stops.
    2. The followers stop seeing it and commit 4+ rounds of two under the next lowest id.
    3. It is thawed (links healed, compute resumed), still the lowest id, with a stale φ.
    Result: it adopts the followers' φ (their join shows more merged work) instead of sending
    them to resync; the followers' committed round numbers never go backwards; all three end
    at max_steps with one φ and bit-identical weights."""
    H, max_steps = 2, 32

    async def go():
        net = InMemoryNetwork()
        swarm = Swarm(net)
        for name in "abc":
            swarm.add(name, DiLoCoStrategy, "diloco", inner_steps=H, max_steps=max_steps, **FAST)
        leader, *followers = swarm.ids()
        peers = swarm.peers
        tasks = await swarm.run()
        await wait_until(lambda: all(any(r["group_size"] == 3 for r in oks(peers[f])) for f in followers), 4,
                         "rounds of three")
        async def freeze_between_rounds(fn) -> bool:
            """At the leader's next apply: once the followers applied that round too (their commit
            replies are in), and before their next join, which then goes to the next leader."""
            if getattr(fn, "__name__", "") != "_apply":
                return False
            committed = peers[leader].round_no
            while not all(peers[f].round_no > committed for f in followers):
                await asyncio.sleep(0)  # each follower moves by at most one step meanwhile
            swarm.freeze(leader)
            return True

        swarm.before_compute[leader] = freeze_between_rounds
        await wait_until(lambda: not swarm.gates[leader].is_set(), 2, "the freeze")
        frozen_at = peers[leader].round_no
        start = max(peers[f].round_no for f in followers)
        await wait_until(lambda: all(sum(r["group_size"] == 2 and r["round"] >= start for r in oks(peers[f])) >= 4
                                     for f in followers), 10, "rounds of two without the leader")
        thawed_at = max(peers[f].round_no for f in followers)
        swarm.thaw(leader)
        await asyncio.wait_for(asyncio.gather(*tasks.values()), 10)
        await net.close()
        return swarm, leader, followers, frozen_at, thawed_at

    swarm, leader, followers, frozen_at, thawed_at = run(go(), 25)
    peers = swarm.peers
    assert thawed_at >= frozen_at + 4  # the followers really went on while it was frozen
    for f in followers:
        rounds = [r["round"] for r in oks(peers[f])]
        assert rounds == sorted(rounds), (swarm.names[f], history(peers[f]))
    log = swarm.logs[leader]
    assert any("holds more merged work" in line for line in log), log[-10:]
    # it adopted at the followers' round, not below it, and took part from then on
    assert any(r["outcome"] == "ok" and r["group_size"] == 3 and r["round"] >= thawed_at
               for r in peers[leader].round_history), history(peers[leader])
    assert len({s.ctx.trainer.param_hash() for s in peers.values()}) == 1
    assert len({s.phi_hash for s in peers.values()}) == 1
    assert all(s.ctx.trainer.step == max_steps for s in peers.values())
    # the page's panel reads the same history: the round table, φ, and how many rounds committed
    panel = peers[followers[0]].page_panel()
    facts = dict(panel.facts)
    assert panel.kind == "outer_rounds" and facts["φ hash"] == peers[followers[0]].phi_hash[:16]
    committed = sum(1 for r in peers[followers[0]].round_history[-200:] if r["outcome"] == "ok")
    assert facts["φ agreement"].startswith(f"{committed} of the last ")
    assert [row[0] for row in panel.rows] == [r["round"] for r in peers[followers[0]].round_history[-12:]]


# ---------------------------------------------------------------------- diloco: slow leader, quorum
def test_diloco_quorum_goes_on_without_a_slow_leader_which_then_downloads_the_commit():
    """1. Three diloco peers (H=4) with a deadline quorum (round_grace_s 0.15). After the first
       round the leader (lowest id) gets slow: 0.05 s per compute call, so its 4 steps take
       0.4 s, well past the grace window.
    2. The window opens at the first contributing join, so the fast peers' round freezes and
       commits without the leader, which coordinates it all the same.
    Result: the fast peers commit rounds of two led by the slow leader; the leader logs that
    its round committed without it and that it cut its local steps short, and resyncs from a
    member; the fast peers end at max_steps with one φ."""
    H, max_steps = 4, 32

    async def go():
        net = InMemoryNetwork()
        swarm = Swarm(net)
        ids = sorted(net.transport(n, run_id=RUN_ID).peer_id for n in "abc")
        slow_id = ids[0]
        for name in "abc":
            is_slow = net.peer_id(name) == slow_id
            swarm.add(name, DiLoCoStrategy, "diloco", inner_steps=H, max_steps=max_steps, round_grace_s=0.15,
                      delay_fn=(lambda: 0.05 if swarm.peers[slow_id].round_no >= 1 else 0.0) if is_slow
                      else (lambda: 0.0), **FAST)
        fast = [p for p in swarm.ids() if p != slow_id]
        tasks = await swarm.run()
        await asyncio.wait_for(asyncio.gather(*(tasks[p] for p in fast)), 8)
        await net.close()
        return swarm, slow_id, fast

    swarm, slow_id, fast = run(go(), 12)
    peers = swarm.peers
    for f in fast:
        pairs = [r for r in oks(peers[f]) if r["group_size"] == 2]
        assert len([r for r in pairs if r["peer"] == slow_id]) >= 3, history(peers[f])
        rounds = [r["round"] for r in oks(peers[f])]
        assert rounds == sorted(rounds) and len(set(rounds)) == len(rounds), history(peers[f])
    log = "\n".join(swarm.logs[slow_id])
    assert "committed without the leader" in log and "cutting my local steps short" in log, log[-2000:]
    assert any(r["outcome"] == "resync" for r in peers[slow_id].round_history), history(peers[slow_id])
    assert len({peers[f].ctx.trainer.param_hash() for f in fast}) == 1
    assert len({peers[f].phi_hash for f in fast}) == 1
    assert all(peers[f].ctx.trainer.step == max_steps for f in fast)


# ---------------------------------------------------------------------- streaming: dead leader
def test_streaming_diloco_retries_the_fragment_round_its_dead_leader_aborted():
    """1. Three streaming-diloco peers (H=4, P=2, τ=1: a fragment round every 2 steps) commit
       rounds of three.
    2. The leader (lowest id) is killed (handlers, streams and tasks gone) as the first member
       dials it its commit vote: the fragment round in flight aborts on both members.
    3. The round is retried at its apply step, under the next leader.
    Result: each member has an aborted round whose round number later commits, in a group of
    the two survivors led by the lowest surviving id (a retry, not a skip); both reach
    max_steps and end on one φ."""
    max_steps = 24

    async def go():
        net = InMemoryNetwork()
        swarm = Swarm(net)
        for name in "abc":
            swarm.add(name, StreamingDiLoCoStrategy, "streaming-diloco", inner_steps=4, fragments=2,
                      overlap_steps=1, mix_alpha=0.5, max_steps=max_steps, **FAST)
        leader, *members = swarm.ids()
        peers = swarm.peers
        tasks = await swarm.run()
        await wait_until(lambda: all(sum(r["group_size"] == 3 for r in oks(peers[m])) >= 2 for m in members), 4,
                         "fragment rounds of three")
        net.on_stream("round.commit", lambda caller, callee: swarm.kill(callee), callee=leader)
        await asyncio.wait_for(asyncio.gather(*(tasks[m] for m in members)), 8)
        await net.close()
        return swarm, leader, members, tasks[leader]

    swarm, leader, members, leader_task = run(go(), 12)
    peers = swarm.peers
    assert leader_task.cancelled()  # the kill really happened
    for m in members:
        h = peers[m].round_history
        retried = [r["round"] for i, r in enumerate(h) if r["outcome"] == "error" and any(
            later["outcome"] == "ok" and later["round"] == r["round"] and later["group_size"] == 2
            and later["peer"] == members[0] for later in h[i + 1:])]
        assert retried, history(peers[m])
        assert not any(r["outcome"] == "resync" for r in h), history(peers[m])
    assert len({peers[m].phi_hash for m in members}) == 1
    assert all(peers[m].ctx.trainer.step == max_steps for m in members)


# ---------------------------------------------------------------------- noloco: pairs and the odd one
def test_noloco_three_peers_pair_up_and_the_odd_one_skips():
    """1. Three noloco peers (H=5) train 50 steps: 10 pair rounds. Each pairs the sorted live
       peers by the round's seed (the real LeaderElection over the fake records), so each
       round has one pair and one odd peer.
    Result: every peer accounts for all 10 rounds; in every round exactly two peers exchanged,
    each naming the other, and the third skipped as the odd one out; the replicas end with
    three different weights (NoLoCo has no global commit)."""
    H, max_steps, rounds = 5, 50, 10

    async def go():
        net = InMemoryNetwork()
        swarm = Swarm(net)
        swarm.online_only = True
        for name in "abc":
            swarm.add(name, NoLoCoStrategy, "noloco", inner_steps=H, max_steps=max_steps, min_peers=3, **FAST)
        tasks = await swarm.run()
        await asyncio.wait_for(asyncio.gather(*tasks.values()), 8)
        await net.close()
        return swarm

    swarm = run(go(), 12)
    peers = swarm.peers
    for p, s in peers.items():
        assert len(s.round_history) == rounds, (swarm.names[p], history(s))
        assert [r["round"] for r in s.round_history] == list(range(1, rounds + 1)), history(s)
        assert s.ctx.trainer.step == max_steps
    for k in range(1, rounds + 1):
        this = {p: next(r for r in s.round_history if r["round"] == k) for p, s in peers.items()}
        paired = sorted(p for p, r in this.items() if r["outcome"] == "ok")
        assert len(paired) == 2, {swarm.names[p]: (r["outcome"], r["peer"][-8:]) for p, r in this.items()}
        a, b = paired
        assert this[a]["peer"] == b and this[b]["peer"] == a
        (odd,) = set(peers) - set(paired)
        assert this[odd]["outcome"] == "no_peers" and this[odd]["peer"] == ""
    assert len({s.ctx.trainer.param_hash() for s in peers.values()}) == 3  # NoLoCo replicas are not identical
    assert len({tuple(r["peer"] for r in s.round_history) for s in peers.values()}) > 1  # partners vary
    panel = next(iter(peers.values())).page_panel()
    assert panel.kind == "outer_rounds" and len(panel.rows) == rounds and dict(panel.facts)["distinct partners"] in "12"
