"""diloco's merged work: a committed round adds its member count, a round of one adds nothing.

After a split, the side whose φ holds more work is kept; a peer cut off alone runs rounds of
one at full speed, and must not outweigh the side that kept averaging. The strategy runs its
real round loop; only the round transaction is scripted."""
from __future__ import annotations

import asyncio

import torch

from swarm_node.strategies.lowcomm.diloco import DiLoCoStrategy, merged_work
from swarm_node.protocol.averaging.transaction import RoundOutcome
from tests.unit.test_strategy_checkpoint import _ctx


class Scripted:
    def __init__(self, outcomes: list[RoundOutcome]):
        self.outcomes = list(outcomes)

    async def run_round(self, round_no, phi_hash, weight, vector, leader=None):
        return self.outcomes.pop(0)


def test_rounds_of_one_add_no_work():
    assert merged_work(["a"]) == 0 and merged_work(["a", "b"]) == 2 and merged_work(["a", "b", "c"]) == 3
    s = DiLoCoStrategy(_ctx("diloco", inner_steps=2))
    s.election.mark_committed = lambda group: None  # no membership here
    n = sum(p.numel() for p in s.params)
    s.rounds = Scripted([RoundOutcome("committed", torch.zeros(n), ["me"]),
                         RoundOutcome("committed", torch.zeros(n), ["me", "you"])])
    asyncio.run(s._outer_round())
    assert (s.round_no, s.work) == (1, 0)  # committed alone: φ moved, no merged work
    asyncio.run(s._outer_round())
    assert (s.round_no, s.work) == (2, 2)
