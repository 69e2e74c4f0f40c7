"""Signed DHT records (protocol/dht_signing.py), record by record, the way hivemind's DHT calls
the validator when a node asks it to store a record and when a node answers a read: a peer's own
record verifies and reads back unchanged; a record under someone else's id, re-signed by a
stranger, tampered with, given another expiry, replayed under another key, or not an envelope at
all is refused and counted."""
from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer

from swarm_node.identity import ensure_identity
from swarm_node.protocol.dht_signing import TAG, SignedRecordValidator
from swarm_node.protocol.signing import Context, Signer


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Signer, Signer]:
    d = tmp_path_factory.mktemp("keys")
    return tuple(Signer.from_identity_file(ensure_identity(d / f"k{i}").path) for i in range(2))  # type: ignore


def record(writer: str, value: bytes = b"\x93\x01\xa6online\x00", expiry: float = 1e9, key: bytes = b"K" * 20):
    return DHTRecord(key, MSGPackSerializer.dumps(writer), MSGPackSerializer.dumps(value), expiry)


class Counted:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def test_an_own_record_verifies_and_reads_back_unchanged(keys):
    me, _ = keys
    v = SignedRecordValidator(me, Counted())
    rec = record(me.peer_id)
    signed = dataclasses.replace(rec, value=v.sign_value(rec))
    assert signed.value != rec.value
    reader = SignedRecordValidator(keys[1], Counted())  # anyone can check it: the key travels along
    assert reader.validate(signed) and reader.validate(signed)  # the second from the verdict cache
    assert reader.strip_value(signed) == rec.value and reader.on_forged.n == 0


def test_forged_and_tampered_records_are_refused_and_counted(keys):
    me, stranger = keys
    mine = SignedRecordValidator(me)
    theirs = SignedRecordValidator(stranger)
    reader = SignedRecordValidator(me, counted := Counted())
    victim = record(me.peer_id)
    good = dataclasses.replace(victim, value=mine.sign_value(victim))

    forged = [
        # the stranger writes under my id: its validator will not sign what is not its own
        dataclasses.replace(victim, value=theirs.sign_value(victim)),
        # ... so it builds the envelope itself, with its own key and signature
        dataclasses.replace(victim, value=msgpack.packb(
            [TAG, victim.value, stranger.public_key.proto,
             stranger.sign(Context.DHT_RECORD, b"anything")], use_bin_type=True)),
        # my genuine envelope, replayed with a later expiry, another value, or under another key
        dataclasses.replace(good, expiration_time=good.expiration_time + 3600),
        dataclasses.replace(good, value=msgpack.packb([TAG, b"\x93\x01\xa7leaving\x00",
                                                       *msgpack.unpackb(good.value, raw=False)[2:]],
                                                      use_bin_type=True)),
        dataclasses.replace(good, key=b"L" * 20),
        # my signed record moved under the stranger's subkey
        dataclasses.replace(good, subkey=MSGPackSerializer.dumps(stranger.peer_id)),
        # no envelope, a wrong tag, a non-string subkey, no subkey, garbage
        victim,
        dataclasses.replace(good, value=msgpack.packb(["xxx1", b"v", b"k", b"s"])),
        dataclasses.replace(good, subkey=MSGPackSerializer.dumps(7)),
        dataclasses.replace(good, subkey=b""),
        dataclasses.replace(good, value=b"\xc1\xff" * 40),
    ]
    for i, rec in enumerate(forged):
        assert not reader.validate(rec), f"forgery {i} accepted"
    assert counted.n == len(forged)
    assert reader.validate(good) and counted.n == len(forged)


def test_an_oversized_envelope_is_refused_without_parsing(keys):
    me, _ = keys
    v = SignedRecordValidator(me, counted := Counted())
    rec = record(me.peer_id, value=b"x" * 20_000)
    assert not v.validate(dataclasses.replace(rec, value=v.sign_value(rec)))
    assert counted.n == 1


def test_only_the_spec_of_a_peer_we_join_through_can_turn_us_away():
    """Specs are per-peer records: a stranger's different spec under the run id is counted and
    ignored; the same difference from a peer named in --initial-peers is a SpecMismatch naming
    the field. Our own spec is published under our id either way."""
    import asyncio
    from types import SimpleNamespace

    from swarm_node.config import NodeConfig
    from swarm_node.membership import Membership, SpecMismatch
    from swarm_node.metrics import NodeMetrics
    from swarm_node.protocol.records import SpecRecord

    spec = NodeConfig(state_dir="/tmp/unused").run_spec()
    other = NodeConfig(state_dir="/tmp/unused", lr=0.5).run_spec()
    theirs = SimpleNamespace(value=SpecRecord(other.digest(), other.canonical()).to_wire(), expiration_time=1e12)
    stored: list[tuple] = []

    async def get(key):
        return SimpleNamespace(value={"stranger": theirs, "me": theirs})

    async def store(key, value, ttl_s, subkey=None):
        stored.append((key, subkey))
        return True

    net = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "me"), get=get, store=store)
    metrics = NodeMetrics("sync", ["spec_mismatch", "bad_record"])
    ms = Membership(net, spec, metrics, ttl_s=4.0, make_record=None)
    asyncio.run(ms.check_spec(trusted={"friend"}))
    assert stored == [(f"swarm/{spec.run_id}/spec", "me")]
    assert metrics.rejected_messages.labels(reason="spec_mismatch")._value.get() == 1
    with pytest.raises(SpecMismatch, match="lr: ours=0.003 theirs=0.5"):
        asyncio.run(ms.check_spec(trusted={"stranger"}))

