"""Find strategies by name: built-ins plus anything declared in the `swarm_node.strategies`
entry-point group (so a third-party package adds one without touching node/)."""
from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points

from swarm_node.strategies.base import Strategy
from swarm_node.strategies.options import NoOptions, StrategyOptions

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "swarm_node.strategies"
DEFAULT_STRATEGY = "sync"  # what `join`, `demo` and `simulate` run when told nothing
BASELINE_STRATEGY = "solo"  # one peer training alone: what the demo compares a swarm against
BUILTIN = {
    "solo": "swarm_node.strategies.solo:SoloStrategy",
    "sync": "swarm_node.strategies.sync:SyncStrategy",
    "diloco": "swarm_node.strategies.lowcomm.diloco:DiLoCoStrategy",
    "noloco": "swarm_node.strategies.lowcomm.noloco:NoLoCoStrategy",
    "streaming-diloco": "swarm_node.strategies.lowcomm.streaming:StreamingDiLoCoStrategy",
    "gradcode": "swarm_node.strategies.gradcode.strategy:GradientCodingStrategy",
    "swarm": "swarm_node.strategies.swarm.strategy:SwarmStrategy",
    "sapo": "swarm_node.strategies.sapo.strategy:SapoStrategy",
}


# The built-ins' option models, read without importing the strategies (torch, hivemind): the CLI
# builds its flags from them. A test checks each against its strategy's `options`.
_BUILTIN_OPTIONS = {
    "diloco": "swarm_node.strategies.lowcomm.options:DiLoCoOptions",
    "noloco": "swarm_node.strategies.lowcomm.options:NoLoCoOptions",
    "streaming-diloco": "swarm_node.strategies.lowcomm.options:StreamingOptions",
    "gradcode": "swarm_node.strategies.gradcode.options:GradcodeOptions",
    "swarm": "swarm_node.strategies.swarm.options:SwarmOptions",
    "sapo": "swarm_node.strategies.sapo.options:SapoOptions",
}


class UnknownStrategy(LookupError):
    pass


def available() -> dict[str, str]:
    """name -> 'module:Class' for every strategy this installation can load."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return dict(sorted(found.items()))


def load(name: str) -> type[Strategy]:
    targets = available()
    if name not in targets:
        raise UnknownStrategy(f"unknown strategy {name!r}; available: {', '.join(targets)}")
    cls = _resolve(targets[name])
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise UnknownStrategy(f"{targets[name]} is not a Strategy subclass")
    return cls


def _resolve(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@functools.cache
def option_models() -> dict[str, type[StrategyOptions]]:
    """name -> the strategy's options model, for every strategy this installation can load. A
    plugin that fails to import is left out with a warning: `join --strategy` names it then."""
    models: dict[str, type[StrategyOptions]] = {}
    for name, target in available().items():
        try:
            if name in _BUILTIN_OPTIONS and target == BUILTIN[name]:
                models[name] = _resolve(_BUILTIN_OPTIONS[name])
            elif name in BUILTIN and target == BUILTIN[name]:
                models[name] = NoOptions
            else:
                models[name] = load(name).options
        except Exception as e:  # a broken plugin must not break every other command
            log.warning("strategy %s: could not read its options (%s: %s)", name, type(e).__name__, e)
    return models
