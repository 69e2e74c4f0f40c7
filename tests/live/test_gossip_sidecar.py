"""The rollout-gossip sidecar as a program: three real sidecar processes, driven over stdin.

One `connect` command naming two peers dials both (each peer in parallel), and a publish then
reaches both. No node runs: this is the sidecar's own contract.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from swarm_node.identity import ensure_identity

pytestmark = pytest.mark.timeout(90)
WAIT_S = 30.0


class Sidecar:
    def __init__(self, name: str, tmp: Path):
        ident = tmp / f"{name}.key"
        ensure_identity(ident)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarm_node.sidecars.gossip", "--identity", str(ident), "--run-id", "t"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.listen: list[str] = self.wait("ready")["listen"]
        self.peer_id = self.listen[0].rsplit("/p2p/", 1)[-1]

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def wait(self, kind: str, until=lambda e: True, timeout_s: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                e = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if e.get("event") == kind and until(e):
                return e
        raise AssertionError(f"no {kind!r} event within {timeout_s:.0f}s")

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def test_one_connect_command_dials_every_peer_named(tmp_path):
    cars: list[Sidecar] = []
    try:
        for name in ("a", "b", "c"):
            cars.append(Sidecar(name, tmp_path))
        a, b, c = cars
        a.send({"cmd": "connect", "maddrs": [*b.listen, *c.listen, *a.listen]})  # its own address is skipped
        seen = set()
        while seen != {b.peer_id, c.peer_id}:
            seen.add(a.wait("connected", lambda e: e["peer_id"] not in seen)["peer_id"])
        time.sleep(2.5)  # two gossipsub heartbeats: the mesh forms
        a.send({"cmd": "publish", "data": "aGVsbG8="})
        for other in (b, c):
            got = other.wait("message")
            assert got["from"] == a.peer_id and got["data"] == "aGVsbG8="
    finally:
        for car in cars:
            car.close()
