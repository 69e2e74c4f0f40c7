"""The churn lab's view of the installed strategies: each one's `ChurnProfile`.

A strategy declares its profile (flags, how a run ends, how survivors must agree, its named
scenarios) on its class; this module reads it through the registry, so adding a strategy
changes nothing here.
"""
from __future__ import annotations

import dataclasses

from swarm_node.strategies import registry
from swarm_node.strategies.churn_profile import CHURN, GENERIC, KILL, PARTITION, ChurnProfile

__all__ = ["CHURN", "GENERIC", "KILL", "PARTITION", "ChurnProfile", "builtin_profiles", "profile_for"]


def profile_for(strategy: str) -> ChurnProfile:
    """The strategy's own profile, or the generic scenarios for one without (or not installed)."""
    try:
        declared = registry.load(strategy).churn_profile
    except registry.UnknownStrategy:
        declared = None
    return dataclasses.replace(declared or ChurnProfile(scenarios=GENERIC), strategy=strategy)


def builtin_profiles() -> dict[str, ChurnProfile]:
    return {name: profile_for(name) for name in registry.BUILTIN}
