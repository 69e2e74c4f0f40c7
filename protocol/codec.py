"""Tensor codec: torch tensors <-> `swarmnode.v1.Tensor` / `TensorChunk` wire messages.

Owns: encoding (raw, float16, absmax blockwise int8, blockwise 4-bit E3M0 described at its constants),
validated decoding of untrusted messages, and cutting tensor lists into size-bounded chunks
plus reassembling them. Pure functions, no I/O.
Invariants
  * Buffers are little-endian, row-major; `dtype` always names the ORIGINAL dtype and decoding
    returns it. Allowed: float32, float16, bfloat16, int64, int32; integers are never compressed
    (encode sends them raw; decode rejects a compressed integer tensor).
  * Every size is checked against the header and the caller's caps BEFORE anything is
    allocated: numel > max_numel is "too_large" even if the buffer is tiny.
  * Lossy encodings refuse non-finite sources ("non_finite"); FLOAT16 clamps finite values
    beyond +-65504 instead of letting them become inf; NONE sends NaN/inf as is (the receiver
    decides: allow_non_finite). Any problem raises `CodecError` (`.reason` in REJECT_REASONS);
    nothing partially decoded is returned; a `ChunkAssembler` that rejected a chunk stays failed.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence

import torch
from google.protobuf.message import DecodeError

from swarm_node.protocol.pb import swarm_node_wire_pb2 as wire

if sys.byteorder != "little":  # buffers are little-endian and we reinterpret in place
    raise ImportError("swarm_node.protocol.codec requires a little-endian host")

NONE: int = wire.COMPRESSION_NONE
FLOAT16: int = wire.COMPRESSION_FLOAT16
INT8_BLOCKWISE: int = wire.COMPRESSION_INT8_BLOCKWISE
E3M0: int = wire.COMPRESSION_E3M0
DEFAULT_BLOCK_SIZE = 256
MAX_NDIM = 32

REJECT_REASONS: tuple[str, ...] = ("bad_dtype", "bad_shape", "too_large", "non_finite", "malformed")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_COMPRESSIONS = (NONE, FLOAT16, INT8_BLOCKWISE, E3M0)
_BLOCKWISE = (INT8_BLOCKWISE, E3M0)
_FP16_MAX = 65504.0
_INT8_MAX = 127
# Blockwise encodings (INT8_BLOCKWISE, E3M0) carry one fp32 scale per block; a scale must be
# finite and >= 0 (negative: "malformed"; NaN/inf: "non_finite" for E3M0, and for INT8 caught
# by the decoded-value check unless allow_non_finite).
# E3M0 (4 bits per value; the exact layout is documented on COMPRESSION_E3M0 in the .proto):
# s = absmax of the block; each value becomes 0 or +-s * 2^-k with k in 0..6, rounded to the
# nearest such level in linear distance (ties away from zero). Error bound per value:
# |x_hat - x| <= |x| / 3 when |x| >= s * 2^-6, else <= s * 2^-7. The block's largest magnitude
# is exact. Decoding multiplies by powers of two only, so (for a finite scale and no fp32
# underflow) every decoded value is exactly 0 or +-s * 2^-k.
# Exponent field e = 1..7 stands for magnitude 2^-(7-e) (times the block scale); e = 0
# is zero. _E3M0_MIDPOINTS[j] is the rounding threshold between level e = j and e = j + 1
# (ascending), so e = number of midpoints <= |x|/s.
_E3M0_MAX_SHIFT = 6
_E3M0_MIDPOINTS = torch.tensor(
    [2.0 ** -(_E3M0_MAX_SHIFT + 1)] + [0.75 * 2.0**-k for k in range(_E3M0_MAX_SHIFT - 1, -1, -1)],
    dtype=torch.float32,
)
# code (sign << 3 | e) -> signed level; code 8 ("negative zero") decodes to +0.0
_E3M0_LEVELS = torch.tensor(
    [0.0] + [2.0 ** -(7 - e) for e in range(1, 8)] + [0.0] + [-(2.0 ** -(7 - e)) for e in range(1, 8)],
    dtype=torch.float32,
)


class CodecError(ValueError):
    """A tensor message was rejected; `reason` is one of REJECT_REASONS (a metrics label)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ---------------------------------------------------------------------------- encode


