"""CheckFree rule: golden values, edge cases, swaps."""
from __future__ import annotations

import pytest
import torch

from swarm_node.train.model import GPTConfig, build_model, split_stages
from swarm_node.strategies.swarm.checkfree import (CheckFreeConfig, NotRecoverable, body_of, body_order, fresh_optimizer,
                                             plan_recovery, rebuild_state, weighted_average)


def test_golden_weighted_average():
    cfg = CheckFreeConfig()
    prev = {"blocks.0.w": torch.tensor([1.0, -2.0]), "blocks.0.n": torch.tensor([3], dtype=torch.int64)}
    nxt = {"blocks.0.w": torch.tensor([3.0, 4.0]), "blocks.0.n": torch.tensor([7], dtype=torch.int64)}
    out = weighted_average(prev, nxt, prev_norm=0.5, next_norm=1.0, cfg=cfg)
    # alpha = 1.0 + 1e-4 (next), beta = 0.5 + 1e-4 (prev): (1.0001*3 + 0.5001*1)/1.5002 = 2.333288...
    assert out["blocks.0.w"][0].item() == pytest.approx(3.5004 / 1.5002, abs=1e-7)
    assert out["blocks.0.w"][1].item() == pytest.approx((1.0001 * 4 - 0.5001 * 2) / 1.5002, abs=1e-7)
    assert out["blocks.0.n"].item() == 3  # non-float copied from the previous neighbour
    sq = weighted_average(prev, nxt, 0.5, 1.0, CheckFreeConfig(exponent=2.0))
    assert sq["blocks.0.w"][0].item() == pytest.approx((1.0001 * 3 + 0.2501 * 1) / 1.2502, abs=1e-7)


def test_clipped_norms_give_uniform_average():
    prev, nxt = {"blocks.0.w": torch.randn(5)}, {"blocks.0.w": torch.randn(5)}
    out = weighted_average(prev, nxt, 1.0, 1.0, CheckFreeConfig())
    torch.testing.assert_close(out["blocks.0.w"], (prev["blocks.0.w"] + nxt["blocks.0.w"]) / 2, atol=1e-7, rtol=0)


def test_rebuild_middle_stage_of_gpt_and_fresh_optimizer():
    stages = split_stages(build_model(GPTConfig(n_layer=3, d_model=32, seq_len=16), 0), 3)
    with torch.no_grad():  # make the neighbours differ
        for p in stages[2].parameters():
            p.add_(0.1)
    cfg = CheckFreeConfig()
    plan = plan_recovery(1, 3, cfg)
    assert plan.method == "wavg" and plan.sources == (0, 2)
    sds = {j: stages[j].state_dict() for j in (0, 2)}
    state = rebuild_state(plan, stages[1].state_dict().keys(), sds, {0: 0.2, 2: 0.6}, cfg)
    a, b = 0.6 + 1e-4, 0.2 + 1e-4
    for k, v in state.items():
        expect = (a * sds[2][k].double() + b * sds[0][k].double()) / (a + b)
        assert torch.allclose(v.double(), expect, atol=1e-7), k
    stages[1].load_state_dict(state)
    opt = fresh_optimizer(stages[1].parameters(), 3e-3, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 1.1)
    assert len(opt.state) == 0


def test_edge_stages_need_checkfree_plus_and_an_edge_copy():
    stages = split_stages(build_model(GPTConfig(n_layer=3, d_model=32, seq_len=16), 0), 3)
    with pytest.raises(NotRecoverable):
        plan_recovery(2, 3, CheckFreeConfig())
    with pytest.raises(NotRecoverable):
        plan_recovery(0, 1, CheckFreeConfig(swaps=True))
    cfg = CheckFreeConfig(swaps=True)
    plan = plan_recovery(2, 3, cfg)
    assert plan.method == "copy" and plan.sources == (1,)
    keys = stages[2].state_dict().keys()
    with pytest.raises(NotRecoverable):  # the head has no copy anywhere
        rebuild_state(plan, keys, {1: stages[1].state_dict()}, {}, cfg)
    edge = {k: v for k, v in stages[2].state_dict().items() if not k.startswith("blocks.")}
    state = rebuild_state(plan, keys, {1: stages[1].state_dict()}, {}, cfg, edge_copy=edge)
    for k, v in body_of(stages[1].state_dict()).items():
        assert torch.equal(state[k], v)
    assert torch.equal(state["lm_head.weight"], stages[2].lm_head.weight.detach())


def test_swap_schedule():
    assert body_order(6, 0, True) == [0, 1, 2, 3, 4, 5]
    assert body_order(6, 1, True) == [1, 0, 2, 3, 5, 4]
    assert body_order(6, 1, False) == list(range(6))
    assert body_order(3, 1, True) == [1, 0, 2] and body_order(3, 3, True) == [0, 2, 1]
    assert body_order(2, 1, True) == [1, 0]


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        CheckFreeConfig(lr_scale=0)
    with pytest.raises(ValueError):
        weighted_average({"blocks.w": torch.ones(1)}, {"blocks.w": torch.ones(1)}, float("nan"), 1.0,
                         CheckFreeConfig())
    with pytest.raises(NotRecoverable):
        weighted_average({"blocks.w": torch.ones(2)}, {"blocks.w": torch.ones(3)}, 1.0, 1.0, CheckFreeConfig())


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_checkfree.py"
    spec = importlib.util.spec_from_file_location("bench_checkfree", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_checkfree"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_baselines_are_what_they_claim():
    """The bench's `skip` body is exactly the identity; `random_full` has std-0.02 residual
    projections (no depth scaling), while the model's own init scales them down."""
    bench = _bench()
    cfg = GPTConfig(n_layer=4, d_model=32, n_head=4, seq_len=16)
    stage = split_stages(build_model(cfg, 0), 4)[1]
    skip = type(stage)(cfg, 1, 4)
    skip.load_state_dict(bench.skip_state(stage))
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(skip.body(x), x)
    full = bench.reinit_full(stage, 5)
    assert 0.015 < float(full["blocks.0.mlp.proj.weight"].std()) < 0.025
    assert float(stage.state_dict()["blocks.0.mlp.proj.weight"].std()) < 0.012  # 0.02 / sqrt(8) at init
    # the Markov toy data is deterministic and inside its vocabulary
    data = bench.MarkovData(32, 0)
    (a, _), (b, _) = next(data.val_batches(4, 16, 1)), next(data.val_batches(4, 16, 1))
    assert torch.equal(a, b) and int(a.max()) < 32
