"""An in-memory network of peers for tests: the real `Transport` over in-memory P2P streams.

`InMemoryNetwork.transport(name)` returns a `FakeTransport`, which is the project's own
`protocol.transport.Transport` built on a `FakeP2P`. So `call()`'s deadline, its error
mapping (`PeerUnavailable`, `ClosedWithoutAnswer`), handler wrapping and byte counting are
the production code. Only the layer under it is in memory. That layer copies how hivemind's
protobuf streams behave:
- The sender serializes each message (`SerializeToString`) and the receiver parses it with the
  type it declared (`FromString`), so schema mismatches fail as they would on the wire. An
  optional `max_message_bytes` cap records an oversized message in `violations` and breaks
  the stream.
- The caller writes its requests from a task of its own, then an end-of-stream marker. The
  handler's request iterator ends at that marker, and the handler gets the caller's id from
  the connection (`P2PContext.remote_id`).
- A handler that raises sends its error, and the caller's stream raises `P2PHandlerError`.
  A handler that returns closes the stream: the caller reads what was sent, then the end. If
  the caller is still writing, its writes fail with BrokenPipeError.
- When a caller stops reading (a deadline, a `break`, a broken stream), its handler is
  cancelled.

Faults: `partition(a, b)`/`heal` (the link goes black: dials and messages wait until the link
is healed), `kill(peer)`, `delay(peer, s)` added to each message to or from the peer, and
`drop_after(n, a, b)`, which breaks a stream after n messages. `on_stream(method, fn)` runs
`fn` when a matching stream is dialled, which places a fault at an exact protocol step.
Not modelled: bandwidth, flow control, the handler's 5-message prefetch bound, p2pd's dial and
relay timings, unary calls, and the bulk TCP path.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Coroutine, Iterable, Union

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from swarm_node.protocol.transport import Transport

_EOS = object()  # the caller's end-of-stream marker (hivemind sends an empty RPCError)
_CLOSE = object()  # the handler side closed the stream: end of file for the caller
_WAKE = object()  # wakes a reader after its stream broke


@dataclass(frozen=True)
class _HandlerError:
    message: str  # what hivemind's RPCError carries: str(exception)


class _Reset(Exception):
    """The stream broke: reads on it see end of file."""


@dataclass
class ByteCounts:
    """A `count_bytes(direction, channel, nbytes)` callback that keeps totals."""

    totals: dict[tuple[str, str], int] = field(default_factory=dict)

    def __call__(self, direction: str, channel: str, nbytes: int) -> None:
        key = (direction, channel)
        self.totals[key] = self.totals.get(key, 0) + nbytes

    def get(self, direction: str, channel: str) -> int:
        return self.totals.get((direction, channel), 0)


@dataclass
class _DropRule:
    after: int  # messages that get through before the stream breaks
    a: str
    b: str | None
    method: str | None
    left: int | None  # streams still to break; None: every matching stream

    def matches(self, caller: str, callee: str, name: str) -> bool:
        ends = {caller, callee}
        if self.a not in ends or (self.b is not None and self.b not in ends):
            return False
        return self.method is None or name.endswith("." + self.method)


@dataclass(eq=False)
class _Stream:
    """One bidirectional stream. `up` carries requests and `down` carries replies, as
    (deliver_at loop time, item) pairs. An item is serialized bytes or a marker."""

    caller: str
    callee: str
    name: str
    drop_after: int | None = None
    up: asyncio.Queue = field(default_factory=asyncio.Queue)
    down: asyncio.Queue = field(default_factory=asyncio.Queue)
    messages: int = 0  # data messages that crossed, both directions together
    broken: bool = False
    handler_done: bool = False  # the handler side closed its end
    handler_task: asyncio.Task | None = None


class FakeP2P:
    """The part of hivemind's `P2P` that `Transport` uses, served by an `InMemoryNetwork`."""

    def __init__(self, network: InMemoryNetwork, name: str, peer_id: PeerID):
        self.network, self.name, self.peer_id = network, name, peer_id
        self.handlers: dict[str, tuple[Callable, type[Message]]] = {}
        self.dead = False
        self.tasks: set[asyncio.Task] = set()  # cancelled by kill(), as a SIGKILL would end them

    async def add_protobuf_handler(self, name: str, handler: Callable, input_protobuf_type: type[Message], *,
                                   stream_input: bool = False, stream_output: bool = False,
                                   balanced: bool = False) -> None:
        if not (stream_input and stream_output):
            raise NotImplementedError("the fake serves bidirectional streams only (all that Transport registers)")
        if self.dead:
            raise P2PDaemonError("p2pd is not running")
        self.handlers[name] = (handler, input_protobuf_type)  # p2pd too replaces a handler of the same name

    async def remove_protobuf_handler(self, name: str, *, stream_input: bool = False,
                                      stream_output: bool = False) -> None:
        self.handlers.pop(name, None)

    async def iterate_protobuf_handler(self, peer_id: PeerID, name: str,
                                       input: Iterable[Message] | AsyncIterator[Message],
                                       output_protobuf_type: type[Message]) -> AsyncIterator[Message]:
        return await self.network._open(self, peer_id, name, input, output_protobuf_type)


