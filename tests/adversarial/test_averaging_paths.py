"""Byzantine payloads against the averaging paths that carry them, on the in-memory transport:
the butterfly all-reduce (diloco, streaming-diloco, swarm stage averaging) and the star gather
round (sync). One member of five sends x1000, sign-flipped x10 or NaN; under `mean` the result
is taken over, under `clipped` and `trimmed` it stays near the honest mean and the reducer names
the offender to its reporter. A NaN push is refused on the wire (codec) before any rule: the
round is incomplete, so nothing is committed. Not covered: a byzantine *reducer* decides its own
shard's result (verifying reductions, as BTARD does, is not built)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from swarm_node.protocol.averaging.butterfly import ButterflyAllReduce
from swarm_node.protocol.averaging.robust import Aggregation, AggregationRule, Combined
from swarm_node.protocol.averaging.star import GatherRound
from tests.fakes.transport import InMemoryNetwork

N = 12_001  # uneven shards, several segments each
PAYLOADS = {"x1000": lambda h: 1000 * h, "flip_x10": lambda h: -10 * h, "nan": lambda h: h.clone().fill_(float("nan"))}


def honest(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(N, generator=g)
    return [base + 0.3 * torch.randn(N, generator=g) for _ in range(k)]


def rel_err(x: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - target) / torch.linalg.vector_norm(target))


def butterfly(vectors: list[torch.Tensor], rule: AggregationRule) -> tuple[list, list[Combined], list[str]]:
    reports: list[Combined] = []

    async def go():
        net = InMemoryNetwork()
        peers = [net.transport(f"p{i}") for i in range(len(vectors))]
        layers = [ButterflyAllReduce(t, timeout_s=3.0, transport_mode="p2p", segment_elems=1000, rule=rule,
                                     report=reports.append) for t in peers]
        for layer in layers:
            await layer.start()
        group = sorted(t.peer_id for t in peers)
        ids.extend(t.peer_id for t in peers)
        return await asyncio.wait_for(asyncio.gather(
            *(layer.run("g", group, v, 1.0) for layer, v in zip(layers, vectors))), 20)

    ids: list[str] = []
    return asyncio.run(go()), reports, ids


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("mode", [a.value for a in Aggregation])
def test_butterfly_all_reduce_with_one_byzantine_member(payload, mode):
    h = honest(4)
    target = torch.stack(h).mean(0)
    outs, reports, ids = butterfly([*h, PAYLOADS[payload](h[0])], AggregationRule(Aggregation(mode)))
    if payload == "nan":  # refused on the wire (codec: non_finite) whatever the rule: the round is incomplete
        assert not any(out.complete for out in outs)
        return
    for out in outs:
        assert out.complete and torch.equal(out.result, outs[0].result)  # members still agree bit for bit
    result = outs[0].result
    if mode == "mean":
        assert reports == []
        assert rel_err(result, target) > 2
        return
    assert torch.isfinite(result).all() and rel_err(result, target) < 0.5
    caught = {p for r in reports for p in (*r.clipped, *r.dropped)}
    assert ids[4] in caught
    assert len(reports) == 5  # every reducer reports its shard once


@pytest.mark.parametrize("mode", ["clipped", "trimmed"])
def test_star_gather_round_with_one_byzantine_pusher(mode):
    h = honest(4)
    shapes = [(3, 4000), (1,)]

    def as_list(v: torch.Tensor) -> list[torch.Tensor]:
        return [v[:12000].reshape(3, 4000), v[12000:]]

    reports: list[Combined] = []
    rnd = GatherRound(1, {f"p{i}" for i in range(5)}, rule=AggregationRule(Aggregation(mode)), report=reports.append)
    for i, v in enumerate(h):
        rnd.add(f"p{i}", as_list(v), 32)
    rnd.add("p4", as_list(-1000 * h[0]), 10_000)  # a forged sample count too: weights cannot buy influence
    assert rnd.closed.is_set() and [tuple(t.shape) for t in rnd.result] == shapes
    result = torch.cat([t.reshape(-1) for t in rnd.result])
    assert rel_err(result, torch.stack(h).mean(0)) < 0.6
    assert "p4" in reports[0].clipped
    plain = GatherRound(1, {f"p{i}" for i in range(5)})
    for i, v in enumerate(h):
        plain.add(f"p{i}", as_list(v), 32)
    plain.add("p4", as_list(-1000 * h[0]), 10_000)
    assert rel_err(torch.cat([t.reshape(-1) for t in plain.result]), torch.stack(h).mean(0)) > 100


def test_a_stranger_joining_a_round_first_with_another_length_does_not_lock_the_members_out():
    """Round transactions: a stranger joins round 7 before anyone else, declaring a vector of
    another length. The length is the leader's own, so the stranger is refused and the three
    members commit their mean among themselves (the first joiner used to fix the length)."""
    from tests.fakes.transport import InMemoryNetwork as Net
    from tests.unit.test_fake_transport import _coordinators, _mean, _vectors

    async def go():
        net = Net()
        ids = sorted(net.transport(n).peer_id for n in "abc")
        stranger = net.transport("x").peer_id
        rcs = await _coordinators(net, "abcx", set(ids))
        vecs = _vectors(ids)
        early = net.spawn(stranger, rcs[stranger].run_round(7, "phi-7", 1.0, torch.zeros(999)))
        await asyncio.sleep(0.05)
        honest = {p: net.spawn(p, rcs[p].run_round(7, "phi-7", *vecs[p])) for p in ids}
        outs = dict(zip(honest, await asyncio.gather(*honest.values())))
        bad = await early
        await net.close()
        return ids, vecs, outs, bad

    ids, vecs, outs, bad = asyncio.run(asyncio.wait_for(go(), 20))
    for p, out in outs.items():
        assert out.status == "committed" and out.group == ids, (p[-8:], out.detail)
        torch.testing.assert_close(out.result, _mean(list(vecs.values())))
    assert bad.status != "committed" and "999 elements" in bad.detail
