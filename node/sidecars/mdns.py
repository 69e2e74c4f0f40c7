"""mDNS sidecar: advertise this node on the LAN and find other nodes of the same run.

Run only as its own process (`python -m swarm_node.sidecars.mdns ...`), started and
supervised by node/discovery.py; it imports py-libp2p, which must never be imported in the
node process (its `crypto.pb` protobuf clashes with hivemind's). Its libp2p key is the
node's identity.key, so its peer id *is* the node's. It registers with py-libp2p's mDNS under
the run's private service type `_p2p-<sha256(run_id)[:10]>._udp.local.`, serves
`/swarm-node/discovery/1.0.0` (one signed advertisement, discovery_record.py), and unless
--no-browse dials every peer mDNS reports (the secure channel authenticates its peer id),
validates its advertisement strictly and reports it (OUTPUT below; logs go to stderr).
Lifetime: dies with its parent (PR_SET_PDEATHSIG first thing, plus a parent-pid watch that
also covers the seconds spent importing py-libp2p); SIGTERM unregisters the service (goodbye
packets) and exits 0. Every network wait is bounded. `--fault` (hidden) serves a deliberately
bad advertisement: the tests' fault injector for the validation path.
"""
from __future__ import annotations

import argparse
import sys

from swarm_node.discovery_record import (MAX_ADVERT_BYTES, Advert, AdvertRejected, decode_advert, encode_advert,
                               service_fingerprint)
from swarm_node.protocol.signing import Signer
from swarm_node.sidecars.runtime import emit, load_host, run_sidecar, sidecar_parser, until_signal

PROTOCOL_ID = "/swarm-node/discovery/1.0.0"
FETCH_TIMEOUT_S = 5.0
FETCH_ATTEMPTS = 3
FAULTS = ("wrong_run", "bad_signature", "malformed", "oversize", "peer_mismatch")

# OUTPUT, one JSON object per line on stdout (nothing else is written there; t_s counts from start):
#   {"event": "ready", "peer_id", "service", "listen", "t_s"}
#   {"event": "peer", "peer_id", "maddrs", "t_s"}                a validated peer of our run
#   {"event": "rejected", "reason", "peer_id", "detail", "t_s"}  reason in REJECT_REASONS
#   {"event": "unreachable", "peer_id", "detail", "t_s"}         mDNS named it, its host did not answer
#   {"event": "error", "detail", "t_s"}                          bad arguments (then exit 2)


def listen_plan(maddrs: list[str]) -> tuple[str, list[str]]:
    """(IP to bind, IPs to advertise) from the node's join multiaddrs: same machine, same IPs.
    Loopback-only nodes bind 127.0.0.1; otherwise bind all and advertise the node's IPs."""
    ips = list(dict.fromkeys(m.split("/")[2] for m in maddrs if m.startswith("/ip4/")))
    if not ips:
        raise ValueError("no /ip4/ join multiaddr to advertise")
    if all(ip.startswith("127.") for ip in ips):
        return "127.0.0.1", ips[:1]
    return "0.0.0.0", [ip for ip in ips if not ip.startswith("127.")]


def faulty_record(fault: str, good: Advert, signer: Signer) -> bytes:
    """A record that an honest browser must reject with reason `fault` (oversize: too_large)."""
    import msgpack

    if fault == "malformed":
        return b"\x95\x01not-a-record"
    if fault == "oversize":
        return b"\x00" * (MAX_ADVERT_BYTES + 100)
    if fault == "wrong_run":
        return encode_advert(Advert(good.run_id + "-other", good.peer_id, good.maddrs), signer)
    if fault == "peer_mismatch":
        other = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
        maddrs = tuple(m.rsplit("/p2p/", 1)[0] + "/p2p/" + other for m in good.maddrs)
        return encode_advert(Advert(good.run_id, other, maddrs), signer)
    if fault == "bad_signature":
        fields = msgpack.unpackb(encode_advert(good, signer), raw=False)
        fields[4] = bytes([fields[4][0] ^ 0xFF]) + fields[4][1:]
        return msgpack.packb(fields, use_bin_type=True)
    raise ValueError(fault)


async def read_capped(stream) -> bytes:
    """Read until EOF or one byte past the cap (so oversize is detected, never buffered)."""
    blob = b""
    try:
        while len(blob) <= MAX_ADVERT_BYTES:
            chunk = await stream.read(MAX_ADVERT_BYTES + 1 - len(blob))
            if not chunk:
                break
            blob += chunk
    except EOFError:  # py-libp2p signals end-of-stream by raising StreamEOF, not by b""
        pass
    return blob


