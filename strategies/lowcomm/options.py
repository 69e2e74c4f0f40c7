"""Settings of the DiLoCo family (diloco, streaming-diloco, noloco)."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from swarm_node.strategies.options import StrategyOptions


# A few hundred steps from scratch (the demo): H = 10 and the outer step as plain averaging (lr 1, no
# momentum). That early, the paper's outer Nesterov momentum overshoots (bench_byom, 2.55M Llama, 300 steps:
# solo 5.15, plain averaging every 10 steps 4.57, lr 0.7 with Nesterov 0.9 5.57).
EARLY_TRAINING_OUTER = ("--inner-steps", "10", "--outer-lr", "1.0", "--outer-momentum", "0")


class DiLoCoOptions(StrategyOptions):
    SPEC_FIELDS: ClassVar[tuple[str, ...]] = ("inner_steps", "outer_lr", "outer_momentum")
    # the DiLoCo paper's outer optimizer: SGD, lr 0.7, Nesterov momentum 0.9
    DEFAULT_OUTER_MOMENTUM: ClassVar[float] = 0.9

    inner_steps: int = Field(50, ge=1, le=100_000, description="DiLoCo family: local steps between outer rounds (H).")
    outer_lr: float = Field(0.7, gt=0, le=10, description="DiLoCo family: outer SGD learning rate.")
    outer_momentum: float | None = Field(None, ge=0, lt=1, description="DiLoCo family: outer momentum (unset: 0.9 "
                                         "Nesterov for diloco and streaming-diloco, 0.5 heavy-ball for noloco).")
    round_grace_s: float | None = Field(None, gt=0, le=3600, description="DiLoCo family: after the first peer joins "
                                        "a round, how long it waits for the other expected peers before it goes on "
                                        "with those that joined, the leader included only if it was ready (the "
                                        "deadline quorum; unset = wait for all up to --round-timeout-s after the "
                                        "leader is ready).")

    def momentum(self) -> float:
        """The outer momentum in effect: the one set, or this strategy's default."""
        return self.DEFAULT_OUTER_MOMENTUM if self.outer_momentum is None else self.outer_momentum

    def spec_fields(self, node: Any) -> dict[str, Any]:
        return {**super().spec_fields(node), "outer_momentum": self.momentum()}


class NoLoCoOptions(DiLoCoOptions):
    # Heavy-ball 0.5, NoLoCo's own default: at 0.9 (7x the pseudo-gradient per round) the pairwise
    # consensus oscillates, and peers apart after a partition diverged (loss 26) in the churn lab.
    DEFAULT_OUTER_MOMENTUM: ClassVar[float] = 0.5


class StreamingOptions(DiLoCoOptions):
    SPEC_FIELDS: ClassVar[tuple[str, ...]] = (*DiLoCoOptions.SPEC_FIELDS, "fragments", "overlap_steps", "mix_alpha")

    fragments: int = Field(5, ge=1, le=1024, description="streaming-diloco: fragments synced in turn (P; must divide H).")
    overlap_steps: int = Field(1, ge=0, description="streaming-diloco: local steps a fragment's exchange overlaps (tau < H/P).")
    mix_alpha: float = Field(0.5, ge=0, le=1, description="streaming-diloco: merge weight of the local fragment (alpha).")

    def check(self, node: Any) -> None:
        H, P, tau = self.inner_steps, self.fragments, self.overlap_steps
        if H % P:
            raise ValueError(f"streaming-diloco needs --inner-steps ({H}) divisible by --fragments ({P})")
        if tau >= H // P:
            raise ValueError(f"streaming-diloco needs --overlap-steps ({tau}) < inner-steps/fragments ({H // P})")
