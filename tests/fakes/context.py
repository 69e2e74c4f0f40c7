"""Narrow strategy contexts for tests: the node settings and options a strategy reads, from a config."""
from __future__ import annotations

from typing import Any

from swarm_node.strategies.context import NodeSettings


def settings(config: Any, strategy_cls: Any = None) -> dict[str, Any]:
    """`node=` (and `options=`, given the strategy class) for a context, read by name from
    `config` (a NodeConfig or any namespace; missing names keep their defaults)."""
    out: dict[str, Any] = {"node": NodeSettings.of(config)}
    if strategy_cls is not None:
        out["options"] = strategy_cls.options_of(config)
    return out
