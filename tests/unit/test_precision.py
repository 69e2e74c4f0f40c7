"""Mixed precision and gradient accumulation of LocalTrainer, their settings and the memory gauge."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys

import pytest
import torch

from swarm_node.config import ConfigError, load_config
from swarm_node.metrics import NodeMetrics
from swarm_node.train.data import ByteDataset
from swarm_node.train.device import device_memory_bytes
from swarm_node.train.precision import LossScale, PrecisionError, can_autocast, check_precision
from swarm_node.train.trainer import LocalTrainer, NonFiniteGradients, TrainConfig, build_trainer

from tests.unit.trainer_fixtures import TINY, ds, one_thread  # noqa: F401  (fixtures)


def make(ds: ByteDataset, device: str = "cpu", **kw: object) -> LocalTrainer:
    kw.setdefault("batch_size", 16)
    return build_trainer(TINY, TrainConfig(**kw), ds, device=device)  # type: ignore[arg-type]


def assert_fp32_master(tr: LocalTrainer, grads: list[torch.Tensor]) -> None:
    assert all(p.dtype == torch.float32 for p in tr.parameters_list())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    for state in tr.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


def train_and_check(tr: LocalTrainer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        result = tr.compute_gradients(tr.step)
        assert_fp32_master(tr, result.grads)
        tr.apply_gradients(result.grads)
        losses.append(result.loss)
    assert all(math.isfinite(x) for x in losses)
    return losses


def test_bf16_on_cpu_learns_with_fp32_master_weights(ds: ByteDataset) -> None:
    """1. Train the built-in GPT 20 steps under bf16 autocast on the CPU.
    Result: finite, falling loss; weights, optimizer state and handed-out grads are fp32;
    evaluation runs under the same autocast and is finite."""
    tr = make(ds, precision="bf16")
    assert tr.loss_scale is None  # bf16 has fp32's range: no scaling
    losses = train_and_check(tr, 20)
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]) - 0.5
    assert math.isfinite(tr.evaluate(2))


def test_bf16_gradients_are_close_to_fp32(ds: ByteDataset) -> None:
    g32 = make(ds).compute_gradients(0).grads
    g16 = make(ds, precision="bf16").compute_gradients(0).grads
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g32]),
                                                torch.cat([g.flatten() for g in g16]), dim=0)
    assert cos > 0.95


def test_fp16_is_allowed_on_cpu_when_torch_autocasts_it(ds: ByteDataset) -> None:
    """fp16 on the CPU is decided by probing this torch, not by its version.
    Result: where it autocasts, training works with a loss scale; else a one-line refusal."""
    if not can_autocast("cpu", torch.float16):
        with pytest.raises(PrecisionError, match="not supported on cpu"):
            make(ds, precision="fp16")
        return
    tr = make(ds, precision="fp16")
    assert tr.loss_scale is not None and tr.loss_scale.scale == 2.0**16
    losses = train_and_check(tr, 8)
    assert losses[-1] < losses[0]
    assert math.isfinite(tr.evaluate(2))


def test_fp16_unscaled_grads_match_fp32(ds: ByteDataset) -> None:
    if not can_autocast("cpu", torch.float16):
        pytest.skip("this torch does not autocast fp16 on the CPU")
    g32 = make(ds).compute_gradients(0).grads
    g16 = make(ds, precision="fp16").compute_gradients(0).grads  # scaled by 2**16 in backward
    n32 = math.sqrt(sum(float(g.pow(2).sum()) for g in g32))
    n16 = math.sqrt(sum(float(g.pow(2).sum()) for g in g16))
    assert n16 == pytest.approx(n32, rel=0.05)  # unscaled: same magnitude, not 65536x


def test_fp16_overflow_is_non_finite_shrinks_the_scale_and_spares_the_weights(ds: ByteDataset, tmp_path) -> None:
    """1. Take one step, then set an absurd loss scale so fp16 backward overflows.
    2. compute_gradients -> NonFiniteGradients; the scale halves; weights and optimizer untouched.
    3. Retrying the step (what strategies do) shrinks the scale until the step goes through.
    Result: training continues with finite fp32 weights; the scale survives a checkpoint."""
    if not can_autocast("cpu", torch.float16):
        pytest.skip("this torch does not autocast fp16 on the CPU")
    tr = make(ds, precision="fp16")
    tr.train_step()
    before = tr.param_hash()
    opt_step = tr.optimizer.state[tr.parameters_list()[0]]["step"].clone()
    assert tr.loss_scale is not None
    tr.loss_scale.scale = 2.0**40
    with pytest.raises(NonFiniteGradients) as info:
        tr.compute_gradients(tr.step)
    assert info.value.step == 1 and not math.isfinite(info.value.norm)
    assert tr.loss_scale.scale == 2.0**39
    assert tr.param_hash() == before and tr.step == 1
    assert torch.equal(tr.optimizer.state[tr.parameters_list()[0]]["step"], opt_step)
    assert all(p.grad is None for p in tr.parameters_list())
    for _ in range(40):
        try:
            tr.train_step()
            break
        except NonFiniteGradients:
            continue
    assert tr.step == 2 and tr.loss_scale.scale < 2.0**39
    assert all(torch.isfinite(p).all() for p in tr.parameters_list())
    tr.save_checkpoint(tmp_path / "c.pt")
    other = make(ds, precision="fp16")
    other.load_checkpoint(tmp_path / "c.pt")
    assert other.loss_scale is not None and other.loss_scale.scale == tr.loss_scale.scale


def test_loss_scale_halves_on_overflow_and_grows_after_clean_steps() -> None:
    s = LossScale(scale=8.0, growth_interval=3, min_scale=2.0)
    s.update(False)
    assert s.scale == 4.0
    s.update(True), s.update(True)
    assert s.scale == 4.0
    s.update(True)
    assert s.scale == 8.0 and s.clean_steps == 0
    s.update(False), s.update(False), s.update(False)
    assert s.scale == 2.0  # floored


def test_fp32_checkpoint_has_no_loss_scale(ds: ByteDataset) -> None:
    assert "loss_scale" not in make(ds).state_dict()


def test_grad_accum_equals_one_larger_batch(ds: ByteDataset) -> None:
    """1. Trainer A: 4 micro-batches of 4; trainer B: one batch of 16; same seed and step.
    Result: the same windows (one draw of 16, split), so mean loss and gradient agree to fp32
    rounding; num_samples counts all micro-batches; steps draw different data."""
    a = make(ds, batch_size=4, grad_accum=4)
    b = make(ds, batch_size=16)
    ra, rb = a.compute_gradients(3), b.compute_gradients(3)
    assert ra.num_samples == rb.num_samples == 16
    assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
    for ga, gb in zip(ra.grads, rb.grads):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    assert a.compute_gradients(4).loss != ra.loss  # another step, other windows
    assert all(p.grad is None for p in a.parameters_list())
    a.apply_gradients(ra.grads)
    b.apply_gradients(rb.grads)
    for p, q in zip(a.parameters_list(), b.parameters_list()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_grad_accum_micro_batches_are_distinct_windows(ds: ByteDataset) -> None:
    x, _ = ds.step_batch(16, TINY.seq_len, seed=0, step=3, rank=0, ranks=64)
    rows = {tuple(r.tolist()) for r in x}
    assert len(rows) == 16  # the four micro-batches of 4 never repeat a window
    x4, _ = ds.step_batch(16, TINY.seq_len, seed=0, step=4, rank=0, ranks=64)
    assert not rows & {tuple(r.tolist()) for r in x4}


def test_coded_gradients_with_grad_accum_equal_one_larger_partition(ds: ByteDataset) -> None:
    """Gradient coding with 2 micro-batches of 4 per partition vs partitions of 8.
    Result: the same partitions (drawn at 8 windows, split) and the same coded gradient."""
    a = make(ds, batch_size=4, grad_accum=2)
    b = make(ds, batch_size=8)
    for (xa, _), (xb, _) in zip((a.partition_batch(2, j) for j in (0, 5)), (b.partition_batch(2, j) for j in (0, 5))):
        assert torch.equal(xa, xb)
    parts = [(0, 1.0), (5, -0.5)]
    ra, rb = a.compute_coded_gradients(2, parts), b.compute_coded_gradients(2, parts)
    assert ra.num_samples == rb.num_samples == 16
    assert ra.loss == pytest.approx(rb.loss, rel=1e-5)
    for ga, gb in zip(ra.grads, rb.grads):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_coded_gradients_under_bf16_are_finite_fp32(ds: ByteDataset) -> None:
    res = make(ds, batch_size=4, precision="bf16").compute_coded_gradients(0, [(0, 1.0), (1, 0.5)])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in res.grads)


def test_train_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(PrecisionError, match="fp8"):
        TrainConfig(precision="fp8")
    check_precision("fp32", "cpu")
    check_precision("bf16", "cpu")


@pytest.mark.parametrize("flag, value, needle", [("--precision", "fp8", "--precision"),
                                                 ("--grad-accum", "0", "--grad-accum")])
def test_bad_flag_is_one_line_and_exit_2(tmp_path, flag: str, value: str, needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "swarm_node", "join", flag, value, "--new-swarm",
                           "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_strategies_that_train_their_own_way_refuse_the_settings() -> None:
    with pytest.raises(ConfigError, match="--grad-accum do not apply to swarm"):
        load_config({"strategy": "swarm", "precision": "bf16"})
    with pytest.raises(ConfigError, match="do not apply to sapo"):
        load_config({"strategy": "sapo", "grad_accum": 2})
    cfg = load_config({"strategy": "gradcode", "precision": "bf16", "grad_accum": 2, "device": "cpu"})
    assert (cfg.precision, cfg.grad_accum) == ("bf16", 2)


def test_run_spec_carries_grad_accum_but_not_precision() -> None:
    base = load_config({"new_swarm": True}).run_spec()
    assert "grad_accum" not in base.canonical()  # at its default: existing digests unchanged
    bf16 = load_config({"new_swarm": True, "precision": "bf16", "device": "cpu"}).run_spec()
    assert bf16.digest() == base.digest()  # peers may differ in precision
    accum = load_config({"new_swarm": True, "grad_accum": 4}).run_spec()
    assert accum.canonical()["grad_accum"] == 4 and accum.digest() != base.digest()
    assert any(d.startswith("grad_accum:") for d in accum.differences(base.canonical()))


def test_device_memory_gauge_reports_rss_on_cpu() -> None:
    m = NodeMetrics("sync")
    rss = device_memory_bytes(torch.device("cpu"))
    assert rss > 10 << 20
    m.device_memory.set(rss)
    assert b"swarm_device_memory_bytes " in m.exposition()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(ds: ByteDataset, precision: str) -> None:
    """1. Train 10 steps on CUDA under bf16 / fp16 (with 2 micro-batches).
    Result: finite falling loss, fp32 master weights and grads, memory gauge reads allocated bytes."""
    tr = make(ds, device="cuda", precision=precision, batch_size=8, grad_accum=2)
    losses = train_and_check(tr, 10)
    assert losses[-1] < losses[0]
    assert math.isfinite(tr.evaluate(2))
    assert device_memory_bytes(tr.device) > 0
