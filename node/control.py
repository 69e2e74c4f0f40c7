"""Local gRPC control service: `swarm-node status|peers|drain` talk to a running node here.

Server contract:
- Binds loopback only (default `127.0.0.1:0`); any other host raises `ValueError` unless
  `allow_remote=True`. Status and peers are open to local users; `Drain` stops the node, so it
  needs the token the node writes to `control.token` (mode 0600) in its state dir.
- Handlers run on a 2-thread pool, not on the event loop: `status_fn` must return a
  ready snapshot cheaply and `drain_fn` must only *request* a drain in a thread-safe way
  (e.g. `loop.call_soon_threadsafe`) and return at once. A raising callback becomes
  gRPC INTERNAL with the exception text; the server keeps serving.

Client contract: every call has a deadline. An unreachable or silent node raises
`ControlUnavailable`, a refused drain `ControlRefused`, a server-side failure `ControlError`,
each with a message a person can act on; none leaks a raw `grpc.RpcError`.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc

from swarm_node.protocol.pb import swarm_node_control_pb2 as pb
from swarm_node.protocol.pb import swarm_node_control_pb2_grpc as pb_grpc
from swarm_node.status import NodeStatus, PeerView, Phase

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:0"
# SO_REUSEPORT (gRPC's Linux default) would let a second node bind the same port silently.
# Proxy variables must never reroute a loopback control call.
_SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class ControlError(RuntimeError):
    """The node answered, but the call failed (e.g. its status callback raised)."""


class ControlRefused(ControlError):
    """The node refused a mutating call: no control token, or the wrong one."""


class ControlUnavailable(ControlError):
    """No node answered at `address` within the deadline."""

    def __init__(
        self, address: str, cause: str | BaseException, state_dir: str | None = None, *, timeout_s: float | None = None
    ) -> None:
        self.address, self.cause, self.state_dir = address, cause, state_dir
        where = f" (state dir {state_dir})" if state_dir else ""
        if timeout_s is None:
            msg = f"no swarm-node is listening on {address} — is the node running?{where}"
        else:  # something accepted the connection but did not answer: a hung node, or not ours
            msg = f"the swarm-node on {address} did not answer within {timeout_s:g}s — is it hung?{where}"
        super().__init__(msg)


# --- conversions (one place, so the proto and the models cannot drift silently) ------------


def _opt(msg, field: str):
    return getattr(msg, field) if msg.HasField(field) else None


def peer_to_pb(p: PeerView) -> pb.Peer:
    return pb.Peer(**p.model_dump())


def peer_from_pb(m: pb.Peer) -> PeerView:
    return PeerView(
        peer_id=m.peer_id, state=m.state, strategy=m.strategy, role=m.role, device=m.device, step=m.step,
        samples_per_s=m.samples_per_s, version=m.version, expires_in_s=m.expires_in_s, is_self=m.is_self,
    )


def status_to_pb(st: NodeStatus) -> pb.StatusReply:
    d = st.model_dump(exclude={"peers", "last_round", "phase"})
    d = {k: v for k, v in d.items() if v is not None}  # None = unset `optional` field
    return pb.StatusReply(
        **d,
        phase=st.phase.value,
        peers=[peer_to_pb(p) for p in st.peers],
        last_round_json=json.dumps(st.model_dump(mode="json", include={"last_round"})["last_round"]),
    )


def status_from_pb(m: pb.StatusReply) -> NodeStatus:
    return NodeStatus(
        peer_id=m.peer_id, run_id=m.run_id, version=m.version, phase=Phase(m.phase), strategy=m.strategy,
        role=m.role, device=m.device, join_maddrs=list(m.join_maddrs), step=m.step,
        resumed_from_step=_opt(m, "resumed_from_step"), train_loss=_opt(m, "train_loss"),
        val_loss=_opt(m, "val_loss"), samples_per_s=m.samples_per_s, routing_table_size=m.routing_table_size,
        peers=[peer_from_pb(p) for p in m.peers], last_round=json.loads(m.last_round_json or "{}"),
        bytes_sent=m.bytes_sent, bytes_received=m.bytes_received, uptime_s=m.uptime_s, checks=dict(m.checks),
        waiting_for=_opt(m, "waiting_for"),
    )


# --- server -------------------------------------------------------------------------------


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"control address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # other host names could resolve anywhere


EXIT_PAST_STEP = 75  # `swarm-node drain --at-step N` exit code when the node is past N (EX_TEMPFAIL: ask again)


class DrainOutcome(NamedTuple):
    accepted: bool
    detail: str
    past_step: bool = False  # a drain at a step the node had already passed (refused)
    current_step: int = 0


TOKEN_FILE = "control.token"
TOKEN_METADATA = "x-swarm-node-token"


def write_token(state_dir: Path) -> str:
    """A fresh control token in `state_dir/control.token`, readable by its owner only."""
    token = secrets.token_hex(32)
    path = Path(state_dir) / TOKEN_FILE
    path.unlink(missing_ok=True)  # a file left with wider permissions is replaced, not reused
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def read_token(state_dir: str | Path) -> str | None:
    try:
        return (Path(state_dir) / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


class _Servicer(pb_grpc.ControlServicer):
    def __init__(self, status_fn: Callable[[], NodeStatus], drain_fn: Callable[[str, int], DrainOutcome | tuple[bool, str]],
                 token: str | None) -> None:
        self._status_fn, self._drain_fn, self._token = status_fn, drain_fn, token

    def _call(self, context: grpc.ServicerContext, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as e:
            log.exception("control callback %s raised", getattr(fn, "__name__", fn))
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return status_to_pb(self._call(context, self._status_fn))

    def Peers(self, request: pb.PeersRequest, context: grpc.ServicerContext) -> pb.PeersReply:
        return pb.PeersReply(peers=[peer_to_pb(p) for p in self._call(context, self._status_fn).peers])

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainReply:
        if self._token is not None:  # reading is open to local users; stopping the node is not
            given = dict(context.invocation_metadata()).get(TOKEN_METADATA, "")
            if not hmac.compare_digest(given.encode(), self._token.encode()):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"drain needs the node's control token ({TOKEN_FILE} in its state dir, readable by "
                              "the user that runs the node)")
        if request.at_step < 0:
            return pb.DrainReply(accepted=False, detail=f"at_step must be >= 0, got {request.at_step}")
        out = DrainOutcome(*self._call(context, self._drain_fn, request.reason, request.at_step))
        return pb.DrainReply(accepted=out.accepted, detail=out.detail, past_step=out.past_step,
                             current_step=out.current_step)


class ControlServer:
    """The control service on `address` (loopback `HOST:PORT`; port 0 = ephemeral).

    `start()` returns the bound `host:port` (IPv6 as `[::1]:port`) and raises `OSError`
    when the address cannot be bound. `stop(grace_s)` lets in-flight calls finish for up
    to `grace_s`, then cancels them; it is idempotent.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        status_fn: Callable[[], NodeStatus],
        drain_fn: Callable[[str, int], DrainOutcome | tuple[bool, str]],
        allow_remote: bool = False,
        token: str | None = None,
    ) -> None:
        host, port = _split_host_port(address)
        if not allow_remote and not _is_loopback(host):
            raise ValueError(
                f"refusing to bind the control service to {address}: it is unauthenticated and can drain "
                "the node; use a loopback address (127.0.0.1, ::1) or pass allow_remote=True"
            )
        self._host, self._port = host, port
        self._servicer = _Servicer(status_fn, drain_fn, token)
        self._server: grpc.Server | None = None

    def start(self) -> str:
        if self._server is not None:
            raise RuntimeError("ControlServer already started")
        server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="swarm-control"), options=_SERVER_OPTIONS)
        pb_grpc.add_ControlServicer_to_server(self._servicer, server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        try:
            port = server.add_insecure_port(f"{host}:{self._port}")
        except RuntimeError as e:  # grpcio raises here on bind failure (older versions returned 0)
            port, cause = 0, e
        else:
            cause = None
        if port == 0:
            server.stop(None)
            raise OSError(f"cannot bind the control service to {host}:{self._port}: {cause or 'address in use?'}")
        server.start()
        self._server = server
        address = f"{host}:{port}"
        log.debug("control service listening on %s", address)
        return address

    def stop(self, grace_s: float = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait(grace_s + 1.0)


# --- client -------------------------------------------------------------------------------


class ControlClient:
    """Calls a node's control service; usable as a context manager (closes the channel).

    Each call fails within about `timeout_s`: `ControlUnavailable` when nothing answers,
    `ControlError` when the node answered with an error. `state_dir` only improves the message.
    """

    def __init__(self, address: str, timeout_s: float = 5.0, *, state_dir: str | None = None,
                 token: str | None = None) -> None:
        self.address, self.timeout_s, self.state_dir, self.token = address, timeout_s, state_dir, token
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.ControlStub(self._channel)

    def status(self) -> NodeStatus:
        return status_from_pb(self._call(self._stub.Status, pb.StatusRequest()))

    def peers(self) -> list[PeerView]:
        return [peer_from_pb(p) for p in self._call(self._stub.Peers, pb.PeersRequest()).peers]

    def drain(self, reason: str, at_step: int = 0) -> DrainOutcome:
        """Ask the node to drain now, or (at_step > 0) once it reaches that step."""
        metadata = ((TOKEN_METADATA, self.token),) if self.token else None
        reply = self._call(self._stub.Drain, pb.DrainRequest(reason=reason, at_step=at_step), metadata)
        return DrainOutcome(reply.accepted, reply.detail, reply.past_step, reply.current_step)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, metadata=None):
        try:
            # wait_for_ready=False: a refused connection fails now instead of at the deadline.
            return method(request, timeout=self.timeout_s, wait_for_ready=False, metadata=metadata)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ControlUnavailable(self.address, e.details() or str(code), self.state_dir) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ControlUnavailable(
                    self.address, e.details() or str(code), self.state_dir, timeout_s=self.timeout_s
                ) from None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise ControlRefused(f"swarm-node at {self.address} refused: {e.details()}") from None
            raise ControlError(f"swarm-node at {self.address} failed the call: {code}: {e.details()}") from None
