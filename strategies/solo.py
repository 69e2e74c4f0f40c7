"""`solo`: train alone on local gradients. The baseline every other strategy is measured
against; the node still joins the DHT and announces itself, it just never exchanges
tensors."""
from __future__ import annotations

import torch

from swarm_node.train.trainer import StepResult

from swarm_node.strategies.data_parallel import DataParallelStrategy


class SoloStrategy(DataParallelStrategy):
    name = "solo"

    async def reduce(self, result: StepResult) -> list[torch.Tensor] | None:
        self.ctx.progress.state = "online"
        return result.grads
