"""A stranger in a swarm's DHT (run as a script by test_page_browser.py), in one of two modes:

- `other-spec`: a peer of the same run id with another run spec. A real node whose spec differs
  from the peer it joins through refuses to start, so this plays one that got in anyway.
- `hostile-device`: a peer of the swarm's own spec (read from the swarm's records) whose device
  field is markup, under another strategy name so that no round ever waits for it.

It joins through the same network code as a node, with its own identity, and announces a
correctly signed heartbeat record once a second for the given seconds (or until SIGTERM, after
which it shuts its p2pd down). Usage: stranger_peer.py MODE JOIN_MADDR RUN_ID STATE_DIR SECONDS
"""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from swarm_node.identity import ensure_identity
from swarm_node.metrics import NodeMetrics
from swarm_node.network import NetworkSettings, SwarmNetwork
from swarm_node.protocol.records import PeerRecord, RecordError, peers_key

HOSTILE_DEVICE = '<img src=x onerror=__pwned=2><script>__pwned=1</script>'


async def swarm_spec_hash(net: SwarmNetwork, run_id: str) -> str:
    for _ in range(20):
        found = await net.get(peers_key(run_id))
        for item in (found.value if found is not None and isinstance(found.value, dict) else {}).values():
            try:
                return PeerRecord.from_wire(item.value).spec_hash
            except RecordError:
                continue
        await asyncio.sleep(0.5)
    raise RuntimeError("no record of the swarm found")


async def main(mode: str, join: str, run_id: str, state_dir: str, seconds: float) -> None:
    path = Path(state_dir) / "identity.key"
    ensure_identity(path)
    net = await SwarmNetwork.create(NetworkSettings(host="127.0.0.1", port=0, announce_host=None, identity_path=path,
                                                    startup_timeout_s=30), NodeMetrics("stranger"))
    try:
        if not await net.connect_peers([join]):
            raise RuntimeError(f"could not reach {join}")
        me = net.peer_id.to_base58()
        if mode == "other-spec":
            rec = PeerRecord(peer_id=me, state="online", spec_hash="0123456789abcdef", strategy="diloco",
                             role="trainer", device="cpu", step=1, samples_per_s=1.0, software="stranger")
        else:
            rec = PeerRecord(peer_id=me, state="online", spec_hash=await swarm_spec_hash(net, run_id),
                             strategy="observer", role="observer", device=HOSTILE_DEVICE, step=0, samples_per_s=0.0,
                             software="stranger")
        print("stranger", mode, me, flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        end = loop.time() + seconds
        while loop.time() < end and not stop.is_set():
            await net.store(peers_key(run_id), rec.to_wire(), ttl_s=4, subkey=me)
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass
    finally:
        await net.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
