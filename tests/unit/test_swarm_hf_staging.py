"""swarm on a Hugging Face model, in one process: StageWorkers built by `staging_of` from a
loaded tiny Llama / GPT-2 train through the pipeline, and CheckFree rebuilds a middle stage
of it from its neighbours. The models are written offline under tmp_path."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from swarm_node.strategies.swarm.checkfree import (CheckFreeConfig, neighbour_weight, plan_recovery,  # noqa: E402
                                                   rebuild_state)
from swarm_node.strategies.swarm.stage import StageWorker  # noqa: E402
from swarm_node.strategies.swarm.staging import staging_of, why_not_staged  # noqa: E402
from swarm_node.strategies.swarm.strategy import SwarmStrategy  # noqa: E402
from swarm_node.strategies.swarm.options import SwarmOptions  # noqa: E402
from swarm_node.train.models import load_model  # noqa: E402
from swarm_node.strategies.sapo.hf_fixture import make_tiny_hf_model  # noqa: E402
from tests.byom_models import make_tiny_llama  # noqa: E402

SPEC = SimpleNamespace(batch_size=4, seq_len=16, seed=0, n_layer=0, n_head=0, d_model=0)


def _loaded(path):
    return load_model(str(path), seed=0, seq_len=SPEC.seq_len, n_layer=0, n_head=0, d_model=0).module


def _step(workers: list[StageWorker], ids: torch.Tensor, targets: torch.Tensor) -> float:
    """One pipeline micro-batch: forwards stage by stage, then backwards from the last."""
    acts = [ids]
    for w in workers[:-1]:
        acts.append(w.forward(acts[-1]))
    grad, loss = workers[-1].backward(acts[-1], targets)
    for k in range(len(workers) - 2, -1, -1):
        grad, _ = workers[k].backward(acts[k], grad)
    return float(loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_stage_workers_train_through_the_pipeline(arch, tmp_path):
    """A 3-layer model in 3 stages: the chained workers' first loss equals the full model's, and
    60 steps on one repeated batch lower it; stage 1 serves float activations [B, T, D]."""
    path = make_tiny_llama(tmp_path / "m", n_layer=3) if arch == "llama" else \
        make_tiny_hf_model(tmp_path / "m", n_layer=3, n_embd=32)
    module = _loaded(path)
    st = staging_of(module, SPEC, 3)
    assert st.cfg.d_model == 32 and st.cfg.seq_len == SPEC.seq_len
    workers = [StageWorker(st.cfg, 0, k, 3, lr=3e-3, make_stage=st.make_stage) for k in range(3)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, st.cfg.vocab_size, (SPEC.batch_size, SPEC.seq_len), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        _, full_loss = module(ids, targets)
    first = _step(workers, ids, targets)
    assert abs(first - float(full_loss)) < 1e-4, (first, float(full_loss))
    for _ in range(59):
        last = _step(workers, ids, targets)
    assert last < first - 1.0, (first, last)
    assert all(w.step == 60 for w in workers)
    with pytest.raises(ValueError, match="takes float"):
        workers[1].forward(ids)  # token ids sent to a middle stage


def test_checkfree_rebuilds_a_middle_stage_of_an_hf_model(tmp_path):
    """Stage 1 of a 3-stage Llama is lost: its body is the gradient-norm weighted average of
    stages 0's and 2's bodies (same keys and shapes on every stage), and the rebuilt worker
    trains on."""
    module = _loaded(make_tiny_llama(tmp_path / "m", n_layer=3))
    st = staging_of(module, SPEC, 3)
    workers = [StageWorker(st.cfg, 0, k, 3, lr=3e-3, make_stage=st.make_stage) for k in range(3)]
    ids = torch.randint(0, st.cfg.vocab_size, (SPEC.batch_size, SPEC.seq_len), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1, dims=1)
    for _ in range(5):
        _step(workers, ids, targets)
    cf = CheckFreeConfig()
    plan = plan_recovery(1, 3, cf)
    keys, _ = workers[1].expected_state()
    states = {j: dict(zip(*workers[j].state())) for j in (0, 2)}
    norms = {j: float(workers[j].last_grad_norm) for j in (0, 2)}
    rebuilt = rebuild_state(plan, keys, states, norms, cf)
    assert set(rebuilt) == set(keys) and all(k.startswith("blocks.") for k in keys)
    w0, w2 = neighbour_weight(norms[0], cf), neighbour_weight(norms[2], cf)
    key = next(k for k in keys if k.endswith("q_proj.weight"))
    expect = (w0 * states[0][key] + w2 * states[2][key]) / (w0 + w2)
    assert torch.allclose(rebuilt[key], expect, atol=1e-6)
    fresh = StageWorker(st.cfg, 0, 1, 3, lr=3e-3, make_stage=st.make_stage)
    fresh.load_state(rebuilt, fresh_optimizer=True, lr_scale=cf.lr_scale)
    workers[1] = fresh
    losses = [_step(workers, ids, targets) for _ in range(30)]
    assert losses[-1] < losses[0], losses


def test_swarm_refuses_models_it_cannot_stage(tmp_path):
    """A factory module and a layer count that --stages does not divide are refused with a reason
    before any peer traffic (Strategy.check_model); a fitting model passes."""
    llama = _loaded(make_tiny_llama(tmp_path / "m", n_layer=3))
    assert SwarmStrategy.check_model(llama, SwarmOptions(stages=3)) == ""
    assert "divisible" in SwarmStrategy.check_model(llama, SwarmOptions(stages=2))
    assert "built-in GPT or a Hugging Face" in why_not_staged(torch.nn.Linear(2, 2), 2)
