"""A peer of the same run id with another run spec (run as a script by test_page_browser.py).

A real node whose spec differs from the peer it joins through refuses to start, so this plays
one that got in anyway (it joined through a peer of its own spec): it joins the swarm's DHT with
its own identity, through the same network code as a node, and announces a correctly signed
heartbeat record whose spec hash is not the swarm's, once a second for the given seconds (or
until SIGTERM, after which it shuts its p2pd down).
Usage: stranger_peer.py JOIN_MADDR RUN_ID STATE_DIR SECONDS
"""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from swarm_node.identity import ensure_identity
from swarm_node.metrics import NodeMetrics
from swarm_node.network import NetworkSettings, SwarmNetwork
from swarm_node.protocol.records import PeerRecord, peers_key


async def main(join: str, run_id: str, state_dir: str, seconds: float) -> None:
    path = Path(state_dir) / "identity.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_identity(path)
    net = await SwarmNetwork.create(NetworkSettings(host="127.0.0.1", port=0, announce_host=None, identity_path=path,
                                                    startup_timeout_s=30), NodeMetrics("stranger"))
    try:
        if not await net.connect_peers([join]):
            raise RuntimeError(f"could not reach {join}")
        me = net.peer_id.to_base58()
        rec = PeerRecord(peer_id=me, state="online", spec_hash="0123456789abcdef", strategy="diloco", role="trainer",
                         device="cpu", step=1, samples_per_s=1.0, software="stranger")
        print("stranger", me, flush=True)
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
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
