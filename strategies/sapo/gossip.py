"""Node side of rollout gossip: start, feed and read the rollout sidecar.

The sidecar (node/sidecars/gossip.py) runs py-libp2p gossipsub in its own process; this
module never imports py-libp2p. Its lifetime (dies with the node, restarted with backoff,
bounded stop) and line reading are node/sidecars/supervisor.py's.

- `start()` returns at once; `wait_ready(timeout_s)` waits (bounded) for the sidecar's
  listen addresses (`listen`, empty until ready).
- `publish(data)` and `connect(maddrs)` never block on the network: a sidecar that is not
  up yet or is restarting simply misses them (gossip is best effort; the node pulls what a
  manifest names and gossip did not bring).
- Every received payload goes to `on_message(from_peer, data)`; `from_peer` is gossipsub's
  authenticated origin, which the receiver checks against the rollout's signed sender.
- Lines longer than `MAX_LINE_BYTES` or not JSON are skipped.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Callable

from swarm_node.sidecars.supervisor import SidecarClient, SidecarSupervisor, sidecar_command

log = logging.getLogger(__name__)

SIDECAR_MODULE = "swarm_node.sidecars.gossip"
MAX_LINE_BYTES = 1 << 20
REDIAL_S = 10.0


class GossipClient(SidecarClient):
    def __init__(self, *, identity_path: Path, run_id: str, host: str = "127.0.0.1",
                 announce_host: str | None = None, on_message: Callable[[str, bytes], None],
                 stop_timeout_s: float = 4.0, max_backoff_s: float = 30.0):
        self.identity_path, self.run_id, self.host, self.announce_host = identity_path, run_id, host, announce_host
        self.on_message = on_message
        self.listen: list[str] = []
        self.ready_after_s: float | None = None
        self.connected: set[str] = set()
        self._ready = asyncio.Event()
        self._dialled: dict[str, float] = {}  # maddr -> when it was last asked for (monotonic)
        self.sidecar = SidecarSupervisor(self.command, on_event=self._handle, on_exit=self._forget, log=log,
                                         label="rollout sidecar", task_name="rollout-sidecar", stdin=True,
                                         max_line_bytes=MAX_LINE_BYTES, stop_timeout_s=stop_timeout_s,
                                         max_backoff_s=max_backoff_s)

    def command(self) -> list[str]:
        args = ["--identity", str(self.identity_path), "--run-id", self.run_id, "--host", self.host]
        if self.announce_host:
            args += ["--announce-host", self.announce_host]
        return sidecar_command(SIDECAR_MODULE, args)

    # ---- lifecycle -------------------------------------------------------------------
    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    # ---- commands --------------------------------------------------------------------
    def _send(self, cmd: dict) -> bool:
        return self._ready.is_set() and self.sidecar.send_line(json.dumps(cmd))

    def publish(self, data: bytes) -> bool:
        return self._send({"cmd": "publish", "data": base64.b64encode(data).decode()})

    def connect(self, maddrs: list[str]) -> None:
        """Dial the sidecars at `maddrs`: new ones now, known ones again every `REDIAL_S` (a dial
        to a connected peer costs nothing; one whose connection died in a partition comes back)."""
        now = time.monotonic()
        due = [m for m in maddrs if m not in self.listen and now - self._dialled.get(m, -REDIAL_S) >= REDIAL_S]
        if due and self._send({"cmd": "connect", "maddrs": due}):
            self._dialled.update(dict.fromkeys(due, now))

    # ---- events ----------------------------------------------------------------------
    def _forget(self) -> None:
        """The sidecar exited: what it knew (readiness, dials, connections) went with it."""
        self._ready.clear()
        self._dialled.clear()
        self.connected.clear()

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "message":
            self.on_message(str(event["from"]), base64.b64decode(event["data"]))
        elif kind == "ready":
            self.listen = [str(m) for m in event.get("listen", [])]
            if self.ready_after_s is None:
                self.ready_after_s = round(time.monotonic() - self.sidecar.started_at, 3)
            log.info("rollout gossip: sidecar up at %s (topic %s)", ", ".join(self.listen), event.get("topic"))
            self._ready.set()
        elif kind == "connected":
            self.connected.add(str(event.get("peer_id")))
        elif kind == "connect_failed":
            log.info("rollout gossip: could not dial %s (%s)", event.get("peer_id"), event.get("detail"))
        elif kind == "error":
            log.warning("rollout sidecar: %s", event.get("detail"))