def encode_tensor(
    t: torch.Tensor, compression: int = NONE, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> wire.Tensor:
    """Encode `t` (any device, any layout). Integer tensors ignore `compression`."""
    dtype_name = _DTYPE_NAMES.get(t.dtype)
    if dtype_name is None:
        raise CodecError("bad_dtype", f"cannot encode dtype {t.dtype}")
    if compression not in _COMPRESSIONS:
        raise CodecError("malformed", f"unknown compression {compression}")
    t = t.detach().to("cpu").contiguous()
    if not t.dtype.is_floating_point:
        compression = NONE
    msg = wire.Tensor(shape=list(t.shape), dtype=dtype_name, compression=compression)
    flat = t.reshape(-1)
    if compression == NONE:
        msg.buffer = _to_bytes(flat)
        return msg
    if not bool(torch.isfinite(flat).all()):
        raise CodecError("non_finite", "cannot compress a tensor holding NaN/inf")
    if compression == FLOAT16:
        msg.buffer = _to_bytes(flat.float().clamp(-_FP16_MAX, _FP16_MAX).half())
        return msg
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if compression == E3M0:
        if block_size % 2:
            raise ValueError(f"E3M0 needs an even block_size, got {block_size}")
        packed, scales = _quantize_e3m0(flat.float(), block_size)
        msg.buffer, msg.scales, msg.block_size = _to_bytes(packed), _to_bytes(scales), block_size
        return msg
    q, scales = _quantize(flat.float(), block_size)
    msg.buffer, msg.scales, msg.block_size = _to_bytes(q), _to_bytes(scales), block_size
    return msg


def _to_bytes(flat: torch.Tensor) -> bytes:
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def _blocks(x: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Views of the whole blocks (as one 2-D view) and of the short tail block, if any."""
    full = x.numel() // block_size * block_size
    parts = [x[:full].view(-1, block_size)] if full else []
    if full < x.numel():
        parts.append(x[full:].view(1, -1))
    return parts


def _quantize(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    qs, ss = [], []
    for blk in _blocks(x, block_size):
        scale = blk.abs().amax(dim=1) / _INT8_MAX
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero block
        qs.append(torch.round(blk / divisor[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8).reshape(-1))
        ss.append(scale)
    if not qs:
        return torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.float32)
    return torch.cat(qs), torch.cat(ss)


def _quantize_e3m0(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 codes (ceil(n/2) bytes) and per-block absmax scales of fp32 `x`."""
    codes, ss = [], []
    for blk in _blocks(x, block_size):
        scale = blk.abs().amax(dim=1)
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero block
        mag = (blk.abs() / divisor[:, None]).reshape(-1)  # in [0, 1]
        e = torch.bucketize(mag, _E3M0_MIDPOINTS, right=True)  # 0..7, ties round up
        negative = (blk.reshape(-1) < 0) & (e > 0)  # zero is always code 0
        codes.append((e | (negative.to(e.dtype) << 3)).to(torch.uint8))
        ss.append(scale)
    if not codes:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)
    c = torch.cat(codes)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])  # padding nibble: 0
    pairs = c.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), torch.cat(ss)


def _dequantize_e3m0(packed: torch.Tensor, scales: torch.Tensor, numel: int, block_size: int) -> torch.Tensor:
    """fp32 values from validated packed codes (len ceil(numel/2)) and scales."""
    if numel % 2 and int(packed[-1]) >> 4:
        raise CodecError("malformed", "E3M0 padding nibble is not zero")
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
    levels = _E3M0_LEVELS[codes.long()]
    out, start = [], 0
    for blk in _blocks(levels, block_size):
        out.append((blk * scales[start : start + blk.shape[0], None]).reshape(-1))
        start += blk.shape[0]
    return torch.cat(out)


# ---------------------------------------------------------------------------- decode


class _Header:
    """A validated Tensor header: every size below is safe to allocate."""

    __slots__ = ("shape", "dtype", "compression", "block_size", "numel", "buffer_len", "scales_len")

    def __init__(self, shape, dtype, compression, block_size, numel, buffer_len, scales_len):
        self.shape, self.dtype, self.compression, self.block_size = shape, dtype, compression, block_size
        self.numel, self.buffer_len, self.scales_len = numel, buffer_len, scales_len


