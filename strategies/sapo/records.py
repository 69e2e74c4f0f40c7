"""SAPO wire records: signed rollout groups, per-round manifests, gossip addresses, the round clock.

A *rollout group* is what a peer shares for one question: the task triple (task, seed,
index), the question text and its G completions as plain text, plus small metadata. It
never carries rewards, token ids, weights or the truth: receivers regenerate the truth
from the triple and score with their own verifier (strategies/sapo/tasks.py).

Wire form (msgpack, versioned): `[VERSION, body, public_key, signature]`; `body` is the msgpack
of `[run_id, round, sender, task, seed, index, question, completions, meta]`, `public_key` the
sender's libp2p `PublicKey` protobuf, `signature` its identity key's signature over `body` in
the `Context.SAPO_ROLLOUT` context (protocol/signing.py). The group id is sha256(body)[:16] hex, so a
manifest names exactly one content; `decode_rollout` lists what a valid record guarantees.
The round is the swarm's wall-clock epoch `floor(dht_time / round_s)` (`round_of`), the same
on every peer whose clock agrees within the DHT's tolerance; never a local counter.
Pure (msgpack, hashlib, protocol.signing): no network, no torch, no libp2p.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import msgpack

from swarm_node.protocol.signing import Context, Signer, Verdict, verify

VERSION = 1
MAX_ROLLOUT_BYTES = 64 * 1024  # one group; far below gossipsub's and the transport's caps
MAX_QUESTION_CHARS = 2048
MAX_COMPLETION_CHARS = 1024
MAX_META_ITEMS = 8
MAX_GROUP_IDS = 64  # per manifest
MAX_MANIFEST_BYTES = 4096
REJECT_REASONS = ("bad_types", "wrong_group_size", "oversize", "forged_signature", "stale_round")
GROUP_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class RolloutRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---- round clock -------------------------------------------------------------------
def round_of(t: float, round_s: float) -> int:
    return int(math.floor(t / round_s))


def round_start(round_: int, round_s: float) -> float:
    return round_ * round_s


# ---- DHT keys ----------------------------------------------------------------------
def manifest_key(run_id: str, round_: int) -> str:
    return f"swarm/{run_id}/sapo/round/{round_}"


def gossip_addrs_key(run_id: str) -> str:
    return f"swarm/{run_id}/sapo/gossip"


def gossip_topic(run_id: str) -> str:
    return f"swarm-node/{run_id}/rollouts/{VERSION}"


# ---- rollout groups ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RolloutGroup:
    run_id: str
    round: int
    sender: str
    task: str
    seed: int
    index: int
    question: str
    completions: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"model": "gpt-1x64"}; str/int/float values

    def body(self) -> bytes:
        return msgpack.packb([self.run_id, self.round, self.sender, self.task, self.seed, self.index,
                              self.question, list(self.completions), dict(self.meta)], use_bin_type=True)


def group_id_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class SignedRollout:
    group: RolloutGroup
    group_id: str
    wire: bytes  # exactly what was (or will be) sent; re-served verbatim on pull


def encode_rollout(group: RolloutGroup, signer: Signer) -> SignedRollout:
    if group.sender != signer.peer_id:
        raise ValueError("a peer signs only its own rollouts")
    body = group.body()
    wire = msgpack.packb([VERSION, body, signer.public_key.proto, signer.sign(Context.SAPO_ROLLOUT, body)],
                         use_bin_type=True)
    if len(wire) > MAX_ROLLOUT_BYTES:
        raise ValueError(f"rollout of {len(wire)} bytes exceeds {MAX_ROLLOUT_BYTES}")
    return SignedRollout(group, group_id_of(body), wire)


def _is_int(v: Any) -> bool:
    return type(v) is int


def decode_rollout(blob: Any, *, run_id: str, group_size: int, current_round: int, max_round_lag: int = 1,
                   from_peer: str | None = None, known_task: Callable[[str], bool] = lambda t: True) -> SignedRollout:
    """Validate everything about a received rollout or raise `RolloutRejected` with a bounded reason:
    - oversize: the blob, the question, a completion or the metadata exceed their caps;
    - bad_types: not msgpack, wrong version/shape, a field of the wrong type (bool is not int),
      another run id, or an unknown task;
    - wrong_group_size: not exactly G completions;
    - stale_round: a round outside [current - max_lag, current + 1] (one round of clock skew);
    - forged_signature: the key does not hash to the claimed sender, the signature does not
      verify, or the claimed sender is not the peer that handed us the blob (gossip origin or
      pulled publisher). So one peer can neither forge nor overwrite another's rollouts."""
    if type(blob) is not bytes:
        raise RolloutRejected("bad_types", f"rollout must be bytes, got {type(blob).__name__}")
    if len(blob) > MAX_ROLLOUT_BYTES:
        raise RolloutRejected("oversize", f"{len(blob)} bytes > {MAX_ROLLOUT_BYTES}")
    try:
        outer = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=MAX_ROLLOUT_BYTES)
    except Exception as e:  # msgpack raises many unrelated types
        raise RolloutRejected("bad_types", f"not msgpack: {str(e)[:80]}") from None
    if not (isinstance(outer, list) and len(outer) == 4 and _is_int(outer[0])
            and all(type(x) is bytes for x in outer[1:])):
        raise RolloutRejected("bad_types", "expected [version, body, public_key, signature]")
    if outer[0] != VERSION:
        raise RolloutRejected("bad_types", f"version {outer[0]} unsupported (expected {VERSION})")
    body, pub, sig = outer[1], outer[2], outer[3]
    try:
        f = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:
        raise RolloutRejected("bad_types", f"body is not msgpack: {str(e)[:80]}") from None
    if not (isinstance(f, list) and len(f) == 9):
        raise RolloutRejected("bad_types", "body must have 9 fields")
    r_id, rnd, sender, task, seed, index, question, completions, meta = f
    if not (type(r_id) is str and _is_int(rnd) and type(sender) is str and len(sender) <= 128 and type(task) is str
            and len(task) <= 64 and _is_int(seed) and _is_int(index) and seed >= 0 and index >= 0
            and type(question) is str and isinstance(completions, list) and isinstance(meta, dict)):
        raise RolloutRejected("bad_types", "a field has the wrong type")
    if r_id != run_id:
        raise RolloutRejected("bad_types", f"rollout of run {r_id[:64]!r}, ours is {run_id!r}")
    if not known_task(task):
        raise RolloutRejected("bad_types", f"unknown task {task!r}")
    if not all(type(c) is str for c in completions):
        raise RolloutRejected("bad_types", "completions must be strings")
    if not (len(meta) <= MAX_META_ITEMS and all(type(k) is str and len(k) <= 32 and type(v) in (str, int, float)
                                                and (type(v) is not str or len(v) <= 128) for k, v in meta.items())):
        raise RolloutRejected("bad_types", f"meta must be at most {MAX_META_ITEMS} short str -> str/int/float items")
    if len(question) > MAX_QUESTION_CHARS or any(len(c) > MAX_COMPLETION_CHARS for c in completions):
        raise RolloutRejected("oversize", "question or completion too long")
    if len(completions) != group_size:
        raise RolloutRejected("wrong_group_size", f"{len(completions)} completions, the run uses G={group_size}")
    if not current_round - max_round_lag <= rnd <= current_round + 1:
        raise RolloutRejected("stale_round", f"round {rnd}, current {current_round} (lag {max_round_lag})")
    if from_peer is not None and from_peer != sender:
        raise RolloutRejected("forged_signature", f"{from_peer[:16]} handed us a rollout claiming {sender[:16]}")
    verdict = verify(Context.SAPO_ROLLOUT, body, sig, signer=sender, key=pub)
    if verdict is Verdict.WRONG_SIGNER:
        raise RolloutRejected("forged_signature", f"key does not belong to the claimed sender {sender[:16]}")
    if not verdict.ok:
        raise RolloutRejected("forged_signature", f"signature does not verify ({verdict.value})")
    group = RolloutGroup(r_id, rnd, sender, task, seed, index, question, tuple(completions), meta)
    return SignedRollout(group, group_id_of(body), blob)


