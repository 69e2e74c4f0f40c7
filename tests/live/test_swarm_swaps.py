"""CheckFree+ swap schedule in the live swarm strategy (--checkfree-swaps), without a network
except the last test: part-wise stage math (body then head == full, gradients too), the
swapped route and the trainer's real `_run_route` driving workers through the real wire
encoding, the `part` field's validation (an unknown value is a counted rejection), the run
spec, and one live 3-stage swarm with swaps on: it trains, counts swapped micro-batches, and
a SIGKILLed only last-stage server is rebuilt by a CheckFree+ copy."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.config import NodeConfig
from swarm_node.lab.launcher import Swarm
from swarm_node.train.model import GPTConfig
from swarm_node.protocol import codec
from swarm_node.strategies.swarm import strategy as sw
from swarm_node.strategies.swarm.checkfree import body_order, stage_route, swapped_pairs
from swarm_node.strategies.swarm.stage import StageWorker
from swarm_node.strategies.swarm.wire import Op, Part, Status, encode_request, read_request, request_part

from tests.live.test_swarm_live import ARGS, _wait_metric, metric, start_one_two_one

CFG = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 16), generator=g), torch.randint(0, 256, (4, 16), generator=g)


def _grads(w: StageWorker) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in w.module.named_parameters() if p.grad is not None}


def test_last_stage_body_then_head_equals_full_with_gradients():
    h = torch.randn(4, 16, 32)
    _, y = _batch()
    full, split = (StageWorker(CFG, 0, 2, 3, lr=1e-3, accumulate=4) for _ in range(2))
    ref_out = full.forward(h)
    g_full, loss_full = full.backward(h, y)
    mid = split.forward(h, "body")
    assert mid.shape == h.shape
    torch.testing.assert_close(split.forward(mid, "head"), ref_out)
    g_mid, loss_split = split.backward(mid, y, "head")  # the head's backward computes the loss
    assert split.pending == 0  # the head part does not complete the micro-batch on this stage
    g_in, none = split.backward(h, g_mid, "body")
    assert none is None and split.pending == 1 == full.pending
    assert loss_split == pytest.approx(loss_full, abs=1e-6)
    torch.testing.assert_close(g_in, g_full, atol=1e-6, rtol=1e-5)
    a, b = _grads(full), _grads(split)
    assert sorted(a) == sorted(b) and any(k.startswith("lm_head") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_first_stage_embed_then_body_equals_full_with_gradients():
    x, _ = _batch(1)
    g = torch.randn(4, 16, 32)
    full, split = (StageWorker(CFG, 0, 0, 3, lr=1e-3, accumulate=4) for _ in range(2))
    e = split.forward(x, "embed")
    torch.testing.assert_close(split.forward(e, "body"), full.forward(x))
    assert full.backward(x, g)[0] is None
    g_e, _ = split.backward(e, g, "body")
    assert split.pending == 0
    assert split.backward(x, g_e, "embed")[0] is None and split.pending == 1  # ids have no gradient
    a, b = _grads(full), _grads(split)
    assert sorted(a) == sorted(b) and "tok_emb.weight" in a
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_parts_a_stage_lacks_are_refused():
    mid, last = StageWorker(CFG, 0, 1, 3, lr=1e-3), StageWorker(CFG, 0, 2, 3, lr=1e-3)
    with pytest.raises(ValueError, match="no head"):
        mid.forward(torch.randn(2, 16, 32), "head")
    with pytest.raises(ValueError, match="no embed"):
        last.forward(torch.randn(2, 16, 32), "embed")
    with pytest.raises(ValueError, match="unknown stage part"):
        last.forward(torch.randn(2, 16, 32), "tail")
    with pytest.raises(ValueError):  # a body-only backward takes activation grads, not targets
        last.backward(torch.randn(2, 16, 32), torch.randint(0, 256, (2, 16)).float(), "body")


def test_swapped_route_order():
    assert stage_route(3, 1, False) == [(0, "full"), (1, "full"), (2, "full")]
    assert stage_route(4, 0, True) == [(k, "full") for k in range(4)]
    # S == 3: the pairs (0,1) and (1,2) overlap, odd micro-batches alternate (checkfree.body_order)
    assert stage_route(3, 1, True) == [(0, "embed"), (1, "full"), (0, "body"), (2, "full")]
    assert stage_route(3, 3, True) == [(0, "full"), (2, "body"), (1, "full"), (2, "head")]
    assert [swapped_pairs(3, n, True) for n in range(6)] == [[], ["first"], [], ["last"], [], ["first"]]
    assert stage_route(4, 1, True) == [(0, "embed"), (1, "full"), (0, "body"), (3, "body"), (2, "full"),
                                       (3, "head")]
    assert swapped_pairs(4, 1, True) == ["first", "last"] and swapped_pairs(4, 1, False) == []
    assert stage_route(2, 1, True) == [(0, "embed"), (1, "body"), (0, "body"), (1, "head")]
    for S in range(1, 7):  # every body runs exactly once, in body_order
        for n in range(8):
            bodies = [k for k, part in stage_route(S, n, True) if part in ("full", "body")]
            assert bodies == body_order(S, n, True), (S, n)


def _assert_matches_reference(loss: float, logits: torch.Tensor, y: torch.Tensor, workers, ref) -> None:
    """The routed micro-batch's loss and every stage's gradients equal the hand-composed model's."""
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), abs=1e-6)
    for w, r in zip(workers, ref):
        a, b = _grads(r), _grads(w)
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=f"stage {w.index} {k}")


