"""Local training on one device: gradients, optimizer steps, evaluation, checkpoints.

`LocalTrainer` owns one model replica, its AdamW optimizer and the batch generator of this
peer. Strategies drive it: `compute_gradients(step)` produces this peer's gradients for a
step without changing any parameter; the strategy may average them with other peers and
then calls `apply_gradients(grads)`, which is the only place parameters change.

Invariants:
  * Everything runs synchronously on the caller's (single compute) thread.
  * A step's batch is this peer's data shard of it (train/sampler.py; `data_rank`, else a hash
    of `peer`): fixed by (run seed, shard, step), so a retried or resumed step sees the same data.
  * A non-finite loss or gradient raises before any parameter or optimizer state changes.
  * `trainer.step` counts applied optimizer steps; checkpoints restore it exactly, so
    "save at N, load, continue" is bit-identical to never having stopped (same device and
    thread count).
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swarm_node.train.data import ByteDataset, batch_generator_seed
from swarm_node.train.model import GPTConfig, build_model
from swarm_node.train.precision import LossScale, autocast, autocast_dtype, check_precision
from swarm_node.train.sampler import rank_of

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Optimizer and batching knobs shared by every peer of a run."""

    lr: float = 3e-3  # AdamW learning rate (constant; schedules belong to strategies)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None or 0 disables clipping
    batch_size: int = 16  # sequences per local step
    seed: int = 0  # run seed: model init and per-step batch seeds derive from it
    # "constant", or "cosine": linear warmup over `warmup_steps`, then cosine decay to 0 at
    # `total_steps`. A function of the step alone, so a joiner that adopts a peer's step count
    # also has its learning rate.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    # Data shards a step's training windows are split into (train/sampler.py). Peers on different
    # shards draw disjoint windows; a peer's shard is `data_rank`, or a hash of its peer id.
    data_shards: int = 64
    data_rank: int | None = None  # per peer, not shared: pins this peer's shard (0..data_shards-1)
    # Per peer: the dtype of the forward pass (train/precision.py). Weights, optimizer state and the
    # gradients handed to strategies stay fp32, so peers of one run may differ here.
    precision: str = "fp32"
    # Micro-batches of `batch_size` per step, averaged: the effective batch is their product, which
    # decides the data each shard draws, so it is shared like `batch_size`.
    grad_accum: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # lists from JSON/TOML
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("lr and batch_size must be positive")
        if self.data_shards <= 0 or (self.data_rank is not None and not 0 <= self.data_rank < self.data_shards):
            raise ValueError(f"data_rank must be in [0, data_shards={self.data_shards}), got {self.data_rank}")
        if self.grad_accum <= 0:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        autocast_dtype(self.precision)  # raises PrecisionError for an unknown name
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr schedule {self.lr_schedule!r} (constant or cosine)")
        if self.lr_schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError("a cosine schedule needs total_steps > warmup_steps")

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step taken at `step` (0-based)."""
        if self.lr_schedule == "constant":
            return self.lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; parameters and optimizer state were left untouched."""


class NonFiniteLoss(NonFiniteError):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step = step
        self.loss = loss


class NonFiniteGradients(NonFiniteError):
    def __init__(self, step: int, norm: float) -> None:
        super().__init__(f"non-finite gradient norm {norm} at step {step}")
        self.step = step
        self.norm = norm


@dataclass(frozen=True)
class StepResult:
    """This peer's contribution to one step. `grads` align with `parameters_list()`."""

    step: int
    loss: float
    grads: list[torch.Tensor]  # detached, fp32, on the trainer's device
    num_samples: int  # sequences in the batch (all micro-batches)
    duration_s: float  # batch + forward + backward, device-synchronised


