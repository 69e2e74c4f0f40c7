"""Find strategies by name: built-ins plus anything declared in the `swarm_node.strategies`
entry-point group (so a third-party package adds one without touching node/)."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from swarm_node.strategies.base import Strategy

ENTRY_POINT_GROUP = "swarm_node.strategies"
_BUILTIN = {
    "solo": "swarm_node.strategies.solo:SoloStrategy",
    "sync": "swarm_node.strategies.sync:SyncStrategy",
    "diloco": "swarm_node.strategies.lowcomm.diloco:DiLoCoStrategy",
    "noloco": "swarm_node.strategies.lowcomm.noloco:NoLoCoStrategy",
    "streaming-diloco": "swarm_node.strategies.lowcomm.streaming:StreamingDiLoCoStrategy",
    "gradcode": "swarm_node.strategies.gradcode.strategy:GradientCodingStrategy",
    "swarm": "swarm_node.strategies.swarm.strategy:SwarmStrategy",
    "sapo": "swarm_node.strategies.sapo.strategy:SapoStrategy",
}


class UnknownStrategy(LookupError):
    pass


def available() -> dict[str, str]:
    """name -> 'module:Class' for every strategy this installation can load."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return dict(sorted(found.items()))


def load(name: str) -> type[Strategy]:
    targets = available()
    if name not in targets:
        raise UnknownStrategy(f"unknown strategy {name!r}; available: {', '.join(targets)}")
    module_name, _, attr = targets[name].partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UnknownStrategy(f"{targets[name]} is not a Strategy subclass")
    return cls