# ---- small DHT records ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Manifest:
    """What a peer published in one round: group ids only (the rollouts travel elsewhere)."""

    VERSION: ClassVar[int] = 1
    peer_id: str
    round: int
    group_ids: tuple[str, ...]

    def to_wire(self) -> bytes:
        blob = msgpack.packb([self.VERSION, self.peer_id, self.round, list(self.group_ids[:MAX_GROUP_IDS])],
                             use_bin_type=True)
        assert len(blob) <= MAX_MANIFEST_BYTES
        return blob

    @classmethod
    def from_wire(cls, blob: Any, *, subkey: str, round_: int) -> "Manifest":
        """Raises ValueError unless well-formed, stored under its own peer id, for `round_`."""
        if type(blob) is not bytes or len(blob) > MAX_MANIFEST_BYTES:
            raise ValueError("manifest must be bytes of at most 4 KiB")
        f = msgpack.unpackb(blob, raw=False)
        if not (isinstance(f, list) and len(f) == 4 and f[0] == cls.VERSION and type(f[1]) is str
                and _is_int(f[2]) and isinstance(f[3], list) and len(f[3]) <= MAX_GROUP_IDS):
            raise ValueError("malformed manifest")
        if f[1] != subkey:
            raise ValueError(f"manifest claims {f[1][:16]} under subkey {str(subkey)[:16]}")
        if f[2] != round_:
            raise ValueError(f"manifest for round {f[2]} under round {round_}")
        if not all(type(g) is str and GROUP_ID_RE.match(g) for g in f[3]):
            raise ValueError("malformed group id")
        return cls(f[1], f[2], tuple(f[3]))


def encode_gossip_addrs(peer_id: str, maddrs: list[str]) -> bytes:
    return msgpack.packb([1, peer_id, list(maddrs[:8])], use_bin_type=True)


def decode_gossip_addrs(blob: Any, *, subkey: str) -> list[str]:
    """The sidecar multiaddrs a peer published; each must end in /p2p/<that peer> (the
    sidecar runs on the node's own key, so a wrong address can only fail to connect)."""
    if type(blob) is not bytes or len(blob) > 4096:
        raise ValueError("gossip address record must be bytes of at most 4 KiB")
    f = msgpack.unpackb(blob, raw=False)
    if not (isinstance(f, list) and len(f) == 3 and f[0] == 1 and f[1] == subkey and isinstance(f[2], list)
            and len(f[2]) <= 8 and all(type(m) is str and len(m) <= 256 and m.endswith(f"/p2p/{subkey}")
                                       for m in f[2])):
        raise ValueError("malformed gossip address record")
    return list(f[2])
