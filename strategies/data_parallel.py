"""The step loop shared by data-parallel strategies (solo, sync, and later the coded ones).

Each iteration: wait for enough peers -> compute this peer's gradients for step
`trainer.step` on the compute thread -> `reduce()` them with the swarm -> apply on the
compute thread. `reduce()` returning None means "no agreed update for this step": the
parameters stay as they are and the same step is retried, so peers that all failed a
round stay identical. A non-finite loss or gradient skips the step and is counted.
"""
from __future__ import annotations

import abc
import asyncio
import time

import torch

from swarm_node.trainer import NonFiniteError, StepResult

from .base import Strategy


class DataParallelStrategy(Strategy):
    @abc.abstractmethod
    async def reduce(self, result: StepResult) -> list[torch.Tensor] | None:
        """Turn this peer's gradients into the update every peer applies, or None to skip."""

    def peers_needed(self) -> int:
        return self.ctx.config.min_peers

    async def wait_for_peers(self) -> bool:
        """Block (bounded, re-checking stop) until enough peers are present; False if stopping."""
        ctx = self.ctx
        while not ctx.should_stop():
            have = len(ctx.membership.others()) + 1
            need = self.peers_needed()
            if have >= need:
                ctx.progress.waiting_for = None
                return True
            ctx.progress.waiting_for = f"peers: {have}/{need} needed"
            await asyncio.sleep(0.5)
        return False

    async def run(self) -> None:
        ctx = self.ctx
        max_steps = ctx.config.max_steps
        while not ctx.should_stop() and (max_steps == 0 or ctx.trainer.step < max_steps):
            if not await self.wait_for_peers():
                break
            step = ctx.trainer.step
            t0 = time.perf_counter()
            try:
                result: StepResult = await ctx.compute(ctx.trainer.compute_gradients, step)
            except NonFiniteError as e:
                ctx.metrics.rejected_messages.labels(reason="non_finite").inc()
                ctx.log.warning("skipping step %d: %s", step, e)
                continue
            update = await self.reduce(result)
            if update is None:
                await asyncio.sleep(0.2)  # no agreed update: retry this step, without spinning
                continue
            try:
                await ctx.compute(ctx.trainer.apply_gradients, update)
            except NonFiniteError as e:
                ctx.metrics.rejected_messages.labels(reason="non_finite").inc()
                ctx.log.warning("update for step %d not applied: %s", step, e)
                continue
            elapsed = time.perf_counter() - t0
            self._record_step(result, elapsed)
            await ctx.on_step()

    def _record_step(self, result: StepResult, elapsed_s: float) -> None:
        ctx, m = self.ctx, self.ctx.metrics
        ctx.progress.step = ctx.trainer.step
        ctx.progress.train_loss = result.loss
        sps = result.num_samples / max(elapsed_s, 1e-9)
        # EMA so one slow round does not make the console jump around
        prev = ctx.progress.samples_per_s
        ctx.progress.samples_per_s = sps if prev == 0 else 0.8 * prev + 0.2 * sps
        m.local_step.set(ctx.trainer.step)
        m.train_loss.set(result.loss)
        m.local_samples.inc(result.num_samples)
        m.local_tokens.inc(result.num_samples * ctx.spec.seq_len)
        m.step_duration.observe(elapsed_s)
        m.samples_per_second.set(ctx.progress.samples_per_s)
