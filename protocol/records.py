"""DHT key layout and the versioned records stored under it.

Keys (all small values, far below hivemind's ~16 KB / 4 MiB trouble zones):
  swarm/{run}/peers   subkey = peer id (base58) -> PeerRecord.to_wire()
  swarm/{run}/spec    subkey = peer id (base58) -> SpecRecord.to_wire() (the spec that peer runs)

Invariants:
- A record on the wire is a msgpack-able tuple `(VERSION, field, ...)`; `from_wire` rejects
  anything else with `RecordError` (a float where an int belongs, a bool where a number
  belongs, out-of-range values, oversized strings). Callers count the rejection and drop
  the record; a bad record never raises out of the membership loop.
- `to_wire` enforces `MAX_RECORD_BYTES` (below the DHT value-size pitfalls).
- The subkey a record is stored under is who wrote it: the DHT keeps only records signed by
  the subkey's key (dht_signing.py); a record whose embedded peer id differs from its subkey
  is treated as spoofed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, TypeVar

import msgpack

MAX_RECORD_BYTES = 4096
MAX_STR = 256
PEER_STATES = ("joining", "online", "leaving")


class RecordError(ValueError):
    """A record from the DHT failed validation; the message says which field and why."""


R = TypeVar("R")


@dataclass(frozen=True)
class Entry(Generic[R]):
    record: R
    expires_at: float  # DHT time


class RecordStore:
    """What strategies see of the DHT: records kept per peer under one key (the subkey is the
    writer's peer id, the only trusted statement of who wrote it). A peer publishes its own and
    reads everyone's, decoded by the caller's `decode(value, subkey)`; a value that does not
    decode is counted (`on_reject`) and dropped, never raised. A failed read reads as empty."""

    def __init__(self, net: Any, peer_id: str, on_reject: Callable[[], None]):
        self._net, self.peer_id, self._on_reject = net, peer_id, on_reject

    async def publish(self, key: str, value: bytes, ttl_s: float) -> bool:
        return await self._net.store(key, value, ttl_s=ttl_s, subkey=self.peer_id)

    async def read(self, key: str, decode: Callable[[Any, str], R], *, skip_own: bool = False,
                   now: float | None = None) -> dict[str, Entry[R]]:
        """Every peer's decoded record under `key`; expired ones dropped when `now` is given."""
        found = await self._net.get(key)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        out: dict[str, Entry[R]] = {}
        for subkey, item in entries.items():
            if type(subkey) is not str:  # not written by a peer id: nobody we could trust
                self._on_reject()
                continue
            if skip_own and subkey == self.peer_id:
                continue
            if now is not None and item.expiration_time <= now:
                continue
            try:
                out[subkey] = Entry(decode(item.value, subkey), item.expiration_time)
            except Exception:  # whatever a malformed or hostile value makes the decoder raise
                self._on_reject()
        return out


def peers_key(run_id: str) -> str:
    return f"swarm/{run_id}/peers"


def spec_key(run_id: str) -> str:
    return f"swarm/{run_id}/spec"


def _int(name: str, v: Any, lo: int = 0, hi: int = 2**62) -> int:
    if type(v) is not int:  # bool is a subclass of int: reject it explicitly
        raise RecordError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise RecordError(f"{name}={v} out of range [{lo}, {hi}]")
    return v


def _float(name: str, v: Any, lo: float = 0.0, hi: float = 1e12) -> float:
    if type(v) not in (int, float):
        raise RecordError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or not lo <= v <= hi:
        raise RecordError(f"{name}={v} is not finite or out of range [{lo}, {hi}]")
    return float(v)


def _str(name: str, v: Any, max_len: int = MAX_STR) -> str:
    if type(v) is not str:
        raise RecordError(f"{name} must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise RecordError(f"{name} is {len(v)} chars, limit {max_len}")
    return v


def _pack(obj: tuple) -> bytes:
    blob = msgpack.packb(obj, use_bin_type=True)
    if len(blob) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(blob)} bytes exceeds {MAX_RECORD_BYTES}")
    return blob


def _unpack(blob: Any, version: int, n_fields: int, kind: str) -> tuple:
    if type(blob) is not bytes:
        raise RecordError(f"{kind} must be bytes, got {type(blob).__name__}")
    if len(blob) > MAX_RECORD_BYTES:
        raise RecordError(f"{kind} of {len(blob)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        obj = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise RecordError(f"{kind} is not valid msgpack: {e}") from None
    if not isinstance(obj, list) or not obj:
        raise RecordError(f"{kind} must be a non-empty array")
    if obj[0] != version or type(obj[0]) is not int:
        raise RecordError(f"{kind} version {obj[0]!r} unsupported (expected {version})")
    if len(obj) != n_fields + 1:
        raise RecordError(f"{kind} has {len(obj) - 1} fields, expected {n_fields}")
    return tuple(obj[1:])


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer's heartbeat: who it is, what it runs and how fast. Refreshed every announce interval."""

    VERSION: ClassVar[int] = 1

    peer_id: str
    state: str  # joining | online | leaving
    spec_hash: str
    strategy: str
    role: str
    device: str
    step: int
    samples_per_s: float
    software: str
    maddrs: tuple[str, ...] = field(default_factory=tuple)

    def to_wire(self) -> bytes:
        return _pack((self.VERSION, self.peer_id, self.state, self.spec_hash, self.strategy, self.role, self.device,
                      self.step, self.samples_per_s, self.software, list(self.maddrs[:8])))

    @classmethod
    def from_wire(cls, blob: Any, *, subkey: str | None = None) -> "PeerRecord":
        (peer_id, state, spec_hash, strategy, role, device, step, sps, software, maddrs) = _unpack(
            blob, cls.VERSION, 10, "peer record")
        peer_id = _str("peer_id", peer_id, 128)
        if subkey is not None and subkey != peer_id:
            raise RecordError(f"record claims peer {peer_id[:16]}… but was stored under {str(subkey)[:16]}…")
        if state not in PEER_STATES:
            raise RecordError(f"state {state!r} not one of {PEER_STATES}")
        if not isinstance(maddrs, list) or len(maddrs) > 8:
            raise RecordError("maddrs must be a list of at most 8 strings")
        return cls(peer_id=peer_id, state=state, spec_hash=_str("spec_hash", spec_hash, 64),
                   strategy=_str("strategy", strategy, 64), role=_str("role", role, 64),
                   device=_str("device", device, 64), step=_int("step", step),
                   samples_per_s=_float("samples_per_s", sps), software=_str("software", software, 64),
                   maddrs=tuple(_str("maddr", m) for m in maddrs))


@dataclass(frozen=True, slots=True)
class SpecRecord:
    """The run's spec as first published; joiners compare theirs field by field."""

    VERSION: ClassVar[int] = 1

    digest: str
    spec: dict[str, Any]

    def to_wire(self) -> bytes:
        return _pack((self.VERSION, self.digest, self.spec))

    @classmethod
    def from_wire(cls, blob: Any) -> "SpecRecord":
        digest, spec = _unpack(blob, cls.VERSION, 2, "spec record")
        if not isinstance(spec, dict) or len(spec) > 64:
            raise RecordError("spec must be a map of at most 64 fields")
        for k, v in spec.items():
            _str("spec key", k, 64)
            if not isinstance(v, (str, int, float, bool)) and v is not None:
                raise RecordError(f"spec field {k} has unsupported type {type(v).__name__}")
        return cls(digest=_str("digest", digest, 64), spec=spec)
