"""One replica of one pipeline stage: the tensor math a SWARM stage server runs.

Pure torch, no network; every method runs on the node's single compute thread.

Invariants:
  * Stateless between calls: `forward` keeps nothing; `backward(inputs, ...)` recomputes
    the forward from the re-sent inputs, so a backward may run on a different replica
    than the forward (exact when both replicas hold the same weights).
  * Gradients of `accumulate` backwards are averaged, clipped to `grad_clip` and applied in
    one AdamW step; `step` counts applied steps and `last_grad_norm` keeps the post-clip norm
    of the last one (what CheckFree weighs neighbours by).
  * Non-finite inputs, losses or gradients raise `ValueError` before anything changes.
  * `part` (CheckFree+ swaps, see `backward`) runs "full" (default) or one piece of the stage.
  * `load_state` (replica sync, rebalancing, CheckFree) replaces the weights; with
    `fresh_optimizer=True` it also starts a new optimizer at lr * lr_scale.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from swarm_node.train.model import GPTConfig, build_stage

PARTS = ("full", "embed", "body", "head")


class StageWorker:
    def __init__(self, cfg: GPTConfig | Any, seed: int, index: int, num_stages: int, *, lr: float,
                 accumulate: int = 1, grad_clip: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 make_stage: Callable[[int], nn.Module] | None = None):
        """`cfg` gives the input checks (seq_len, vocab_size, d_model); `make_stage(k)` builds stage k
        at its initial weights (default: the seeded built-in GPT's)."""
        if accumulate < 1:
            raise ValueError("accumulate must be >= 1")
        self.cfg, self.seed, self.index, self.num_stages = cfg, seed, index, num_stages
        self.make_stage = make_stage or (lambda k: build_stage(cfg, seed, k, num_stages))
        self.base_lr, self.lr_scale, self.accumulate, self.grad_clip, self.betas = lr, 1.0, accumulate, grad_clip, betas
        self.module: nn.Module = self.make_stage(index)
        self.optimizer = self._new_optimizer()
        self.step = 0
        self.pending = 0  # backwards accumulated since the last optimizer step
        self.last_grad_norm: float | None = None
        self.samples = 0

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.module.parameters(), lr=self.base_lr * self.lr_scale, betas=self.betas,
                                 weight_decay=0.0)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    # ---------------------------------------------------------------- compute
    def _check_part(self, part: str) -> None:
        if part not in PARTS:
            raise ValueError(f"unknown stage part {part!r}")
        if part == "embed" and not self.is_first or part == "head" and not self.is_last:
            raise ValueError(f"stage {self.index} has no {part} part")

    def _takes_ids(self, part: str) -> bool:
        return self.is_first and part in ("full", "embed")

    def _gives_logits(self, part: str) -> bool:
        return self.is_last and part in ("full", "head")

    def _counts(self, part: str) -> bool:
        """Whether this backward completes the micro-batch on this stage (see the invariants)."""
        if part == "full":
            return True
        return part == "embed" if self.is_first else part == "body"

    def _run(self, x: torch.Tensor, part: str) -> torch.Tensor:
        m = self.module
        if part == "full":
            return m(x)
        if part == "embed":
            return m.embed(x)
        return m.body(x) if part == "body" else m.head(x)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor, part: str = "full") -> torch.Tensor:
        self._check_part(part)
        self._check_input(inputs, part)
        self.module.train()
        return self._run(inputs, part).detach()

    def backward(self, inputs: torch.Tensor, grad_or_targets: torch.Tensor,
                 part: str = "full") -> tuple[torch.Tensor | None, float | None]:
        """Recompute the forward (of `part`), backpropagate, accumulate. Returns (grad wrt
        inputs or None for byte ids, the loss when the output is logits or None).

        Parts (CheckFree+ swap schedule): "full", or one piece of the stage: "embed" (stage 0),
        "body" (the blocks), "head" (ln_f + lm_head, last stage). The loss is computed wherever
        the output is logits (full last stage, or head). One micro-batch counts once toward
        `accumulate` whatever the split: a full backward counts, and of a split stage the part
        whose backward runs last in the micro-batch (stage 0's embed, the last stage's body);
        the other part's gradients accumulate into the same step uncounted."""
        self._check_part(part)
        self._check_input(inputs, part)
        self.module.train()
        ids = self._takes_ids(part)
        x = inputs if ids else inputs.detach().requires_grad_(True)
        out = self._run(x, part)
        loss_value = None
        if self._gives_logits(part):
            targets = grad_or_targets
            if targets.dtype != torch.long or targets.shape != inputs.shape[:2]:
                raise ValueError(f"targets must be int64 {tuple(inputs.shape[:2])}, got {targets.dtype} "
                                 f"{tuple(targets.shape)}")
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.cfg.vocab_size):
                raise ValueError("targets outside the vocabulary")
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ValueError(f"non-finite loss {loss_value}")
            loss.backward()
        else:
            g = grad_or_targets
            if g.shape != out.shape or not g.is_floating_point():
                raise ValueError(f"grad_outputs shape {tuple(g.shape)} != outputs {tuple(out.shape)}")
            if not torch.isfinite(g).all():
                raise ValueError("non-finite grad_outputs")
            out.backward(g.to(out.dtype))  # unscaled: the input grads go upstream as is
        grad_in = None if ids else x.grad.detach()
        if self._counts(part):
            self.samples += int(inputs.shape[0])
            self.pending += 1
            if self.pending >= self.accumulate:
                self._apply()
        return grad_in, loss_value

    def _apply(self) -> None:
        params = [p for p in self.module.parameters() if p.grad is not None]
        for p in params:  # the sum over the accumulated backwards -> their mean
            p.grad.div_(self.pending)
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip)) if params else 0.0
        self.pending = 0
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError(f"non-finite gradient norm {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_grad_norm = min(norm, self.grad_clip)
        self.step += 1

    def _check_input(self, inputs: torch.Tensor, part: str = "full") -> None:
        if self._takes_ids(part):
            if inputs.dtype != torch.long or inputs.dim() != 2 or inputs.shape[1] > self.cfg.seq_len:
                raise ValueError(f"stage 0 takes int64 [B, T<={self.cfg.seq_len}], got {inputs.dtype} "
                                 f"{tuple(inputs.shape)}")
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= self.cfg.vocab_size):
                raise ValueError("token ids outside the vocabulary")
        else:
            if (not inputs.is_floating_point() or inputs.dim() != 3 or inputs.shape[2] != self.cfg.d_model
                    or inputs.shape[1] > self.cfg.seq_len):
                raise ValueError(f"stage {self.index} ({part}) takes float [B, T, {self.cfg.d_model}], got "
                                 f"{inputs.dtype} {tuple(inputs.shape)}")
            if not torch.isfinite(inputs).all():
                raise ValueError("non-finite activations")

    # ---------------------------------------------------------------- state
    def state(self) -> tuple[list[str], list[torch.Tensor]]:
        sd = self.module.state_dict()
        return list(sd), [v.detach().clone() for v in sd.values()]

    def expected_state(self) -> tuple[list[str], list[tuple[int, ...]]]:
        sd = self.module.state_dict()
        return list(sd), [tuple(v.shape) for v in sd.values()]

    def load_state(self, state: Mapping[str, torch.Tensor], *, step: int | None = None, fresh_optimizer: bool = False,
                   lr_scale: float = 1.0) -> None:
        self.module.load_state_dict(dict(state), strict=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        if fresh_optimizer:
            self.lr_scale = lr_scale  # from base lr each time: bumps never compound
            self.optimizer = self._new_optimizer()
        if step is not None:
            self.step = step

    def mix_with(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Move every float tensor a fraction `weight` toward a peer replica's (gossip averaging)."""
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                if v.is_floating_point():
                    v.mul_(1 - weight).add_(state[k].to(v.dtype), alpha=weight)

    def float_vector(self) -> torch.Tensor:
        """Every float tensor of the stage, flattened in state-dict order (fp32, CPU)."""
        return torch.cat([v.detach().reshape(-1).float().cpu() for v in self.module.state_dict().values()
                          if v.is_floating_point()])

    def shift_floats(self, delta: torch.Tensor) -> None:
        """Add a `float_vector`-shaped delta to the float tensors (a replica average applied on
        top of whatever this replica learnt while the average was being computed)."""
        with torch.no_grad():
            at = 0
            for v in self.module.state_dict().values():
                if v.is_floating_point():
                    n = v.numel()
                    v.add_(delta[at:at + n].view_as(v).to(v.device, v.dtype))
                    at += n
        if at != delta.numel():
            raise ValueError(f"delta of {delta.numel()} values for a stage of {at}")

    def switch(self, index: int, state: Mapping[str, torch.Tensor] | None = None, **load_kwargs) -> None:
        """Serve another stage (rebalancing, CheckFree): new module, optionally loaded."""
        self.index, self.lr_scale = index, 1.0
        self.module = self.make_stage(index)
        self.optimizer = self._new_optimizer()
        self.pending, self.last_grad_norm = 0, None
        if state is not None:
            self.load_state(state, **load_kwargs)
