"""Node side of LAN discovery: start, read and supervise the mDNS sidecar process.

The sidecar (node/sidecars/mdns.py) runs py-libp2p, which cannot live in this process
(hivemind's and py-libp2p's `crypto.pb` protobufs clash), so it is a child process that
reports JSON lines on its stdout. This module never imports py-libp2p.

Contract:
- `start()` spawns the sidecar and returns at once; `wait_for_peers(timeout_s)` returns
  the join multiaddrs of the peers found so far once at least one is found (plus a short
  settle time to collect simultaneous answers), or `[]` when the time is up. It waits at
  most `timeout_s` after the sidecar said "ready" and never more than `timeout_s +
  start_timeout_s` in all, so a slow or broken sidecar delays the node by a bounded time.
- Peers found later go to `on_peer(peer_id, maddrs)` (the node dials them).
- Rejected advertisements (spoofed, malformed, other run) go to `on_reject(reason)`.
- The sidecar dies with the node: spawned through `setpriv --pdeathsig KILL` (uvloop
  ignores preexec_fn) and told our pid, which it watches. If it exits while we run, it is
  restarted with backoff (1 s doubling to 30 s); `stop()` sends SIGTERM, waits
  `stop_timeout_s`, then SIGKILLs. Lines over 64 KiB or that are not JSON are skipped.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SIDECAR_MODULE = "swarm_node.sidecars.mdns"
MAX_LINE_BYTES = 64 * 1024
SETTLE_S = 0.5  # after the first answer: peers started together answer within ~this


class DiscoveryClient:
    def __init__(self, *, identity_path: Path, run_id: str, maddrs: list[str], browse: bool = True,
                 on_peer: Callable[[str, list[str]], None] | None = None,
                 on_reject: Callable[[str], None] | None = None,
                 start_timeout_s: float = 20.0, stop_timeout_s: float = 4.0, max_backoff_s: float = 30.0,
                 extra_args: tuple[str, ...] = ()):
        self.identity_path, self.run_id, self.maddrs, self.browse = identity_path, run_id, list(maddrs), browse
        self.on_peer, self.on_reject = on_peer, on_reject
        self.start_timeout_s, self.stop_timeout_s, self.max_backoff_s = start_timeout_s, stop_timeout_s, max_backoff_s
        self.extra_args = extra_args
        self.peers: dict[str, list[str]] = {}  # peer id -> join maddrs, latest advertisement
        self.rejected: dict[str, int] = {}
        self.restarts = 0
        self.pid: int | None = None
        self.ready_after_s: float | None = None  # seconds from start() to the sidecar advertising
        self.first_peer_after_s: float | None = None  # seconds from start() to the first peer
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._found = asyncio.Event()
        self._stopping = False
        self._started_at = 0.0
        # False while the node is still collecting peers for its start (they come back from
        # wait_for_peers); from then on each newly found peer is handed to on_peer.
        self.deliver_later = False

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", SIDECAR_MODULE, "--identity", str(self.identity_path), "--run-id", self.run_id,
               "--parent-pid", str(os.getpid()), "--browse" if self.browse else "--no-browse",
               *(a for m in self.maddrs for a in ("--maddr", m)), *self.extra_args]
        setpriv = shutil.which("setpriv")
        # setpriv execs the sidecar in place (same pid) with the parent-death signal set
        # before Python even starts; the sidecar's own parent watch covers systems without it.
        return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._started_at = time.monotonic()
        self._task = asyncio.create_task(self._supervise(), name="mdns-sidecar")

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)  # lets it unregister its mDNS record
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except (asyncio.TimeoutError, ProcessLookupError):
                try:
                    proc.kill()
                    await asyncio.wait_for(proc.wait(), 2)
                except (asyncio.TimeoutError, ProcessLookupError):
                    pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_for_peers(self, timeout_s: float) -> list[str]:
        """Join maddrs of the peers found within the bounded wait (see module docstring)."""
        loop_deadline = self._started_at + timeout_s + self.start_timeout_s
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

    # ---- supervision -----------------------------------------------------------------
    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=None, limit=MAX_LINE_BYTES)
                self.pid = self._proc.pid
                await self._read_events(self._proc.stdout)
                code = await self._proc.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code = f"spawn failed: {e}"
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran fine for a while: a fresh failure, not a crash loop
            log.warning("mDNS sidecar exited (%s); restarting in %.0fs", code, backoff)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _read_events(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than MAX_LINE_BYTES: asyncio dropped the buffered part;
                continue        # the line's tail comes next, fails to parse, and is skipped too
            if not line:
                return
            try:
                event = json.loads(line)
                self._handle(event)
            except Exception as e:  # a broken line must not stop discovery
                log.debug("ignored a sidecar line (%s): %r", e, line[:200])

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            log.info("mDNS discovery: advertising on %s as %s%s", ", ".join(event.get("listen", [])),
                     event.get("service"), "" if self.browse else " (advertise only)")
            if self.ready_after_s is None:
                self.ready_after_s = round(time.monotonic() - self._started_at, 3)
            self._ready.set()
        elif kind == "peer":
            peer_id, maddrs = str(event["peer_id"]), [str(m) for m in event["maddrs"]]
            is_new = self.peers.get(peer_id) != maddrs
            self.peers[peer_id] = maddrs
            if self.first_peer_after_s is None:
                self.first_peer_after_s = round(time.monotonic() - self._started_at, 3)
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
