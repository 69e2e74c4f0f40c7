"""Production round code, run as several peers in one event loop over the in-memory transport.

Shown:
- The transport has the semantics of `Transport` on hivemind: chunked tensor lists arrive
  intact, with bytes counted on both ends. The handler learns who called. A dead peer, a
  missed deadline or a cut link raises PeerUnavailable. A cut link blocks only itself and
  delivers again once healed. A stream that breaks before any answer raises
  ClosedWithoutAnswer. A handler's exception reaches the caller.
- `ButterflyAllReduce` over libp2p streams among 3 peers (a weight-0 joiner among them):
  every peer holds the weighted mean, bit for bit the same on each.
- `RoundCoordinator` with 3 peers: a round commits one result everywhere. A member or the
  leader killed mid all-reduce makes every survivor abort, and the retry without it commits.
  A member cut off from the leader aborts while the other two commit, then it is sent to resync.
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import AsyncIterator

import pytest
import torch

from swarm_node.config import NodeConfig
from swarm_node.metrics import NodeMetrics
from swarm_node.protocol import codec
from swarm_node.protocol.averaging.butterfly import ButterflyAllReduce
from swarm_node.protocol.messages import wire
from swarm_node.protocol.transport import (MAX_MESSAGE, ClosedWithoutAnswer, PeerUnavailable, first_message,
                                           receive_tensor_list)
from swarm_node.protocol.averaging.transaction import RoundCoordinator, RoundOutcome, averaging_layer, tensor_digest
from tests.fakes.transport import FakeTransport, InMemoryNetwork
from tests.fakes.context import settings

WIRE_CAP = MAX_MESSAGE + 256  # a chunk plus its wrapper's fields: larger means chunking is broken


def run(coro, limit_s: float = 8.0):
    return asyncio.run(asyncio.wait_for(coro, limit_s))


async def collect(t: FakeTransport, peer: str, method: str, requests, reply_type, timeout_s: float = 2.0) -> list:
    return [r async for r in t.call(peer, method, requests, reply_type, timeout_s=timeout_s, channel="test")]


async def add_echo(t: FakeTransport, *, hold_s: float = 0.0, seen: list | None = None) -> None:
    """An `echo` handler: answers each request (a Pong-like SyncReply) after `hold_s`."""

    async def echo(requests: AsyncIterator[wire.SyncPush], caller: str) -> AsyncIterator[wire.SyncReply]:
        try:
            async for msg in requests:
                await asyncio.sleep(hold_s)
                yield wire.SyncReply(detail=f"{msg.run_id} from {caller[-8:]}", step=msg.step)
        finally:
            if seen is not None:
                seen.append(caller)

    await t.add_handler("echo", echo, wire.SyncPush, channel="test")


# ---------------------------------------------------------------------- transport semantics
def test_a_chunked_tensor_list_arrives_intact_and_both_ends_count_the_same_bytes():
    tensors = [torch.randn(600_000), torch.randn(3, 5), torch.zeros(0), torch.arange(7, dtype=torch.int64)]
    shapes = [tuple(t.shape) for t in tensors]

    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        a, b = net.transport("a"), net.transport("b")
        got: dict[str, object] = {}

        async def rpc_sum(requests: AsyncIterator[wire.SyncPush], caller: str) -> AsyncIterator[wire.SyncReply]:
            first = await first_message(requests, 1.0)
            got["caller"], got["tensors"] = caller, await receive_tensor_list(first, requests, 1.0, shapes)
            total = sum(float(t.double().sum()) for t in got["tensors"])
            yield wire.SyncReply(detail=repr(total))
            for chunk in codec.tensors_to_chunks(got["tensors"], codec.NONE, MAX_MESSAGE):
                yield wire.SyncReply(chunk=chunk)

        await b.add_handler("sum", rpc_sum, wire.SyncPush, channel="test")
        pushes = [wire.SyncPush(run_id="run", num_tensors=len(tensors), chunk=c) if i == 0 else wire.SyncPush(chunk=c)
                  for i, c in enumerate(codec.tensors_to_chunks(tensors, codec.NONE, MAX_MESSAGE))]
        replies = await collect(a, b.peer_id, "sum", pushes, wire.SyncReply)
        back = codec.ChunkAssembler.for_shapes(shapes)
        for r in replies[1:]:
            back.add(r.chunk)
        await net.close()
        return net, a, b, got, pushes, replies, back.result()

    net, a, b, got, pushes, replies, echoed = run(go())
    assert len(pushes) >= 3  # the big tensor really was cut into chunks
    assert got["caller"] == a.peer_id
    for sent, received, returned in zip(tensors, got["tensors"], echoed):
        assert torch.equal(sent, received) and torch.equal(sent, returned)
    assert float(replies[0].detail) == pytest.approx(sum(float(t.double().sum()) for t in tensors))
    assert a.bytes.get("tx", "test") == b.bytes.get("rx", "test") == sum(p.ByteSize() for p in pushes)
    assert b.bytes.get("tx", "test") == a.bytes.get("rx", "test") == sum(r.ByteSize() for r in replies)
    assert net.violations == []


def test_an_oversized_message_breaks_the_stream_and_is_recorded():
    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        a, b = net.transport("a"), net.transport("b")
        await add_echo(b)
        big = wire.SyncPush(param_hash="x" * (WIRE_CAP + 1))
        with pytest.raises(ClosedWithoutAnswer):
            await collect(a, b.peer_id, "echo", [big], wire.SyncReply)
        return net.violations

    violations = run(go())
    assert len(violations) == 1 and "SyncPush" in violations[0]


def test_a_killed_peer_ends_its_streams_and_cannot_be_called_or_call():
    """1. a calls b, whose handler holds the reply; b is killed meanwhile (its task with it).
    2. a calls b again; b calls c.
    Result: the open call ends without an answer (the caller must check completeness, as on
    hivemind), later calls raise PeerUnavailable, and b's spawned work is cancelled."""

    async def go():
        net = InMemoryNetwork()
        a, b, c = net.transport("a"), net.transport("b"), net.transport("c")
        seen: list[str] = []
        await add_echo(b, hold_s=0.5, seen=seen)
        await add_echo(c)
        b_work = net.spawn(b, asyncio.sleep(30))
        open_call = asyncio.create_task(collect(a, b.peer_id, "echo", [wire.SyncPush(run_id="r")], wire.SyncReply))
        await asyncio.sleep(0.1)
        net.kill(b)
        in_flight = await open_call
        with pytest.raises(PeerUnavailable) as later:
            await collect(a, b.peer_id, "echo", [wire.SyncPush()], wire.SyncReply)
        with pytest.raises(PeerUnavailable):
            await collect(b, c.peer_id, "echo", [wire.SyncPush()], wire.SyncReply)
        with pytest.raises(PeerUnavailable):
            await collect(a, a.peer_id, "echo", [wire.SyncPush()], wire.SyncReply)  # p2pd refuses to dial itself
        await asyncio.sleep(0)
        return in_flight, str(later.value), b_work.cancelled(), seen, a.peer_id

    in_flight, later, b_work_cancelled, seen, a_id = run(go())
    assert in_flight == [] and "failed echo" in later
    assert b_work_cancelled
    assert seen == [a_id]  # b's handler was cancelled, not left running


