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

from swarm_node.train.trainer import NonFiniteError, StepResult

from swarm_node.strategies.base import Strategy


class DataParallelStrategy(Strategy):
    @abc.abstractmethod
    async def reduce(self, result: StepResult) -> list[torch.Tensor] | None:
        """Turn this peer's gradients into the update every peer applies, or None to skip."""

    async def run(self) -> None:
        ctx = self.ctx
        max_steps = ctx.node.max_steps
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
            self.record_step(result.num_samples, result.loss, elapsed)
            await ctx.on_step()
