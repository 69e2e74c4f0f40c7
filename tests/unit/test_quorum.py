"""The run-long quorum of sync and gradcode, in-process: the rule, graceful leaves seen in the
membership, the wait (state, phase inputs, metrics) and the sync leader refusing to commit a
round below the quorum. The live behaviour (a partitioned peer holds still and rejoins without a
fork) is in tests/churn (network namespaces)."""
from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import torch

from swarm_node.config import NodeConfig
from swarm_node.membership import Membership
from swarm_node.metrics import NodeMetrics
from swarm_node.protocol.records import PeerRecord
from swarm_node.strategies import base
from swarm_node.strategies.base import Progress, Strategy, StrategyContext
from swarm_node.strategies.gradcode.round import CodedRound, make_plan
from swarm_node.strategies.leader import LeaderElection
from swarm_node.strategies.quorum import QuorumRule, majority
from swarm_node.strategies.sync import SyncStrategy
from swarm_node.train.trainer import StepResult
from tests.fakes.context import settings


def test_majority_and_the_rule():
    assert [majority(n) for n in range(6)] == [1, 1, 2, 2, 3, 3]
    rule = QuorumRule()
    assert rule.needed() == 1  # nothing committed yet: --min-peers is the start barrier, not this
    rule.committed(4, at=100.0)
    assert rule.needed() == 3  # a 2-2 split: neither side steps
    assert rule.needed(left_since_commit=1) == 2  # one left gracefully: 3 remain, 2 of them suffice
    assert rule.needed(left_since_commit=3) == 1  # drained down to one: it goes on alone
    rule.committed(0, at=200.0)  # an empty group changes nothing
    assert (rule.last_group, rule.committed_at) == (4, 100.0)
    assert QuorumRule(fixed=1).needed() == 1 and QuorumRule(fixed=5).needed(left_since_commit=4) == 5
    # a peer that joined through --initial-peers (a restart, say) never trains alone before its first round
    assert QuorumRule(joined=True).needed() == 2


def test_with_nobody_online_the_most_advanced_replica_leads():
    """A swarm re-forming after a quorum loss: every peer is joining. The peer at the highest step
    leads (ties to the lowest id), so the others download its replica rather than it theirs;
    without prefer_progress (diloco, noloco) the lowest id leads as before."""
    def election(prefer: bool, my_step: int, others: dict[str, int]) -> str:
        members = [SimpleNamespace(peer_id=p, record=SimpleNamespace(strategy="sync", state="joining", step=st))
                   for p, st in others.items()]
        ctx = SimpleNamespace(peer_id="m", progress=Progress(state="joining"), node=SimpleNamespace(ttl_s=4.0),
                              trainer=SimpleNamespace(step=my_step),
                              peers=SimpleNamespace(others=lambda: members))
        return LeaderElection(ctx, "sync", prefer_progress=prefer).leader()

    assert election(True, 317, {"a": 10, "b": 0}) == "m"
    assert election(True, 10, {"a": 317, "b": 317}) == "a"
    assert election(True, 0, {"a": 0, "b": 0}) == "a"  # a fresh swarm: the lowest id, as always
    assert election(False, 317, {"a": 10, "b": 0}) == "a"


def _record(peer: str, state: str, strategy: str = "sync", spec_hash: str = "") -> bytes:
    return PeerRecord(peer_id=peer, state=state, spec_hash=spec_hash, strategy=strategy, role="trainer",
                      device="cpu", step=1, samples_per_s=1.0, software="t").to_wire()


def test_membership_counts_graceful_leaves_of_peers_it_had_seen():
    spec = NodeConfig(state_dir="/tmp/unused").run_spec()
    net = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "me"))
    ms = Membership(net, spec, NodeMetrics("sync"), ttl_s=4.0, make_record=None)
    now = time.time()

    def refresh(entries: dict[str, str]) -> None:
        items = {p: SimpleNamespace(value=_record(p, st, spec_hash=ms.spec_hash), expiration_time=now + 60)
                 for p, st in entries.items()}
        ms._update({m.peer_id: m for p, it in items.items() if (m := ms._parse(p, it, time.time()))})

    refresh({"a": "online", "b": "online", "c": "online"})
    t = time.time()
    assert ms.left_since(t - 1, "sync") == 0
    refresh({"a": "online", "b": "leaving", "c": "online", "x": "leaving"})  # x was never seen live
    assert ms.left_since(t - 1, "sync") == 1 and ms.left_since(t - 1, "gradcode") == 0
    assert ms.left_since(time.time() + 1, "sync") == 0  # only leaves after the given time count
    refresh({"a": "online", "b": "online", "c": "online"})  # b restarted under its identity: back
    assert ms.left_since(t - 1, "sync") == 0


