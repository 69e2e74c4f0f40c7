"""`swarm-node check`: can this machine join a swarm? Each check yields a `Finding`.

This module owns the preflight checks and their wording. It only reads the local machine,
binds (and immediately closes) the configured listen port, may raise this process's open
file soft limit, and opens TCP connections to exactly the initial peers it is given, each
bounded by `connect_timeout_s` and all probed in parallel.

Levels: "ok"; "warn" (will run, but something a person should know); "error" (will not
work as configured). `exit_code` is 3 when any finding is an error, else 0.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import resource
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Level = Literal["ok", "warn", "error"]

GiB = 2**30
MiB = 2**20
EXIT_ERROR = 3
NOFILE_TARGET = 4096  # libp2p keeps many sockets; below this a busy swarm hits EMFILE

_BASE58 = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


@dataclass(frozen=True)
class Finding:
    name: str
    level: Level
    detail: str


# --------------------------------------------------------------------------- multiaddrs


@dataclass(frozen=True)
class PeerAddr:
    """The parts of an initial-peer multiaddr that preflight needs."""

    maddr: str
    proto: str  # ip4 | ip6 | dns | dns4 | dns6
    host: str
    transport: str  # tcp | udp
    port: int
    peer_id: str


def parse_multiaddr(maddr: str) -> PeerAddr:
    """Parse `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT/p2p/PEER_ID` (optionally `/udp/PORT/quic[-v1]`
    instead of tcp, and a trailing `/p2p-circuit[/p2p/ID]`). Raises ValueError saying what
    is wrong.
    """
    parts = maddr.strip().split("/")
    if len(parts) < 2 or parts[0] != "":
        raise ValueError("a multiaddr starts with '/'")
    parts = parts[1:]
    if len(parts) < 6:
        raise ValueError("expected /ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<peer-id>")
    proto, host, transport, port_text = parts[:4]
    rest = parts[4:]
    if proto == "ip4":
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"bad IPv4 address {host!r}") from None
    elif proto == "ip6":
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
    elif proto in ("dns", "dns4", "dns6"):
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"bad DNS name {host!r}")
    else:
        raise ValueError(f"unsupported address protocol {proto!r} (want ip4, ip6, dns, dns4, dns6)")
    if transport not in ("tcp", "udp"):
        raise ValueError(f"unsupported transport {transport!r} (want tcp, or udp/.../quic)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    if transport == "udp":
        if not rest or rest[0] not in ("quic", "quic-v1"):
            raise ValueError("udp must be followed by /quic or /quic-v1")
        rest = rest[1:]
    if len(rest) < 2 or rest[0] not in ("p2p", "ipfs"):
        raise ValueError("missing /p2p/<peer-id>")
    peer_id = rest[1]
    if len(peer_id) < 10 or not set(peer_id) <= _BASE58:
        raise ValueError(f"bad peer id {peer_id!r} (expected base58, e.g. 12D3KooW... or Qm...)")
    tail = rest[2:]
    if tail and not (tail == ["p2p-circuit"] or (len(tail) == 3 and tail[0] == "p2p-circuit" and tail[1] == "p2p")):
        raise ValueError(f"unexpected trailing components /{'/'.join(tail)}")
    return PeerAddr(maddr, proto, host, transport, int(port_text), peer_id)


# --------------------------------------------------------------------------- checks


def check_torch_and_device(device: str) -> list[Finding]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - a broken install shows up here in many ways
        return [Finding("torch", "error", f"cannot import torch: {e}")]
    from swarm_node.train.device import DeviceError, describe_device, resolve_device

    findings = [Finding("torch", "ok", f"torch {torch.__version__}")]
    try:
        dev = resolve_device(device)
        findings.append(Finding("device", "ok", f"{device} -> {describe_device(dev)}"))
    except DeviceError as e:
        findings.append(Finding("device", "error", str(e)))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        findings.append(Finding("gpu", "ok", f"{n} GPU(s) visible: {names}"))
    else:
        findings.append(Finding("gpu", "warn", "no GPU, training on CPU"))
    return findings


def _available_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - fall back to /proc below
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(
    warn_below: int = 2 * GiB, error_below: int = 512 * MiB, available: int | None = None
) -> Finding:
    avail = _available_memory_bytes() if available is None else available
    if avail is None:
        return Finding("memory", "warn", "cannot determine available RAM")
    text = f"{avail / GiB:.1f} GiB RAM available"
    if avail < error_below:
        return Finding("memory", "error", f"{text}; need at least {error_below / MiB:.0f} MiB")
    if avail < warn_below:
        return Finding("memory", "warn", f"{text}; under {warn_below / GiB:.0f} GiB, training may be slow or OOM")
    return Finding("memory", "ok", text)


def check_disk(state_dir: Path, warn_below: int = 1 * GiB) -> Finding:
    # The state dir may not exist yet: measure (and test writability of) its nearest ancestor.
    probe = Path(state_dir).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return Finding("disk", "error", f"{probe} is not writable (state dir {state_dir})")
    free = shutil.disk_usage(probe).free
    text = f"{free / GiB:.1f} GiB free for state dir {state_dir}"
    if free < warn_below:
        return Finding("disk", "warn", f"{text}; under {warn_below / GiB:.0f} GiB, checkpoints may fail")
    return Finding("disk", "ok", text)


def check_port(host: str, port: int) -> Finding:
    """Try to bind `host:port` (TCP) and release it at once. Port 0 means "any": skipped."""
    if port == 0:
        return Finding("port", "ok", "port 0: the OS picks a free port (not checked)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return Finding("port", "error", f"cannot resolve listen host {host!r}: {e}")
    family, socktype, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, socktype, proto) as s:
            # SO_REUSEADDR: a port left in TIME_WAIT by our own previous run is not "busy".
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as e:
        why = _errno_text(e)
        hint = " (is another swarm-node running?)" if e.errno == errno.EADDRINUSE else ""
        return Finding("port", "error", f"cannot bind {host}:{port}: {why}{hint}")
    return Finding("port", "ok", f"{host}:{port} is free")


def raise_nofile_limit(target: int = NOFILE_TARGET) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit if below `target`.

    Returns (soft before, soft after). Never lowers the limit; failures leave it unchanged.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < target:
        new = hard if hard != resource.RLIM_INFINITY else max(target, 1 << 20)
        for candidate in (new, target):
            if candidate <= soft or (hard != resource.RLIM_INFINITY and candidate > hard):
                continue
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
                break
            except (ValueError, OSError):
                continue
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_nofile(target: int = NOFILE_TARGET, raise_limit: bool = True) -> Finding:
    if raise_limit:
        before, after = raise_nofile_limit(target)
    else:
        before = after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if after != resource.RLIM_INFINITY and after < target:
        why = "and the hard limit does not allow more" if raise_limit else "(not raised: raise_nofile=False)"
        return Finding(
            "open-files",
            "warn",
            f"open-file limit is {_limit_text(after)} (< {target}) {why}; "
            f"raise it with `ulimit -n {target}`, LimitNOFILE={target} in a systemd unit, "
            f"or `docker run --ulimit nofile={target}:{target}`",
        )
    if after != before:
        return Finding(
            "open-files", "ok", f"raised open-file soft limit {_limit_text(before)} -> {_limit_text(after)}"
        )
    return Finding("open-files", "ok", f"open-file limit {_limit_text(after)}")


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _errno_text(e: OSError) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"[{name}] {e.strerror or os.strerror(e.errno)}"
    return str(e) or type(e).__name__


def _probe_tcp(addr: PeerAddr, timeout_s: float) -> str | None:
    """None if a TCP connection to the peer succeeds, else why not."""
    family = {"ip4": socket.AF_INET, "dns4": socket.AF_INET, "ip6": socket.AF_INET6, "dns6": socket.AF_INET6}.get(
        addr.proto, socket.AF_UNSPEC
    )
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, family=family, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve {addr.host!r}: {e.strerror or e}"
    fam, socktype, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(fam, socktype, proto) as s:
            s.settimeout(timeout_s)
            s.connect(sockaddr)
    except OSError as e:
        if isinstance(e, socket.timeout):
            return f"no answer within {timeout_s:g} s"
        return _errno_text(e)
    return None


def check_peers(initial_peers: Sequence[str], connect_timeout_s: float = 3.0) -> list[Finding]:
    """Parse every initial peer and TCP-probe the parsable ones in parallel.

    The whole check takes at most about `connect_timeout_s` + 2 s: probes run on daemon
    threads, and one stuck in a slow DNS lookup is reported as unreachable and abandoned.
    """
    if not initial_peers:
        return [Finding("peers", "ok", "no initial peers: this node starts a new swarm")]
    findings: list[Finding | None] = [None] * len(initial_peers)
    results: dict[int, str | None] = {}
    threads: list[tuple[int, PeerAddr, threading.Thread]] = []
    lock = threading.Lock()

    def run(i: int, addr: PeerAddr) -> None:
        why = _probe_tcp(addr, connect_timeout_s)
        with lock:
            results[i] = why

    for i, maddr in enumerate(initial_peers):
        try:
            addr = parse_multiaddr(maddr)
        except ValueError as e:
            findings[i] = Finding(f"peer[{i}]", "error", f"cannot parse {maddr!r}: {e}")
            continue
        if addr.transport != "tcp":
            findings[i] = Finding(f"peer[{i}]", "warn", f"{maddr}: reachability not checked ({addr.transport}/quic)")
            continue
        t = threading.Thread(target=run, args=(i, addr), name=f"preflight-peer-{i}", daemon=True)
        t.start()
        threads.append((i, addr, t))

    deadline = time.monotonic() + connect_timeout_s + 2.0
    for _, _, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for i, addr, _ in threads:
            if i not in results:
                findings[i] = Finding(f"peer[{i}]", "warn", f"{addr.maddr}: unreachable: probe timed out")
            elif results[i] is None:
                findings[i] = Finding(f"peer[{i}]", "ok", f"{addr.maddr}: TCP reachable")
            else:
                findings[i] = Finding(
                    f"peer[{i}]", "warn", f"{addr.maddr}: unreachable at {addr.host}:{addr.port}: {results[i]}"
                )
    return [f for f in findings if f is not None]


def run_preflight(
    *,
    device: str = "auto",
    initial_peers: Sequence[str] = (),
    host: str = "0.0.0.0",
    port: int = 0,
    state_dir: Path = Path("."),
    min_free_memory_bytes: int = 512 * MiB,
    warn_free_memory_bytes: int = 2 * GiB,
    min_free_disk_bytes: int = 1 * GiB,
    nofile_target: int = NOFILE_TARGET,
    raise_nofile: bool = True,
    connect_timeout_s: float = 3.0,
) -> list[Finding]:
    """Run every check, in a fixed order; never raises for a failed check."""
    findings = check_torch_and_device(device)
    findings.append(check_memory(warn_free_memory_bytes, min_free_memory_bytes))
    findings.append(check_disk(Path(state_dir), min_free_disk_bytes))
    findings.append(check_port(host, port))
    findings.append(check_nofile(nofile_target, raise_nofile))
    findings.extend(check_peers(list(initial_peers), connect_timeout_s))
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    return EXIT_ERROR if any(f.level == "error" for f in findings) else 0


def format_findings(findings: Sequence[Finding]) -> str:
    """Plain-text table: LEVEL, CHECK, DETAIL; one row per finding."""
    rows = [("LEVEL", "CHECK", "DETAIL")] + [(f.level.upper(), f.name, f.detail) for f in findings]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
