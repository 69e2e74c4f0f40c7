"""How `swarm-node demo` runs and judges a strategy: its `DemoProfile`.

A strategy names its profile (`Strategy.demo_profile`); the demo reads it through the registry,
so node/ names no strategy. `node_args` are demo-scale settings of the swarm's peers (a
3-peer swarm on the built-in model and data, done in a few minutes on two CPU cores); the
baseline runs with `baseline_args` only, so a swarm is not judged against a baseline held back
by the swarm's settings. The demo prints both; flags after `--` override them on every node. `measure` picks what the summary judges: held-out loss against
the baseline node at the same step count ("val_loss"; a pipeline trainer measures it through
the stages), or the mean reward per completion against a baseline that shares nothing
("reward").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DemoProfile:
    steps: int = 200  # the demo's --steps when none is given
    node_args: tuple[str, ...] = ()  # flags of every swarm peer
    measure: Literal["val_loss", "reward"] = "val_loss"
    baseline: str = "solo"  # the strategy of the baseline node
    baseline_args: tuple[str, ...] = ()  # the baseline node's flags (default: the node's defaults)
    shows: str = ""  # one line: what this demo shows about the strategy
