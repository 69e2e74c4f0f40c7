"""Weighted butterfly all-reduce of one flat fp32 vector among a frozen group.

The vector is cut into len(group) contiguous shards; member i reduces shard i. Every
member streams its shard j to group[j] (its own shard stays local), the reducer averages
what arrived — Σ wᵢxᵢ / Σ wᵢ, accumulated in fp32 — and streams the mean back to each
contributor. Each peer sends and receives about 2·(N−1)/N of the vector, spread over all
links instead of funnelled through one leader.

Contract:
- The group and its `group_id` come from a coordinator (strategies/rounds.py); a push
  stamped with another group id, a wrong shard index or a wrong size is rejected and
  counted. Accumulation is fp32 whatever the wire compression.
- A reducer waits for all members until `timeout_s`, then closes with who arrived. The
  outcome says exactly what happened: `complete` is true only if every shard came back
  from its reducer with every member counted. A partial average is reported, never
  hidden (hivemind's averager fills missing parts with local values silently).
- Nothing here commits anything: the caller decides (see rounds.py's commit vote).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from . import codec
from .pb import swarm_node_rounds_pb2 as rpb
from .transport import MAX_MESSAGE, PeerUnavailable, Transport, drain, first_message

log = logging.getLogger(__name__)
METHOD = "allreduce.shard"
ShardStatus = rpb.ShardReply.Status
KEEP_GROUPS = 8


def shard_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges; the first numel % parts shards are one longer."""
    if parts < 1:
        raise ValueError("need at least one part")
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass
class _Reduction:
    """This member's shard of one group: accumulates contributions until closed."""

    expected: set[str]
    length: int
    total: torch.Tensor
    index: int = -1  # which shard of the group this member reduces
    weight: float = 0.0
    contributors: set[str] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    result: torch.Tensor | None = None
    encoded: list | None = None  # the result's wire chunks, encoded once for every contributor

    def add(self, peer: str, x: torch.Tensor, w: float) -> None:
        if self.closed.is_set() or peer in self.contributors:
            return
        self.total.add_(x.float(), alpha=w)
        self.weight += w
        self.contributors.add(peer)
        if self.contributors >= self.expected:
            self.close()

    def close(self) -> None:
        if not self.closed.is_set():
            # all-zero weights (only joiners): the mean update is zero, not NaN
            self.result = self.total / self.weight if self.weight > 0 else torch.zeros_like(self.total)
            self.closed.set()


@dataclass
class AllReduceOutcome:
    result: torch.Tensor | None  # the averaged vector, None if some shard never came back
    complete: bool  # every shard returned with every member counted
    contributors_per_shard: list[int]
    failed: list[str]  # reducers we got nothing from, or members missing from a shard
    duration_s: float
    bytes_sent: int = 0


