"""The one transport all strategies share: protobuf streams between peers over hivemind's P2P.

Streams, not unary calls: unary messages are capped at 4 MiB by p2pd's persistent
connections, streams are not (each message is framed; we keep each under `MAX_MESSAGE`).

Contract:
- Handler names are namespaced by run id, so two runs on one p2pd never cross.
- `call()` yields the peer's replies and enforces one overall deadline; on expiry it
  raises `PeerUnavailable` (so do dial and remote-handler errors). Callers treat that as
  "this peer is not taking part now", never as fatal.
- Every message in and out is counted in `swarm_network_{transmit,receive}_bytes_total`
  under the caller-chosen channel label.
- Handlers learn the caller's peer id from the libp2p connection (authenticated by its
  key), never from a field inside the message.
"""
from __future__ import annotations

import asyncio
from enum import Enum
from typing import AsyncIterator, Callable, Iterable, TypeVar

import torch
from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext, PeerID

from swarm_node.protocol import codec

M = TypeVar("M", bound=Message)
MAX_MESSAGE = 1 << 20  # chunk size for tensor streams; far below p2pd's framing limits

Handler = Callable[[AsyncIterator[Message], str], AsyncIterator[Message]]


class Unavailable(str, Enum):
    """Why a peer is not taking part now."""
    DEADLINE = "deadline"  # it did not answer (or finish answering) in time
    FAILED = "failed"  # the dial failed, its handler raised, or it sent something unusable
    CLOSED = "closed"  # its stream ended before the first reply
    GONE = "gone"  # it left the membership view while we waited on it


class PeerUnavailable(Exception):
    """A peer could not be reached, failed, or missed the deadline; `reason` says which."""

    def __init__(self, message: str, reason: Unavailable = Unavailable.FAILED):
        super().__init__(message)
        self.reason = reason

    @property
    def timed_out(self) -> bool:
        return self.reason is Unavailable.DEADLINE


class ClosedWithoutAnswer(PeerUnavailable):
    """The peer's stream ended before its first reply. Seen now and then on live streams
    (about one round RPC in 15-50 on a loaded box) while both sides are healthy, so an
    idempotent request may simply be sent again."""

    def __init__(self, message: str):
        super().__init__(message, Unavailable.CLOSED)


class Transport:
    def __init__(self, p2p: P2P, run_id: str, count_bytes: Callable[[str, str, int], None]):
        self.p2p, self.run_id = p2p, run_id
        self._count = count_bytes  # (direction 'tx'|'rx', channel, nbytes)
        self._handlers: list[str] = []

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    def _name(self, method: str) -> str:
        return f"swarm_node.{self.run_id}.{method}"

    async def add_handler(self, method: str, handler: Handler, request_type: type[Message], channel: str) -> None:
        """Register `handler(requests, caller_peer_id) -> replies` for a bidirectional stream."""

        async def wrapped(requests: AsyncIterator[Message], context: P2PContext) -> AsyncIterator[Message]:
            async def counted() -> AsyncIterator[Message]:
                async for msg in requests:
                    self._count("rx", channel, msg.ByteSize())
                    yield msg

            async for reply in handler(counted(), context.remote_id.to_base58()):
                self._count("tx", channel, reply.ByteSize())
                yield reply

        name = self._name(method)
        await self.p2p.add_protobuf_handler(name, wrapped, request_type, stream_input=True, stream_output=True)
        self._handlers.append(name)

    async def call(self, peer_id: str, method: str, requests: Iterable[Message] | AsyncIterator[Message],
                   reply_type: type[M], *, timeout_s: float, channel: str) -> AsyncIterator[M]:
        """Stream `requests` to a peer and yield its replies, all within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        async def outgoing() -> AsyncIterator[Message]:
            if hasattr(requests, "__aiter__"):
                async for msg in requests:  # type: ignore[union-attr]
                    self._count("tx", channel, msg.ByteSize())
                    yield msg
            else:
                for msg in requests:  # type: ignore[union-attr]
                    self._count("tx", channel, msg.ByteSize())
                    yield msg

        received = 0
        try:
            pid = PeerID.from_base58(peer_id)
            stream = await asyncio.wait_for(
                self.p2p.iterate_protobuf_handler(pid, self._name(method), outgoing(), reply_type), timeout_s)
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    reply = await asyncio.wait_for(stream.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                self._count("rx", channel, reply.ByteSize())
                received += 1
                yield reply
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"{peer_id[-8:]} missed the {timeout_s:.1f}s deadline for {method}",
                                  Unavailable.DEADLINE) from None
        except asyncio.CancelledError:
            raise
        except PeerUnavailable:
            raise
        except (BrokenPipeError, ConnectionResetError, asyncio.IncompleteReadError):
            # hivemind writes an end-of-stream marker after our requests; a handler that
            # answered and closed first makes that write fail *after* its reply reached us.
            # Callers check that what they received is complete, so this is just the end.
            if received:
                return
            raise ClosedWithoutAnswer(f"{peer_id[-8:]} closed {method} without answering") from None
        except Exception as e:  # P2PDaemonError, P2PHandlerError, ConnectionError, ...
            text = (str(e) or type(e).__name__).splitlines()[0][:200]
            raise PeerUnavailable(f"{peer_id[-8:]} failed {method}: {text}") from None

    async def close(self) -> None:
        for name in self._handlers:
            try:
                await asyncio.wait_for(self.p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True), 3)
            except Exception:
                pass  # p2pd is going away anyway
        self._handlers.clear()


async def drain(requests: AsyncIterator, timeout_s: float, max_messages: int = 100_000) -> None:
    """Consume the caller's remaining requests, end-of-stream marker included, so that it
    is done writing before we answer and close (bounded in time and count)."""
    for _ in range(max_messages):
        if await first_message(requests, timeout_s) is None:
            return


async def receive_tensor_list(first: Message, rest: AsyncIterator[Message], timeout_s: float,
                              shapes: list[tuple[int, ...]]) -> list[torch.Tensor] | None:
    """The tensor list a peer streams as chunks (`first.chunk`, then each later message's
    `.chunk`), checked against `shapes`; None if the sender stopped before the end. Raises
    `codec.CodecError` for anything malformed (the caller counts and answers it)."""
    declared = getattr(first, "num_tensors", len(shapes))
    if declared != len(shapes):
        raise codec.CodecError("bad_shape", f"{declared} tensors, model has {len(shapes)}")
    assembler = codec.ChunkAssembler.for_shapes(shapes)
    assembler.add(first.chunk)
    while not assembler.complete:
        msg = await first_message(rest, timeout_s)
        if msg is None:
            return None
        assembler.add(msg.chunk)
    return assembler.result()


async def first_message(requests: AsyncIterator[M], timeout_s: float) -> M | None:
    """The first request of a stream, or None if the caller sent nothing in time."""
    try:
        return await asyncio.wait_for(requests.__anext__(), timeout_s)
    except (StopAsyncIteration, asyncio.TimeoutError):
        return None
