"""Node side of rollout gossip: start, feed, read and supervise the rollout sidecar.

The sidecar (node/sidecars/gossip.py) runs py-libp2p gossipsub in its own process; this
module never imports py-libp2p. It follows node/discovery.py's pattern: spawned through
`setpriv --pdeathsig KILL` when available and told our pid (it dies with the node),
restarted with backoff (1 s doubling to 30 s) if it exits while we run, stopped with
SIGTERM then SIGKILL.

Contract:
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
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SIDECAR_MODULE = "swarm_node.sidecars.gossip"
MAX_LINE_BYTES = 1 << 20


class GossipClient:
    def __init__(self, *, identity_path: Path, run_id: str, host: str = "127.0.0.1",
                 announce_host: str | None = None, on_message: Callable[[str, bytes], None],
                 stop_timeout_s: float = 4.0, max_backoff_s: float = 30.0):
        self.identity_path, self.run_id, self.host, self.announce_host = identity_path, run_id, host, announce_host
        self.on_message = on_message
        self.stop_timeout_s, self.max_backoff_s = stop_timeout_s, max_backoff_s
        self.listen: list[str] = []
        self.restarts = 0
        self.pid: int | None = None
        self.ready_after_s: float | None = None
        self.connected: set[str] = set()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._started_at = 0.0
        self._dialled: set[str] = set()  # maddrs asked for since the last (re)start

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", SIDECAR_MODULE, "--identity", str(self.identity_path), "--run-id", self.run_id,
               "--host", self.host, "--parent-pid", str(os.getpid())]
        if self.announce_host:
            cmd += ["--announce-host", self.announce_host]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._started_at = time.monotonic()
        self._task = asyncio.create_task(self._supervise(), name="rollout-sidecar")

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
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

    # ---- commands --------------------------------------------------------------------
    def _send(self, cmd: dict) -> bool:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None or not self._ready.is_set():
            return False
        try:
            proc.stdin.write((json.dumps(cmd) + "\n").encode())
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False
        return True

    def publish(self, data: bytes) -> bool:
        return self._send({"cmd": "publish", "data": base64.b64encode(data).decode()})

    def connect(self, maddrs: list[str]) -> None:
        """Dial the sidecars at `maddrs` once per sidecar lifetime (re-dialled after a restart)."""
        new = [m for m in maddrs if m not in self._dialled and m not in self.listen]
        if new and self._send({"cmd": "connect", "maddrs": new}):
            self._dialled.update(new)

    # ---- supervision -----------------------------------------------------------------
    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=None, limit=MAX_LINE_BYTES)
                self.pid = self._proc.pid
                await self._read_events(self._proc.stdout)
                code = await self._proc.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code = f"spawn failed: {e}"
            self._ready.clear()
            self._dialled.clear()
            self.connected.clear()
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.warning("rollout sidecar exited (%s); restarting in %.0fs", code, backoff)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _read_events(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # over MAX_LINE_BYTES: skipped (its tail fails to parse too)
                continue
            if not line:
                return
            try:
                self._handle(json.loads(line))
            except Exception as e:  # one bad line must not stop the gossip
                log.debug("ignored a rollout-sidecar line (%s): %r", e, line[:200])

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "message":
            self.on_message(str(event["from"]), base64.b64decode(event["data"]))
        elif kind == "ready":
            self.listen = [str(m) for m in event.get("listen", [])]
            if self.ready_after_s is None:
                self.ready_after_s = round(time.monotonic() - self._started_at, 3)
            log.info("rollout gossip: sidecar up at %s (topic %s)", ", ".join(self.listen), event.get("topic"))
            self._ready.set()
        elif kind == "connected":
            self.connected.add(str(event.get("peer_id")))
        elif kind == "connect_failed":
            log.info("rollout gossip: could not dial %s (%s)", event.get("peer_id"), event.get("detail"))
        elif kind == "error":
            log.warning("rollout sidecar: %s", event.get("detail"))
