"""Process hygiene: no process of ours outlives the daemon, not even after SIGKILL.

hivemind starts `p2pd` as a plain child; if the Python parent dies uncleanly the daemon
keeps running under PID 1 and keeps answering peers (measured: peers still counted it
30 s later). We ask the kernel to SIGKILL p2pd when its parent dies (PR_SET_PDEATHSIG),
by wrapping asyncio's subprocess factory for that one binary. The flag is tied to the
*thread* that forked, which for hivemind is the event-loop (main) thread.

Zombies: a killed p2pd is re-parented to PID 1 which, in some sandboxes, never reaps it;
such a process is dead (state Z) and holds no sockets. `is_running_process` treats it so.
"""
from __future__ import annotations

import asyncio.subprocess
import ctypes
import functools
import os
import shutil
import signal

import psutil

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """Run in the child between fork and exec: SIGKILL me when my parent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # parent already gone before prctl took effect
        os._exit(1)


def install_p2pd_reaper() -> None:
    """Make every p2pd that hivemind spawns from now on die with this process."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_swarm_node_reaper", False):
        return

    setpriv = shutil.which("setpriv")

    @functools.wraps(original)
    async def create_subprocess_exec(program, *args, **kwargs):
        if os.path.basename(str(program)) == "p2pd":
            if setpriv is not None:
                # uvloop spawns through libuv and ignores preexec_fn, so set the flag from an
                # exec wrapper instead (util-linux setpriv execs p2pd in the same process).
                return await original(setpriv, "--pdeathsig", "KILL", "--", program, *args, **kwargs)
            kwargs.setdefault("preexec_fn", die_with_parent)  # honoured by the stdlib loop
        return await original(program, *args, **kwargs)

    create_subprocess_exec._swarm_node_reaper = True  # type: ignore[attr-defined]
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec


def reap_children(timeout_s: float = 3.0) -> int:
    """Terminate, then kill, every descendant still alive. Returns how many there were."""
    children = psutil.Process().children(recursive=True)
    for c in children:
        try:
            c.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for c in alive:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return len(children)


def is_running_process(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
