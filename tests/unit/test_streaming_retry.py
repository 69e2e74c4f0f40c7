"""An aborted streaming-diloco fragment round is retried with the Δ_f it was sent with, and
after the last attempt it is skipped without any local-only outer update.

The strategy runs its real send/apply code; only the round transaction is a stub that
replays scripted outcomes (the transaction itself is tested live in test_node_live.py)."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import torch

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.config import NodeConfig
from swarm_node.train.data import ByteDataset
from swarm_node.metrics import NodeMetrics
from swarm_node.train.model import GPTConfig
from swarm_node.strategies.lowcomm import streaming as streaming_diloco
from swarm_node.strategies.base import Progress
from swarm_node.protocol.averaging.transaction import RoundOutcome
from swarm_node.strategies.lowcomm.streaming import StreamingDiLoCoStrategy
from swarm_node.train.trainer import TrainConfig, build_trainer
from tests.fakes.context import settings

TINY = GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16)


class ScriptedRounds:
    """Answers run_round with the next scripted outcome and records every call."""

    def __init__(self, outcomes: list[RoundOutcome]):
        self.outcomes, self.calls = list(outcomes), []

    async def run_round(self, round_no, phi_hash, weight, vector, leader=None):
        self.calls.append((round_no, phi_hash, weight, vector.clone()))
        return self.outcomes.pop(0)


def _strategy(outcomes: list[RoundOutcome]) -> tuple[StreamingDiLoCoStrategy, ScriptedRounds]:
    ds = ByteDataset(torch.randint(0, 256, (4096,), dtype=torch.uint8))
    trainer = build_trainer(TINY, TrainConfig(batch_size=2, seed=0), ds, peer=1)
    cfg = NodeConfig(strategy="streaming-diloco", inner_steps=4, fragments=2, overlap_steps=1)

    async def compute(fn, *args):
        return fn(*args)

    ctx = SimpleNamespace(**settings(cfg, StreamingDiLoCoStrategy), spec=SimpleNamespace(run_id="r"), trainer=trainer, transport=None,
                          compute=compute, peer_id="me", metrics=NodeMetrics("streaming-diloco"), progress=Progress(),
                          should_stop=lambda: False, log=logging.getLogger("test"), peers=None,
                          deadlines=Deadlines(cfg.round_timeout_s))
    s = StreamingDiLoCoStrategy(ctx)
    s.rounds = ScriptedRounds(outcomes)
    with torch.no_grad():  # as if inner steps ran: θ differs from φ
        for p in s.params:
            p.add_(0.01)
    return s, s.rounds


def _rounds_by_outcome(s: StreamingDiLoCoStrategy) -> dict[str, float]:
    out = {}
    for metric in s.ctx.metrics.rounds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["outcome"]] = sample.value
    return out


def test_an_aborted_fragment_round_is_retried_with_the_same_delta_and_then_applied():
    aborted = RoundOutcome("aborted", detail="incomplete all-reduce; missing ['deadbeef']", group=["me", "x"],
                           leader="me")
    s, rounds = _strategy([aborted, None])  # the second outcome is filled in below, once Δ is known
    phi_before = [p.clone() for p in s.phi]
    f0 = s.frags[0]

    async def go():
        await s._maybe_send(2)  # H/P = 2: fragment 0 is sent after step 2 and applied at 2 + τ
        sent = s.pending[3].delta
        rounds.outcomes[-1] = RoundOutcome("committed", result=sent.clone(), group=["me", "x"], leader="me")
        await s._maybe_apply(3)

    asyncio.run(go())
    assert len(rounds.calls) == 2, "the aborted round was not retried"
    (r1, h1, w1, d1), (r2, h2, w2, d2) = rounds.calls
    assert (r1, h1, w1) == (r2, h2, w2) and torch.equal(d1, d2)
    assert not s.pending
    changed = [i for i in range(len(s.phi)) if not torch.equal(s.phi[i], phi_before[i])]
    assert changed and set(changed) <= set(f0), "the retried commit did not move φ of fragment 0 (only)"
    counts = _rounds_by_outcome(s)
    assert (counts["ok"], counts["error"], counts["resync"]) == (1.0, 1.0, 0.0)


def test_a_fragment_round_that_keeps_aborting_is_skipped_without_a_local_update():
    aborted = RoundOutcome("aborted", detail="group never froze", leader="me")
    s, rounds = _strategy([aborted] * streaming_diloco.FRAGMENT_ATTEMPTS)
    phi_before = [p.clone() for p in s.phi]
    theta_before = [p.detach().clone() for p in s.params]

    async def go():
        await s._maybe_send(2)
        await s._maybe_apply(3)

    asyncio.run(go())
    assert len(rounds.calls) == streaming_diloco.FRAGMENT_ATTEMPTS
    assert not s.pending
    assert all(torch.equal(a, b) for a, b in zip(s.phi, phi_before))
    assert all(torch.equal(a.detach(), b) for a, b in zip(s.params, theta_before))
    assert _rounds_by_outcome(s)["error"] == streaming_diloco.FRAGMENT_ATTEMPTS


def test_serving_state_never_waits_past_its_bound_for_a_step_that_holds_the_lock():
    """A peer asks for our state while our loop holds the step lock through a fragment round
    that keeps retrying (it may be waiting for that very peer). The snapshot guard gives up
    waiting after `in_flight_round` and serves anyway, with a warning, well before the
    requester's download deadline; a free lock is taken and released as before."""
    import time

    s, _ = _strategy([])
    s.ctx.deadlines = Deadlines(0.2)  # in_flight_round = 0.4 s, state_download = 0.6 s

    async def go() -> tuple[float, bool]:
        await s._step_lock.acquire()  # the loop, stuck in a retried round
        t0 = time.monotonic()
        async with s._snapshot_guard():
            waited = time.monotonic() - t0
        still_held = s._step_lock.locked()  # the guard must not release a lock it never took
        s._step_lock.release()
        async with s._snapshot_guard():
            assert s._step_lock.locked()
        return waited, still_held and not s._step_lock.locked()

    waited, ok = asyncio.run(go())
    assert 0.3 < waited < s.ctx.deadlines.state_download, waited
    assert ok
