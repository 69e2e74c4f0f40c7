"""Shared fixtures. Multi-process tests get a `Swarm` whose nodes are always killed, and the
session ends by checking that no p2pd started by these tests is still running."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from swarm_node.lab.launcher import Swarm, leftover_launched_pids

# Small and fast: one layer, short sequences, 1 s heartbeats, 4 s record lifetime.
FAST_NODE_ARGS = [
    "--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1",
    "--announce-interval-s", "1", "--record-ttl-s", "4", "--watchdog-interval-s", "1",
    "--status-interval-s", "2", "--n-layer", "1", "--d-model", "64", "--n-head", "4", "--seq-len", "32",
    "--batch-size", "8", "--data-max-bytes", "600000", "--round-timeout-s", "5",
    "--eval-every", "10", "--checkpoint-every", "10", "--shutdown-grace-s", "10",
]


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """Fail the session if any process our tests launched (a node or its p2pd) still runs.
    Only pids the launcher recorded are touched: other p2pds on the machine are not ours."""
    yield
    leftover = leftover_launched_pids()
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftover, f"processes left running after the tests: {leftover}"


@pytest.fixture
def swarm(tmp_path: Path):
    sw = Swarm(tmp_path, FAST_NODE_ARGS)
    try:
        yield sw
    finally:
        sw.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_metrics(node) -> dict[tuple[str, tuple], float]:
    """A live node's /metrics as {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    code, body = node.http("/metrics")
    assert code == 200, code
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