def test_a_missed_deadline_raises_peer_unavailable_and_cancels_the_handler():
    async def go():
        net = InMemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        seen: list[str] = []
        await add_echo(b, hold_s=5.0, seen=seen)
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable) as err:
            await collect(a, b.peer_id, "echo", [wire.SyncPush()], wire.SyncReply, timeout_s=0.3)
        took = time.monotonic() - t0
        await asyncio.sleep(0.05)
        ended_with_caller = list(seen)  # the held handler, 4.7 s before its reply was due
        # delay: 3 hops (dial, request, reply) of 0.1 s each on the a-b link
        net.delay(b, 0.1)
        await add_echo(b, seen=seen)
        with pytest.raises(PeerUnavailable):
            await collect(a, b.peer_id, "echo", [wire.SyncPush()], wire.SyncReply, timeout_s=0.2)
        t1 = time.monotonic()
        slow = await collect(a, b.peer_id, "echo", [wire.SyncPush(step=3)], wire.SyncReply, timeout_s=1.0)
        return str(err.value), took, ended_with_caller, slow, time.monotonic() - t1

    why, took, ended_with_caller, slow, slow_s = run(go())
    assert "missed the 0.3s deadline for echo" in why and 0.29 <= took < 0.6
    assert len(ended_with_caller) == 1  # the handler was cancelled when its caller gave up
    assert [r.step for r in slow] == [3] and 0.29 <= slow_s < 0.6