class ButterflyAllReduce:
    def __init__(self, transport: Transport, *, timeout_s: float, compression: int = codec.NONE,
                 max_numel: int = 1 << 31, on_reject=None):
        self.transport, self.timeout_s, self.compression = transport, timeout_s, compression
        self.max_numel = max_numel
        self.on_reject = on_reject or (lambda reason: None)
        self._groups: dict[str, _Reduction] = {}
        self._registered: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        await self.transport.add_handler(METHOD, self._rpc_shard, rpb.ShardPush, channel="averaging")

    def _event(self, group_id: str) -> asyncio.Event:
        if group_id not in self._registered:
            self._registered[group_id] = asyncio.Event()
            for old in list(self._registered)[:-KEEP_GROUPS]:
                self._registered.pop(old, None)
                self._groups.pop(old, None)
        return self._registered[group_id]

    async def run(self, group_id: str, group: list[str], vector: torch.Tensor, weight: float) -> AllReduceOutcome:
        t0 = time.perf_counter()
        me = self.transport.peer_id
        if me not in group:
            raise ValueError("this peer is not a member of the group")
        vector = vector.detach().reshape(-1).float().cpu()
        bounds = shard_bounds(vector.numel(), len(group))
        my_index = group.index(me)
        lo, hi = bounds[my_index]
        mine = _Reduction(expected=set(group), length=hi - lo, total=torch.zeros(hi - lo), index=my_index)
        self._groups[group_id] = mine
        self._event(group_id).set()
        mine.add(me, vector[lo:hi], weight)

        async def exchange(j: int) -> tuple[torch.Tensor | None, int, str]:
            s, e = bounds[j]
            return await self._push(group[j], group_id, j, vector[s:e], weight)

        tasks = {j: asyncio.create_task(exchange(j)) for j in range(len(group)) if j != my_index}
        try:
            await asyncio.wait_for(mine.closed.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            mine.close()
        pieces: list[torch.Tensor | None] = [None] * len(group)
        counts = [0] * len(group)
        failed: list[str] = []
        # Others receive my shard's mean through the (possibly lossy) codec: use exactly what
        # they decode, or members would hold different vectors and never agree on a commit.
        pieces[my_index], counts[my_index] = self._as_sent(mine.result), len(mine.contributors)
        failed += sorted(set(group) - mine.contributors)
        for j, task in tasks.items():
            piece, n, err = await task
            pieces[j], counts[j] = piece, n
            if piece is None:
                failed.append(group[j])
                log.info("shard %d from %s missing: %s", j, group[j][-8:], err)
        have_all = all(p is not None for p in pieces)
        result = torch.cat(pieces) if have_all else None  # type: ignore[arg-type]
        complete = have_all and all(c == len(group) for c in counts)
        return AllReduceOutcome(result, complete, counts, sorted(set(failed)), time.perf_counter() - t0)

    def _as_sent(self, x: torch.Tensor) -> torch.Tensor:
        if self.compression == codec.NONE:
            return x
        return codec.decode_tensor(codec.encode_tensor(x, self.compression), max_numel=x.numel())

    async def _push(self, peer: str, group_id: str, shard: int, x: torch.Tensor,
                    weight: float) -> tuple[torch.Tensor | None, int, str]:
        def messages():
            for chunk in codec.tensors_to_chunks([x], self.compression, MAX_MESSAGE):
                yield rpb.ShardPush(group_id=group_id, shard=shard, weight=weight, chunk=chunk)

        assembler = codec.ChunkAssembler(1, max_numel_total=x.numel(), expected_shapes=[tuple(x.shape)])
        n, status, detail = 0, None, ""
        try:
            async for reply in self.transport.call(peer, METHOD, messages(), rpb.ShardReply,
                                                   timeout_s=self.timeout_s * 2 + 5, channel="averaging"):
                status, detail, n = reply.status, reply.detail, reply.num_contributors
                if status != ShardStatus.SHARD_STATUS_OK:
                    break
                assembler.add(reply.chunk)
        except PeerUnavailable as e:
            return None, 0, str(e)
        except codec.CodecError as e:
            self.on_reject(e.reason)
            return None, 0, f"reducer sent a bad shard: {e}"
        if status == ShardStatus.SHARD_STATUS_OK and assembler.complete:
            return assembler.result()[0], n, ""
        return None, 0, f"{ShardStatus.Name(status) if status is not None else 'no answer'} {detail}"

    async def _rpc_shard(self, requests: AsyncIterator[rpb.ShardPush], caller: str) -> AsyncIterator[rpb.ShardReply]:
        first = await first_message(requests, self.timeout_s)
        if first is None:
            return
        # the pusher may be faster than our coordinator reply: wait briefly for the group
        try:
            await asyncio.wait_for(self._event(first.group_id).wait(), self.timeout_s)
        except asyncio.TimeoutError:
            await drain(requests, self.timeout_s)
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail="unknown group")
            return
        red = self._groups.get(first.group_id)
        ok_weight = first.weight >= 0 and first.weight == first.weight and first.weight < 1e9
        if red is None or caller not in red.expected or not ok_weight or first.shard != red.index:
            self.on_reject("malformed")
            await drain(requests, self.timeout_s)
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail="not a member / bad weight / wrong shard")
            return
        assembler = codec.ChunkAssembler(1, max_numel_total=red.length, expected_shapes=[(red.length,)])
        try:
            assembler.add(first.chunk)
            while not assembler.complete:
                msg = await first_message(requests, self.timeout_s)
                if msg is None:
                    return  # pusher vanished: it does not contribute
                assembler.add(msg.chunk)
        except codec.CodecError as e:
            self.on_reject(e.reason)
            log.warning("rejected shard from %s: %s", caller[-8:], e)
            await drain(requests, self.timeout_s)
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail=str(e))
            return
        await drain(requests, self.timeout_s)
        red.add(caller, assembler.result()[0], float(first.weight))
        try:
            await asyncio.wait_for(red.closed.wait(), self.timeout_s * 2)
        except asyncio.TimeoutError:
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_TIMEOUT, detail="shard never closed")
            return
        if red.encoded is None:
            red.encoded = list(codec.tensors_to_chunks([red.result], self.compression, MAX_MESSAGE))
        for chunk in red.encoded:
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_OK, num_contributors=len(red.contributors),
                                 total_weight=red.weight, chunk=chunk)

