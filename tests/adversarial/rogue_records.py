"""A rogue peer that writes DHT records it has no right to (run as a script by test_rogue_live.py).

It joins the swarm's DHT with a fresh identity and no record validator, reads the victim's
record, then stores: the victim's record as `leaving` with an expiry an hour away (unsigned, and
re-signed with the rogue's own key), ten invented `online` peers, and another spec for the run
under the run owner's id. It prints one JSON line: what each store reported.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives import serialization
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from swarm_node.network import split_peer_maddr
from swarm_node.protocol.dht_signing import TAG
from swarm_node.protocol.records import PeerRecord, SpecRecord, peers_key, spec_key
from swarm_node.protocol.signing import KeyType, PublicKey


def fresh_peer_id() -> str:
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                         serialization.PublicFormat.Raw)
    return PublicKey.of(KeyType.ED25519, raw).peer_id


async def main(join: str, run_id: str, victim: str, owner: str) -> dict:
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht = await DHTNode.create(p2p=p2p, wait_timeout=3)
    peer, transport = split_peer_maddr(join)  # dial, ping, look ourselves up: as a node joins
    await p2p._client.connect(peer, [transport])
    if await dht.protocol.call_ping(peer) is None:
        raise RuntimeError(f"{join} did not answer a DHT ping")
    await dht.find_nearest_nodes([dht.node_id])
    out: dict = {"rogue": p2p.peer_id.to_base58()}
    try:
        found = await dht.get(peers_key(run_id), latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        out["peers_read"] = len(entries)
        # without a validator the envelope reads back as [TAG, serialized value, key, signature]
        env = entries[victim].value if victim in entries else None
        rec = None
        if isinstance(env, list) and len(env) == 4 and env[0] == TAG:
            rec = PeerRecord.from_wire(MSGPackSerializer.loads(env[1]))
        out["read_victim"] = rec is not None
        far = get_dht_time() + 3600
        if rec is not None:
            blob = dataclasses.replace(rec, state="leaving").to_wire()
            out["victim_leaving_unsigned"] = bool(await dht.store(peers_key(run_id), blob, far, subkey=victim))
            # the victim's own key and a made-up signature
            resigned = [TAG, MSGPackSerializer.dumps(blob), env[2], b"\x00" * 256]  # serialized: an envelope
            out["victim_leaving_bad_signature"] = bool(await dht.store(peers_key(run_id), resigned, far, subkey=victim))
        fakes = 0
        for _ in range(10):
            pid = fresh_peer_id()
            fake = PeerRecord(peer_id=pid, state="online", spec_hash=rec.spec_hash if rec else "0" * 16,
                              strategy=rec.strategy if rec else "sync", role="trainer", device="cpu", step=10**6,
                              samples_per_s=1e6, software="rogue", maddrs=("/ip4/127.0.0.1/tcp/9/p2p/" + pid,))
            fakes += bool(await dht.store(peers_key(run_id), fake.to_wire(), far, subkey=pid))
        out["fake_peers_stored"] = fakes
        forged_spec = SpecRecord(digest="f" * 16, spec={"run_id": run_id, "lr": 0.5})
        out["spec_under_owner"] = bool(await dht.store(spec_key(run_id), forged_spec.to_wire(), far, subkey=owner))
        # its own spec under its own id is a valid record: joiners that do not join through it ignore it
        out["spec_under_self"] = bool(await dht.store(spec_key(run_id), forged_spec.to_wire(), far,
                                                      subkey=out["rogue"]))
    finally:
        await dht.shutdown()
        await p2p.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 60))), flush=True)