def test_a_partition_blocks_only_the_cut_link_and_holds_messages_until_healed():
    async def go():
        net = InMemoryNetwork()
        a, b, c = (net.transport(n) for n in "abc")
        for t in (a, b, c):
            await add_echo(t)
        net.partition(a, b)
        with pytest.raises(PeerUnavailable):
            await collect(a, b.peer_id, "echo", [wire.SyncPush()], wire.SyncReply, timeout_s=0.3)
        with pytest.raises(PeerUnavailable):
            await collect(b, a.peer_id, "echo", [wire.SyncPush()], wire.SyncReply, timeout_s=0.3)
        others = [await collect(x, y.peer_id, "echo", [wire.SyncPush(step=1)], wire.SyncReply)
                  for x, y in ((a, c), (c, a), (b, c), (c, b))]
        pending = asyncio.create_task(collect(a, b.peer_id, "echo", [wire.SyncPush(step=2)], wire.SyncReply))
        await asyncio.sleep(0.2)
        assert not pending.done()
        net.heal(a, b)
        return others, await pending

    others, healed = run(go())
    assert all([r.step for r in replies] == [1] for replies in others)
    assert [r.step for r in healed] == [2]


def test_a_stream_dying_mid_way_and_a_failing_handler_reach_the_caller_as_on_the_wire():
    async def go():
        net = InMemoryNetwork()
        a, b = net.transport("a"), net.transport("b")
        seen: list[str] = []
        await add_echo(b, seen=seen)

        async def broken(requests, caller):
            await first_message(requests, 1.0)
            raise RuntimeError("bad shard index")
            yield  # an async generator, as every handler is

        await b.add_handler("broken", broken, wire.SyncPush, channel="test")
        many = [wire.SyncPush(step=i) for i in range(5)]
        net.drop_after(2, a, b, method="echo")  # the request stream dies before the 3rd message
        with pytest.raises(ClosedWithoutAnswer):
            await collect(a, b.peer_id, "echo", many, wire.SyncReply)
        intact = await collect(a, b.peer_id, "echo", many, wire.SyncReply)  # the rule broke one stream
        net.drop_after(3, b, method="echo")  # dies after both requests and the first reply
        partial = await collect(a, b.peer_id, "echo", many[:2], wire.SyncReply)
        with pytest.raises(PeerUnavailable) as failed:
            await collect(a, b.peer_id, "broken", [wire.SyncPush()], wire.SyncReply)
        return intact, partial, str(failed.value)

    intact, partial, failed = run(go())
    assert [r.step for r in intact] == [0, 1, 2, 3, 4]
    assert [r.step for r in partial] == [0]  # what arrived before the break; the caller checks completeness
    assert "bad shard index" in failed


# ---------------------------------------------------------------------- all-reduce
def test_butterfly_allreduce_over_p2p_streams_gives_every_peer_the_weighted_mean():
    """1. Three peers, vectors of 0.9 M floats (shards of two 1 MiB chunks, uneven split),
       weights 1, 2.5 and 0 (a joiner), libp2p-stream data path.
    Result: each peer's outcome is complete with 3 contributors per shard, every result is
    the same bits, and equals Σwx/Σw computed directly."""
    n = 900_001
    weights = [1.0, 2.5, 0.0]
    vectors = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        peers = [net.transport(name) for name in "abc"]
        layers = [ButterflyAllReduce(t, timeout_s=3.0, transport_mode="p2p", segment_elems=50_000) for t in peers]
        for layer in layers:
            await layer.start()
        group = sorted(t.peer_id for t in peers)
        outs = await asyncio.gather(*(layer.run("g1", group, v, w) for layer, v, w in zip(layers, vectors, weights)))
        return net, peers, outs

    net, peers, outs = run(go(), 20)
    expected = sum(w * v.double() for w, v in zip(weights, vectors)) / sum(weights)
    for out in outs:
        assert out.complete and out.contributors_per_shard == [3] * 3 and out.failed == []
        assert sorted(out.paths) == ["local", "p2p", "p2p"]
        assert torch.equal(out.result, outs[0].result)
        torch.testing.assert_close(out.result.double(), expected, rtol=1e-5, atol=1e-5)
    for t in peers:  # 2(N-1)/N of the vector: 2 shards pushed, its own shard's mean sent to 2 members
        assert 4 / 3 * n * 4 < t.bytes.get("tx", "averaging") < 1.35 * n * 4
    assert net.violations == []


# ---------------------------------------------------------------------- round transactions
ROUND_TIMEOUT_S = 0.6
# below the leader's answer deadline for a join (grace + timeout - 1 s, at least 0.5 s): a
# window as long as that deadline would freeze the group only after every join had timed out
GRACE_S = 0.3


def _ctx(t: FakeTransport) -> SimpleNamespace:
    """What `averaging_layer` reads from a strategy's context: the node config and metrics."""
    return SimpleNamespace(**settings(NodeConfig(strategy="diloco", allreduce_transport="p2p")), transport=t,
                           metrics=NodeMetrics("diloco"))


