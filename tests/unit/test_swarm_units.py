"""swarm strategy pieces without a network: stage math (cross-replica backward), router
proportional share and failover bans, rebalancing rule, records and payload validation."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.train.model import GPTConfig, build_model
from swarm_node.protocol import codec
from swarm_node.protocol.records import RecordError
from swarm_node.strategies.swarm.rebalance import choose_start_stage, designated_mover, rebalance_target, recovery_targets
from swarm_node.strategies.swarm.router import NoPeers, StageRouter, round_robin
from swarm_node.strategies.swarm.stage import StageWorker
from swarm_node.strategies.swarm.wire import Op, StageRecord, encode_request, read_request
from tests.fakes.context import settings

CFG = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16)


def _pipeline(accumulate=1):
    return [StageWorker(CFG, 0, k, 3, lr=1e-3, accumulate=accumulate) for k in range(3)]


def test_pipeline_of_workers_matches_the_whole_model_gradient():
    """Forward on replica A, backward on replica B (same weights) == single-process reference."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 16))
    y = torch.randint(0, 256, (4, 16))
    ref = build_model(CFG, 0)
    _, loss = ref(x, y)
    loss.backward()
    a, b = _pipeline(), _pipeline()  # two replicas of every stage
    h0 = a[0].forward(x)
    h1 = a[1].forward(h0)
    g1, loss_b = b[2].backward(h1, y)  # last stage: recompute + loss + backward on replica B
    assert loss_b == pytest.approx(float(loss.detach()), abs=1e-6)
    # B's stage-1 grads before its step == reference grads of block 1: check via a fresh replica
    c1 = StageWorker(CFG, 0, 1, 3, lr=1e-3, accumulate=2)  # accumulate=2: keeps grads (no step yet)
    g0 = c1.backward(h0, g1)[0]
    for (name, p), q in zip(c1.module.blocks[0].named_parameters(), ref.blocks[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    g0_b = b[1].backward(h0, g1)[0]  # another replica of stage 1 gives the same input grads
    torch.testing.assert_close(g0, g0_b, atol=1e-7, rtol=0)
    c0 = StageWorker(CFG, 0, 0, 3, lr=1e-3, accumulate=2)
    c0.backward(x, g0)
    torch.testing.assert_close(c0.module.pos_emb.weight.grad, ref.pos_emb.weight.grad, atol=1e-6, rtol=1e-5)
    assert b[2].step == 1 and b[2].last_grad_norm is not None and b[2].last_grad_norm <= 1.0


def test_worker_rejects_bad_inputs():
    w = StageWorker(CFG, 0, 1, 3, lr=1e-3)
    with pytest.raises(ValueError):
        w.forward(torch.randint(0, 256, (2, 16)))  # ids to a middle stage
    with pytest.raises(ValueError):
        w.forward(torch.full((2, 16, 32), float("nan")))
    last = StageWorker(CFG, 0, 2, 3, lr=1e-3)
    with pytest.raises(ValueError):
        last.backward(torch.zeros(2, 16, 32), torch.full((2, 16), 300))  # targets outside the vocabulary


def _simulate(pick, rates, n_tasks):
    """Closed-loop discrete-event: each peer works FIFO at its rate; returns shares and makespan."""
    busy = {p: 0.0 for p in rates}
    counts = {p: 0 for p in rates}
    for _ in range(n_tasks):
        p = pick()
        busy[p] += 1.0 / rates[p]
        counts[p] += 1
    return {p: c / n_tasks for p, c in counts.items()}, max(busy.values())


def test_router_shares_work_in_proportion_to_speed():
    rates = {"a": 1.0, "b": 1.0, "c": 4.0}
    r = StageRouter(rng=random.Random(0))
    r.update({p: (1e12, 0.0) for p in rates})

    def pick():
        p = r.pick(1.0)
        r.report_ok(p, 1.0, 1.0 / rates[p])  # measured service time of one sample
        return p

    shares, makespan = _simulate(pick, rates, 20_000)
    for p, rate in rates.items():
        assert shares[p] == pytest.approx(rate / 6.0, abs=0.03)
    assert 20_000 / makespan >= 0.95 * 6.0
    _, rr_makespan = _simulate(round_robin(sorted(rates)), rates, 20_000)
    assert 20_000 / rr_makespan <= 0.6 * 6.0


def test_router_failover_bans_until_reannounce_and_new_peers_are_tried_soon():
    r = StageRouter(rng=random.Random(1))
    r.update({"a": (100.0, 0.0), "b": (100.0, 0.0)})
    for _ in range(50):
        r.report_ok(r.pick(1.0), 1.0, 0.01)
    r.report_error("a")
    assert all(r.pick(1.0) == "b" for _ in range(10))
    r.update({"a": (100.0, 0.0), "b": (100.0, 0.0)})  # same expiration: still banned
    assert r.pick(1.0) == "b"
    r.update({"a": (200.0, 0.0), "b": (200.0, 0.0)})  # re-announced: back
    assert "a" in {r.pick(1.0) for _ in range(10)}
    r.update({"a": (200.0, 0.0), "b": (200.0, 0.0), "c": (200.0, 0.0)})
    assert "c" in [r.pick(1.0) for _ in range(3)]  # a newcomer starts at the minimum virtual time
    r.update({})
    with pytest.raises(NoPeers):
        r.pick(1.0)


def test_rebalance_rule_converges_without_oscillation():
    peers = [5, 1, 3]  # non-trainer stages 1..3 of a 4-stage pipeline; stage 0 = trainers
    caps = [1.0] + [float(n) for n in peers]
    moves = 0
    for _ in range(20):
        moved = False
        for k in (1, 2, 3):
            if caps[k] >= 2:
                t = rebalance_target(caps, k, 1.0, 0.05)
                if t is not None:
                    caps[k] -= 1
                    caps[t] += 1
                    moves += 1
                    moved = True
                    break
        if not moved:
            break
    assert caps[1:] == [3.0, 3.0, 3.0] and moves == 2
    assert rebalance_target([1.0, 3.0, 3.0, 3.0], 1, 1.0, 0.05) is None  # balanced: stay
    assert choose_start_stage([2, 2, 0], [0, 0, 0]) == 2
    assert choose_start_stage([2, 3, 1], [0, 0, 0]) == 2
    # a stage served only by a trainer on loan comes before the least-capacity one (it goes home)
    assert choose_start_stage([1, 1, 1], [0, 5.0, 9.0], on_loan=[2]) == 2
    assert choose_start_stage([1, 0, 1], [0, 0, 9.0], on_loan=[2]) == 1  # an empty stage still first
    assert designated_mover({0: ["t1", "t2"], 1: [], 2: ["z", "y"]}) == "y"
    # no server stage can spare a peer: a spare trainer moves (the 4-peers-for-3-stages stall),
    # the one with the fewest training steps, so the most-trained stage-0 replica keeps training
    assert designated_mover({0: ["t1", "t2"], 1: [], 2: ["z"]}) == "t1"
    assert designated_mover({0: ["t1", "t2"], 1: [], 2: ["z"]}, {"t1": 90, "t2": 3}) == "t2"
    assert designated_mover({0: ["t1"], 1: [], 2: ["z"]}) is None  # never strand a stage, trainers' included
    assert designated_mover({0: ["t1", "t2"], 1: ["a", "b"], 2: []}) == "a"  # a server donor comes first


def test_stage_record_validation():
    rec = StageRecord("peerA", 1, "online", 12.5, 3, 7, 0.4, False)
    assert StageRecord.from_wire(rec.to_wire(), subkey="peerA", num_stages=3) == rec
    with pytest.raises(RecordError):
        StageRecord.from_wire(rec.to_wire(), subkey="peerB", num_stages=3)  # spoofed
    with pytest.raises(RecordError):
        StageRecord.from_wire(rec.to_wire(), subkey="peerA", num_stages=1)  # stage out of range
    with pytest.raises(RecordError):
        StageRecord.from_wire(b"\x93\x01\x02", subkey="peerA", num_stages=3)


async def _aiter(msgs):
    for m in msgs:
        yield m


def _read(msgs, run_id="r", max_numel=10_000):
    async def go():
        it = _aiter(msgs[1:])
        return await read_request(msgs[0], it, run_id=run_id, max_numel=max_numel, timeout_s=1.0)
    return asyncio.run(go())


def test_request_payload_validation():
    x = torch.randn(2, 4, 8)
    msgs = encode_request("r", Op.STAGE_FORWARD, 1, "m", [x], codec.FLOAT16)
    out = _read(msgs)
    torch.testing.assert_close(out[0], x, atol=1e-2, rtol=1e-2)
    q = encode_request("r", Op.STAGE_FORWARD, 1, "m", [x], codec.INT8_BLOCKWISE)
    assert (_read(q)[0] - x).norm() / x.norm() < 0.02
    with pytest.raises(codec.CodecError) as e:
        _read(encode_request("other", Op.STAGE_FORWARD, 1, "m", [x], codec.NONE))
    assert e.value.reason == "malformed"
    with pytest.raises(codec.CodecError) as e:
        _read(encode_request("r", Op.STAGE_FORWARD, 1, "m", [x, x], codec.NONE))  # wrong tensor count
    assert e.value.reason == "malformed"
    with pytest.raises(codec.CodecError) as e:
        _read(msgs, max_numel=10)
    assert e.value.reason == "too_large"
    bad = encode_request("r", Op.STAGE_FORWARD, 1, "m", [x], codec.NONE)
    bad[0].chunk.tensor.buffer = bad[0].chunk.tensor.buffer[:-3]  # truncated payload
    with pytest.raises(codec.CodecError):
        _read(bad)
    nan = encode_request("r", Op.STAGE_FORWARD, 1, "m", [torch.full((2, 4, 8), float("nan"))], codec.NONE)
    with pytest.raises(codec.CodecError) as e:
        _read(nan)
    assert e.value.reason == "non_finite"


def _server(stage: int = 1):
    """A SwarmStrategy serving `stage`, with an in-process context (no network)."""
    import logging
    from types import SimpleNamespace

    from swarm_node.config import NodeConfig
    from swarm_node.metrics import NodeMetrics
    from swarm_node.strategies.base import Progress
    from swarm_node.strategies.swarm.strategy import SwarmStrategy

    cfg = NodeConfig(strategy="swarm", n_layer=3, d_model=32, n_head=4, seq_len=16, batch_size=2, stages=3,
                     round_timeout_s=2.0)

    async def compute(fn, *a):
        return fn(*a)

    ctx = SimpleNamespace(**settings(cfg, SwarmStrategy), spec=cfg.run_spec(), peer_id="me", metrics=NodeMetrics("swarm"),
                          trainer=SimpleNamespace(model=None),  # the built-in GPT: stages come from the spec
                          compute=compute, progress=Progress(), log=logging.getLogger("t"), should_stop=lambda: False,
                          deadlines=Deadlines(cfg.round_timeout_s))
    s = SwarmStrategy(ctx)
    s.worker = StageWorker(GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16), 0, stage, 3, lr=1e-3)
    s.serving = True
    return s, ctx


def _serve(s, msgs):
    from swarm_node.strategies.swarm.wire import read_reply

    async def go():
        replies = s._rpc(_aiter(msgs), "caller")
        return await read_reply(replies, max_numel=10**7, max_tensors=1, timeout_s=2.0)
    return asyncio.run(go())


def _rejected(ctx, reason: str) -> float:
    return ctx.metrics.rejected_messages.labels(reason=reason)._value.get()


def test_stage_server_answers_and_rejects_bad_payloads_counting_them():
    from swarm_node.strategies.swarm.wire import Status

    s, ctx = _server(1)
    run = ctx.spec.run_id
    h = torch.randn(2, 16, 32)
    first, out = _serve(s, encode_request(run, Op.STAGE_FORWARD, 1, "m", [h], codec.FLOAT16))
    assert first.status == Status.STAGE_OK and out[0].shape == (2, 16, 32)
    first, out = _serve(s, encode_request(run, Op.STAGE_BACKWARD, 1, "m", [h, torch.randn(2, 16, 32)], codec.NONE))
    assert first.status == Status.STAGE_OK and out[0].shape == (2, 16, 32) and s.worker.step == 1
    # wrong tensor count -> malformed
    first, _ = _serve(s, encode_request(run, Op.STAGE_BACKWARD, 1, "m", [h], codec.NONE))
    assert first.status == Status.STAGE_REJECTED and _rejected(ctx, "malformed") == 1
    # NaN activations -> non_finite
    first, _ = _serve(s, encode_request(run, Op.STAGE_FORWARD, 1, "m", [torch.full((2, 16, 32), float("nan"))],
                                        codec.NONE))
    assert first.status == Status.STAGE_REJECTED and _rejected(ctx, "non_finite") == 1
    # wrong width -> bad_shape (the stage math refuses it before computing)
    first, _ = _serve(s, encode_request(run, Op.STAGE_FORWARD, 1, "m", [torch.randn(2, 16, 8)], codec.NONE))
    assert first.status == Status.STAGE_REJECTED and _rejected(ctx, "bad_shape") == 1
    # oversized claim -> too_large, before anything is allocated
    first, _ = _serve(s, encode_request(run, Op.STAGE_FORWARD, 1, "m", [torch.zeros(400, 64, 64)], codec.NONE))
    assert first.status == Status.STAGE_REJECTED and _rejected(ctx, "too_large") == 1
    # another stage -> WRONG_STAGE (not counted as a bad payload)
    first, _ = _serve(s, encode_request(run, Op.STAGE_FORWARD, 2, "m", [h], codec.NONE))
    assert first.status == Status.STAGE_WRONG_STAGE
    assert s.worker.step == 1  # nothing rejected touched the weights


def test_checkfree_retries_an_unreachable_neighbour_then_copies_the_one_that_answered():
    """A lost middle stage is rebuilt from both neighbours when both answer (wavg). When one
    stays unreachable through every retry, the stage copies the neighbour that answered (not its
    seeded init, which would throw away what the pipeline had learnt)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter

    from swarm_node.strategies.swarm import strategy as sw
    from swarm_node.strategies.swarm.checkfree import CheckFreeConfig

    workers = [StageWorker(CFG, 0, k, 3, lr=1e-3) for k in range(3)]
    lost = StageWorker(CFG, 0, 1, 3, lr=1e-3)  # the joiner taking stage 1, at its seeded init
    donor = StageWorker(CFG, 0, 1, 3, lr=1e-3)  # a stand-in middle stage whose body both neighbours share
    with torch.no_grad():
        for p in donor.module.parameters():
            p.add_(1.0)

    def run(reachable: set[int]) -> tuple[dict[str, int], int]:
        fetches: dict[int, int] = {0: 0, 2: 0}

        async def fetch(pid, j):
            fetches[j] += 1
            if j not in reachable:
                return None
            return donor.module.state_dict(), 0.5, 7, {}

        async def compute(fn, *a):
            return fn(*a)

        async def refresh():
            return None

        reg = CollectorRegistry()
        labelled = lambda name, *labels: Counter(name, name, list(labels), registry=reg)  # noqa: E731
        view = SimpleNamespace(online=lambda: {"peer": (SimpleNamespace(step=7), 0.0)})
        stub = SimpleNamespace(
            S=3, cf=CheckFreeConfig(), _own=None, views={0: view, 2: view}, _fetch_state=fetch,
            _refresh_views=refresh, worker=lost, edge_copy=None, totals={"recoveries": 0},
            sm=SimpleNamespace(stage_lost=labelled("lost", "stage"), neighbor_norm=SimpleNamespace(
                labels=lambda **kw: SimpleNamespace(set=lambda v: None)), cf_recoveries=labelled("cf", "stage", "method"),
                cf_duration=SimpleNamespace(observe=lambda v: None)),
            ctx=SimpleNamespace(peer_id="me", compute=compute, should_stop=lambda: False,
                                node=SimpleNamespace(announce_interval_s=0.01, ttl_s=0.025),
                                metrics=SimpleNamespace(recoveries=labelled("rec", "kind", "outcome")),
                                log=SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)))
        stub._source_state = lambda j: sw.SwarmStrategy._source_state(stub, j)
        asyncio.run(sw.SwarmStrategy._checkfree(stub, 1))
        methods = {s.labels["method"]: int(s.value) for m in reg.collect() if m.name == "cf"
                   for s in m.samples if s.name == "cf_total"}
        return methods, fetches[2]

    methods, _ = run({0, 2})
    assert methods == {"wavg": 1}
    methods, tries = run({0})
    assert methods == {"copy": 1} and tries == sw.RECOVERY_FETCH_ATTEMPTS
    body = {k: v for k, v in lost.module.state_dict().items() if k.startswith("blocks.")}
    assert all(torch.equal(v, donor.module.state_dict()[k]) for k, v in body.items())  # the copy, not the init


def test_a_stage_nobody_ever_served_is_filled_once_every_arriving_peer_had_time_to_announce():
    """Three peers joined together and all picked stage 1: stage 2 was never served. A server
    peer waits for late announcements (patience), then the designated mover fills it; a lost
    stage (served before) is filled at once; a trainer fills any empty stage."""
    never, lost = [False, True, False], [False, True, True]
    assert recovery_targets([2], 1, never, [0, 0, 2], patience_reads=6) == []  # peers may still be arriving
    assert recovery_targets([2], 1, never, [0, 0, 6], patience_reads=6) == [2]  # nobody came: spread out
    assert recovery_targets([2], 1, lost, [0, 0, 2], patience_reads=6) == [2]  # served, then lost
    assert recovery_targets([1, 2], 0, never, [0, 2, 2], patience_reads=6) == [1, 2]  # a trainer fills any


def test_a_stage_server_back_from_a_full_stop_serves_its_stage_from_the_checkpoint(tmp_path):
    """1. A stage-1 server takes one backward step (weights, Adam moments and step move).
    2. Its checkpoint state goes through a file, loaded as the node loads it (weights_only).
    3. A fresh strategy restores it and starts with nobody serving any stage.
    Result: it picks stage 1 again and serves it with the saved weights, moments and step, and the
    trainer step counter it had; a checkpoint of another pipeline shape is refused at restore,
    and one whose tensors do not fit leaves the stage as a fresh one (a warning, no crash)."""
    s, ctx = _server(1)
    run = ctx.spec.run_id
    h = torch.randn(2, 16, 32)
    _serve(s, encode_request(run, Op.STAGE_BACKWARD, 1, "m", [h, torch.randn(2, 16, 32)], codec.NONE))
    s.steps = 7
    torch.save({"strategy": s.checkpoint_state()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["strategy"]

    async def restart(state):
        t, _ = _server(1)
        t.worker, t.serving = None, False

        async def no_announce(*a, **k):
            return None
        t._announce = no_announce
        t.restore_checkpoint_state(state)
        k = await t._choose_stage()
        await t._take_stage(k, reason="start")
        return t, k

    t, k = asyncio.run(restart(saved))
    assert k == 1 and t.worker.index == 1 and t.worker.step == s.worker.step == 1 and t.steps == 7
    for a, b in zip(s.worker.module.state_dict().values(), t.worker.module.state_dict().values()):
        assert torch.equal(a, b)
    mine, theirs = s.worker.optimizer.state_dict()["state"], t.worker.optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[i]["exp_avg"], theirs[i]["exp_avg"]) for i in mine)

    with pytest.raises(ValueError, match="does not fit"):
        _server(1)[0].restore_checkpoint_state({**saved, "stage": 5})
    misfit = {**saved, "stage_tensors": [x[..., :1] if x.dim() > 1 else x for x in saved["stage_tensors"]]}
    t, k = asyncio.run(restart(misfit))
    assert k == 1 and t.worker.step == 0  # served from the seed, as a new stage


def test_a_trainer_measures_held_out_loss_through_the_pipeline_and_a_server_does_not():
    """A 3-stage pipeline: the trainer runs stage 0 and calls stages 1 and 2 (forward, whole
    stages). Result: its held-out loss is the cross-entropy of the composed stages on the held-out
    windows, not the local model's; a stage server reports nothing (None), and so does a trainer
    whose next stage cannot be reached."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from swarm_node.strategies.swarm.router import NoPeers
    from swarm_node.train.data import ByteDataset

    s, ctx = _server(0)
    data = ByteDataset(torch.randint(0, 256, (8192,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8))
    ctx.trainer = SimpleNamespace(dataset=data)
    cfg = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16)
    others = {k: StageWorker(cfg, 0, k, 3, lr=1e-3) for k in (1, 2)}
    for w in others.values():  # trained a little, so they differ from what the seed builds
        with torch.no_grad():
            for p in w.module.parameters():
                p.add_(0.01 * torch.randn_like(p))
    calls = []

    async def call(k, op, tensors, mb_id, part="full"):
        calls.append((k, op, part))
        return None, [others[k].forward(tensors[0], part)]
    s._call = call

    got = asyncio.run(s.evaluate())
    want = []
    for x, y in data.val_batches(ctx.spec.batch_size, ctx.spec.seq_len, 8):
        logits = others[2].forward(others[1].forward(s.worker.forward(x)))
        want.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))
    assert got == pytest.approx(sum(want) / len(want), rel=1e-6)
    assert calls[:2] == [(1, Op.STAGE_FORWARD, "full"), (2, Op.STAGE_FORWARD, "full")] and len(calls) == 16

    async def unreachable(*a, **k):
        raise NoPeers("stage 1 has no peers")
    s._call = unreachable
    assert asyncio.run(s.evaluate()) is None
    server, _ = _server(1)
    assert asyncio.run(server.evaluate()) is None


def test_a_checkpointed_stage_far_behind_its_neighbours_is_rebuilt_instead():
    from swarm_node.strategies.swarm.strategy import saved_stage_is_stale

    assert not saved_stage_is_stale(40, [])  # a full stop: nobody back yet
    assert not saved_stage_is_stale(40, [41, 44])  # neighbours back from the same moment
    assert not saved_stage_is_stale(400, [430])  # within 10 %
    assert saved_stage_is_stale(0, [300])  # a crash with an old checkpoint: CheckFree from them
    assert saved_stage_is_stale(100, [300])