def _check_header(
    msg: wire.Tensor,
    *,
    max_numel: int,
    expected_shape: Sequence[int] | None,
    expected_dtype: torch.dtype | None,
) -> _Header:
    compression, block_size = msg.compression, msg.block_size
    if compression not in _COMPRESSIONS:  # proto3 enums are open: any int parses
        raise CodecError("malformed", f"unknown compression {compression}")
    if compression in _BLOCKWISE and block_size <= 0:
        raise CodecError("malformed", f"block_size must be > 0, got {block_size}")
    if compression == E3M0 and block_size % 2:
        raise CodecError("malformed", f"E3M0 block_size must be even, got {block_size}")
    if compression not in _BLOCKWISE and block_size != 0:
        raise CodecError("malformed", "block_size set without a blockwise compression")
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise CodecError("bad_dtype", f"unknown dtype {msg.dtype[:32]!r}")
    if expected_dtype is not None and dtype != expected_dtype:
        raise CodecError("bad_dtype", f"dtype {msg.dtype} != expected {expected_dtype}")
    if compression != NONE and not dtype.is_floating_point:
        raise CodecError("bad_dtype", f"{msg.dtype} cannot be compressed")
    if len(msg.shape) > MAX_NDIM:
        raise CodecError("bad_shape", f"{len(msg.shape)} dims > {MAX_NDIM}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError("bad_shape", f"negative dim in {shape}")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise CodecError("bad_shape", f"shape {shape} != expected {tuple(expected_shape)}")
    numel = math.prod(shape)  # Python ints: no overflow
    if numel > max_numel:
        raise CodecError("too_large", f"{numel} elements > max {max_numel}")
    if compression == NONE:
        buffer_len, scales_len = numel * dtype.itemsize, 0
    elif compression == FLOAT16:
        buffer_len, scales_len = numel * 2, 0
    elif compression == E3M0:
        buffer_len, scales_len = -(-numel // 2), -(-numel // block_size) * 4
    else:
        buffer_len, scales_len = numel, -(-numel // block_size) * 4
    return _Header(shape, dtype, compression, block_size, numel, buffer_len, scales_len)


def _decode_payload(
    h: _Header, buffer: bytes | bytearray, scales: bytes | bytearray, allow_non_finite: bool
) -> torch.Tensor:
    """Decode a payload against a validated header. A bytearray is taken over (the result
    may alias it); bytes are copied once."""
    if len(buffer) != h.buffer_len:
        raise CodecError("bad_shape", f"buffer is {len(buffer)} bytes, shape {h.shape} needs {h.buffer_len}")
    if len(scales) != h.scales_len:
        raise CodecError("bad_shape", f"scales are {len(scales)} bytes, expected {h.scales_len}")
    if h.numel == 0:
        return torch.empty(h.shape, dtype=h.dtype)
    # frombuffer on bytes would alias read-only memory (and warn): own a writable copy
    buffer = buffer if isinstance(buffer, bytearray) else bytearray(buffer)
    if h.compression == NONE:
        out = torch.frombuffer(buffer, dtype=h.dtype)
    elif h.compression == FLOAT16:
        out = torch.frombuffer(buffer, dtype=torch.float16).to(h.dtype)
    elif h.compression == E3M0:
        s = torch.frombuffer(bytearray(scales), dtype=torch.float32)
        if bool((s < 0).any()):
            raise CodecError("malformed", "negative E3M0 block scale")
        if not bool(torch.isfinite(s).all()):
            raise CodecError("non_finite", "E3M0 block scale is NaN/inf")
        packed = torch.frombuffer(buffer, dtype=torch.uint8)
        out = _dequantize_e3m0(packed, s, h.numel, h.block_size).to(h.dtype)
    else:
        s = torch.frombuffer(bytearray(scales), dtype=torch.float32)
        if bool((s < 0).any()):
            raise CodecError("malformed", "negative int8 block scale")
        q = torch.frombuffer(buffer, dtype=torch.int8)
        deq, start = [], 0
        for blk in _blocks(q, h.block_size):
            deq.append((blk.float() * s[start : start + blk.shape[0], None]).reshape(-1))
            start += blk.shape[0]
        out = torch.cat(deq).to(h.dtype)
    if h.dtype.is_floating_point and not allow_non_finite and not bool(torch.isfinite(out).all()):
        raise CodecError("non_finite", "tensor holds NaN/inf")
    return out.view(h.shape)


def decode_tensor(
    msg: wire.Tensor,
    *,
    max_numel: int,
    expected_shape: tuple[int, ...] | None = None,
    expected_dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
) -> torch.Tensor:
    """Validate and decode an untrusted Tensor message into a fresh CPU tensor."""
    h = _check_header(msg, max_numel=max_numel, expected_shape=expected_shape, expected_dtype=expected_dtype)
    return _decode_payload(h, msg.buffer, msg.scales, allow_non_finite)


def parse_tensor(
    data: bytes,
    *,
    max_numel: int,
    expected_shape: tuple[int, ...] | None = None,
    expected_dtype: torch.dtype | None = None,
    allow_non_finite: bool = False,
) -> torch.Tensor:
    """decode_tensor() for serialized Tensor bytes."""
    try:
        msg = wire.Tensor.FromString(data)
    except DecodeError as e:
        raise CodecError("malformed", f"not a Tensor message: {e}") from None
    return decode_tensor(
        msg, max_numel=max_numel, expected_shape=expected_shape,
        expected_dtype=expected_dtype, allow_non_finite=allow_non_finite,
    )


def estimate_bytes(t: torch.Tensor, compression: int = NONE, *, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Payload bytes (buffer + scales) encode_tensor would produce, without encoding."""
    n = t.numel()
    if not t.dtype.is_floating_point or compression == NONE:
        return n * t.element_size()
    if compression == FLOAT16:
        return n * 2
    if compression == E3M0:
        return -(-n // 2) + -(-n // block_size) * 4
    return n + -(-n // block_size) * 4


# ---------------------------------------------------------------------------- chunks

_INT32_MAX = 2**31 - 1
# Slack over the measured header: tags + length varints of buffer/scales (<= 6 bytes each)
# and growth of the nested Tensor's length varint (<= 5 bytes).
_CHUNK_SLACK = 2 * 6 + 5


def tensors_to_chunks(
    tensors: Sequence[torch.Tensor],
    compression: int = NONE,
    max_chunk_bytes: int = 1 << 20,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[wire.TensorChunk]:
    """Encode tensors one at a time and yield TensorChunks, each serializing to at most
    max_chunk_bytes (the layout is documented on TensorChunk in the .proto). A message
    wrapping a chunk (SyncPush, ...) adds its own fields on top of that bound."""
    for index, t in enumerate(tensors):
        msg = encode_tensor(t, compression, block_size=block_size)
        header = wire.Tensor(shape=msg.shape, dtype=msg.dtype, compression=msg.compression, block_size=msg.block_size)
        worst = wire.TensorChunk(tensor_index=index, chunk_index=_INT32_MAX, num_chunks=_INT32_MAX, tensor=header)
        budget = max_chunk_bytes - worst.ByteSize() - _CHUNK_SLACK
        # Unit = what one chunk must hold whole: an element, or a block and its scale.
        if msg.compression == INT8_BLOCKWISE:
            unit_buf, unit_scale = msg.block_size, 4
        elif msg.compression == E3M0:  # even block_size: a block is block_size/2 whole bytes
            unit_buf, unit_scale = msg.block_size // 2, 4
        else:
            unit_buf, unit_scale = (2 if msg.compression == FLOAT16 else _DTYPES[msg.dtype].itemsize), 0
        units_per_chunk = budget // (unit_buf + unit_scale) if budget > 0 else 0
        if units_per_chunk <= 0:
            raise ValueError(f"max_chunk_bytes={max_chunk_bytes} too small for one element/block of tensor {index}")
        # Read the encoded bytes once: protobuf copies a bytes field on every access, which
        # made chunking a large tensor quadratic (measured: 0.12 s -> 0.018 s for 25 MB).
        buffer, scales = memoryview(msg.buffer), memoryview(msg.scales)
        total_units = -(-len(buffer) // unit_buf) if len(buffer) else 0
        num_chunks = max(1, -(-total_units // units_per_chunk))
        for ci in range(num_chunks):
            lo, hi = ci * units_per_chunk, (ci + 1) * units_per_chunk
            piece = wire.Tensor(buffer=bytes(buffer[lo * unit_buf : hi * unit_buf]),
                                scales=bytes(scales[lo * unit_scale : hi * unit_scale]))
            if ci == 0:
                piece.MergeFrom(header)
            yield wire.TensorChunk(tensor_index=index, chunk_index=ci, num_chunks=num_chunks, tensor=piece)


class ChunkAssembler:
    """Rebuilds tensors from an untrusted, strictly ordered stream of TensorChunks.

    Memory is bounded by the headers: a tensor's declared numel is charged against
    max_numel_total when its first chunk arrives, and no tensor may receive more bytes
    than its header implies. Each tensor is decoded (and its bytes freed) as soon as its
    last chunk arrives. After any CodecError the assembler rejects everything.
    """

    @classmethod
    def for_shapes(cls, shapes: list[tuple[int, ...]], *, allow_non_finite: bool = False) -> "ChunkAssembler":
        """An assembler that accepts exactly these shapes and no more elements than they hold."""
        numel = sum(math.prod(s) for s in shapes)
        return cls(len(shapes), max_numel_total=numel, expected_shapes=list(shapes), allow_non_finite=allow_non_finite)

    def __init__(
        self,
        num_tensors: int,
        *,
        max_numel_total: int,
        expected_shapes: list[tuple[int, ...]] | None = None,
        expected_dtypes: list[torch.dtype] | None = None,
        allow_non_finite: bool = False,
    ) -> None:
        if num_tensors < 0:
            raise CodecError("malformed", f"negative tensor count {num_tensors}")
        for name, exp in (("expected_shapes", expected_shapes), ("expected_dtypes", expected_dtypes)):
            if exp is not None and len(exp) != num_tensors:
                raise ValueError(f"{name} has {len(exp)} entries for {num_tensors} tensors")
        self._num_tensors = num_tensors
        self._numel_left = max_numel_total
        self._expected_shapes = expected_shapes
        self._expected_dtypes = expected_dtypes
        self._allow_non_finite = allow_non_finite
        self._done: list[torch.Tensor] = []
        self._header: _Header | None = None  # of the tensor being received
        self._num_chunks = 0
        self._next_chunk = 0
        self._buffer = bytearray()
        self._scales = bytearray()
        self._failed = False

    def add(self, chunk: wire.TensorChunk) -> None:
        if self._failed:
            raise CodecError("malformed", "assembler already rejected this stream")
        try:
            self._add(chunk)
        except CodecError:
            self._failed = True
            self._buffer, self._scales = bytearray(), bytearray()
            raise

    def _add(self, chunk: wire.TensorChunk) -> None:
        index = len(self._done)
        if index >= self._num_tensors:
            raise CodecError("malformed", f"chunk for tensor {chunk.tensor_index} after all {index} tensors")
        if chunk.tensor_index != index or chunk.chunk_index != self._next_chunk:
            raise CodecError("malformed", f"got chunk {chunk.tensor_index}/{chunk.chunk_index}, "
                                          f"expected {index}/{self._next_chunk}")
        t = chunk.tensor
        if self._next_chunk == 0:
            self._start_tensor(index, chunk)
        elif chunk.num_chunks != self._num_chunks:
            raise CodecError("malformed", f"num_chunks changed from {self._num_chunks} to {chunk.num_chunks}")
        elif t.shape or t.dtype or t.compression or t.block_size:
            raise CodecError("malformed", f"header fields on chunk {chunk.chunk_index} of tensor {index}")
        h = self._header
        assert h is not None
        if h.buffer_len + h.scales_len > 0 and not (t.buffer or t.scales):
            raise CodecError("malformed", "empty chunk")  # bounds the chunk count by the byte count
        if len(self._buffer) + len(t.buffer) > h.buffer_len or len(self._scales) + len(t.scales) > h.scales_len:
            raise CodecError("bad_shape", f"tensor {index} got more bytes than its shape {h.shape} implies")
        self._buffer += t.buffer
        self._scales += t.scales
        self._next_chunk += 1
        if self._next_chunk < self._num_chunks:
            return
        # shape/dtype were enforced on the header; the buffers are ours to hand over
        self._done.append(_decode_payload(h, self._buffer, self._scales, self._allow_non_finite))
        self._header, self._next_chunk = None, 0
        self._buffer, self._scales = bytearray(), bytearray()

    def _start_tensor(self, index: int, chunk: wire.TensorChunk) -> None:
        if chunk.num_chunks < 1:
            raise CodecError("malformed", f"num_chunks={chunk.num_chunks}")
        h = _check_header(
            chunk.tensor,
            max_numel=self._numel_left,
            expected_shape=None if self._expected_shapes is None else self._expected_shapes[index],
            expected_dtype=None if self._expected_dtypes is None else self._expected_dtypes[index],
        )
        if chunk.num_chunks > max(1, h.buffer_len + h.scales_len):
            raise CodecError("malformed", f"{chunk.num_chunks} chunks for {h.buffer_len + h.scales_len} bytes")
        self._numel_left -= h.numel
        self._header, self._num_chunks = h, chunk.num_chunks

    @property
    def complete(self) -> bool:
        return not self._failed and len(self._done) == self._num_tensors

    def result(self) -> list[torch.Tensor]:
        """All tensors, in order; raises "malformed" if the stream ended early."""
        if self._failed:
            raise CodecError("malformed", "assembler rejected this stream")
        if len(self._done) != self._num_tensors:
            raise CodecError("malformed", f"stream ended with {len(self._done)}/{self._num_tensors} tensors "
                                          f"(tensor {len(self._done)} at chunk {self._next_chunk})")
        return list(self._done)
