"""Start and supervise real `swarm-node join` processes on this machine.

Used by `swarm-node demo`, the multi-process tests, and later the churn tooling. Every
node runs in its own process group (so a kill reaches p2pd too), every wait has a
deadline, and `close()` leaves nothing running, whatever happened before.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from swarm_node.processes import is_running_process

JOIN_LINE = re.compile(r"^To join this swarm: swarm-node join --initial-peers (\S+)$", re.MULTILINE)


class LaunchError(RuntimeError):
    pass


# Every pid (node or child) this process has launched: lets a test session check, and kill,
# exactly its own leftovers, never a p2pd that belongs to someone else on the machine.
LAUNCHED_PIDS: set[int] = set()


def leftover_launched_pids() -> list[int]:
    return sorted(pid for pid in LAUNCHED_PIDS if is_running_process(pid))


@dataclass
class NodeProcess:
    name: str
    state_dir: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    cmd_prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", H]: must exec, keeping the pid
    _info: dict[str, Any] | None = None
    _pids_seen: set[int] = field(default_factory=set)

    def start(self) -> "NodeProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "node.json").unlink(missing_ok=True)
        self._info = None
        self.log_path = self.state_dir / "node.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWARM_NODE_LOG_FORMAT": "console", **self.env}
        log = open(self.log_path, "ab")
        cmd = [*self.cmd_prefix, sys.executable, "-m", "swarm_node", "join", "--state-dir", str(self.state_dir),
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        LAUNCHED_PIDS.add(self.proc.pid)
        log.close()
        return self

    # ---- observation ---------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def wait_info(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Block until the node wrote node.json (servers up, join line printed)."""
        deadline = time.monotonic() + timeout_s
        path = self.state_dir / "node.json"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LaunchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                self._info = json.loads(path.read_text())
                self._remember_pids()
                return self._info
            except (OSError, ValueError):
                time.sleep(0.2)
        raise LaunchError(f"{self.name} did not start within {timeout_s:.0f}s:\n{self.log_text()[-3000:]}")

    @property
    def info(self) -> dict[str, Any]:
        if self._info is None:
            return self.wait_info()
        return self._info

    def join_maddr(self) -> str:
        found = JOIN_LINE.findall(self.log_text())  # the log is appended across restarts: the last run's
        if not found:
            raise LaunchError(f"{self.name} printed no join line")
        return found[-1]

    def http(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        url = f"http://{self.info['http']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict[str, Any]:
        code, body = self.http("/status")
        if code != 200:
            raise LaunchError(f"{self.name} /status answered {code}: {body[:200]!r}")
        return json.loads(body)

    def wait_for(self, predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll /status until predicate(status) is true; raise with the last status otherwise."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LaunchError(f"{self.name} exited ({self.proc.returncode}) while waiting for {what}:\n"
                                  f"{self.log_text()[-3000:]}")
            try:
                last = self.status()
                if predicate(last):
                    return last
            except (LaunchError, OSError, ValueError) as e:
                last = e
            time.sleep(poll_s)
        raise LaunchError(f"{self.name}: timed out after {timeout_s:.0f}s waiting for {what}; last status: "
                          f"{str(last)[:1500]}\nlog tail:\n{self.log_text()[-2000:]}")

    def _remember_pids(self) -> None:
        if self.proc is None:
            return
        try:
            p = psutil.Process(self.proc.pid)
            self._pids_seen |= {p.pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        LAUNCHED_PIDS.update(self._pids_seen)

    def group_pids(self) -> list[int]:
        """Live (non-zombie) processes of this node: its group plus any child seen earlier."""
        pids = set()
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if self.proc is not None and os.getpgid(p.pid) == self.proc.pid or p.pid in self._pids_seen:
                    pids.add(p.pid)
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                continue
        return sorted(pids)

    # ---- stopping --------------------------------------------------------------------
    def terminate(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (graceful drain); returns the exit code, or None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self, group: bool = True) -> None:
        """SIGKILL the node (its whole process group unless group=False: the crash path)."""
        if self.proc is None:
            return
        self._remember_pids()
        try:
            if group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Leave nothing behind: kill the group and any remembered child (e.g. p2pd)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        for pid in self.group_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Swarm:
    """A set of nodes on loopback started from one bootstrap node."""

    def __init__(self, workdir: Path, common_args: list[str], env: dict[str, str] | None = None):
        self.workdir, self.common_args, self.env = Path(workdir), list(common_args), dict(env or {})
        self.nodes: list[NodeProcess] = []

    def add(self, name: str, extra: list[str] | None = None, initial: str | None = None) -> NodeProcess:
        args = [*self.common_args, *(extra or [])]
        args += ["--initial-peers", initial] if initial else ["--new-swarm"]
        node = NodeProcess(name, self.workdir / name, args, env=self.env)
        self.nodes.append(node)
        return node.start()

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
