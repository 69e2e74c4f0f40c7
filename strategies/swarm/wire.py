"""Pipeline messages <-> tensors, and the per-stage DHT record.

Invariants:
  * Every tensor goes through protocol/codec.py (strict validation before allocation);
    activations and gradients use the run's --act-compression (fp16 default, int8
    blockwise option); token ids and targets are int64 and always travel raw.
  * `read_request` / `read_reply` check the header fields (an unknown `part`, or one given to a
    STATE request, included), the tensor count allowed for the op and a numel cap, and raise
    `codec.CodecError` with a reason from swarm_rejected_messages_total's label set
    ("malformed", "too_large", "bad_dtype", ...); callers count it and answer REJECTED / try
    another replica.
  * `part` (CheckFree+ swaps) is "full" unless set; "full" is never written to the wire, so
    without --checkfree-swaps no message carries a `part` field.
  * Stage records: swarm/{run}/stage/{k}, subkey = peer id; a small msgpack tuple validated
    field by field (a record whose peer id differs from its subkey is spoofed and dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, AsyncIterator, ClassVar, Iterator, Sequence

import msgpack
import torch

from swarm_node.protocol import codec
from swarm_node.protocol.messages import pipeline as pl
from swarm_node.protocol.transport import MAX_MESSAGE

Op = pl.StageRequest.Op
Status = pl.StageReply.Status
Part = pl.StageRequest.Part
PART_NAMES = {Part.STAGE_PART_FULL: "full", Part.STAGE_PART_BODY: "body", Part.STAGE_PART_HEAD: "head"}
PART_VALUES = {name: value for value, name in PART_NAMES.items()}
TENSORS_PER_OP = {Op.STAGE_FORWARD: 1, Op.STAGE_BACKWARD: 2, Op.STAGE_STATE: 0}
COMPRESSIONS = {"none": codec.NONE, "fp16": codec.FLOAT16, "int8": codec.INT8_BLOCKWISE}
MAX_RECORD_BYTES = 1024
STAGE_STATES = ("joining", "online", "leaving")


def stage_key(run_id: str, stage: int) -> str:
    return f"swarm/{run_id}/stage/{stage}"


def _chunks(tensors: Sequence[torch.Tensor], compression: int) -> Iterator:
    # ints (ids, targets) are sent raw by the codec whatever `compression` says
    return codec.tensors_to_chunks(list(tensors), compression, MAX_MESSAGE - 1024)


def encode_request(run_id: str, op: int, stage: int, mb_id: str, tensors: Sequence[torch.Tensor],
                   compression: int, part: str = "full") -> list[pl.StageRequest]:
    if part not in PART_VALUES:
        raise ValueError(f"stage part {part!r} has no wire value (the embedding runs on the trainer only)")
    msgs = [pl.StageRequest(chunk=c) for c in _chunks(tensors, compression)] or [pl.StageRequest()]
    first = msgs[0]
    first.run_id, first.op, first.stage, first.microbatch_id, first.num_tensors = run_id, op, stage, mb_id, len(tensors)
    if part != "full":
        first.part = PART_VALUES[part]
    return msgs


def request_part(first: pl.StageRequest) -> str:
    """The part a (validated, see `read_request`) request asks for."""
    return PART_NAMES[first.part]


def encode_reply(status: int, stage: int, *, detail: str = "", tensors: Sequence[torch.Tensor] = (),
                 compression: int = codec.NONE, loss: float = 0.0, grad_norm: float = 0.0, stage_step: int = 0,
                 keys: Sequence[str] = ()) -> list[pl.StageReply]:
    msgs = [pl.StageReply(chunk=c) for c in _chunks(tensors, compression)] or [pl.StageReply()]
    first = msgs[0]
    first.status, first.stage, first.detail, first.num_tensors = status, stage, detail[:500], len(tensors)
    first.loss, first.grad_norm, first.stage_step = loss, grad_norm, stage_step
    first.keys.extend(keys)
    return msgs


async def _assemble(first, rest: AsyncIterator, max_numel: int, num_tensors: int, allow_non_finite: bool,
                    timeout_s: float) -> list[torch.Tensor]:
    import asyncio

    asm = codec.ChunkAssembler(num_tensors, max_numel_total=max_numel, allow_non_finite=allow_non_finite)
    if num_tensors == 0:
        return []
    if first.HasField("chunk"):
        asm.add(first.chunk)
    while not asm.complete:
        try:
            msg = await asyncio.wait_for(rest.__anext__(), timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise codec.CodecError("malformed", "stream stalled before all tensors arrived") from None
        if msg.ByteSize() and (getattr(msg, "num_tensors", 0) or getattr(msg, "run_id", "")):
            raise codec.CodecError("malformed", "header fields repeated on a later message")
        asm.add(msg.chunk)
    return asm.result()


async def read_request(first: pl.StageRequest, rest: AsyncIterator, *, run_id: str, max_numel: int,
                       timeout_s: float) -> list[torch.Tensor]:
    if first.run_id != run_id:
        raise codec.CodecError("malformed", f"run id {first.run_id[:64]!r} is not ours")
    if first.op not in TENSORS_PER_OP:
        raise codec.CodecError("malformed", f"unknown op {first.op}")
    if first.num_tensors != TENSORS_PER_OP[first.op]:
        raise codec.CodecError("malformed", f"op {Op.Name(first.op)} takes {TENSORS_PER_OP[first.op]} tensors, "
                                            f"got {first.num_tensors}")
    if first.part not in PART_NAMES:
        raise codec.CodecError("malformed", f"unknown stage part {first.part}")
    if first.op == Op.STAGE_STATE and first.part != Part.STAGE_PART_FULL:
        raise codec.CodecError("malformed", "a STATE request takes no part")
    if len(first.microbatch_id) > 128:
        raise codec.CodecError("malformed", "microbatch id too long")
    return await _assemble(first, rest, max_numel, first.num_tensors, False, timeout_s)


async def read_reply(replies: AsyncIterator[pl.StageReply], *, max_numel: int, max_tensors: int,
                     timeout_s: float) -> tuple[pl.StageReply, list[torch.Tensor]]:
    import asyncio

    try:
        first = await asyncio.wait_for(replies.__anext__(), timeout_s)
    except StopAsyncIteration:
        raise codec.CodecError("malformed", "empty reply") from None
    if first.status != Status.STAGE_OK:
        return first, []
    if not 0 <= first.num_tensors <= max_tensors:
        raise codec.CodecError("malformed", f"{first.num_tensors} tensors in a reply (at most {max_tensors})")
    if not (math.isfinite(first.loss) and math.isfinite(first.grad_norm)):
        raise codec.CodecError("non_finite", "non-finite loss or grad norm in a reply")
    return first, await _assemble(first, replies, max_numel, first.num_tensors, False, timeout_s)


@dataclass(frozen=True, slots=True)
class StageRecord:
    """What a stage server announces: where it is, how fast, how busy, how far."""

    VERSION: ClassVar[int] = 1

    peer_id: str
    stage: int
    state: str  # joining | online | leaving
    throughput: float  # samples/s over whole RPCs, EMA
    queue: int  # requests waiting or running
    step: int  # optimizer steps of this replica
    grad_norm: float  # last post-clip gradient norm (CheckFree)
    trainer: bool  # a trainer: a stage-0 peer, or one on loan to a server stage it rebuilt

    def to_wire(self) -> bytes:
        blob = msgpack.packb((self.VERSION, self.peer_id, self.stage, self.state, float(self.throughput),
                              int(self.queue), int(self.step), float(self.grad_norm), bool(self.trainer)))
        if len(blob) > MAX_RECORD_BYTES:
            raise ValueError("stage record too large")
        return blob

    @classmethod
    def from_wire(cls, blob: Any, *, subkey: str, num_stages: int) -> "StageRecord":
        from swarm_node.protocol.records import RecordError

        if type(blob) is not bytes or len(blob) > MAX_RECORD_BYTES:
            raise RecordError("stage record must be small bytes")
        try:
            obj = msgpack.unpackb(blob, raw=False)
        except Exception as e:
            raise RecordError(f"stage record is not msgpack: {e}") from None
        if not isinstance(obj, list) or len(obj) != 9 or obj[0] != cls.VERSION:
            raise RecordError("stage record has the wrong version or arity")
        _, pid, stage, state, thr, queue, step, gn, trainer = obj
        if type(pid) is not str or pid != subkey:
            raise RecordError("stage record's peer id differs from its subkey")
        if type(stage) is not int or not 0 <= stage < num_stages:
            raise RecordError(f"stage {stage!r} out of range")
        if state not in STAGE_STATES:
            raise RecordError(f"state {state!r}")
        for name, v in (("throughput", thr), ("grad_norm", gn)):
            if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v < 1e9:
                raise RecordError(f"{name}={v!r}")
        for name, v in (("queue", queue), ("step", step)):
            if type(v) is not int or not 0 <= v < 2**62:
                raise RecordError(f"{name}={v!r}")
        if type(trainer) is not bool:
            raise RecordError("trainer must be a bool")
        return cls(pid, stage, state, float(thr), queue, step, float(gn), trainer)
