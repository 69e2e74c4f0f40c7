"""Bulk data path for the butterfly all-reduce: shard bytes on direct TCP connections.

Why: libp2p streams through p2pd cost several CPU copies per byte (protobuf framing, unix
socket, encryption, muxing); a 100 MB all-reduce among 4 peers spent ~20× gloo's time there.
Only tensor bytes use plain TCP (wire format: see the comment above `MAGIC`); group, round id
and token stay on the authenticated libp2p stream.
Invariants:
- A token is 32 random bytes handed out by the reducer over the libp2p stream of the member it
  is for, bound to (group, member), single use and expiring. The member proves it knows the
  first half; the reducer answers with the second, so a member never streams its shard to a
  stranger listening on a recycled address either.
- Every length is checked against what the round expects BEFORE anything is allocated or read
  (a raw shard is exactly `numel * 4` bytes, a compressed one at most `max_payload_bytes`);
  decoded values must be finite. A violation raises `BulkError` with a bounded `.reason` (a
  metrics label) and drops the connection. Every read and write runs under a deadline.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch

from swarm_node.protocol import codec

log = logging.getLogger(__name__)

# Wire format (all little-endian), one connection per (member, reducer, group):
#   member  -> reducer  HELLO    magic b"SNB1", client proof (16 B)
#   reducer -> member   WELCOME  status u8, server proof (16 B; zeros when rejected)
#   member  -> reducer  PUSH     compression u8, weight f64, nbytes u64, then nbytes of payload
#   reducer -> member   REPLY    status u8, nbytes u64, detail length u16, detail (utf-8),
#                                then (status OK only) nbytes of payload, then
#                       TRAILER  status u8, contributors u32, total weight f64
# Payload: COMPRESSION_NONE is the raw little-endian fp32 shard (sent from and received into
# the tensors' own memory, no copy in Python); any other compression is ONE
# `swarmnode.v1.Tensor` message made by protocol/codec.py for the whole shard.
# Raw shards are pipelined: the reducer adds each SEGMENT of a push as it arrives and streams
# each segment of the mean back as soon as every member's part of it is in, so the scatter and
# the gather overlap on one full-duplex connection. The REPLY is therefore sent before the
# outcome is known; only the TRAILER says whether the payload counts (OK and every member
# counted), so a reader must not use the payload before the trailer.
# Nothing here knows about rounds or what the weights mean: protocol/averaging/butterfly.py does.
MAGIC = b"SNB1"
TOKEN_BYTES = 32
PROOF_BYTES = TOKEN_BYTES // 2
HELLO = struct.Struct(f"<4s{PROOF_BYTES}s")
WELCOME = struct.Struct(f"<B{PROOF_BYTES}s")
PUSH = struct.Struct("<BdQ")
REPLY = struct.Struct("<BQH")
TRAILER = struct.Struct("<BId")
OK, REJECTED, TIMEOUT = 0, 1, 2
MAX_DETAIL = 512
HANDSHAKE_TIMEOUT_S = 5.0  # a connection that does not say HELLO in time is dropped
MAX_CONNECTIONS = 256  # concurrent inbound connections; more are refused at accept
MAX_PER_SOURCE = 64  # of them from one IP address: one host holding idle connections cannot lock others out
# reasons BulkError may carry; the codec's own reasons pass through unchanged
REJECT_REASONS: tuple[str, ...] = ("bad_token", "truncated", "too_large", "bad_shape", "malformed",
                                   "non_finite", "timeout")


class BulkError(Exception):
    """A bulk transfer failed or was refused; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class BulkUnavailable(Exception):
    """The TCP path cannot be used with this peer (no listener, unreachable, handshake
    refused) and nothing was sent yet: the caller may fall back to the libp2p stream."""


# ---------------------------------------------------------------------------- framing (pure)


def max_payload_bytes(numel: int) -> int:
    """Upper bound on a compressed shard's bytes: never more than raw fp32 plus headers and
    per-block scales (every codec compression is smaller than fp32 + 1/64 for its scales)."""
    return numel * 4 + numel // 64 + 4096


