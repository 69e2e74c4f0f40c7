"""Rollout-gossip sidecar: a py-libp2p host with gossipsub that carries SAPO rollouts.

Run only as its own process (`python -m swarm_node.sidecars.gossip ...`), started and
supervised by strategies/sapo/gossip.py. Like mdns.py (both build on runtime.py) it imports
py-libp2p, which must never be imported in the node process (the `crypto.pb` protobuf clash
with hivemind). Its libp2p key is the node's identity.key, so its peer id and gossipsub
signatures name the node. One topic per run (`swarm-node/<run>/rollouts/1`), with limits
set on purpose (py-libp2p's defaults drop messages silently: see PROTOCOL below).
Payloads are opaque bytes, signed and verified by the nodes, never here.
Lifetime: dies with its parent (PR_SET_PDEATHSIG plus a parent watch), exits 0 on SIGTERM
or when stdin closes. Every network wait is bounded.
"""
from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import sys

from swarm_node.sidecars.runtime import emit, load_host, run_sidecar, sidecar_parser, until_signal

CONNECT_TIMEOUT_S = 5.0
MAX_PEERS_PER_COMMAND = 64  # peers dialled in parallel per connect command
MAX_ADDRS_PER_PEER = 8
PUBLISH_PACE_S = 0.005  # ~200 msg/s: far below what drains a 1024-deep queue
MAX_COMMAND_BYTES = 1 << 20

# PROTOCOL with the node, JSON lines:
#   stdin  {"cmd": "connect", "maddrs": [...]}   dial every peer named (each in parallel, bounded, 5 s)
#          {"cmd": "publish", "data": <base64>}   publish one payload on the topic
#   stdout {"event": "ready", "peer_id", "listen": [maddr/p2p/id], "topic", "t_s"}
#          {"event": "message", "from": peer id, "data": <base64>, "t_s"}  (never our own)
#          {"event": "connected" | "connect_failed", "peer_id", "detail"?, "t_s"}
#          {"event": "error", "detail", "t_s"}
# Gossipsub limits: spam protection (10 msg/s per peer) off, eclipse protection off (every
# loopback peer shares one IP), the subscription channel and each per-peer outbound queue
# raised from 32 to --queue-size, the message-size cap set to --max-message-bytes (rollouts
# are capped far below it), a 1 s heartbeat so the mesh forms within a round; publishes are
# paced (a short sleep after each) and strict signing stays on.


async def run(args: argparse.Namespace) -> int:
    import multiaddr
    import trio
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.pubsub import pubsub as pubsub_module
    from libp2p.pubsub import rpc_queue
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    # Deliberate limits (module docstring, point 2). Both are read when a subscription or
    # a peer's queue is created, which happens only after this point.
    pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = args.queue_size
    pubsub_module.RpcQueue = functools.partial(rpc_queue.RpcQueue, max_size=args.queue_size,
                                               max_message_size=args.max_message_bytes)

    host, _ = load_host(args.identity)
    me = str(host.get_id())
    router = GossipSub(protocols=[PROTOCOL_ID_V11, PROTOCOL_ID], degree=args.degree, degree_low=max(1, args.degree - 2),
                       degree_high=args.degree + 4, heartbeat_initial_delay=0.1, heartbeat_interval=1,
                       time_to_live=60, spam_protection_enabled=False, eclipse_protection_enabled=False,
                       max_pending_messages_per_peer=args.queue_size)
    pubsub = Pubsub(host, router, strict_signing=True, max_inbound_rpc_size=args.max_message_bytes + 4096,
                    cache_size=4096, seen_ttl=300)
    topic = f"swarm-node/{args.run_id}/rollouts/1"

    async def connect_peer(addrs: list[str]) -> None:
        """Dial one peer through its addresses in turn, until one answers (a no-op when connected)."""
        for m in addrs[:MAX_ADDRS_PER_PEER]:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(m))
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await host.connect(info)
                emit("connected", peer_id=str(info.peer_id))
                return
            except Exception as e:  # py-libp2p raises many types for "not now"
                emit("connect_failed", peer_id=m.rsplit("/p2p/", 1)[-1], detail=f"{type(e).__name__}: {e}"[:200])

    async def connect(maddrs: list[str], nursery) -> None:
        by_peer: dict[str, list[str]] = {}
        for m in maddrs:
            peer = m.rsplit("/p2p/", 1)[-1]
            if peer != me:
                by_peer.setdefault(peer, []).append(m)
        for addrs in list(by_peer.values())[:MAX_PEERS_PER_COMMAND]:
            nursery.start_soon(connect_peer, addrs)

    async def commands(nursery) -> None:
        stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buf = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:  # the node closed our stdin: it is gone or stopping
                nursery.cancel_scope.cancel()
                return
            buf += chunk
            if len(buf) > MAX_COMMAND_BYTES and b"\n" not in buf:
                buf = b""  # an oversize line: drop it rather than buffer without bound
                emit("error", detail="command line over 1 MiB dropped")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    cmd = json.loads(line)
                    if cmd.get("cmd") == "connect":
                        await connect([str(m) for m in cmd["maddrs"]], nursery)
                    elif cmd.get("cmd") == "publish":
                        data = base64.b64decode(cmd["data"])
                        if len(data) > args.max_message_bytes:
                            emit("error", detail=f"payload of {len(data)} bytes over the cap, not published")
                            continue
                        await pubsub.publish(topic, data)
                        await trio.sleep(PUBLISH_PACE_S)
                except Exception as e:
                    emit("error", detail=f"command failed: {type(e).__name__}: {e}"[:200])

    async def deliver(subscription) -> None:
        while True:
            msg = await subscription.get()  # drain everything, our own echoes included
            origin = str(ID(msg.from_id))
            if origin != me:
                emit("message", **{"from": origin, "data": base64.b64encode(msg.data).decode()})

    async with host.run([multiaddr.Multiaddr(f"/ip4/{args.host}/tcp/{args.port}")]):
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(topic)
            port = int(host.get_transport_addrs()[0].value_for_protocol("tcp"))
            announce = args.announce_host or ("127.0.0.1" if args.host in ("0.0.0.0", "") else args.host)
            emit("ready", peer_id=me, listen=[f"/ip4/{announce}/tcp/{port}/p2p/{me}"], topic=topic)
            async with until_signal() as nursery:
                nursery.start_soon(deliver, subscription)
                nursery.start_soon(commands, nursery)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = sidecar_parser("swarm_node.sidecars.gossip", __doc__)
    p.add_argument("--host", default="127.0.0.1", help="IP to listen on")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--announce-host", default=None, help="IP to put in the advertised multiaddr")
    p.add_argument("--max-message-bytes", type=int, default=256 * 1024)
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--degree", type=int, default=6)
    args = p.parse_args(argv)
    return run_sidecar("rollout-sidecar", run, args)


if __name__ == "__main__":
    sys.exit(main())
