"""Churn-lab fixtures: the capability probe that decides whether namespace tests run."""
from __future__ import annotations

import pytest

from swarm_node.lab.netlab import capability


@pytest.fixture
def lab_capable() -> None:
    """Skip, with the probe's reason, unless this process can build a network-namespace lab."""
    ok, why = capability()
    if not ok:
        pytest.skip(f"churn lab unavailable: {why}")
