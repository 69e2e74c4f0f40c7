"""The sync strategy's pure parts: weighted averaging, leader choice, round closing, state transfer."""
from __future__ import annotations

import asyncio

import pytest
import torch

from swarm_node.train.data import ByteDataset
from swarm_node.train.model import GPTConfig
from swarm_node.strategies import registry
from swarm_node.protocol.averaging.state_transfer import StateTransferError, restore, snapshot
from swarm_node.strategies.leader import pick_leader
from swarm_node.protocol.averaging.mean import weighted_mean
from swarm_node.protocol.averaging.star import GatherRound
from swarm_node.train.trainer import TrainConfig, build_trainer


def test_weighted_mean_matches_hand_computation():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([4.0, 8.0]), torch.tensor([[0.0]])]
    out = weighted_mean([(a, 1), (b, 3)])
    torch.testing.assert_close(out[0], torch.tensor([3.25, 6.5]))
    torch.testing.assert_close(out[1], torch.tensor([[0.75]]))
    with pytest.raises(ValueError):
        weighted_mean([])


def test_pick_leader_lowest_non_suspect():
    assert pick_leader(["Qmc", "Qma", "Qmb"]) == "Qma"
    assert pick_leader(["Qmc", "Qma", "Qmb"], suspects={"Qma"}) == "Qmb"
    assert pick_leader(["Qma"], suspects={"Qma"}) is None


def test_round_closes_when_all_expected_arrive_and_late_adds_are_ignored():
    async def go():
        rnd = GatherRound(step=0, expected={"a", "b"})
        rnd.add("a", [torch.ones(2)], 1)
        assert not rnd.closed.is_set()
        rnd.add("b", [torch.zeros(2)], 1)
        assert rnd.closed.is_set()
        rnd.add("c", [torch.full((2,), 100.0)], 100)  # too late: must not change the result
        torch.testing.assert_close(rnd.result[0], torch.full((2,), 0.5))
        assert rnd.total_samples == 2

    asyncio.run(go())


def _trainer(seed_peer: str):
    ds = ByteDataset(torch.randint(0, 256, (20_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    return build_trainer(GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16), TrainConfig(batch_size=4), ds,
                         peer=seed_peer)


def test_state_snapshot_restore_makes_replicas_identical_and_rejects_tampering():
    torch.set_num_threads(1)
    src, dst = _trainer("a"), _trainer("b")
    for _ in range(3):
        src.train_step()
    meta, tensors = snapshot(src)
    restore(dst, meta, tensors)
    assert dst.param_hash() == src.param_hash() and dst.step == 3
    # the same update keeps them identical, which needs identical Adam moments too
    update = src.compute_gradients(3).grads
    src.apply_gradients(update)
    dst.apply_gradients(update)
    assert dst.param_hash() == src.param_hash()

    fresh = _trainer("c")
    before = fresh.param_hash()
    bad = [t.clone() for t in tensors]
    bad[meta["model_keys"].index("blocks.0.ln1.weight")].add_(1.0)  # no longer matches the advertised hash
    with pytest.raises(StateTransferError, match="hash"):
        restore(fresh, meta, bad)
    assert fresh.param_hash() == before and fresh.step == 0  # untouched
    with pytest.raises(StateTransferError):
        restore(fresh, meta, tensors[:-1])


def test_registry_lists_builtins_and_rejects_unknown():
    names = registry.available()
    assert {"solo", "sync"} <= set(names)
    assert registry.load("sync").name == "sync"
    with pytest.raises(registry.UnknownStrategy, match="available"):
        registry.load("nope")