def pack_push(compression: int, weight: float, nbytes: int) -> bytes:
    return PUSH.pack(compression, weight, nbytes)


def unpack_push(data: bytes, numel: int) -> tuple[int, float, int]:
    """Validate a PUSH header against a shard of `numel` fp32 elements."""
    if len(data) != PUSH.size:
        raise BulkError("truncated", f"push header of {len(data)} bytes")
    compression, weight, nbytes = PUSH.unpack(data)
    if compression not in (codec.NONE, codec.FLOAT16, codec.INT8_BLOCKWISE, codec.E3M0):
        raise BulkError("malformed", f"unknown compression {compression}")
    if not (weight >= 0 and weight < 1e9):  # also false for NaN
        raise BulkError("malformed", f"bad weight {weight!r}")
    check_payload_size(compression, nbytes, numel)
    return compression, weight, nbytes


def check_payload_size(compression: int, nbytes: int, numel: int) -> None:
    if compression == codec.NONE:
        if nbytes != numel * 4:
            raise BulkError("too_large" if nbytes > numel * 4 else "bad_shape",
                            f"raw shard of {nbytes} bytes, expected {numel * 4}")
    elif nbytes > max_payload_bytes(numel):
        raise BulkError("too_large", f"compressed shard of {nbytes} bytes for {numel} elements")
    elif nbytes == 0:
        raise BulkError("bad_shape", "empty compressed shard")


def pack_reply(status: int, nbytes: int, detail: str = "") -> bytes:
    d = detail.encode()[:MAX_DETAIL]
    return REPLY.pack(status, nbytes, len(d)) + d


def unpack_reply(data: bytes) -> tuple[int, int, int]:
    """(status, nbytes, detail_len) of a REPLY header."""
    if len(data) != REPLY.size:
        raise BulkError("truncated", f"reply header of {len(data)} bytes")
    status, nbytes, detail_len = REPLY.unpack(data)
    if status not in (OK, REJECTED, TIMEOUT) or detail_len > MAX_DETAIL:
        raise BulkError("malformed", f"reply status {status}, detail of {detail_len} bytes")
    return status, nbytes, detail_len


def pack_trailer(status: int, contributors: int, total_weight: float) -> bytes:
    return TRAILER.pack(status, contributors, total_weight)


def unpack_trailer(data: bytes, max_contributors: int) -> tuple[int, int, float]:
    if len(data) != TRAILER.size:
        raise BulkError("truncated", f"trailer of {len(data)} bytes")
    status, contributors, total_weight = TRAILER.unpack(data)
    if status not in (OK, REJECTED, TIMEOUT) or contributors > max_contributors:
        raise BulkError("malformed", f"trailer status {status} with {contributors} contributors")
    return status, contributors, total_weight


def segment_bounds(numel: int, segment: int) -> list[tuple[int, int]]:
    """The pipelining segments of a shard: [start, end) of at most `segment` elements
    (one empty segment for an empty shard, so every shard has at least one)."""
    if segment < 1:
        raise ValueError("segment must be >= 1")
    return [(s, min(s + segment, numel)) for s in range(0, numel, segment)] or [(0, 0)]


def encode_payload(x: torch.Tensor, compression: int) -> memoryview:
    """What goes on the wire for shard `x` (flat fp32): raw bytes are a view of x itself."""
    if compression == codec.NONE:
        x = x.detach().reshape(-1).float().contiguous()
        return memoryview(x.numpy()).cast("B")
    return memoryview(codec.encode_tensor(x, compression).SerializeToString())


