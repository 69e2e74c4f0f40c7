"""sync joiners, in-process: a joiner pushes like any follower and the leader's step and hash check
decides whether it must download the leader's state first (never a silent fork); the leader does not
wait out the round timeout for a peer it told to resync, nor close a round opened by an early push
without the peers it sees by the time it leads."""
from __future__ import annotations

import asyncio
import time

import torch

from swarm_node.protocol import codec
from swarm_node.protocol.pb import swarm_node_wire_pb2 as wire
from swarm_node.protocol.averaging.star import GatherRound
from swarm_node.strategies.sync import Status, SyncStrategy
from swarm_node.train.trainer import StepResult

from tests.unit.test_quorum import _ctx


def _result(step: int = 0) -> StepResult:
    return StepResult(step=step, loss=1.0, grads=[torch.ones(3)], num_samples=4, duration_s=0.0)


async def _push(s: SyncStrategy, caller: str, *, step: int = 0, param_hash: str = "h") -> list[wire.SyncReply]:
    async def requests():
        for chunk in codec.tensors_to_chunks([torch.full((3,), 2.0)], codec.NONE, 1 << 20):
            yield wire.SyncPush(run_id="t", step=step, param_hash=param_hash, num_samples=4, num_tensors=1,
                                chunk=chunk)

    return [r async for r in s._rpc_push(requests(), caller)]


def test_excused_peer_is_not_waited_for():
    async def go():
        rnd = GatherRound(step=0, expected={"a", "b", "c"})
        rnd.leader_ready.set()
        rnd.add("a", [torch.ones(1)], 1)
        rnd.add("b", [torch.ones(1)], 1)
        assert not rnd.closed.is_set()
        rnd.excuse("c")
        assert rnd.closed.is_set() and set(rnd.contributions) == {"a", "b"}

    asyncio.run(go())


def test_a_joiner_pushes_instead_of_downloading_unasked():
    """A joiner (state joining) under an online leader: reduce() goes straight to the push; the
    download happens only if the leader answers RESYNC."""
    ctx = _ctx(["a"])  # "a" is online and sorts before "me": the leader
    ctx.progress.state = "joining"
    s = SyncStrategy(ctx)
    calls = []

    async def follow(leader, result):
        calls.append(("push", leader))
        return [torch.ones(3)], "ok", 2

    async def resync(leader, why):  # pragma: no cover - must not be reached
        calls.append(("download", leader))

    s._follow, s._resync = follow, resync
    update = asyncio.run(s.reduce(_result()))
    assert calls == [("push", "a")] and update is not None
    assert ctx.progress.state == "online"


def test_leader_tells_a_differing_joiner_to_resync_and_does_not_wait_for_it():
    """Leader "a" (me) expects x and y. x pushes from another replica: RESYNC, and it does not
    contribute. y pushes from the same replica. Result: the round closes with a and y at once, not
    at the 5 s round timeout."""
    ctx = _ctx(["x", "y"], timeout_s=5.0)
    s = SyncStrategy(ctx)
    assert s.leader() == "me"

    async def go():
        lead = asyncio.ensure_future(s._lead(_result()))
        await asyncio.sleep(0.05)
        bad = await _push(s, "x", param_hash="other")
        assert [r.status for r in bad] == [Status.SYNC_STATUS_RESYNC] and "hash" in bad[0].detail
        good = await _push(s, "y")
        assert good and all(r.status == Status.SYNC_STATUS_OK for r in good)
        return await lead

    t0 = time.monotonic()
    update, outcome, size = asyncio.run(go())
    assert time.monotonic() - t0 < 2.0
    assert outcome == "ok" and size == 2 and set(s.rounds[0].contributions) == {"me", "y"}
    torch.testing.assert_close(update[0], torch.full((3,), 1.5))


def test_a_stale_joiner_is_told_to_resync_and_excused_from_the_open_round():
    ctx = _ctx(["x", "y"], step=10, timeout_s=5.0)
    s = SyncStrategy(ctx)

    async def go():
        lead = asyncio.ensure_future(s._lead(_result(step=10)))
        await asyncio.sleep(0.05)
        stale = await _push(s, "x", step=0)
        assert [r.status for r in stale] == [Status.SYNC_STATUS_RESYNC]
        assert "x" not in s.rounds[10].expected and not s.rounds[10].closed.is_set()  # y still expected
        await _push(s, "y", step=10)
        return await lead

    t0 = time.monotonic()
    _, outcome, size = asyncio.run(go())
    assert time.monotonic() - t0 < 2.0 and (outcome, size) == ("ok", 2)


def test_a_round_opened_by_an_early_push_expects_the_peers_seen_when_leading():
    """A follower's push opens round 0 while the leader's view still holds nobody else; by the time
    the leader leads it sees x too. Result: the round waits for x (here: times out without it)
    instead of closing at once with the leader alone."""
    others: list[str] = []
    ctx = _ctx(others, timeout_s=0.3)
    ctx.peers.others = lambda: [type("M", (), {"peer_id": p, "record": type("R", (), {
        "strategy": "sync", "state": "joining"})})() for p in others]
    ctx.progress.state = "joining"
    s = SyncStrategy(ctx)
    s._round(0)  # what an early push does
    assert s.rounds[0].expected == {"me"}
    others.append("x")
    s.quorum.fixed = 1
    _, outcome, size = asyncio.run(s._lead(_result()))
    assert "x" in s.rounds[0].expected and (outcome, size) == ("ok", 1)
    assert s.ctx.metrics.stragglers._value.get() == 1  # closed at the timeout, without x
