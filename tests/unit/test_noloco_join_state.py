"""A NoLoCo joiner takes the donor's θ_j, φ_j and momentum δ_j through the state snapshot."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.config import NodeConfig
from swarm_node.train.data import ByteDataset
from swarm_node.train.model import GPTConfig
from swarm_node.strategies.lowcomm.noloco import NoLoCoStrategy
from swarm_node.protocol.averaging.state_transfer import StateTransferError, restore, snapshot
from swarm_node.train.trainer import TrainConfig, build_trainer
from tests.fakes.context import settings

TINY = GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16)


def _strategy(seed_shift: int) -> NoLoCoStrategy:
    ds = ByteDataset(torch.randint(0, 256, (4096,), dtype=torch.uint8))
    trainer = build_trainer(TINY, TrainConfig(batch_size=2, seed=0), ds, peer=seed_shift)
    ctx = SimpleNamespace(**settings(NodeConfig(strategy="noloco"), NoLoCoStrategy), trainer=trainer, transport=None, compute=None,
                          peer_id=f"p{seed_shift}", deadlines=Deadlines(20.0), spec=SimpleNamespace(run_id="r"))
    return NoLoCoStrategy(ctx)


def test_joiner_continues_the_donors_outer_trajectory():
    donor, joiner = _strategy(1), _strategy(2)
    donor.ctx.trainer.train_step()
    donor.phi = [torch.randn_like(p) for p in donor.phi]
    donor.momentum = [torch.randn_like(p) for p in donor.phi]
    meta, tensors = snapshot(donor.ctx.trainer, donor._extra_snapshot)
    restore(joiner.ctx.trainer, meta, tensors, joiner._extra_restore)
    assert all(torch.equal(a, b) for a, b in zip(joiner.phi, donor.phi))
    assert all(torch.equal(a, b) for a, b in zip(joiner.momentum, donor.momentum))
    assert joiner.ctx.trainer.param_hash() == donor.ctx.trainer.param_hash()  # θ_j too
    assert not torch.equal(joiner.phi[0], joiner.params[0].detach())  # φ_j, not θ_j, as before


def test_donor_without_momentum_and_a_malformed_outer_state():
    donor, joiner = _strategy(1), _strategy(2)
    meta, tensors = snapshot(donor.ctx.trainer, donor._extra_snapshot)
    restore(joiner.ctx.trainer, meta, tensors, joiner._extra_restore)
    assert joiner.momentum is None and all(torch.equal(a, b) for a, b in zip(joiner.phi, donor.phi))
    with pytest.raises(StateTransferError):
        joiner._extra_restore({"noloco": 1, "has_momentum": True}, list(donor.phi))  # momentum missing


def test_partners_far_ahead_do_not_cancel_the_round_we_wait_in():
    """A slow peer waits in round 2 while faster partners push rounds 3, 4, ...: the held rounds
    are capped, but the one our loop waits in stays (its cancelled future once ended the
    training loop as if asked to stop)."""
    import asyncio

    from swarm_node.protocol.averaging.pairwise import KEEP_ROUNDS

    s = _strategy(1).pairs

    async def main() -> None:
        s.post(2, [torch.zeros(1)])
        for r in range(3, 3 + KEEP_ROUNDS + 3):
            s._slot(r)
        assert 2 in s._incoming and not s._incoming[2].cancelled()
        assert len(s._posted) <= KEEP_ROUNDS + 1
        assert 3 not in s._posted  # older rounds than the kept ones still go

    asyncio.run(main())


def test_a_peer_behind_its_partner_stops_waiting_for_a_push_that_will_not_come():
    """A responder waits for its partner's θ of round r. Once that partner pushed a later round,
    it is past r: the wait ends at once (so this peer catches up) instead of after the whole
    window, which kept two peers a fixed number of rounds apart forever."""
    import asyncio
    import time

    from swarm_node.protocol.averaging.pairwise import PairFailed, PairOutcome

    async def go():
        s = _strategy(1).pairs
        s.deadlines = Deadlines(0.5)
        s.post(3, [torch.zeros(1)])
        t0 = time.monotonic()
        with pytest.raises(PairFailed) as e:  # nothing from the partner: the whole window
            await s.exchange(3, "p", initiate=False)
        assert e.value.outcome is PairOutcome.TIMEOUT
        waited = time.monotonic() - t0
        s._pushed_by["p"] = 5
        t0 = time.monotonic()
        with pytest.raises(PairFailed, match="round 5") as e:
            await s.exchange(3, "p", initiate=False)
        assert e.value.outcome is PairOutcome.PARTNER_AHEAD
        ahead = time.monotonic() - t0
        s.post(6, [torch.zeros(1)])
        s._incoming[6].set_result(["theta"])
        assert await s.exchange(6, "p", initiate=False) == ["theta"]
        return waited, ahead

    waited, ahead = asyncio.run(go())
    assert waited >= 0.45 and ahead < 0.2, (waited, ahead)
