"""Settings of `gradcode` (the code, and straggler injection for tests and benches)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from swarm_node.strategies.options import StrategyOptions


class GradcodeOptions(StrategyOptions):
    SPEC_FIELDS: ClassVar[tuple[str, ...]] = ("gc_scheme", "gc_stragglers")

    gc_scheme: Literal["auto", "frc", "cyclic", "none"] = Field(
        "auto", description="gradcode: fractional repetition (frc, needs (s+1) | n), cyclic (any n), auto (frc "
        "when it fits, else cyclic) or none (wait for every peer).")
    gc_stragglers: int = Field(1, ge=0, le=64, description="gradcode: stragglers tolerated per step (s); each peer "
                               "computes (s+1)/n of the step's data.")
    # straggler injection: tests and benches, not part of the run spec
    straggler_delay_s: float = Field(0.0, ge=0, le=600, description="gradcode: seconds a chosen straggler waits "
                                     "before contributing (0 = no injection).")
    straggler_count: int = Field(1, ge=0, le=64, description="gradcode: peers chosen (seeded, the same on every "
                                 "peer) to straggle in a step.")
    straggler_prob: float = Field(1.0, ge=0, le=1, description="gradcode: probability that a step has stragglers.")