def test_a_failed_membership_read_keeps_records_until_they_expire():
    """A DHT read that fails (a timeout toward a partitioned replica of the key) is no news: the
    view keeps every record until its own expiry, instead of emptying (which made the reachable
    side of a partition fall below the quorum too)."""
    spec = NodeConfig(state_dir="/tmp/unused").run_spec()

    async def failed_get(key):
        return None

    net = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "me"), get=failed_get)
    ms = Membership(net, spec, NodeMetrics("sync"), ttl_s=4.0, make_record=None)
    now = time.time()
    items = {"a": now + 60, "b": now - 1}  # b's record has expired
    ms._update({m.peer_id: m for p, exp in items.items() if (m := ms._parse(
        p, SimpleNamespace(value=_record(p, "online", spec_hash=ms.spec_hash), expiration_time=exp), now - 5))})
    assert {m.peer_id for m in ms.others()} == {"a"}
    asyncio.run(ms.refresh())
    assert {m.peer_id for m in ms.others()} == {"a"}


class _Gated(Strategy):
    name = "sync"
    quorum_gated = True

    async def run(self) -> None:  # pragma: no cover - not used
        pass


def _ctx(others: list[str], *, quorum: int = 0, step: int = 0, params=None, timeout_s: float = 2.0):
    def members():
        return [SimpleNamespace(peer_id=p, record=SimpleNamespace(strategy="sync", state="online")) for p in others]

    async def compute(fn, *args):
        return fn(*args)

    async def announce(state: str = "online", ttl_s=None) -> bool:
        return True

    membership = SimpleNamespace(others=members, left_since=lambda since, strategy=None: 0, now=time.time,
                                 announce=announce)
    config = SimpleNamespace(min_peers=1, quorum=quorum, round_timeout_s=timeout_s, ttl_s=4.0)
    params = params or [torch.nn.Parameter(torch.zeros(3))]
    trainer = SimpleNamespace(step=step, parameters_list=lambda: params, param_hash=lambda: "h")
    return StrategyContext(**settings(config), spec=SimpleNamespace(run_id="t"), peer_id="me", transport=None,
                           peers=membership, metrics=NodeMetrics("sync"), trainer=trainer, compute=compute,
                           progress=Progress(state="online"), should_stop=lambda: False, on_step=lambda: None,
                           log=logging.getLogger("test.quorum"))


def test_a_peer_below_the_quorum_waits_as_a_joiner_and_resumes_when_peers_return(monkeypatch):
    """1. A gated peer last committed a round of 4; it now sees itself and one other (2 < 3).
    2. For a short grace (0.2 s here) it still steps: a view short for a moment is no split.
    3. After that, wait_for_peers blocks: state joining (not eligible to lead), waiting_for says
       the counts, swarm_quorum_waiting = 1, one wait counted.
    4. Two peers come back into its view.
    Result: the wait returns True, the gauge drops to 0, and the state stays joining (a round
    must check the replica before the peer counts as online again)."""
    monkeypatch.setattr(base, "QUORUM_GRACE_S", 0.2)
    others = ["a"]
    ctx = _ctx(others)
    s = _Gated(ctx)
    s._quorum_reached = True
    s.quorum.committed(4, at=time.time())
    # a round of 4 committed just now is first-hand proof of 4 live peers, whatever records say
    assert s.quorum_counts() == (4, 3)
    s.quorum.committed(4, at=time.time() - 10)  # ... but not after a record lifetime (4 s here)
    assert s.quorum_counts() == (2, 3)

    async def go():
        assert await asyncio.wait_for(s.wait_for_peers(), 1) is True  # within the grace
        assert not ctx.progress.below_quorum and ctx.progress.state == "online"
        await asyncio.sleep(0.3)
        waiter = asyncio.ensure_future(s.wait_for_peers())
        await asyncio.sleep(0.7)
        assert not waiter.done()
        assert ctx.progress.below_quorum and ctx.progress.state == "joining"
        assert ctx.progress.waiting_for == "quorum: 2/3 peers"
        assert ctx.metrics.quorum_waiting._value.get() == 1 and ctx.metrics.quorum_needed._value.get() == 3
        others.extend(["b", "c"])
        assert await asyncio.wait_for(waiter, 3) is True

    asyncio.run(go())
    assert not ctx.progress.below_quorum and ctx.progress.waiting_for is None
    assert ctx.metrics.quorum_waiting._value.get() == 0 and ctx.metrics.quorum_waits._value.get() == 1
    assert ctx.progress.state == "joining"


def test_quorum_one_never_waits():
    ctx = _ctx([], quorum=1)
    s = _Gated(ctx)
    s._quorum_reached = True
    s.quorum.committed(4, at=time.time() - 10)
    assert asyncio.run(asyncio.wait_for(s.wait_for_peers(), 2)) is True
    assert not ctx.progress.below_quorum


