"""Node side of LAN discovery: start and read the mDNS sidecar process.

The sidecar (node/sidecars/mdns.py) runs py-libp2p, which cannot live in this process
(hivemind's and py-libp2p's `crypto.pb` protobufs clash), so it is a child process that
reports JSON lines on its stdout. This module never imports py-libp2p.

- `start()` spawns the sidecar and returns at once; `wait_for_peers(timeout_s)` returns
  the join multiaddrs of the peers found so far once at least one is found (plus a short
  settle time to collect simultaneous answers), or `[]` when the time is up: at most
  `timeout_s` after the sidecar said "ready", never more than `timeout_s + start_timeout_s`.
- Peers found later go to `on_peer(peer_id, maddrs)` (the node dials them); rejected
  advertisements (spoofed, malformed, other run) go to `on_reject(reason)`.
- Its lifetime (dies with the node, restarted with backoff, bounded stop) and line reading
  are node/sidecars/supervisor.py's; lines over 64 KiB or not JSON are skipped.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

from swarm_node.sidecars.supervisor import SidecarClient, SidecarSupervisor, sidecar_command

log = logging.getLogger(__name__)

SIDECAR_MODULE = "swarm_node.sidecars.mdns"
MAX_LINE_BYTES = 64 * 1024
SETTLE_S = 0.5  # after the first answer: peers started together answer within ~this


class DiscoveryClient(SidecarClient):
    def __init__(self, *, identity_path: Path, run_id: str, maddrs: list[str], browse: bool = True,
                 on_peer: Callable[[str, list[str]], None] | None = None,
                 on_reject: Callable[[str], None] | None = None,
                 start_timeout_s: float = 20.0, stop_timeout_s: float = 4.0, max_backoff_s: float = 30.0,
                 extra_args: tuple[str, ...] = ()):
        self.identity_path, self.run_id, self.maddrs, self.browse = identity_path, run_id, list(maddrs), browse
        self.on_peer, self.on_reject = on_peer, on_reject
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args
        self.peers: dict[str, list[str]] = {}  # peer id -> join maddrs, latest advertisement
        self.rejected: dict[str, int] = {}
        self.ready_after_s: float | None = None  # seconds from start() to the sidecar advertising
        self.first_peer_after_s: float | None = None  # seconds from start() to the first peer
        self._ready = asyncio.Event()
        self._found = asyncio.Event()
        # self.command is looked up here, so a subclass's command() (the tests' fakes) is what runs.
        self.sidecar = SidecarSupervisor(self.command, on_event=self._handle, log=log, label="mDNS sidecar",
                                         task_name="mdns-sidecar", max_line_bytes=MAX_LINE_BYTES,
                                         stop_timeout_s=stop_timeout_s, max_backoff_s=max_backoff_s)
        # False while the node is still collecting peers for its start (they come back from
        # wait_for_peers); from then on each newly found peer is handed to on_peer.
        self.deliver_later = False

    def command(self) -> list[str]:
        return sidecar_command(SIDECAR_MODULE, [
            "--identity", str(self.identity_path), "--run-id", self.run_id,
            "--browse" if self.browse else "--no-browse", *(a for m in self.maddrs for a in ("--maddr", m)),
            *self.extra_args])

    # ---- lifecycle -------------------------------------------------------------------
    async def wait_for_peers(self, timeout_s: float) -> list[str]:
        """Join maddrs of the peers found within the bounded wait (module docstring)."""
        loop_deadline = self.sidecar.started_at + timeout_s + self.start_timeout_s
        try:
            await asyncio.wait_for(self._ready.wait(), max(0.0, loop_deadline - time.monotonic() - timeout_s))
        except asyncio.TimeoutError:
            log.warning("the mDNS sidecar did not start within %.0fs: not waiting for LAN peers "
                        "(it keeps trying in the background)", self.start_timeout_s)
            self.deliver_later = True
            return self.found_maddrs()
        try:
            await asyncio.wait_for(self._found.wait(), min(timeout_s, max(0.0, loop_deadline - time.monotonic())))
            await asyncio.sleep(SETTLE_S)
        except asyncio.TimeoutError:
            pass
        finally:
            self.deliver_later = True
        return self.found_maddrs()

    def found_maddrs(self) -> list[str]:
        return [m for maddrs in self.peers.values() for m in maddrs]

    # ---- events ----------------------------------------------------------------------
    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            log.info("mDNS discovery: advertising on %s as %s%s", ", ".join(event.get("listen", [])),
                     event.get("service"), "" if self.browse else " (advertise only)")
            if self.ready_after_s is None:
                self.ready_after_s = round(time.monotonic() - self.sidecar.started_at, 3)
            self._ready.set()
        elif kind == "peer":
            peer_id, maddrs = str(event["peer_id"]), [str(m) for m in event["maddrs"]]
            is_new = self.peers.get(peer_id) != maddrs
            self.peers[peer_id] = maddrs
            if self.first_peer_after_s is None:
                self.first_peer_after_s = round(time.monotonic() - self.sidecar.started_at, 3)
            if is_new:
                log.info("mDNS discovery: found peer %s at %s", peer_id, ", ".join(maddrs))
                if self.deliver_later and self.on_peer is not None:
                    self.on_peer(peer_id, maddrs)
            self._found.set()
        elif kind == "rejected":
            reason = str(event.get("reason"))
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            log.warning("mDNS discovery: ignored an advertisement from %s (%s: %s)", event.get("peer_id"), reason,
                        event.get("detail"))
            if self.on_reject is not None:
                self.on_reject(reason)
        elif kind == "unreachable":
            log.info("mDNS discovery: %s advertised but did not answer (%s)", event.get("peer_id"),
                     event.get("detail"))
        elif kind == "error":
            log.warning("mDNS sidecar: %s", event.get("detail"))