def _drive(route, workers, x, y):
    """The trainer's real `_run_route`, its remote calls served by `workers` through the real
    request encoding and validation (fp32 on the wire, so the result is exact)."""
    calls = []

    async def compute(fn, *a):
        return fn(*a)

    async def call(k, op, tensors, mb_id, part="full"):
        msgs = encode_request("run", op, k, mb_id, tensors, codec.NONE, part)

        async def rest():
            for m in msgs[1:]:
                yield m

        got = await read_request(msgs[0], rest(), run_id="run", max_numel=10**8, timeout_s=5)
        wire_part = request_part(msgs[0])
        calls.append((k, "fwd" if op == Op.STAGE_FORWARD else "bwd", wire_part))
        w = workers[k]
        if op == Op.STAGE_FORWARD:
            return SimpleNamespace(loss=0.0), [w.forward(got[0], wire_part)]
        g_or_y = got[1] if w.is_last and wire_part != "body" else got[1].float()
        grad, loss = w.backward(got[0], g_or_y, wire_part)
        return SimpleNamespace(loss=loss or 0.0), [grad]

    stub = SimpleNamespace(ctx=SimpleNamespace(compute=compute), worker=workers[0], _call=call)
    loss = asyncio.run(sw.SwarmStrategy._run_route(stub, route, x, y, "mb"))
    return loss, calls


def test_trainer_routes_the_swapped_last_pair_forward_and_backward():
    x, y = _batch(2)
    workers = [StageWorker(CFG, 0, k, 3, lr=1e-3, accumulate=4) for k in range(3)]
    loss, calls = _drive(stage_route(3, 3, True), workers, x, y)
    # forward: body(2) then body(1), the head's backward gives the loss; backward in reverse
    assert calls == [(2, "fwd", "body"), (1, "fwd", "full"), (2, "bwd", "head"), (1, "bwd", "full"),
                     (2, "bwd", "body")]
    # the same function by hand: embed+body(0) -> body(2) -> body(1) -> head(2)
    ref = [StageWorker(CFG, 0, k, 3, lr=1e-3, accumulate=4) for k in range(3)]
    m0, m1, m2 = (w.module for w in ref)
    logits = m2.head(m1.body(m2.body(m0(x))))
    _assert_matches_reference(loss, logits, y, workers, ref)
    assert [w.pending for w in workers] == [1, 1, 1]  # one micro-batch counted once per stage