def raw_view(dest: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous fp32 CPU tensor, for recv_into."""
    if dest.dtype != torch.float32 or not dest.is_contiguous() or dest.device.type != "cpu":
        raise ValueError("destination must be a contiguous fp32 CPU tensor")
    return memoryview(dest.numpy()).cast("B")


def decode_payload(compression: int, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
    """Validate and decode a compressed shard with our codec (raw shards are read in place)."""
    try:
        return codec.parse_tensor(bytes(data), max_numel=numel, expected_shape=(numel,),
                                  expected_dtype=torch.float32)
    except codec.CodecError as e:
        raise BulkError(e.reason, str(e)) from None


def check_finite(x: torch.Tensor) -> None:
    # aminmax is one pass with no temporary (isfinite().all() allocates a bool tensor and is
    # ~20x slower); NaN propagates to both ends, +-inf shows at one of them
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise BulkError("non_finite", "shard holds NaN/inf")


# ---------------------------------------------------------------------------- socket I/O


async def _recv_loop(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise BulkError("truncated", f"connection closed after {got} of {n} bytes")
        got += k


async def recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """Fill `view` from `sock` before `deadline` (loop time), or raise BulkError."""
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise BulkError("timeout", "deadline passed")
    try:
        # one wait_for around the whole loop: a Task per recv would cost more than the copy
        await asyncio.wait_for(_recv_loop(loop, sock, view), remaining)
    except asyncio.TimeoutError:
        raise BulkError("timeout", f"{len(view)} bytes not received in {remaining:.1f}s") from None
    except (ConnectionError, OSError) as e:
        raise BulkError("truncated", f"connection failed: {e}") from None


async def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    await recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


async def send_all(sock: socket.socket, *parts: bytes | memoryview, deadline: float) -> int:
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    if remaining <= 0:
        raise BulkError("timeout", "deadline passed")

    async def go() -> None:
        for p in parts:
            await loop.sock_sendall(sock, p)

    try:
        await asyncio.wait_for(go(), remaining)
    except asyncio.TimeoutError:
        raise BulkError("timeout", f"send not done in {remaining:.1f}s") from None
    except (ConnectionError, OSError) as e:
        raise BulkError("truncated", f"connection failed: {e}") from None
    return sum(len(p) for p in parts)


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # no SO_SNDBUF/SO_RCVBUF: setting them disables Linux autotuning, which grows loopback
    # and LAN buffers to several MB, past the usual rmem_max cap on explicit sizes


# ---------------------------------------------------------------------------- server


@dataclass
class _Grant:
    server_proof: bytes
    session: Any
    expires: float


Handler = Callable[[socket.socket, Any], Awaitable[None]]


def local_hosts(bind_host: str, announce_host: str | None) -> list[str]:
    """Addresses to advertise, best first: the announced host, else the bound one, else
    this machine's IPv4 addresses (routable before loopback)."""
    if announce_host:
        return [announce_host]
    if bind_host not in ("0.0.0.0", "", "::"):
        return [bind_host]
    found: list[str] = []
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and a.address not in found:
                    found.append(a.address)
    except Exception:  # psutil missing or a sandbox without interfaces: loopback only
        pass
    found.sort(key=lambda h: (ipaddress.ip_address(h).is_loopback, ipaddress.ip_address(h).is_link_local))
    return found or ["127.0.0.1"]


class BulkServer:
    """One TCP listener per node. `issue(session)` makes a token; a connection that proves
    it gets `handler(sock, session)`; anything else is counted via `on_reject` and closed."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0,
                 announce_host: str | None = None, on_reject: Callable[[str], None] | None = None,
                 max_per_source: int = MAX_PER_SOURCE):
        self.handler, self.host, self.port = handler, host, port
        self.max_per_source = max_per_source
        self._per_source: dict[str, int] = {}
        self.announce_host = announce_host
        self.on_reject = on_reject or (lambda reason: None)
        self._grants: dict[bytes, _Grant] = {}
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self.hosts: list[str] = []

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host if self.host not in ("", "::") else "0.0.0.0", self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.hosts = local_hosts(self.host, self.announce_host)
        self._accept_task = asyncio.create_task(self._accept_loop())

    def issue(self, session: Any, ttl_s: float) -> bytes:
        """A fresh single-use token for `session` (give it to the session's peer only)."""
        now = time.monotonic()
        for k in [k for k, g in self._grants.items() if g.expires < now]:
            del self._grants[k]
        token = secrets.token_bytes(TOKEN_BYTES)
        self._grants[token[:PROOF_BYTES]] = _Grant(token[PROOF_BYTES:], session, now + ttl_s)
        return token

    def redeem(self, client_proof: bytes) -> _Grant | None:
        """The grant a client proof stands for (consumed), or None: unknown, used or expired."""
        grant = self._grants.pop(client_proof, None)
        if grant is None or grant.expires < time.monotonic():
            return None
        return grant

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("bulk accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            source = addr[0] if isinstance(addr, tuple) else str(addr)
            if len(self._conns) >= MAX_CONNECTIONS or self._per_source.get(source, 0) >= self.max_per_source:
                self.on_reject("too_many_connections")
                conn.close()
                continue
            _tune(conn)
            self._per_source[source] = self._per_source.get(source, 0) + 1
            task = asyncio.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(lambda t, source=source: self._release(t, source))

    def _release(self, task: asyncio.Task, source: str) -> None:
        self._conns.discard(task)
        left = self._per_source.get(source, 1) - 1
        if left > 0:
            self._per_source[source] = left
        else:
            self._per_source.pop(source, None)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                hello = await recv_exact(conn, HELLO.size, loop.time() + HANDSHAKE_TIMEOUT_S)
            except BulkError as e:
                self.on_reject(e.reason)
                return
            magic, proof = HELLO.unpack(hello)
            grant = self.redeem(proof) if magic == MAGIC else None
            if grant is None:
                self.on_reject("bad_token" if magic == MAGIC else "malformed")
                log.warning("bulk connection with a bad token or magic refused")
                try:
                    await send_all(conn, WELCOME.pack(REJECTED, bytes(PROOF_BYTES)),
                                   deadline=loop.time() + 1.0)
                except BulkError:
                    pass
                return
            await send_all(conn, WELCOME.pack(OK, grant.server_proof), deadline=loop.time() + HANDSHAKE_TIMEOUT_S)
            await self.handler(conn, grant.session)
        except BulkError as e:
            log.info("bulk connection dropped: %s", e)
        except Exception:
            log.exception("bulk connection handler failed")
        finally:
            conn.close()

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------- client


async def connect(hosts: list[str], port: int, token: bytes, *, timeout_s: float,
                  handshake_s: float = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    """Open an authenticated connection to the first host that answers with the right
    server proof; BulkUnavailable if none does. `timeout_s` bounds the TCP connects in total
    (the reachability test: a NAT'd address costs no more); once a host accepted, its
    handshake gets `handshake_s`, since a slow WELCOME means a busy reducer, not a wrong address
    (a reducer page-faulting in its first round once missed the 3 s connect budget)."""
    if len(token) != TOKEN_BYTES or not (0 < port < 65536) or not hosts:
        raise BulkUnavailable("no usable bulk address or token")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    errors = []
    hosts = hosts[:8]
    for i, host in enumerate(hosts):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        sock = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            _tune(sock)
            # a blackholed candidate (NAT) must not eat the budget of the ones after it
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), max(0.2, remaining / (len(hosts) - i)))
            shake_by = loop.time() + max(0.1, handshake_s)
            await send_all(sock, HELLO.pack(MAGIC, token[:PROOF_BYTES]), deadline=shake_by)
            status, proof = WELCOME.unpack(await recv_exact(sock, WELCOME.size, shake_by))
            if status == OK and hmac.compare_digest(proof, token[PROOF_BYTES:]):
                return sock
            errors.append(f"{host}: handshake refused")
        except (asyncio.TimeoutError, OSError, BulkError, ValueError) as e:
            errors.append(f"{host}: {type(e).__name__} {e}"[:120])
        if sock is not None:
            sock.close()
    raise BulkUnavailable(f"bulk port {port} unreachable: {'; '.join(errors) or 'timeout'}")
