"""bench/bench_checkfree.py --arch llama: every recovery method runs on Llama stages cut by
hf_stages.split_hf_stages (tiny sizes, a few pretrain steps)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")


from tests.unit.test_checkfree import _bench  # noqa: E402  (loads bench/bench_checkfree.py by path)


def test_llama_bench_end_to_end():
    from swarm_node.train.hf_stages import HFPipelineStage

    bench = _bench()
    args = bench.parse_args(["--arch", "llama", "--stages", "3", "--n-layer", "3", "--d-model", "16", "--n-head", "2",
                             "--seq-len", "8", "--batch", "4", "--pretrain", "6", "--ckpt-every", "4",
                             "--marks", "0,2", "--data", "markov", "--edge"])
    installs: list[dict] = []
    report = bench.run(args, installs=installs)

    assert report["arch"] == "llama" and report["config"]["arch"] == "llama"
    assert report["model"]["n_kv_head"] == 1 and report["model"]["d_ff"] == 40
    for m in bench.METHODS:
        per_stage = report["per_stage"][m]
        assert len(per_stage) == 1  # the one middle stage of 3
        for losses in per_stage:
            assert set(losses) == {"+0", "+2"}
            assert all(math.isfinite(v) for v in losses.values()), (m, losses)
    for pre in ("in_order", "with_swaps"):
        for m in ("none", "copy", "random"):
            assert all(math.isfinite(v) for v in report["edge"][pre][m].values()), (pre, m)

    methods = {i["method"] for i in installs}
    assert {"checkfree", "checkfree_body", "uniform", "random", "random_full", "skip"} <= methods
    for i in installs:  # every installed stage is a Llama stage with exactly the lost stage's keys and shapes
        rebuilt = i["installed"]
        assert isinstance(i["module"], HFPipelineStage) and i["module"].cfg.arch == "llama"
        assert list(i["module"].state_dict()) == list(rebuilt)
        assert list(rebuilt) == list(i["lost"]), i["method"]
        for k, v in i["lost"].items():
            assert rebuilt[k].shape == v.shape and rebuilt[k].dtype == v.dtype, (i["method"], k)
    cf = next(i for i in installs if i["method"] == "checkfree")
    assert cf["stage"] == 1 and any(k.startswith("blocks.") for k in cf["lost"])
    assert not torch.equal(cf["installed"]["blocks.0.mlp.down_proj.weight"],
                           cf["lost"]["blocks.0.mlp.down_proj.weight"])  # rebuilt from the neighbours, not kept
    rec = next(i for i in installs if i["method"] == "skip")
    skip = copy.deepcopy(rec["module"])
    skip.load_state_dict(rec["installed"])  # the state as installed, before the continuation trained it
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(skip.body(x), x)  # o_proj and down_proj zeroed: the body is the identity