class FakeTransport(Transport):
    """`protocol.transport.Transport` on a `FakeP2P`. Everything above the streams is the
    production code."""

    def __init__(self, network: InMemoryNetwork, p2p: FakeP2P, run_id: str,
                 count_bytes: Callable[[str, str, int], None]):
        super().__init__(p2p, run_id, count_bytes)  # type: ignore[arg-type]
        self.network, self.name = network, p2p.name

    @property
    def bytes(self) -> ByteCounts | None:
        """The totals, when the network supplied the counter."""
        return self._count if isinstance(self._count, ByteCounts) else None


Peer = Union[FakeTransport, FakeP2P, str]  # a transport, its P2P, a peer name or a peer id


class InMemoryNetwork:
    """Peers in one event loop, and the faults between them. Create it, and use it, inside
    the loop that runs the test."""

    def __init__(self, *, max_message_bytes: int | None = None):
        self.max_message_bytes = max_message_bytes  # None: no cap (hivemind's streams have none)
        self.violations: list[str] = []  # oversized or unparsable messages seen on the wire
        self._peers: dict[str, FakeP2P] = {}  # by peer id
        self._names: dict[str, str] = {}  # name -> peer id
        self._cut: set[frozenset[str]] = set()
        self._delay_s: dict[str, float] = {}
        self._drops: list[_DropRule] = []
        self._streams: set[_Stream] = set()
        self._hooks: list[tuple[str, str | None, str | None, Callable[[str, str], None]]] = []
        self._changed = asyncio.Event()  # pulsed on every fault change, so waiters re-check

    # ------------------------------------------------------------------ peers
    def transport(self, name: str, run_id: str = "run",
                  count_bytes: Callable[[str, str, int], None] | None = None) -> FakeTransport:
        """A transport for peer `name` (created on first use). Two run ids on one peer share
        its P2P, as two runs on one p2pd do."""
        peer_id = self._names.get(name)
        if peer_id is None:
            # a sha256 multihash, so the id is valid base58 that `PeerID.from_base58` decodes
            pid = PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest())
            peer_id = pid.to_base58()
            self._names[name] = peer_id
            self._peers[peer_id] = FakeP2P(self, name, pid)
        return FakeTransport(self, self._peers[peer_id], run_id, count_bytes or ByteCounts())

    def peer_id(self, peer: Peer) -> str:
        if isinstance(peer, FakeTransport):
            return peer.peer_id
        if isinstance(peer, FakeP2P):
            return peer.peer_id.to_base58()
        if peer in self._names:
            return self._names[peer]
        if peer in self._peers:
            return peer
        raise KeyError(f"no peer {peer!r} in this network")

    def spawn(self, peer: Peer, coro: Coroutine) -> asyncio.Task:
        """Run `coro` as `peer`'s work: `kill(peer)` cancels it."""
        p2p = self._peers[self.peer_id(peer)]
        task = asyncio.create_task(coro)
        p2p.tasks.add(task)
        task.add_done_callback(p2p.tasks.discard)
        return task

    # ------------------------------------------------------------------ faults
    def kill(self, peer: Peer) -> None:
        """As if the process and its p2pd got SIGKILL. Its handlers vanish and its streams break
        on both ends. Its tasks started with `spawn` are cancelled. Later dials to it, and
        from it, fail."""
        p2p = self._peers[self.peer_id(peer)]
        p2p.dead = True
        p2p.handlers.clear()
        pid = p2p.peer_id.to_base58()
        for s in list(self._streams):
            if pid in (s.caller, s.callee):
                self._break(s, "peer killed")
        for task in list(p2p.tasks):
            task.cancel()
        self._pulse()

    def partition(self, a: Peer, b: Peer) -> None:
        """Cut the link between a and b, in both directions. Dials and messages on it wait until
        `heal` (as on a black-holed route). Other links are unaffected."""
        self._cut.add(frozenset((self.peer_id(a), self.peer_id(b))))
        self._pulse()

    def heal(self, a: Peer | None = None, b: Peer | None = None) -> None:
        """Restore the link between a and b, or every link when none are named."""
        if a is None:
            self._cut.clear()
        else:
            self._cut.discard(frozenset((self.peer_id(a), self.peer_id(b))))
        self._pulse()

    def delay(self, peer: Peer, seconds: float) -> None:
        """Add `seconds` to every message to or from `peer`, and to every dial. A link's
        latency is the sum of its two ends' delays."""
        self._delay_s[self.peer_id(peer)] = max(0.0, seconds)

    def drop_after(self, n_messages: int, a: Peer, b: Peer | None = None, *, method: str | None = None,
                   streams: int | None = 1) -> None:
        """Make the next `streams` streams (None: every one) between a and b (b None: a and
        anyone), for `method` if given (the name without the run prefix), break once
        `n_messages` data messages have crossed in either direction. The next message is
        lost, and both ends see the stream reset."""
        self._drops.append(_DropRule(n_messages, self.peer_id(a), None if b is None else self.peer_id(b),
                                     method, streams))

    def on_stream(self, method: str, fn: Callable[[str, str], None], *, caller: Peer | None = None,
                  callee: Peer | None = None) -> None:
        """Call `fn(caller_id, callee_id)` once, synchronously, when the first matching stream
        is dialled, before anything crosses it. It puts a fault (`kill`, `partition`) at a
        precise protocol step. A fault it injects applies to that very stream."""
        self._hooks.append((method, None if caller is None else self.peer_id(caller),
                            None if callee is None else self.peer_id(callee), fn))

    def is_cut(self, a: Peer, b: Peer) -> bool:
        return frozenset((self.peer_id(a), self.peer_id(b))) in self._cut

    async def close(self) -> None:
        """Break every stream and cancel every spawned task (end of a test)."""
        for s in list(self._streams):
            self._break(s, "network closed")
        tasks = [t for p in self._peers.values() for t in p.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _latency(self, a: str, b: str) -> float:
        return self._delay_s.get(a, 0.0) + self._delay_s.get(b, 0.0)

    async def _wait_link(self, a: str, b: str, stream: _Stream | None = None) -> None:
        """Wait while the link is cut. Returns early if `stream` breaks meanwhile."""
        while frozenset((a, b)) in self._cut and not (stream is not None and stream.broken):
            await self._changed.wait()

    def _break(self, s: _Stream, why: str) -> None:
        if s.broken:
            return
        s.broken = True
        s.up.put_nowait((0.0, _WAKE))
        s.down.put_nowait((0.0, _WAKE))
        # hivemind: the handler side's read fails, and it cancels the handler
        if s.handler_task is not None and not s.handler_task.done() and s.handler_task is not asyncio.current_task():
            s.handler_task.cancel()
        self._streams.discard(s)
        self._pulse()

    async def _send(self, s: _Stream, direction: str, item: object) -> None:
        """Put `item` (a message or a marker) on the stream. Raises what a socket write would."""
        if s.broken:
            raise ConnectionResetError(f"stream {s.name} was reset")
        if direction == "up" and s.handler_done:
            raise BrokenPipeError(f"{s.name}: the handler closed the stream")
        if isinstance(item, Message):
            payload = item.SerializeToString()
            if self.max_message_bytes is not None and len(payload) > self.max_message_bytes:
                self.violations.append(f"{s.name}: {type(item).__name__} of {len(payload)} bytes "
                                       f"> {self.max_message_bytes}")
                self._break(s, "oversized message")
                raise ConnectionResetError(f"stream {s.name} was reset")
            if s.drop_after is not None and s.messages >= s.drop_after:
                self._break(s, "dropped")
                raise ConnectionResetError(f"stream {s.name} was reset")
            s.messages += 1
            item = payload
        queue = s.up if direction == "up" else s.down
        queue.put_nowait((asyncio.get_running_loop().time() + self._latency(s.caller, s.callee), item))
        await asyncio.sleep(0)  # a write yields to the loop, as a socket drain does

    async def _receive(self, s: _Stream, queue: asyncio.Queue) -> object:
        deliver_at, item = await queue.get()
        wait_s = deliver_at - asyncio.get_running_loop().time()
        if wait_s > 0 and not s.broken:
            await asyncio.sleep(wait_s)
        await self._wait_link(s.caller, s.callee, s)
        if s.broken:
            raise _Reset(s.name)
        return item

    async def _open(self, p2p: FakeP2P, peer_id: PeerID, name: str,
                    requests: Iterable[Message] | AsyncIterator[Message],
                    reply_type: type[Message]) -> AsyncIterator[Message]:
        caller, callee = p2p.peer_id.to_base58(), peer_id.to_base58()
        if p2p.dead:
            raise P2PDaemonError("p2pd is not running")
        if caller == callee:
            raise P2PDaemonError("dial to self attempted")
        for hook in list(self._hooks):
            method, want_caller, want_callee, fn = hook
            if name.endswith("." + method) and want_caller in (None, caller) and want_callee in (None, callee):
                self._hooks.remove(hook)
                fn(caller, callee)
        if p2p.dead:
            raise P2PDaemonError("p2pd is not running")
        latency = self._latency(caller, callee)
        if latency:
            await asyncio.sleep(latency)
        await self._wait_link(caller, callee)
        target = self._peers.get(callee)
        if target is None or target.dead or p2p.dead:
            raise P2PDaemonError(f"failed to dial {callee}: no good addresses")
        entry = target.handlers.get(name)
        if entry is None:
            raise P2PDaemonError(f"failed to negotiate protocol {name}: protocols not supported")
        s = _Stream(caller, callee, name)
        for rule in self._drops:
            if rule.left != 0 and rule.matches(caller, callee, name):
                s.drop_after = rule.after
                if rule.left is not None:
                    rule.left -= 1
                break
        self._streams.add(s)
        handler, request_type = entry
        s.handler_task = asyncio.create_task(self._serve(s, target, handler, request_type))
        if not hasattr(requests, "__aiter__"):
            requests = _aiter(requests)  # type: ignore[arg-type]
        writer = asyncio.create_task(self._write(s, requests))  # type: ignore[arg-type]
        return self._replies(s, writer, reply_type)

    async def _write(self, s: _Stream, requests: AsyncIterator[Message]) -> None:
        async for msg in requests:
            await self._send(s, "up", msg)
        await self._send(s, "up", _EOS)

    async def _replies(self, s: _Stream, writer: asyncio.Task, reply_type: type[Message]) -> AsyncIterator[Message]:
        try:
            while True:
                try:
                    item = await self._receive(s, s.down)
                except _Reset:
                    break  # hivemind: IncompleteReadError ends the replies; the writer says the rest
                if item is _CLOSE:
                    break
                if isinstance(item, _HandlerError):
                    raise P2PHandlerError(f"Failed to call handler `{s.name}` at {s.callee}: {item.message}")
                try:
                    reply = reply_type.FromString(item)  # type: ignore[arg-type]
                except DecodeError:
                    self.violations.append(f"{s.name}: reply does not parse as {reply_type.__name__}")
                    raise
                yield reply
            await writer  # a write that failed (reset, or the handler closed first) raises here
        finally:
            writer.cancel()
            if writer.done() and not writer.cancelled():
                writer.exception()  # retrieved: an unread failure is not worth a warning
            if not s.handler_done:
                self._break(s, "caller closed")  # the handler's next read fails: it is cancelled
            self._streams.discard(s)

    async def _serve(self, s: _Stream, target: FakeP2P, handler: Callable, request_type: type[Message]) -> None:
        context = P2PContext(handle_name=s.name, local_id=target.peer_id, remote_id=PeerID.from_base58(s.caller))

        async def incoming() -> AsyncIterator[Message]:
            while True:
                try:
                    item = await self._receive(s, s.up)
                except _Reset:
                    return
                if item is _EOS:
                    return
                try:
                    msg = request_type.FromString(item)  # type: ignore[arg-type]
                except DecodeError:
                    # hivemind's reader fails, and the handler is cancelled and the stream closed
                    self.violations.append(f"{s.name}: request does not parse as {request_type.__name__}")
                    s.handler_done = True
                    s.down.put_nowait((0.0, _CLOSE))
                    raise asyncio.CancelledError from None
                yield msg

        try:
            async for reply in handler(incoming(), context):
                try:
                    await self._send(s, "down", reply)
                except (ConnectionResetError, BrokenPipeError):
                    return  # the caller is gone: hivemind stops serving without a word
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not s.broken:
                s.down.put_nowait((asyncio.get_running_loop().time() + self._latency(s.caller, s.callee),
                                   _HandlerError(str(e))))
        if not s.broken and not s.handler_done:
            s.handler_done = True
            s.down.put_nowait((asyncio.get_running_loop().time() + self._latency(s.caller, s.callee), _CLOSE))


async def _aiter(items: Iterable[Message]) -> AsyncIterator[Message]:
    for item in items:
        yield item
