"""Node side of any sidecar: spawn, read, restart and stop one sidecar process.

Used by swarm_node.discovery (mDNS) and swarm_node.strategies.sapo.gossip (rollouts); it
never imports py-libp2p. `sidecar_command` runs `python -m <module> <args> --parent-pid
<us>` through `setpriv --pdeathsig KILL` when available (uvloop ignores preexec_fn), so
the kernel kills the sidecar with the node; the sidecar also watches that pid.

`SidecarSupervisor` runs the command until `stop()`: each stdout line is one JSON object
handed to `on_event` (lines over `max_line_bytes`, not JSON, or that make `on_event` raise
are skipped); if the process exits it is restarted with backoff (1 s doubling to
`max_backoff_s`, back to 1 s after a run of over a minute). `stop()` sends SIGTERM, waits
`stop_timeout_s`, then SIGKILLs, and reaps the process within about 2 s more.
`SidecarClient` is the base of the clients: start, stop and counters of their `sidecar`.
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
from typing import Callable, Sequence

FRESH_AFTER_S = 60.0  # a sidecar that ran this long failed afresh: not a crash loop
KILL_WAIT_S = 2.0


def sidecar_command(module: str, args: Sequence[str]) -> list[str]:
    """The argv that runs sidecar `module` as a child that dies with this process."""
    cmd = [sys.executable, "-m", module, *args, "--parent-pid", str(os.getpid())]
    setpriv = shutil.which("setpriv")
    # setpriv execs the sidecar in place (same pid) with the parent-death signal set
    # before Python even starts; the sidecar's own parent watch covers systems without it.
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


class SidecarSupervisor:
    def __init__(self, command: Callable[[], list[str]], *, on_event: Callable[[dict], None],
                 log: logging.Logger, label: str, task_name: str, on_exit: Callable[[], None] | None = None,
                 stdin: bool = False, max_line_bytes: int = 64 * 1024, stop_timeout_s: float = 4.0,
                 max_backoff_s: float = 30.0):
        # `command` is called at each (re)start; `label` names the sidecar in log lines.
        self.command, self.on_event, self.on_exit = command, on_event, on_exit
        self.log, self.label, self.task_name = log, label, task_name
        self.stdin, self.max_line_bytes = stdin, max_line_bytes
        self.stop_timeout_s, self.max_backoff_s = stop_timeout_s, max_backoff_s
        self.restarts = 0
        self.pid: int | None = None  # the current (or last) process
        self.started_at = 0.0  # time.monotonic() at start()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        """Spawn in the background and return at once."""
        self.started_at = time.monotonic()
        self._task = asyncio.create_task(self._supervise(), name=self.task_name)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout_s`; no restart after this."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)  # lets it clean up (e.g. unregister its mDNS record)
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except (asyncio.TimeoutError, ProcessLookupError):
                await self._kill(proc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._proc is not None and self._proc.returncode is None:  # spawned while we were stopping
            await self._kill(self._proc)

    def send_line(self, line: str) -> bool:
        """Write one line to the sidecar's stdin (needs stdin=True); False if it is not running."""
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return False
        try:
            proc.stdin.write((line + "\n").encode())
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False
        return True

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        try:
            proc.kill()
            await asyncio.wait_for(proc.wait(), KILL_WAIT_S)
        except (asyncio.TimeoutError, ProcessLookupError):
            pass

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.command(), stdin=asyncio.subprocess.PIPE if self.stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=None, limit=self.max_line_bytes)
                self.pid = self._proc.pid
                await self._read_events(self._proc.stdout)
                code: int | str = await self._proc.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code = f"spawn failed: {e}"
            if self.on_exit is not None:
                self.on_exit()
            if self._stopping:
                return
            if time.monotonic() - started > FRESH_AFTER_S:
                backoff = 1.0
            self.log.warning("%s exited (%s); restarting in %.0fs", self.label, code, backoff)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _read_events(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than max_line_bytes: asyncio dropped the buffered part;
                continue        # the line's tail comes next, fails to parse, and is skipped too
            if not line:
                return
            try:
                self.on_event(json.loads(line))
            except Exception as e:  # one bad line must not stop the sidecar's client
                self.log.debug("ignored a line from the %s (%s): %r", self.label, e, line[:200])


class SidecarClient:
    """Base of a node-side sidecar client; the subclass sets `self.sidecar`."""
    sidecar: SidecarSupervisor

    @property
    def restarts(self) -> int:
        return self.sidecar.restarts

    @property
    def pid(self) -> int | None:
        return self.sidecar.pid

    def start(self) -> None:
        self.sidecar.start()

    async def stop(self) -> None:
        await self.sidecar.stop()