def test_a_sync_leader_cut_off_from_its_group_does_not_commit_alone():
    """1. A sync leader whose last round had 3 contributors expects two followers that never push
       (they are on the other side of a partition); its round closes at the 0.3 s timeout.
    Result: with the majority rule nothing is applied (no_peers), the step's round is dropped so a
    retry starts fresh, and the round is counted; with --quorum 1 the same round commits."""
    def run(quorum: int):
        ctx = _ctx(["b", "c"], quorum=quorum, timeout_s=0.3)
        s = SyncStrategy(ctx)
        s.quorum.committed(3, at=time.time() - 10)
        result = StepResult(step=7, loss=1.0, grads=[torch.ones(3)], num_samples=4, duration_s=0.0)
        return s, asyncio.run(s._lead(result))

    s, (update, outcome, size) = run(quorum=0)
    assert (update, outcome, size) == (None, "no_peers", 1)
    assert 7 not in s.rounds
    s, (update, outcome, size) = run(quorum=1)
    assert outcome == "ok" and size == 1 and torch.equal(update[0], torch.ones(3))


def test_a_coded_round_decodes_only_with_the_replies_the_quorum_needs():
    """n = 2, s = 1: either reply alone decodes the step (each worker computed all of it). A cut-off
    aggregator whose plan still lists its partner must not decode from its own reply: with
    min_replies = 2 (the majority of a group of 2) it waits for the second, then decodes."""
    plan = make_plan(3, 1, ["a", "b"], "frc", 1, 0)
    g = [torch.full((2,), 4.0)]
    alone = CodedRound(plan, timeout_s=5)
    alone.add(0, "h", [t.clone() for t in g])
    assert alone.decoded
    guarded = CodedRound(plan, timeout_s=5, min_replies=2)
    guarded.add(0, "h", [t.clone() for t in g])
    assert not guarded.decoded
    guarded.add(1, "h", [t.clone() for t in g])
    assert guarded.decoded


def test_a_stale_sync_leader_whose_followers_are_a_step_ahead_catches_up_from_them():
    """After a heal, the lowest id may lead on a replica one step behind the others: nobody pushes
    its step (they push the next one, and wait for it to get there). Its round closes below the
    quorum; seeing early pushes for the next step, it downloads the state of one of those peers
    instead of retrying a step nobody will join."""
    from swarm_node.protocol.averaging.star import GatherRound

    ctx = _ctx(["b", "c"], timeout_s=0.3)
    s = SyncStrategy(ctx)
    s.quorum.committed(3, at=time.time() - 10)
    s.rounds[8] = GatherRound(step=8, expected={"me", "b", "c"}, early={"c", "b"})
    caught_up: list[tuple[str, str]] = []

    async def resync(peer: str, why: str) -> None:
        caught_up.append((peer, why))

    s._resync = resync
    result = StepResult(step=7, loss=1.0, grads=[torch.ones(3)], num_samples=4, duration_s=0.0)
    assert asyncio.run(s._lead(result)) == (None, "resync", 0)
    assert caught_up and caught_up[0][0] == "b" and "step 8" in caught_up[0][1]


def test_a_drained_peer_seen_leaving_just_before_the_commit_that_counted_it_lowers_the_bar():
    """Two peers commit; the other is drained: it announces LEAVING, then finishes that round,
    so its leave is seen a moment BEFORE the commit that still counted it. The one left must
    go on alone (a quorum of 1), not wait for a peer that said it is gone."""
    ctx = _ctx([])
    left_at = time.time()
    ctx.peers.left_since = lambda since, strategy=None: 1 if left_at >= since else 0
    s = _Gated(ctx)
    s.quorum.committed(2, at=left_at + 0.2)
    have, need = s.quorum_counts()
    assert need == 1, (have, need)
    s.quorum.committed(2, at=left_at + 60)  # a leave long before the last commit is not this group's
    assert s.quorum_counts()[1] == 2


def test_a_peer_that_says_it_is_not_the_leader_stops_counting_as_online_by_our_commit():
    """After a heal: we committed a round with x (so x counts as online for us, whatever its record
    says) while x went back to `joining` to have its replica checked. x has the lowest id, so we
    take it for the leader, and it takes us: each answers the other NOT_LEADER, forever. x's
    NOT_LEADER reply drops it from our commit set, and then we lead."""
    x = SimpleNamespace(peer_id="a-x", record=SimpleNamespace(strategy="sync", state="joining", step=245))
    ctx = SimpleNamespace(peer_id="m", progress=Progress(state="online"), node=SimpleNamespace(ttl_s=4.0),
                          trainer=SimpleNamespace(step=245), peers=SimpleNamespace(others=lambda: [x]))
    election = LeaderElection(ctx, "sync", prefer_progress=True)
    election.mark_committed(["m", "a-x"])
    assert election.leader() == "a-x"
    election.not_leader("a-x")
    assert election.leader() == "m"