def test_trainer_routes_the_swapped_first_pair_through_its_own_stage():
    x, y = _batch(3)
    workers = [StageWorker(CFG, 0, k, 3, lr=1e-3, accumulate=4) for k in range(3)]
    loss, calls = _drive(stage_route(3, 1, True), workers, x, y)
    assert calls == [(1, "fwd", "full"), (2, "bwd", "full"), (1, "bwd", "full")]  # stage 0 ran locally
    ref = [StageWorker(CFG, 0, k, 3, lr=1e-3, accumulate=4) for k in range(3)]
    m0, m1, m2 = (w.module for w in ref)
    logits = m2(m0.body(m1.body(m0.embed(x))))
    _assert_matches_reference(loss, logits, y, workers, ref)
    assert [w.pending for w in workers] == [1, 1, 1]


def test_unswapped_route_sends_what_it_always_sent():
    """Off: every call is FULL, and FULL is not written to the wire (bytes unchanged)."""
    t = [torch.randn(2, 4, 8)]
    plain = encode_request("run", Op.STAGE_FORWARD, 1, "m", t, codec.NONE)
    full = encode_request("run", Op.STAGE_FORWARD, 1, "m", t, codec.NONE, "full")
    assert [m.SerializeToString() for m in plain] == [m.SerializeToString() for m in full]
    assert not plain[0].HasField("chunk") or plain[0].part == Part.STAGE_PART_FULL
    body = encode_request("run", Op.STAGE_FORWARD, 1, "m", t, codec.NONE, "body")
    assert body[0].part == Part.STAGE_PART_BODY and request_part(body[0]) == "body"
    with pytest.raises(ValueError):
        encode_request("run", Op.STAGE_FORWARD, 0, "m", t, codec.NONE, "embed")  # trainer-local only


async def _empty():
    return
    yield  # noqa: unreachable: makes this an async generator


def test_unknown_part_is_a_counted_rejection():
    t = [torch.randn(2, 4, 8)]
    bad = encode_request("run", Op.STAGE_FORWARD, 1, "m", t, codec.NONE)
    bad[0].part = 7  # a value this version does not know (proto3 enums keep it)
    with pytest.raises(codec.CodecError) as e:
        asyncio.run(read_request(bad[0], _empty(), run_id="run", max_numel=10**6, timeout_s=1))
    assert e.value.reason == "malformed"
    state = encode_request("run", Op.STAGE_STATE, 1, "s", [], codec.NONE)
    state[0].part = Part.STAGE_PART_BODY
    with pytest.raises(codec.CodecError):
        asyncio.run(read_request(state[0], _empty(), run_id="run", max_numel=10**6, timeout_s=1))

    # the server: answers REJECTED and counts the reason (never raises)
    rejected: list[str] = []
    served: list[tuple[str, str]] = []
    w = StageWorker(CFG, 0, 1, 3, lr=1e-3)
    stub = SimpleNamespace(
        worker=w, serving=True, queue=0, max_numel=10**6, edge_copy=None,
        ctx=SimpleNamespace(node=SimpleNamespace(round_timeout_s=1.0), options=SimpleNamespace(swarm_backward_delay_s=0.0),
                            spec=SimpleNamespace(run_id="run"), deadlines=Deadlines(1.0)),
        sm=SimpleNamespace(served=SimpleNamespace(labels=lambda **kw: SimpleNamespace(
            inc=lambda: served.append((kw["op"], kw["outcome"]))))),
        _reject=rejected.append)

    def answer(msgs):
        async def reqs():
            for m in msgs:
                yield m

        async def collect():
            return [m async for m in sw.SwarmStrategy._rpc(stub, reqs(), "caller")]

        return asyncio.run(collect())

    h = [torch.randn(2, 16, 32)]
    for part in (7, Part.STAGE_PART_HEAD):  # unknown, and a head asked of a middle stage
        msgs = encode_request("run", Op.STAGE_FORWARD, 1, "m", h, codec.NONE)
        msgs[0].part = part
        out = answer(msgs)
        assert out[0].status == Status.STAGE_REJECTED, out[0]
    msgs = encode_request("run", Op.STAGE_STATE, 1, "s", [], codec.NONE)
    msgs[0].part = 5
    assert answer(msgs)[0].status == Status.STAGE_REJECTED
    assert rejected == ["malformed"] * 3 and served == [("forward", "rejected")] * 2


