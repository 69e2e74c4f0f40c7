"""Star exchanges: peers push tensor lists to one center, which answers each of them.

  GatherRound     the center's book of one round: whom it waits for, what arrived, the
                  weighted mean once every expected peer pushed (or the center closed it)
  receive_push    the center's side of a push: the first message and the whole tensor list,
                  or why nothing usable arrived (nothing, a sender gone mid-push, a malformed
                  list, which is counted through `on_reject` and drained)
  push_tensors    a pusher's side: stream the pushes, read replies until one is not OK, and
                  assemble the tensors the OK replies carry
  tensor_messages one message per chunk of a tensor list (every sender of a list uses it)
What a push means (a step, a plan, a round) and who may be the center is the strategy's.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Generic, Iterable, Iterator, TypeVar

import torch

from swarm_node.protocol import codec
from swarm_node.protocol.averaging.mean import weighted_mean
from swarm_node.protocol.averaging.robust import AggregationRule, Combined, combine_lists
from swarm_node.protocol.transport import MAX_MESSAGE, Transport, drain, first_message, receive_tensor_list

M = TypeVar("M")
R = TypeVar("R")


def tensor_messages(tensors: list[torch.Tensor], make: Callable[[bytes], M],
                    compression: int = codec.NONE) -> Iterator[M]:
    """`make(chunk)` for each chunk of `tensors` (CPU copies are taken here)."""
    for chunk in codec.tensors_to_chunks([t.detach().cpu() for t in tensors], compression, MAX_MESSAGE):
        yield make(chunk)


# ---------------------------------------------------------------- center side
class PushResult(enum.Enum):
    OK = "ok"
    NOTHING = "nothing"  # no first message in time: nothing to answer
    VANISHED = "vanished"  # the sender stopped mid-list
    REJECTED = "rejected"  # a malformed list: answer it, it was counted and drained


@dataclass
class Received(Generic[M]):
    result: PushResult
    first: M | None = None
    tensors: list[torch.Tensor] | None = None
    error: codec.CodecError | None = None


async def receive_push(requests: AsyncIterator[M], *, timeout_s: float, shapes: list[tuple[int, ...]],
                       on_reject: Callable[[str], None]) -> Received[M]:
    """Read a whole push before anything is answered: closing the stream while the pusher still
    writes would reach it as a broken pipe, not as the center's answer."""
    first = await first_message(requests, timeout_s)
    if first is None:
        return Received(PushResult.NOTHING)
    try:
        tensors = await receive_tensor_list(first, requests, timeout_s, shapes)
    except codec.CodecError as e:
        on_reject(e.reason)
        await drain(requests, timeout_s)
        return Received(PushResult.REJECTED, first, error=e)
    if tensors is None:
        return Received(PushResult.VANISHED, first)
    await drain(requests, timeout_s)
    return Received(PushResult.OK, first, tensors)


@dataclass
class GatherRound:
    """One round at the center: contributions weighted by their sample counts."""

    step: int
    expected: set[str]
    param_hash: str | None = None
    contributions: dict[str, tuple[list[torch.Tensor], int]] = field(default_factory=dict)
    excused: set[str] = field(default_factory=set)  # told to resync: not waited for
    early: set[str] = field(default_factory=set)  # pushed before the center reached the step
    leader_ready: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    result: list[torch.Tensor] | None = None
    rule: AggregationRule = field(default_factory=AggregationRule)
    report: Callable[[Combined], None] | None = None  # told which contributions were clipped or dropped

    def add(self, peer: str, tensors: list[torch.Tensor], n: int) -> None:
        if self.closed.is_set():
            return
        self.contributions[peer] = (tensors, n)
        if self.expected <= set(self.contributions):
            self.close()

    def excuse(self, peer: str) -> None:
        """`peer` will not contribute to this round: stop waiting for it."""
        if self.closed.is_set() or peer in self.contributions:
            return
        self.excused.add(peer)
        self.expected.discard(peer)
        if self.leader_ready.is_set() and self.expected <= set(self.contributions):
            self.close()

    def close(self) -> None:
        if not self.closed.is_set():
            if self.rule.robust and self.contributions:
                self.result, combined = combine_lists(
                    [(peer, g, float(n)) for peer, (g, n) in self.contributions.items()], self.rule)
                if self.report is not None:
                    self.report(combined)
            else:
                self.result = weighted_mean((g, float(n)) for g, n in self.contributions.values())
            self.closed.set()

    @property
    def total_samples(self) -> int:
        return sum(n for _, n in self.contributions.values())


# ---------------------------------------------------------------- pusher side
@dataclass
class Answer(Generic[R]):
    """The center's answer to a push: its last reply (None: it closed without one) and, when
    every reply was OK and tensors were expected, the assembled list."""

    reply: R | None
    tensors: list[torch.Tensor] | None = None

    @property
    def complete(self) -> bool:
        return self.tensors is not None


async def push_tensors(transport: Transport, center: str, method: str, pushes: Iterable[M], reply_type: type[R], *,
                       timeout_s: float, is_ok: Callable[[R], bool], shapes: list[tuple[int, ...]] | None = None,
                       channel: str = "averaging") -> Answer[R]:
    """Stream `pushes` to `center` and read its replies. Without `shapes` the first reply is the
    answer; with them, OK replies carry chunks of a tensor list until it is complete. Raises
    PeerUnavailable (the call failed) or codec.CodecError (a malformed list)."""
    assembler = codec.ChunkAssembler.for_shapes(shapes) if shapes is not None else None
    last: R | None = None
    async for reply in transport.call(center, method, pushes, reply_type, timeout_s=timeout_s, channel=channel):
        last = reply
        if assembler is None or not is_ok(reply):
            return Answer(reply)
        assembler.add(reply.chunk)  # type: ignore[attr-defined]
    if assembler is not None and last is not None and assembler.complete:
        return Answer(last, assembler.result())
    return Answer(last)
