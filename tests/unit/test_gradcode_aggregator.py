"""The gradcode aggregator's push handler, driven in-process with real wire messages: bad
coded gradients (non-finite, wrong shape or count, a spoofed worker index, an unknown plan)
are rejected and counted and change nothing; good ones decode the step to the exact mean;
a straggler's late reply is answered LATE and its lateness measured."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
import torch

from swarm_node.metrics import NodeMetrics
from swarm_node.protocol import codec
from swarm_node.protocol.pb import swarm_node_gradcode_pb2 as gc_pb
from swarm_node.strategies.base import Progress, StrategyContext
from swarm_node.strategies.gradcode.strategy import GradientCodingStrategy
from swarm_node.strategies.gradcode.round import CodedRound, chosen_stragglers, make_plan
from tests.fakes.context import settings

P = gc_pb.CodedPushReply.Status
SHAPES = [(3, 2), (4,)]
MEMBERS = ["peerA", "peerB", "peerC", "peerD"]  # frc, s=1: groups {A, B} and {C, D}


async def _announce(state: str) -> bool:
    return True


def _member(peer_id: str):
    return SimpleNamespace(peer_id=peer_id, record=SimpleNamespace(strategy="gradcode", state="online"))


def _strategy(others: list[str] = (), step: int = 0) -> GradientCodingStrategy:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    config = SimpleNamespace(round_timeout_s=2.0, gc_scheme="frc", gc_stragglers=1, seed=0, ttl_s=4.0, min_peers=1)
    ctx = StrategyContext(**settings(config, GradientCodingStrategy), spec=SimpleNamespace(run_id="t"), peer_id="peerA", transport=None,
                          peers=SimpleNamespace(others=lambda: [_member(p) for p in others],
                                                     left_since=lambda since, strategy=None: 0, now=lambda: 0.0,
                                                     announce=_announce),
                          metrics=NodeMetrics("gradcode"),
                          trainer=SimpleNamespace(parameters_list=lambda: params, step=step), compute=None,
                          progress=Progress(state="online"), should_stop=lambda: False, on_step=lambda: None,
                          log=logging.getLogger("test.gradcode"))
    return GradientCodingStrategy(ctx)


def _push(plan_id: str, worker: int, tensors: list[torch.Tensor], step: int = 5) -> list[gc_pb.CodedPush]:
    return [gc_pb.CodedPush(plan_id=plan_id, worker=worker, step=step, param_hash="h0", num_tensors=len(tensors),
                            chunk=chunk) for chunk in codec.tensors_to_chunks(tensors, codec.NONE, 1 << 20)]


def _send(strategy, msgs, caller: str):
    async def requests():
        for m in msgs:
            yield m

    async def collect():
        return [r async for r in strategy._rpc_push(requests(), caller)]

    return asyncio.run(collect())


def _rejected(strategy, reason: str) -> float:
    return strategy.ctx.metrics.rejected_messages.labels(reason=reason)._value.get()


def test_bad_pushes_are_rejected_counted_and_change_nothing():
    s = _strategy()
    rnd = s.rounds[5] = CodedRound(make_plan(5, 1, MEMBERS, "frc", 1, 0), timeout_s=30)
    pid = rnd.plan.plan_id
    good = [torch.ones(3, 2), torch.ones(4)]

    nan = [torch.full((3, 2), float("nan")), torch.ones(4)]
    [reply] = _send(s, _push(pid, 1, nan), "peerB")
    assert reply.status == P.PUSH_REJECTED and _rejected(s, "non_finite") == 1

    [reply] = _send(s, _push(pid, 1, [torch.ones(2, 3), torch.ones(4)]), "peerB")
    assert reply.status == P.PUSH_REJECTED and _rejected(s, "bad_shape") == 1

    [reply] = _send(s, _push(pid, 1, [torch.ones(3, 2)]), "peerB")
    assert reply.status == P.PUSH_REJECTED and _rejected(s, "bad_shape") == 2

    [reply] = _send(s, _push(pid, 0, good), "peerB")  # B claims A's worker slot
    assert reply.status == P.PUSH_REJECTED and "not" in reply.detail and _rejected(s, "malformed") == 1

    [reply] = _send(s, _push("not-a-plan", 1, good), "peerB")
    assert reply.status == P.PUSH_UNKNOWN_PLAN
    [reply] = _send(s, _push(pid, 1, good, step=6), "peerB")
    assert reply.status == P.PUSH_UNKNOWN_PLAN

    assert not rnd.arrivals and not rnd.buckets and not rnd.decoded


def test_good_pushes_decode_the_exact_mean_and_a_late_one_is_measured():
    s = _strategy()
    rnd = s.rounds[5] = CodedRound(make_plan(5, 1, MEMBERS, "frc", 1, 0), timeout_s=30)
    pid = rnd.plan.plan_id
    f_group0 = [torch.full((3, 2), 2.0), torch.arange(4.0)]  # g0 + g1, as A and B both compute it
    f_group1 = [torch.full((3, 2), 6.0), torch.ones(4)]      # g2 + g3
    [r] = _send(s, _push(pid, 0, f_group0), "peerA")
    assert r.status == P.PUSH_ACCEPTED and not rnd.decoded  # group {C, D} still missing
    [r] = _send(s, _push(pid, 3, f_group1), "peerD")
    assert r.status == P.PUSH_ACCEPTED and rnd.decoded  # one reply per group: done, B and C not needed
    assert torch.equal(rnd.result[0], torch.full((3, 2), 2.0))  # (2 + 6) / n=4
    assert torch.equal(rnd.result[1], (torch.arange(4.0) + 1) / 4)
    assert sorted(rnd.stragglers()) == ["peerB", "peerC"]
    m = s.ctx.metrics.registry
    assert m.get_sample_value("swarm_gradcode_decodes_total", {"outcome": "exact"}) == 1
    assert m.get_sample_value("swarm_gradcode_stragglers_sum") == 2
    [r] = _send(s, _push(pid, 1, f_group0), "peerB")
    assert r.status == P.PUSH_LATE
    assert m.get_sample_value("swarm_gradcode_straggler_lateness_seconds_count") == 1
    assert m.get_sample_value("swarm_straggler_events_total", {"reason": "late"}) == 1
    assert torch.equal(rnd.result[0], torch.full((3, 2), 2.0))  # a late reply changes nothing
    # the page's panel: the decode with its stragglers, and the late one counted
    panel = s.page_panel()
    facts = dict(panel.facts)
    assert panel.kind == "coded" and facts["stragglers seen"] == "1" and facts["decodes (as aggregator)"].startswith("exact 1")
    assert panel.rows == [[5, "frc", 1, 4, "peerB peerC", panel.rows[0][5]]]


def test_replies_from_a_different_replica_never_mix():
    s = _strategy()
    rnd = s.rounds[5] = CodedRound(make_plan(5, 1, MEMBERS, "frc", 1, 0), timeout_s=30)
    g = [torch.ones(3, 2), torch.ones(4)]
    assert rnd.add(0, "hashX", g) == "accepted"
    assert rnd.add(2, "hashY", g) == "accepted"  # decodable only if mixed across replicas
    assert not rnd.decoded
    assert rnd.add(3, "hashX", g) == "accepted"
    assert rnd.decoded and rnd.result_hash == "hashX"


def test_straggler_choice_is_shared_and_seeded():
    members = tuple(MEMBERS)
    picks = [chosen_stragglers(0, step, members, 1, 1.0) for step in range(40)]
    assert all(len(p) == 1 for p in picks)
    assert picks == [chosen_stragglers(0, step, members, 1, 1.0) for step in range(40)]  # same on every peer
    assert len({next(iter(p)) for p in picks}) == 4  # every member gets its turn
    half = [chosen_stragglers(0, step, members, 2, 0.5) for step in range(200)]
    assert 60 < sum(1 for p in half if p) < 140 and all(len(p) in (0, 2) for p in half)


@pytest.mark.parametrize("n,scheme,expect", [(4, "frc", "frc"), (3, "frc", "cyclic"), (1, "auto", "none")])
def test_plans_follow_the_group_size(n, scheme, expect):
    plan = make_plan(0, 1, MEMBERS[:n], scheme, 1, 0)
    assert plan.code.scheme == expect and plan.code.n == n
    assert plan.plan_id != make_plan(0, 2, MEMBERS[:n], scheme, 1, 0).plan_id  # a retry is a new plan


def test_an_aggregator_behind_the_swarm_catches_up_instead_of_waiting_out_the_deadline():
    """peerA has the lowest id, so it leads as soon as it is online, but it is at step 10
    while the others went on to 15 under the previous aggregator. Its own round can never
    decode: a request for 15 overtakes it, and peerA is sent to download peerB's state. A
    request for an old step peerA never decoded is answered RESYNC at once; once peerA has
    caught up, a round left at an older step releases its waiter. No decode counts as failed.
    A straggling aggregator (the others one step past a step it decoded) is not behind."""
    R = gc_pb.CodedRoundReply.Status
    s = _strategy(others=["peerB", "peerC", "peerD"], step=10)
    req = lambda step: gc_pb.CodedRoundRequest(run_id="t", step=step, param_hash="h0")  # noqa: E731

    async def scenario():
        mine = s._serve_round(req(10), "peerA")
        assert (await mine.__anext__()).status == R.CODED_PLAN
        waiting = asyncio.ensure_future(mine.__anext__())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        b = s._serve_round(req(15), "peerB")
        assert (await b.__anext__()).status == R.CODED_PLAN  # the swarm's step goes on
        reply = await asyncio.wait_for(waiting, 1.0)  # not the 2 s round timeout
        assert reply.status == R.CODED_RESYNC and reply.donor == "peerB", reply
        again = [r async for r in s._serve_round(req(10), "peerA")]
        assert [r.status for r in again] == [R.CODED_RESYNC] and again[0].donor == "peerB"
        old = [r async for r in s._serve_round(req(8), "peerC")]
        assert [r.status for r in old] == [R.CODED_RESYNC]
        d = s._serve_round(req(12), "peerD")  # a peer between the two: its round cannot decode either
        assert (await d.__anext__()).status == R.CODED_PLAN
        d_waiting = asyncio.ensure_future(d.__anext__())
        s.ctx.trainer.step = 15  # peerA downloaded peerB's state
        s._caught_up(15)
        assert (await asyncio.wait_for(d_waiting, 1.0)).status == R.CODED_RESYNC
        assert s._ahead is None
        mine = s._serve_round(req(15), "peerA")
        assert (await mine.__anext__()).status == R.CODED_PLAN  # peerA joins the swarm's round
        await b.aclose()
        await mine.aclose()

    asyncio.run(scenario())
    assert s.gm.decodes.labels(outcome="failed")._value.get() == 0

    straggler = _strategy(others=["peerB", "peerC", "peerD"], step=10)
    rnd = straggler.rounds[10] = CodedRound(make_plan(10, 1, ["peerA", *MEMBERS[1:]], "frc", 1, 0), timeout_s=30)
    for w in (1, 3):
        rnd.add(w, "h0", [torch.ones(3, 2), torch.ones(4)])
    assert rnd.decoded
    straggler._note_ahead(11, "peerB")
    assert straggler._ahead is None


def test_a_round_whose_aggregator_lost_the_role_releases_its_waiters():
    """peerA leads while peer0 (a lower id) is still joining. When peer0 goes online, peerA's
    open round cannot decode any more (the others now push to peer0): its waiters are told
    NOT_LEADER with the new aggregator within a role check, not after the round deadline,
    and the round is not counted as a failed decode."""
    R = gc_pb.CodedRoundReply.Status
    s = _strategy(others=["peer0", "peerB"], step=3)
    records = {m.peer_id: m for m in s.ctx.peers.others()}
    records["peer0"].record.state = "joining"
    s.ctx.peers.others = lambda: list(records.values())
    assert s.election.leader() == "peerA"

    async def scenario():
        mine = s._serve_round(gc_pb.CodedRoundRequest(run_id="t", step=3, param_hash="h0"), "peerA")
        assert (await mine.__anext__()).status == R.CODED_PLAN
        waiting = asyncio.ensure_future(mine.__anext__())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        records["peer0"].record.state = "online"
        reply = await asyncio.wait_for(waiting, 1.5)  # the round timeout is 2 s from creation
        assert reply.status == R.CODED_NOT_LEADER and reply.leader_hint == "peer0", reply

    asyncio.run(scenario())
    assert s.gm.decodes.labels(outcome="failed")._value.get() == 0