class LocalTrainer:
    def __init__(
        self,
        model: nn.Module,
        dataset: ByteDataset,
        cfg: TrainConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        peer: int | str = 0,
    ) -> None:
        """`model` is moved to `device`; `peer` keys this peer's batch stream (index or id).
        `model` is the built-in `GPT` or any module with its convention (train/models.py):
        `model(idx, targets) -> (logits, loss)` and a frozen dataclass `cfg` with `seq_len`."""
        self.cfg = cfg or TrainConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dataset = dataset
        self.peer = peer
        self.data_rank = self.cfg.data_rank if self.cfg.data_rank is not None else rank_of(peer, self.cfg.data_shards)
        self.seq_len = model.cfg.seq_len
        check_precision(self.cfg.precision, self.device.type)
        self.amp_dtype = autocast_dtype(self.cfg.precision)
        # fp16 only: bf16 has fp32's exponent range, so its gradients neither underflow nor need scaling
        self.loss_scale: LossScale | None = LossScale() if self.cfg.precision == "fp16" else None
        self.step = 0  # optimizer steps applied so far
        # what the strategy saved with the last checkpoint loaded: {"name": strategy, "state": {...}}
        self.resumed_strategy_state: dict[str, Any] | None = None
        self.last_grad_norm: float | None = None  # pre-clip norm of the last applied step
        self._params: list[nn.Parameter] = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            self._params,
            lr=self.cfg.lr,
            betas=self.cfg.betas,
            eps=self.cfg.eps,
            weight_decay=self.cfg.weight_decay,
        )
        # No longer draws batches (the sampler does); kept so checkpoints keep their format.
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(batch_generator_seed(self.cfg.seed, peer, 0))

    # ------------------------------------------------------------------ training

    def parameters_list(self) -> list[nn.Parameter]:
        """Parameters in the fixed order used by grads, hashes and strategies."""
        return list(self._params)

    def parameter_names(self) -> list[str]:
        """The dotted names of `parameters_list()`, in the same order (a tied tensor once)."""
        return [name for name, _ in self.model.named_parameters()]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        return autocast(self.device.type, self.amp_dtype)

    def _take_grads(self) -> list[torch.Tensor]:
        """The accumulated `.grad`s as fp32, unscaled; clears them (the tensors returned are the only owners)."""
        inv = 1.0 / self.loss_scale.scale if self.loss_scale is not None else 1.0
        grads = []
        for p in self._params:
            g = p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            grads.append(g * inv if inv != 1.0 else g)
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def _check_scaled(self, step: int, grads: list[torch.Tensor]) -> None:
        """fp16: a non-finite gradient is an overflow of the loss scale; shrink it and raise
        `NonFiniteGradients` so the strategy skips (and retries) the step, as for any NaN/inf."""
        if self.loss_scale is None:
            return
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        self.loss_scale.update(math.isfinite(norm))
        if not math.isfinite(norm):
            raise NonFiniteGradients(step, norm)

    def compute_gradients(self, step: int) -> StepResult:
        """Forward + backward on this peer's batch for `step`; parameters are not changed.

        With `grad_accum` N the step's batch is one draw of N x `batch_size` windows (so shards
        stay disjoint and the data is that of a batch N times larger), run as N micro-batches;
        `grads` and `loss` are their means, and device memory is that of one micro-batch."""
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = self.cfg.grad_accum
        x, y = self.dataset.step_batch(self.cfg.batch_size * n, self.seq_len, seed=self.cfg.seed, step=step,
                                       rank=self.data_rank, ranks=self.cfg.data_shards)
        # the mean over N equal micro-batches is the mean over the whole batch; the fp16 scale rides along
        factor = (self.loss_scale.scale if self.loss_scale is not None else 1.0) / n
        loss_sum = 0.0
        try:
            for xk, yk in zip(x.chunk(n), y.chunk(n)):
                xk = xk.to(self.device, non_blocking=True)
                yk = yk.to(self.device, non_blocking=True)
                with self._autocast():
                    _, loss = self.model(xk, yk)
                assert loss is not None
                loss_value = loss.item()  # syncs; we need it on the host anyway
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(step, loss_value)  # before its backward; no parameter changed
                (loss * factor if factor != 1.0 else loss).backward()
                loss_sum += loss_value
            grads = self._take_grads()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        self._check_scaled(step, grads)
        self._sync()
        return StepResult(
            step=step,
            loss=loss_sum / n,
            grads=grads,
            num_samples=x.shape[0],
            duration_s=time.perf_counter() - t0,
        )

    def partition_batch(self, step: int, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Partition `partition` of the swarm's global batch for `step`: the same on every
        peer (keyed by the partition, not the peer), so any replica can compute it. It is data
        shard `partition` of the step, so up to `data_shards` partitions are disjoint."""
        return self.dataset.step_batch(self.cfg.batch_size * self.cfg.grad_accum, self.seq_len, seed=self.cfg.seed,
                                       step=step, rank=partition % self.cfg.data_shards, ranks=self.cfg.data_shards)

    def compute_coded_gradients(self, step: int, parts: list[tuple[int, float]]) -> StepResult:
        """sum_j w_j * grad(mean loss of partition j) for (j, w_j) in `parts`, one backward over
        the concatenated partitions (exact by linearity) per micro-batch: with `grad_accum` N,
        micro-batch k holds the k-th N-th of every partition; parameters are not changed.
        `loss` is the unweighted mean over the partitions; `num_samples` counts them all."""
        if not parts:
            raise ValueError("no partitions to compute")
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = self.cfg.grad_accum
        batches = [self.partition_batch(step, j) for j, _ in parts]
        weights = torch.tensor([w for _, w in parts], dtype=torch.float32, device=self.device)
        factor = (self.loss_scale.scale if self.loss_scale is not None else 1.0) / n
        loss_sum, num_samples = 0.0, 0
        loss_fn = getattr(self.model, "loss_fn", None)  # a factory model's own loss (train/models.py)
        try:
            for k in range(n):
                x = torch.cat([b[0].chunk(n)[k] for b in batches]).to(self.device, non_blocking=True)
                y = torch.cat([b[1].chunk(n)[k] for b in batches]).to(self.device, non_blocking=True)
                num_samples += x.shape[0]
                with self._autocast():
                    logits, _ = self.model(x)
                    if loss_fn is None:
                        per_token = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                                                      reduction="none")
                        per_part = per_token.view(len(parts), -1).mean(dim=1)  # mean loss of each partition
                    else:
                        per_part = torch.stack([loss_fn(lg, t)
                                                for lg, t in zip(logits.chunk(len(parts)), y.chunk(len(parts)))])
                per_part = per_part.float()
                loss_value = float(per_part.detach().mean())
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(step, loss_value)
                coded = (per_part * weights).sum()
                (coded * factor if factor != 1.0 else coded).backward()
                loss_sum += loss_value
            grads = self._take_grads()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if self.loss_scale is not None:
            self._check_scaled(step, grads)
        else:
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            if not math.isfinite(norm):
                raise NonFiniteGradients(step, norm)
        self._sync()
        return StepResult(step=step, loss=loss_sum / n, grads=grads, num_samples=num_samples,
                          duration_s=time.perf_counter() - t0)

    def apply_gradients(self, grads: list[torch.Tensor]) -> None:
        """Clip `grads` (by global norm) and take one AdamW step; increments `self.step`.

        `grads` may live on any device / dtype; they are copied, never modified. Raises
        `NonFiniteGradients` (parameters untouched) if their norm is NaN/inf.
        """
        if len(grads) != len(self._params):
            raise ValueError(f"expected {len(self._params)} gradients, got {len(grads)}")
        for p, g in zip(self._params, grads):
            if g.shape != p.shape:
                raise ValueError(f"gradient shape {tuple(g.shape)} != parameter shape {tuple(p.shape)}")
            p.grad = g.detach().to(device=p.device, dtype=p.dtype, copy=True)
        clip = self.cfg.grad_clip if self.cfg.grad_clip else math.inf  # inf: only measure
        norm = float(torch.nn.utils.clip_grad_norm_(self._params, clip))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradients(self.step, norm)
        lr = self.cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_grad_norm = norm
        self.step += 1

    def align_step(self, step: int) -> None:
        """Set the step counter to the swarm's count for this replica: the one way to move it
        besides applying gradients. A DiLoCo joiner takes the swarm's round × H; a pipeline peer
        counts its stage's or its trainer's steps. The learning-rate schedule follows it."""
        if step < 0:
            raise ValueError(f"a step counter cannot be negative, got {step}")
        self.step = int(step)

    def train_step(self, step: int | None = None) -> StepResult:
        """Convenience for solo training: compute and apply this peer's own gradients."""
        result = self.compute_gradients(self.step if step is None else step)
        self.apply_gradients(result.grads)
        return result

    @torch.no_grad()
    def evaluate(self, max_batches: int = 8) -> float:
        """Mean loss over the fixed held-out windows (same windows on every peer)."""
        was_training = self.model.training
        self.model.eval()
        try:
            total, n = 0.0, 0
            for x, y in self.dataset.val_batches(self.cfg.batch_size, self.seq_len, max_batches):
                with self._autocast():
                    _, loss = self.model(x.to(self.device), y.to(self.device))
                assert loss is not None
                total += loss.item()
                n += 1
            return total / max(n, 1)
        finally:
            self.model.train(was_training)

    def param_hash(self) -> str:
        """First 16 hex chars of sha256 over (name, dtype, shape, bytes) of every parameter.

        Equal hashes mean bit-identical replicas; used to check that peers stay in sync.
        """
        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())  # raw bits, any dtype
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ state

    def state_dict(self, strategy_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue identically: step, model, optimizer, batch generator,
        and the strategy's own state (outer weights, momentum, round) when it has one."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model_config": asdict(self.model.cfg),
            "train_config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batch_generator": self._gen.get_state(),
        }
        if strategy_state is not None:
            state["strategy"] = strategy_state
        if self.loss_scale is not None:  # fp16 only, so other checkpoints keep their exact contents
            state["loss_scale"] = self.loss_scale.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the model config must match this trainer's model."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
        try:  # a checkpoint of another kind of model (built-in vs brought) does not construct
            theirs = type(self.model.cfg)(**state["model_config"])
        except TypeError:
            theirs = state["model_config"]
        if theirs != self.model.cfg:
            raise ValueError(f"checkpoint model config {theirs} != this model's {self.model.cfg}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves state to the params' device
        self._gen.set_state(state["batch_generator"])
        self.step = int(state["step"])
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.load(state["loss_scale"])
        self.resumed_strategy_state = state.get("strategy")

    def save_checkpoint(self, path: str | os.PathLike[str], strategy_state: dict[str, Any] | None = None) -> None:
        """Write `state_dict()` atomically: a crash leaves the old file or the new, never half."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state_dict(strategy_state), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def load_checkpoint(self, path: str | os.PathLike[str]) -> int:
        """Load a checkpoint written by `save_checkpoint`; returns the restored step."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        self.load_state_dict(state)
        return self.step


def build_trainer(
    model_cfg: GPTConfig,
    train_cfg: TrainConfig,
    dataset: ByteDataset,
    *,
    device: torch.device | str = "cpu",
    peer: int | str = 0,
) -> LocalTrainer:
    """Model seeded from `train_cfg.seed` (identical on every peer) wrapped in a trainer."""
    return LocalTrainer(build_model(model_cfg, train_cfg.seed), dataset, train_cfg, device=device, peer=peer)


__all__ = [
    "LocalTrainer",
    "NonFiniteError",
    "NonFiniteGradients",
    "NonFiniteLoss",
    "StepResult",
    "TrainConfig",
    "build_trainer",
]
