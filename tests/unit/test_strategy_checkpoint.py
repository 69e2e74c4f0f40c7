"""The DiLoCo family keeps its outer state across a full stop: φ, momentum, round and merged
work (diloco), φ_i and δ_i (noloco) are saved with the trainer's checkpoint file and restored
into a fresh strategy, θ staying the checkpoint's own (its local steps since φ)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.config import NodeConfig
from swarm_node.metrics import NodeMetrics
from swarm_node.strategies.base import Progress
from swarm_node.strategies.lowcomm.diloco import DiLoCoStrategy
from swarm_node.strategies.lowcomm.noloco import NoLoCoStrategy
from swarm_node.strategies.lowcomm.outer_math import round_digest
from swarm_node.protocol.averaging.state_transfer import StateTransferError
from swarm_node.train.data import ByteDataset
from swarm_node.train.model import GPTConfig
from swarm_node.train.trainer import TrainConfig, build_trainer
from tests.fakes.context import settings

TINY = GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=16)
DATA = ByteDataset(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))


def _ctx(strategy: str, **cfg):
    from swarm_node.strategies import registry
    trainer = build_trainer(TINY, TrainConfig(batch_size=2, seed=0), DATA, peer=1)

    async def compute(fn, *args):
        return fn(*args)

    return SimpleNamespace(**settings(NodeConfig(strategy=strategy, **cfg), registry.load(strategy)), spec=SimpleNamespace(run_id="r"),
                           trainer=trainer, transport=None, compute=compute, peer_id="me",
                           metrics=NodeMetrics(strategy), progress=Progress(), should_stop=lambda: False,
                           log=logging.getLogger("test"), peers=None,
                           deadlines=Deadlines(NodeConfig().round_timeout_s))


def _save_and_reload(strategy, cls, tmp_path, name: str, **cfg):
    path = tmp_path / "checkpoint.pt"
    strategy.ctx.trainer.save_checkpoint(path, {"name": name, "state": strategy.checkpoint_state()})
    fresh = cls(_ctx(name, **cfg))
    fresh.ctx.trainer.load_checkpoint(path)
    saved = fresh.ctx.trainer.resumed_strategy_state
    assert saved["name"] == name
    fresh.restore_checkpoint_state(saved["state"])
    return fresh


def test_diloco_resumes_phi_momentum_round_and_work(tmp_path):
    s = DiLoCoStrategy(_ctx("diloco", inner_steps=5))
    for _ in range(3):  # three committed rounds: φ moves and the momentum is non-zero
        s.ctx.trainer.train_step()
        s._apply(torch.randn(sum(p.numel() for p in s.params)) * 0.01)
    s.work = 7
    s.ctx.trainer.train_step()  # a local step past the round's start: θ != φ
    theta = [p.detach().clone() for p in s.params]
    fresh = _save_and_reload(s, DiLoCoStrategy, tmp_path, "diloco", inner_steps=5)
    assert (fresh.round_no, fresh.work, fresh.phi_hash) == (3, 7, s.phi_hash)
    assert fresh.phi_hash == round_digest(fresh.phi)
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, theta))  # θ is not reset to φ
    assert fresh.ctx.trainer.step == 16  # 3 rounds x H, plus the local step
    mine, theirs = (x.outer.state_dict()["optimizer"]["state"] for x in (s, fresh))
    assert all(torch.equal(mine[i]["momentum_buffer"], theirs[i]["momentum_buffer"]) for i in mine)
    # the same next round: both apply one mean Δ and agree bit for bit
    delta = torch.randn(sum(p.numel() for p in s.params)) * 0.01
    s._apply(delta.clone())
    fresh._apply(delta.clone())
    assert fresh.phi_hash == s.phi_hash and fresh.round_no == s.round_no == 4


def test_noloco_resumes_its_own_phi_and_momentum(tmp_path):
    s = NoLoCoStrategy(_ctx("noloco"))
    s.phi = [torch.randn_like(p) for p in s.phi]
    s.momentum = [torch.randn_like(p) for p in s.phi]
    fresh = _save_and_reload(s, NoLoCoStrategy, tmp_path, "noloco")
    assert all(torch.equal(a, b) for a, b in zip(fresh.phi, s.phi))
    assert all(torch.equal(a, b) for a, b in zip(fresh.momentum, s.momentum))
    # back from its own checkpoint, it does not replace that state by a live peer's at start
    assert fresh._resumed and not s._resumed


def test_a_checkpoint_of_another_strategy_is_not_restored_into_this_one(tmp_path):
    """The daemon restores only an entry saved under the running strategy's name; an entry
    that does not fit the model is refused by the strategy."""
    s = NoLoCoStrategy(_ctx("noloco"))
    state = s.checkpoint_state()
    d = DiLoCoStrategy(_ctx("diloco"))
    with pytest.raises(StateTransferError):
        d.restore_checkpoint_state({"meta": {"round": 1, "has_momentum": True}, "tensors": state["tensors"][:1]})


def test_a_noloco_peer_back_from_its_checkpoint_joins_from_a_peer_only_when_the_swarm_moved_on():
    from swarm_node.strategies.lowcomm.noloco import joins_from_a_peer

    assert joins_from_a_peer(False, 0, [40], 5)  # a new peer
    assert not joins_from_a_peer(True, 47, [45, 47], 5)  # a full stop: everyone back from the same moment
    assert not joins_from_a_peer(True, 47, [], 5)
    assert joins_from_a_peer(True, 20, [47], 5)  # a crash: the swarm is rounds ahead