def test_run_spec_carries_the_flag_only_when_on():
    base = dict(strategy="swarm", run_id="r", n_layer=3, stages=3)
    off, on = NodeConfig(**base).run_spec(), NodeConfig(**base, checkfree_swaps=True).run_spec()
    assert "checkfree_swaps" not in off.canonical() and on.canonical()["checkfree_swaps"] is True
    assert off.digest() != on.digest()
    assert off.differences(on.canonical()) == ["checkfree_swaps: ours=False theirs=True"]


# ------------------------------------------------------------------------------------- live
@pytest.mark.timeout(300)
def test_live_swarm_with_swaps_trains_and_rebuilds_the_last_stage_by_a_checkfree_plus_copy(tmp_path):
    """1 trainer + 2 stage-1 servers + 1 stage-2 server, --checkfree-swaps: loss falls, swapped
    micro-batches of both pairs are counted; the only stage-2 server is SIGKILLed and a stage-1
    peer rebuilds stage 2 by CheckFree+'s copy (kind checkfree_plus), and training goes on."""
    args = [*ARGS, "--checkfree-swaps"]
    with Swarm(tmp_path, args) as swarm:
        trainer, s1, s2 = start_one_two_one(swarm)
        first_loss = float(trainer.wait_for(lambda s: s.get("step", 0) >= 1, 120, "a first step")["train_loss"])
        trainer.wait_for(lambda s: s.get("step", 0) >= 12, 120, "pipeline steps")
        last, first = (metric(trainer, "swarm_pipeline_swapped_microbatches_total", pair=p) for p in ("last", "first"))
        ok = metric(trainer, "swarm_pipeline_microbatches_total", outcome="ok")
        assert last >= 3 and first >= 3 and last + first <= ok / 2 + 1, (last, first, ok)
        # stage 2 served head-only and body-only backwards (the swapped last pair)
        assert metric(s2, "swarm_stage_requests_served_total", op="backward", outcome="ok") > ok
        time.sleep(4)  # > --stage-average-interval-s: stage-1 peers hold the head copy

        step = trainer.status()["step"]
        s2.kill()
        rebuilt = _wait_metric(s1, "swarm_checkfree_copy_recoveries_total", 1, 90, stage="2", kind="checkfree_plus")
        assert rebuilt is not None, "\n".join(n.log_text()[-1500:] for n in s1)
        assert metric(rebuilt, "swarm_pipeline_stage") == 2
        assert metric(rebuilt, "swarm_checkfree_recoveries_total", stage="2", method="copy") == 1
        assert metric(rebuilt, "swarm_checkfree_copy_recoveries_total", kind="naive") == 0
        # the swapped last pair now runs through the rebuilt stage: body(2) -> body(1) -> head(2)
        swapped = metric(trainer, "swarm_pipeline_swapped_microbatches_total", pair="last")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and metric(
                trainer, "swarm_pipeline_swapped_microbatches_total", pair="last") < swapped + 5:
            time.sleep(0.5)
        assert metric(trainer, "swarm_pipeline_swapped_microbatches_total", pair="last") >= swapped + 5, \
            trainer.log_text()[-3000:] + rebuilt.log_text()[-3000:]
        step = trainer.status()["step"]
        trainer.wait_for(lambda s: s.get("step", 0) >= step + 8, 120, "training after the rebuild")
        assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="lost") == 0
        last_loss = float(trainer.status()["train_loss"])
        assert last_loss < first_loss - 0.3, (first_loss, last_loss)
        print(f"swaps live: first loss {first_loss:.3f}, last loss {last_loss:.3f} at step "
              f"{trainer.status()['step']}")
