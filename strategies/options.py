"""A strategy's own settings, declared by the strategy and merged into `swarm-node join`.

Every field of a strategy's `options` model becomes a `join` flag (`--field-name`), an
environment variable (`SWARM_NODE_FIELD_NAME`) and a TOML key, with its description as the
`--help` text; node/config.py builds the flags from the installed strategies, so a strategy
from another distribution adds flags without any change in node/. Fields named in
`SPEC_FIELDS` must be equal on every peer: they are hashed into the run spec. Two strategies
may declare the same field only with the same type and default (the DiLoCo family shares H).
Option models import pydantic only: the CLI reads them without loading any strategy's code.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StrategyOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    SPEC_FIELDS: ClassVar[tuple[str, ...]] = ()  # hashed into the run spec (every peer must agree)
    # The --model kinds the strategy trains ("builtin", "hf", "factory"), and why not the others:
    # config validation refuses another kind with this reason.
    MODEL_KINDS: ClassVar[tuple[str, ...]] = ("builtin", "hf", "factory")
    MODEL_KINDS_REASON: ClassVar[str] = ""
    # Why the strategy runs its own forward and backward instead of the trainer's step ("" = it
    # trains through the trainer): --precision and --grad-accum are refused with this reason.
    OWN_TRAINING_STEP: ClassVar[str] = ""

    def check(self, node: Any) -> None:
        """Rules across these options and the node's settings (`node` is the whole config);
        raise ValueError with a message in plain words."""

    def spec_fields(self, node: Any) -> dict[str, Any]:
        """What this strategy puts into the run spec (it may also blank out node fields that its
        peers may choose freely, such as the model size)."""
        return {name: getattr(self, name) for name in self.SPEC_FIELDS}


class NoOptions(StrategyOptions):
    """A strategy without settings of its own."""
