"""Signed DHT records: only a record's writer can write it, and every reader checks that.

Every record is stored under a subkey that is its writer's peer id, and its value is wrapped in
an envelope `[TAG, value, writer's public key, signature]`; the signature covers the DHT key,
the subkey, the value and the expiration time (signing.Context.DHT_RECORD). The validator runs
inside hivemind's DHT on both sides: an honest node refuses to store a record that does not
verify (so nobody can overwrite a peer's record, even with a later expiry) and drops one that a
hostile node returns to a read. A replayed record keeps its signed expiry, so it loses to the
writer's newer records and expires. Refusals are counted through `on_forged` (the node's
`swarm_rejected_messages_total{reason="forged_record"}`). Verdicts are cached by envelope, so
the periodic re-reads of unchanged records verify each signature once.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Any, Callable

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from swarm_node.protocol.signing import Context, Signer, verify

TAG = "snr1"  # signed node record, envelope version 1
MAX_ENVELOPE_BYTES = 16_384  # well above MAX_RECORD_BYTES + an RSA key and signature
CACHE_ENTRIES = 4096


def signed_bytes(record: DHTRecord, value: bytes) -> bytes:
    """What a record's signature covers: key, subkey and value (length-prefixed), then expiry."""
    parts = (record.key, record.subkey, value)
    return b"".join(struct.pack(">I", len(p)) + p for p in parts) + struct.pack(">d", record.expiration_time)


def subkey_peer(record: DHTRecord) -> str | None:
    """The subkey as a peer id string, or None (no subkey, or not a string)."""
    try:
        sub = MSGPackSerializer.loads(record.subkey)
    except Exception:
        return None
    return sub if type(sub) is str else None


def open_envelope(blob: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(value, public key protobuf, signature), or None when `blob` is not an envelope."""
    if type(blob) is not bytes or len(blob) > MAX_ENVELOPE_BYTES:
        return None
    try:
        env = msgpack.unpackb(blob, raw=False)
    except Exception:
        return None
    if (not isinstance(env, list) or len(env) != 4 or env[0] != TAG
            or not all(type(x) is bytes for x in env[1:])):
        return None
    return env[1], env[2], env[3]


class SignedRecordValidator(RecordValidatorBase):
    """hivemind record validator: signs this node's own records, verifies everyone's."""

    def __init__(self, signer: Signer, on_forged: Callable[[], None] | None = None):
        self.signer = signer
        self.on_forged = on_forged or (lambda: None)
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()

    def sign_value(self, record: DHTRecord) -> bytes:
        if subkey_peer(record) != self.signer.peer_id:
            return record.value  # not ours to sign: every honest node will refuse it
        signature = self.signer.sign(Context.DHT_RECORD, signed_bytes(record, record.value))
        return msgpack.packb([TAG, record.value, self.signer.public_key.proto, signature], use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        cache_key = hashlib.sha256(signed_bytes(record, record.value)).digest()
        verdict = self._verdicts.get(cache_key)
        if verdict is None:
            verdict = self._check(record)
            self._verdicts[cache_key] = verdict
            while len(self._verdicts) > CACHE_ENTRIES:
                self._verdicts.popitem(last=False)
        if not verdict:
            self.on_forged()
        return verdict

    def _check(self, record: DHTRecord) -> bool:
        writer = subkey_peer(record)
        opened = open_envelope(record.value)
        if writer is None or opened is None:
            return False
        value, key, signature = opened
        return verify(Context.DHT_RECORD, signed_bytes(record, value), signature, signer=writer, key=key).ok

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = open_envelope(record.value)
        return opened[0] if opened is not None else record.value

    def merge_with(self, other: Any) -> bool:
        return False