async def run(args: argparse.Namespace) -> int:
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.discovery.events.peerDiscovery import peerDiscovery
    from libp2p.discovery.mdns.mdns import MDNSDiscovery
    from libp2p.peer.id import ID

    host, _ = load_host(args.identity)
    me = str(host.get_id())
    signer = Signer.from_identity_file(args.identity)  # the same key as the host's: sign as the node
    if signer.peer_id != me:
        emit("error", detail=f"{args.identity} signs as {signer.peer_id}, py-libp2p derived {me}")
        return 2
    for m in args.maddr:
        if not m.endswith(f"/p2p/{me}"):
            emit("error", detail=f"--maddr {m} does not end with this identity's peer id {me}")
            return 2
    advert = Advert(args.run_id, me, tuple(args.maddr))
    record = faulty_record(args.fault, advert, signer) if args.fault else encode_advert(advert, signer)
    protocol = TProtocol(PROTOCOL_ID)

    async def serve(stream) -> None:
        try:
            with trio.move_on_after(FETCH_TIMEOUT_S):
                await stream.write(record)
        finally:
            await stream.close()

    host.set_stream_handler(protocol, serve)
    bind_ip, advertised_ips = listen_plan(args.maddr)
    send, receive = trio.open_memory_channel(256)
    token = trio.lowlevel.current_trio_token()

    def on_discovered(peer_info) -> None:  # zeroconf's thread: hand over to trio, never block
        try:
            trio.from_thread.run_sync(send.send_nowait, peer_info, trio_token=token)
        except Exception as e:  # trio finished, or 256 discoveries pending: drop this one
            print(f"mdns-sidecar: dropped a discovery: {e!r}", file=sys.stderr)

    reported: dict[str, tuple[str, ...]] = {}

    async def fetch(peer_info) -> None:
        pid = str(peer_info.peer_id)
        last = ""
        for attempt in range(FETCH_ATTEMPTS):
            try:
                with trio.fail_after(FETCH_TIMEOUT_S):
                    await host.connect(peer_info)
                    stream = await host.new_stream(peer_info.peer_id, [protocol])
                    remote = str(stream.muxed_conn.peer_id)  # authenticated by the secure channel
                    blob = await read_capped(stream)
                    await stream.close()
                break
            except Exception as e:  # libp2p raises many types for "not now"; retry, then report
                last = f"{type(e).__name__}: {e}"[:200]
                await trio.sleep(0.5 * 2 ** attempt)
        else:
            emit("unreachable", peer_id=pid, detail=last)
            return
        # the key the secure channel authenticated; decode_advert checks it maps to the remote's id
        remote_key = host.get_peerstore().pubkey(ID.from_base58(remote)).serialize()
        try:
            if remote != pid:
                raise AdvertRejected("peer_mismatch", f"mDNS named {pid}, the channel is {remote}")
            got = decode_advert(blob, expected_run_id=args.run_id, remote_peer_id=remote, remote_key=remote_key)
        except AdvertRejected as e:
            emit("rejected", reason=e.reason, peer_id=pid, detail=e.detail[:200])
            return
        if reported.get(got.peer_id) != got.maddrs:
            reported[got.peer_id] = got.maddrs
            emit("peer", peer_id=got.peer_id, maddrs=list(got.maddrs))

    if args.browse:
        peerDiscovery.register_peer_discovered_handler(on_discovered)
    async with host.run([multiaddr.Multiaddr(f"/ip4/{bind_ip}/tcp/0")]):
        port = int(host.get_transport_addrs()[0].value_for_protocol("tcp"))
        listen = [f"/ip4/{ip}/tcp/{port}" for ip in advertised_ips]
        mdns = MDNSDiscovery(host.get_network(), port=port, listen_addrs=listen,
                             service_type=f"_p2p-{service_fingerprint(args.run_id)}._udp.local.")
        if not args.browse:
            mdns.listener.stop()  # advertise only (a --new-swarm node): stop the browsers
        mdns.start()
        emit("ready", peer_id=me, service=mdns.service_type, listen=listen)
        try:
            async with until_signal() as nursery:
                async for peer_info in receive:
                    if str(peer_info.peer_id) != me:  # our own, e.g. a restarted sidecar's stale record
                        nursery.start_soon(fetch, peer_info)
        finally:
            try:
                mdns.stop()  # unregister (goodbye packets); blocks this exiting process briefly
            except Exception as e:
                print(f"mdns-sidecar: stopping mDNS: {e!r}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = sidecar_parser("swarm_node.sidecars.mdns", __doc__)
    p.add_argument("--maddr", action="append", required=True, help="a join multiaddr of the node (repeatable)")
    p.add_argument("--browse", action=argparse.BooleanOptionalAction, default=True,
                   help="also look for other peers (off: advertise only)")
    p.add_argument("--fault", choices=FAULTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return run_sidecar("mdns-sidecar", run, args)


if __name__ == "__main__":
    sys.exit(main())