async def _coordinators(net: InMemoryNetwork, names: str, alive: set[str],
                        state: dict[str, tuple[int, str]] | None = None) -> dict[str, RoundCoordinator]:
    """One RoundCoordinator per peer, as diloco wires it. The leader is the lowest id in
    `alive`; every peer there is expected. Each peer's (round, φ hash) is `state[peer]`,
    by default round 7 with one φ hash for all."""
    out = {}
    for name in names:
        t = net.transport(name)
        rc = RoundCoordinator(
            t, "run", timeout_s=ROUND_TIMEOUT_S, grace_s=GRACE_S,
            allreduce=averaging_layer(_ctx(t), timeout_s=ROUND_TIMEOUT_S),
            leader_fn=lambda: min(alive), expected_fn=lambda: set(alive),
            state_fn=(lambda: (7, "phi-7")) if state is None else (lambda p=t.peer_id: state[p]))
        await rc.start()
        out[t.peer_id] = rc
    return out


def _vectors(ids: list[str]) -> dict[str, tuple[float, torch.Tensor]]:
    return {p: (1.0 + i, torch.randn(1001, generator=torch.Generator().manual_seed(i))) for i, p in enumerate(ids)}


def _mean(parts: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    return (sum(w * v.double() for w, v in parts) / sum(w for w, _ in parts)).float()


async def _round(net: InMemoryNetwork, rcs: dict[str, RoundCoordinator], ids: list[str],
                 vecs: dict[str, tuple[float, torch.Tensor]], round_no: int = 7,
                 phi_hash: str = "phi-7") -> dict[str, RoundOutcome | None]:
    tasks = {p: net.spawn(p, rcs[p].run_round(round_no, phi_hash, *vecs[p])) for p in ids}
    done = await asyncio.gather(*tasks.values(), return_exceptions=True)
    return {p: None if isinstance(d, asyncio.CancelledError) else d for p, d in zip(tasks, done)}


def test_a_round_of_three_commits_the_same_weighted_mean_on_every_peer():
    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        ids = sorted(net.transport(n).peer_id for n in "abc")
        rcs = await _coordinators(net, "abc", set(ids))
        vecs = _vectors(ids)
        outs = await _round(net, rcs, ids, vecs)
        await net.close()
        return ids, vecs, outs

    ids, vecs, outs = run(go())
    want = _mean(list(vecs.values()))
    for p, out in outs.items():
        assert out.status == "committed", (p[-8:], out.detail)
        assert out.group == ids and out.leader == ids[0]
        assert out.result_hash == tensor_digest(out.result) == outs[ids[0]].result_hash
        torch.testing.assert_close(out.result, want)


@pytest.mark.parametrize("victim", ["member", "leader"])
def test_a_peer_killed_during_the_allreduce_aborts_the_round_everywhere_then_the_retry_commits(victim):
    """1. Three peers run round 7. When the victim (a member, or the leader = lowest id) opens
       its first shard stream, it is killed: its handlers vanish and its round task ends.
    2. The survivors run round 7 again, now expecting each other only: the lowest surviving
       id leads.
    Result: both survivors abort the first attempt with nothing to apply. A dead member leaves
    the all-reduce incomplete, and a dead leader also loses the commit vote. The retry commits
    the survivors' weighted mean, with the same hash on both."""

    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        ids = sorted(net.transport(n).peer_id for n in "abc")
        alive = set(ids)
        rcs = await _coordinators(net, "abc", alive)
        dead = ids[0] if victim == "leader" else ids[1]
        net.on_stream("allreduce.shard", lambda caller, callee: net.kill(caller), caller=dead)
        vecs = _vectors(ids)
        t0 = time.monotonic()
        first = await _round(net, rcs, ids, vecs)
        first_s = time.monotonic() - t0
        alive.discard(dead)
        survivors = sorted(alive)
        retry = await _round(net, rcs, survivors, vecs)
        await net.close()
        return ids, dead, survivors, vecs, first, first_s, retry

    ids, dead, survivors, vecs, first, first_s, retry = run(go())
    assert first[dead] is None  # killed: its task was cancelled
    for p in survivors:
        out = first[p]
        assert out.status == "aborted" and out.result is None, (p[-8:], out.status, out.detail)
        assert dead[-8:] in out.detail or "leader lost" in out.detail
        if victim == "leader":
            assert "leader lost during commit" in out.detail
        else:
            assert out.allreduce is not None and not out.allreduce.complete and dead in out.allreduce.failed
    assert first_s < 3 * ROUND_TIMEOUT_S + 1.0  # every wait is bounded by the round timeouts
    want = _mean([vecs[p] for p in survivors])
    for p in survivors:
        out = retry[p]
        assert out.status == "committed" and out.group == survivors and out.leader == survivors[0], out.detail
        assert out.result_hash == retry[survivors[0]].result_hash
        torch.testing.assert_close(out.result, want)


def test_a_member_cut_off_from_the_leader_aborts_the_others_commit_and_it_resyncs_after_healing():
    """1. Three peers at round 7; the link between the leader and member b is cut.
    2. b's join cannot reach the leader: it aborts after its join deadline (grace + timeout).
       The leader freezes the group without b once the grace window ends, and the others commit.
    3. The link heals; the two move to round 8; b joins round 7 again.
    Result: a round of two commits the pair's weighted mean, and b is told to resync from the
    leader up to round 8 (never a round on its stale state)."""

    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        ids = sorted(net.transport(n).peer_id for n in "abc")
        leader, cut, other = ids
        state = {p: (7, "phi-7") for p in ids}
        rcs = await _coordinators(net, "abc", set(ids), state)
        net.partition(leader, cut)
        vecs = _vectors(ids)
        first = await _round(net, rcs, ids, vecs)
        net.heal(leader, cut)
        state[leader] = state[other] = (8, "phi-8")
        late = await rcs[cut].run_round(7, "phi-7", *vecs[cut])
        await net.close()
        return ids, vecs, first, late

    (leader, cut, other), vecs, first, late = run(go())
    assert first[cut].status == "aborted" and "leader unreachable" in first[cut].detail
    want = _mean([vecs[leader], vecs[other]])
    for p in (leader, other):
        assert first[p].status == "committed" and first[p].group == [leader, other], first[p].detail
        torch.testing.assert_close(first[p].result, want)
    assert first[leader].result_hash == first[other].result_hash
    assert late.status == "resync" and late.leader == leader and late.round_no == 8, late


def test_a_leader_behind_a_member_with_more_work_commits_nothing_and_hands_over():
    """1. Two peers after a split, both at round 7: the leader (lowest id) holds a state with 5
       member-rounds of work, the member a different state with 9 (its side merged more).
    2. Both run their round.
    Result: the member is told the leader is behind (aborted, to retry), the leader's callback
    names the member to adopt from, and the leader's own join commits nothing: no local-only
    outer step on the stale side.
    3. The leader adopts the member's state (same round number), and both run round 7 again.
    Result: it commits on both. The handed-over round is over, not pending: a round left
    frozen with an empty group and no verdict turned every later join of that round number
    away ("joined after the group froze") until the peers stopped."""

    async def go():
        net = InMemoryNetwork(max_message_bytes=WIRE_CAP)
        ids = sorted(net.transport(n).peer_id for n in "ab")
        leader, member = ids
        state = {leader: (7, "stale"), member: (7, "fresh")}
        work = {leader: 5, member: 9}
        behind: list[str] = []
        rcs = {}
        for name in "ab":
            t = net.transport(name)
            rc = RoundCoordinator(
                t, "run", timeout_s=ROUND_TIMEOUT_S, grace_s=GRACE_S,
                allreduce=averaging_layer(_ctx(t), timeout_s=ROUND_TIMEOUT_S),
                leader_fn=lambda: leader, expected_fn=lambda: set(ids),
                state_fn=lambda p=t.peer_id: state[p], work_fn=lambda p=t.peer_id: work[p],
                on_behind=behind.append)
            await rc.start()
            rcs[t.peer_id] = rc
        vecs = _vectors(ids)
        tasks = {p: net.spawn(p, rcs[p].run_round(state[p][0], state[p][1], *vecs[p])) for p in ids}
        outs = dict(zip(tasks, await asyncio.gather(*tasks.values())))
        state[leader], work[leader] = state[member], work[member]  # the adoption
        tasks = {p: net.spawn(p, rcs[p].run_round(state[p][0], state[p][1], *vecs[p])) for p in ids}
        again = dict(zip(tasks, await asyncio.gather(*tasks.values())))
        await net.close()
        return leader, member, behind, outs, again

    leader, member, behind, outs, again = run(go())
    assert behind == [member]
    assert outs[member].status == "aborted" and "LEADER_BEHIND" in outs[member].detail
    assert outs[leader].status != "committed", outs[leader]
    for p in (leader, member):
        assert again[p].status == "committed", again[p].detail
    assert again[leader].result_hash == again[member].result_hash
