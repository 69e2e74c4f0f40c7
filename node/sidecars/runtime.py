"""What every sidecar program shares: arguments, identity, event output, lifetime.

Imported by the sidecar programs only (mdns.py, gossip.py). It imports trio and py-libp2p
inside its functions, after `run_sidecar` has set the process up, never at import.
- `emit` writes one JSON event line to the real stdout (the channel to the node).
- `sidecar_parser` holds the arguments every sidecar takes; `load_host` makes a py-libp2p
  host whose key is the node's identity (so the sidecar's peer id is the node's).
- `run_sidecar` dies with the node (PR_SET_PDEATHSIG plus a parent-pid watch), keeps
  stdout for events, then runs the program on trio; `until_signal` is a nursery that
  SIGTERM or SIGINT cancels.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from swarm_node.processes import die_with_parent

_T0 = time.monotonic()
_EVENTS = sys.stdout  # the protocol channel to the node; everything else goes to stderr


def emit(event: str, **fields: Any) -> None:
    """One event line; `t_s` counts from process start."""
    _EVENTS.write(json.dumps({"event": event, **fields, "t_s": round(time.monotonic() - _T0, 3)}) + "\n")
    _EVENTS.flush()


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Exit when the parent is gone: a second line of defence next to PR_SET_PDEATHSIG."""
    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(interval_s)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def sidecar_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A parser for `python -m <module>` with the arguments every sidecar takes."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    p.add_argument("--identity", required=True, help="the node's identity.key (libp2p protobuf private key)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    return p


def load_host(identity_path: str) -> tuple[Any, Any]:
    """(py-libp2p host, private key) for the node's identity file."""
    from libp2p import new_host
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.serialization import deserialize_private_key

    with open(identity_path, "rb") as f:
        private = deserialize_private_key(f.read())
    return new_host(key_pair=KeyPair(private, private.get_public_key())), private


@contextlib.asynccontextmanager
async def until_signal() -> AsyncIterator[Any]:
    """A trio nursery that SIGTERM or SIGINT cancels (its body and every task in it)."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def cancel_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(cancel_on_signal)
            yield nursery


def run_sidecar(label: str, run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    """The common body of a sidecar's main(): die with the node, keep stdout for events only,
    then run `run(args)` on trio."""
    if args.parent_pid is not None:
        die_with_parent()
        watch_parent(args.parent_pid)
    # Libraries must not write to the event channel: route a stray print() to stderr.
    sys.stdout = sys.stderr
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{label}: %(name)s: %(message)s")
    import trio

    try:
        return trio.run(run, args)
    except KeyboardInterrupt:
        return 0
