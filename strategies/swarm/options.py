"""Settings of `swarm` (pipeline shape, placement, CheckFree, fault injection)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from swarm_node.strategies.options import StrategyOptions


class SwarmOptions(StrategyOptions):
    SPEC_FIELDS: ClassVar[tuple[str, ...]] = ("stages", "micro_batches", "act_compression")
    MODEL_KINDS: ClassVar[tuple[str, ...]] = ("builtin", "hf")
    MODEL_KINDS_REASON: ClassVar[str] = ("it splits the built-in GPT or a Hugging Face GPT-2 / Llama directory into "
                                         "pipeline stages; a factory's module has no known block structure")
    OWN_TRAINING_STEP: ClassVar[str] = "its pipeline stages run their own forward and backward"

    stages: int = Field(2, ge=1, le=64, description="swarm: pipeline stages S (the model's layers, --n-layer for the "
                        "built-in GPT, must be divisible by S; the default fits the built-in GPT's default 2).")
    micro_batches: int = Field(2, ge=1, le=256, description="swarm: micro-batches per trainer step (each stage "
                               "replica applies one optimizer step per this many backwards).")
    act_compression: Literal["fp16", "int8", "none"] = Field(
        "fp16", description="swarm: wire encoding of activations and their gradients (int8 = blockwise absmax).")
    stage: str = Field("auto", pattern=r"^(auto|[0-9]{1,2})$", description="swarm: stage this peer serves "
                       "(auto = an empty stage if any, else the one with the least capacity).")
    rebalance_interval_s: float = Field(300.0, ge=0, description="swarm: mean seconds between rebalancing checks "
                                        "(each at a random time in [0, 2T]; 0 = never move).")
    stage_average_interval_s: float = Field(5.0, gt=0, description="swarm: seconds between averaging rounds "
                                            "of a stage's replicas (all-reduce; a mix with one replica if it fails).")
    checkfree_lr_scale: float = Field(1.1, gt=0, le=10, description="swarm: learning-rate multiplier of a stage "
                                      "rebuilt by CheckFree.")
    checkfree_swaps: bool = Field(False, description="swarm: CheckFree+ swap schedule: odd micro-batches run the "
                                  "bodies of stages 0<->1 and S-2<->S-1 in swapped order (with 3 stages they "
                                  "alternate), so a lost last stage is rebuilt by copying stage S-2. Part of the "
                                  "run spec.")
    swarm_backward_delay_s: float = Field(0.0, ge=0, le=600, description="swarm: seconds a stage server sleeps "
                                          "inside each backward (fault injection for tests).")

    def check(self, node: Any) -> None:
        if getattr(node, "model", "builtin") == "builtin" and node.n_layer % self.stages:
            raise ValueError(f"swarm needs --n-layer ({node.n_layer}) divisible by --stages ({self.stages})")
        if self.stage != "auto" and int(self.stage) >= self.stages:
            raise ValueError(f"--stage {self.stage} out of range for --stages {self.stages}")

    def spec_fields(self, node: Any) -> dict[str, Any]:
        fields = super().spec_fields(node)
        if self.checkfree_swaps:  # every peer must run the same schedule
            fields["checkfree_swaps"] = True
        return fields
