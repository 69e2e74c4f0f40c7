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
        s.post(2, [torch.zeros(1)], "p")
        waiting = s._from(2, "p")
        for r in range(3, 3 + KEEP_ROUNDS + 3):
            s._slot(r)
        assert (2, "p") in s._incoming and not waiting.cancelled()
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
        s.post(3, [torch.zeros(1)], "p")
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
        s.post(6, [torch.zeros(1)], "p")
        s._from(6, "q").set_result(["not the partner's"])
        s._from(6, "p").set_result(["theta"])
        assert await s.exchange(6, "p", initiate=False) == ["theta"]  # the partner's list, whoever else pushed
        return waited, ahead

    waited, ahead = asyncio.run(go())
    assert waited >= 0.45 and ahead < 0.2, (waited, ahead)


def test_a_peer_paired_otherwise_this_round_refuses_a_push_and_never_mistakes_it_for_its_partners():
    """Views disagree for a moment: a takes c for its round-4 partner, while c's own loop paired
    itself with b. c refuses a (so a does not count a pair c never made), and the list a pushed is
    never handed to c's wait for b's."""
    import asyncio

    from swarm_node.protocol.averaging.pairwise import PairExchange, PairFailed, PairOutcome
    from tests.fakes.transport import InMemoryNetwork

    async def go():
        net = InMemoryNetwork()
        ta, tc = net.transport("a"), net.transport("c")
        mk = lambda t: PairExchange(t, run_id="r", shapes=[(2,)], compression=0, deadlines=Deadlines(1.0),  # noqa: E731
                                    is_partner=lambda rnd, caller: True, on_reject=lambda reason: None)
        pa, pc = mk(ta), mk(tc)
        await pa.start()
        await pc.start()
        pc.post(4, [torch.ones(2)], "b")
        pa.post(4, [torch.zeros(2)], tc.peer_id)
        with pytest.raises(PairFailed) as refused:
            await pa.exchange(4, tc.peer_id, initiate=True)
        with pytest.raises(PairFailed) as waited:
            await pc.exchange(4, "b", initiate=False)
        await net.close()
        return refused.value, waited.value

    refused, waited = asyncio.run(asyncio.wait_for(go(), 20))
    assert refused.outcome is PairOutcome.REFUSED and "another peer" in str(refused)
    assert waited.outcome is PairOutcome.TIMEOUT  # b never came; a's list was not taken for b's


def test_a_push_for_a_round_older_than_every_kept_one_gets_its_slot():
    """A late partner pushes round 1 when we already hold KEEP_ROUNDS newer rounds: the slot it
    is given must not be evicted on creation (the handler failed with a KeyError, and the pair
    counted the round on one side only)."""
    import asyncio

    from swarm_node.protocol.averaging.pairwise import KEEP_ROUNDS

    s = _strategy(1).pairs

    async def main() -> None:
        for r in range(5, 5 + KEEP_ROUNDS + 1):
            s.post(r, [torch.zeros(1)], "p")
        assert not s._slot(1).is_set()  # created, kept, not yet posted

    asyncio.run(main())
