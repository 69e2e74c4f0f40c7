"""Bulk TCP data path (protocol/bulk_tcp.py) and the reducer's side of it, without p2pd.

Framing and validation are pure functions; the token and stream tests use real sockets
on 127.0.0.1 (a BulkServer, raw client sockets); the reducer under test is a real
ButterflyAllReduce whose only stub is the byte counter it reports to.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from types import SimpleNamespace

import pytest
import torch

from swarm_node.protocol import bulk_tcp, codec
from swarm_node.protocol.averaging.butterfly import ButterflyAllReduce, _Reduction
from swarm_node.protocol.bulk_tcp import BulkError


# ---------------------------------------------------------------------------- pure framing


def test_push_header_roundtrip_and_every_rejection():
    assert bulk_tcp.unpack_push(bulk_tcp.pack_push(codec.NONE, 0.5, 40), numel=10) == (codec.NONE, 0.5, 40)
    cases = [
        (bulk_tcp.pack_push(codec.NONE, 1.0, 36), "bad_shape"),        # raw shard one element short
        (bulk_tcp.pack_push(codec.NONE, 1.0, 44), "too_large"),        # raw shard one element long
        (bulk_tcp.pack_push(codec.FLOAT16, 1.0, 10**9), "too_large"),  # checked before any allocation
        (bulk_tcp.pack_push(codec.FLOAT16, 1.0, 0), "bad_shape"),
        (bulk_tcp.pack_push(99, 1.0, 40), "malformed"),                # unknown compression
        (bulk_tcp.pack_push(codec.NONE, float("nan"), 40), "malformed"),
        (bulk_tcp.pack_push(codec.NONE, -1.0, 40), "malformed"),
        (bulk_tcp.pack_push(codec.NONE, 1e12, 40), "malformed"),
        (bulk_tcp.pack_push(codec.NONE, 1.0, 40)[:-1], "truncated"),
    ]
    for data, reason in cases:
        with pytest.raises(BulkError) as e:
            bulk_tcp.unpack_push(data, numel=10)
        assert e.value.reason == reason, data


def test_reply_and_trailer_roundtrip_and_rejections():
    data = bulk_tcp.pack_reply(bulk_tcp.REJECTED, 0, "no such group")
    status, nbytes, detail_len = bulk_tcp.unpack_reply(data[:bulk_tcp.REPLY.size])
    assert (status, nbytes) == (bulk_tcp.REJECTED, 0) and data[bulk_tcp.REPLY.size:] == b"no such group"
    assert bulk_tcp.unpack_trailer(bulk_tcp.pack_trailer(bulk_tcp.OK, 4, 3.0), max_contributors=4) == (0, 4, 3.0)
    with pytest.raises(BulkError, match="malformed"):
        bulk_tcp.unpack_trailer(bulk_tcp.pack_trailer(bulk_tcp.OK, 5, 3.0), max_contributors=4)
    with pytest.raises(BulkError, match="malformed"):
        bulk_tcp.unpack_reply(struct.pack("<BQH", 7, 0, 0))
    with pytest.raises(BulkError, match="malformed"):
        bulk_tcp.unpack_reply(struct.pack("<BQH", 0, 0, bulk_tcp.MAX_DETAIL + 1))
    with pytest.raises(BulkError, match="truncated"):
        bulk_tcp.unpack_trailer(b"\x00", max_contributors=4)


@pytest.mark.parametrize("numel,segment", [(10, 4), (8, 4), (0, 4), (3, 100)])
def test_segments_cover_the_shard_once(numel, segment):
    seg = bulk_tcp.segment_bounds(numel, segment)
    assert seg[0][0] == 0 and seg[-1][1] == numel and all(a[1] == b[0] for a, b in zip(seg, seg[1:]))
    assert all(0 <= e - s <= segment for s, e in seg) and len(seg) >= 1


@pytest.mark.parametrize("name,comp", [("none", codec.NONE), ("fp16", codec.FLOAT16),
                                       ("int8", codec.INT8_BLOCKWISE), ("e3m0", codec.E3M0)])
def test_payload_goes_through_our_codec_and_decodes_as_the_p2p_path_does(name, comp):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    wire = bulk_tcp.encode_payload(x, comp)
    if comp == codec.NONE:
        assert len(wire) == 4000 and torch.equal(torch.frombuffer(bytearray(wire), dtype=torch.float32), x)
        return
    got = bulk_tcp.decode_payload(comp, wire, 1000)
    # ButterflyAllReduce._as_sent is what a reducer keeps of its own shard: must be identical
    mine = ButterflyAllReduce(transport=None, timeout_s=1, compression=comp)._as_sent(x)
    assert torch.equal(got, mine)
    with pytest.raises(BulkError) as e:  # a shard of the wrong length is refused by the codec
        bulk_tcp.decode_payload(comp, wire, 999)
    assert e.value.reason in codec.REJECT_REASONS


def test_raw_view_refuses_non_fp32_and_finite_check_catches_nan_and_inf():
    with pytest.raises(ValueError):
        bulk_tcp.raw_view(torch.zeros(3, dtype=torch.float64))
    bulk_tcp.check_finite(torch.zeros(0))
    bulk_tcp.check_finite(torch.tensor([1.0, -3e38]))
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(BulkError, match="non_finite"):
            bulk_tcp.check_finite(torch.tensor([1.0, bad, 2.0]))


def test_tokens_are_single_use_bound_and_expiring():
    server = bulk_tcp.BulkServer(handler=None)
    token = server.issue(("g", "peer-a"), ttl_s=10)
    assert len(token) == bulk_tcp.TOKEN_BYTES
    assert server.redeem(bytes(16)) is None  # a guess
    grant = server.redeem(token[:16])
    assert grant is not None and grant.session == ("g", "peer-a") and grant.server_proof == token[16:]
    assert server.redeem(token[:16]) is None  # single use
    stale = server.issue(("g", "peer-b"), ttl_s=-1)
    assert server.redeem(stale[:16]) is None


def test_reduction_segments_become_final_one_by_one_and_a_broken_contributor_poisons():
    async def go():
        red = _Reduction(expected={"a", "b"}, length=10, total=torch.empty(10), segment=4)
        assert [len(red.seg_ready)] == [3] and red.begin("a") and not red.begin("a")
        red.add_segment("a", 0, torch.full((4,), 2.0), 1.0)
        red.add("b", torch.full((10,), 4.0), 3.0)  # b whole, over the p2p path
        assert red.seg_ready[0].is_set() and not red.seg_ready[1].is_set() and not red.closed.is_set()
        assert torch.equal(red.total[:4], torch.full((4,), 3.5))  # (2*1 + 4*3) / 4
        red.add_segment("a", 2, torch.ones(2), 1.0)  # out of order: ignored
        assert red.progress["a"] == 1
        red.fail("a", "connection reset")  # after one segment was added: cannot be undone
        assert red.closed.is_set() and red.poisoned and red.contributors == {"b"}

        clean = _Reduction(expected={"a", "b"}, length=10, total=torch.empty(10), segment=4)
        assert clean.begin("a")
        clean.fail("a", "bad header")  # nothing added yet: harmless, and a may retry
        assert not clean.poisoned and clean.begin("a")

    asyncio.run(go())


# ---------------------------------------------------------------------------- real sockets


class _Counted:
    """What ButterflyAllReduce needs of a Transport for the TCP path: an id and a byte counter."""

    def __init__(self, peer_id: str):
        self.peer_id = peer_id
        self.bytes: dict[str, int] = {"tx": 0, "rx": 0}

    def _count(self, direction: str, channel: str, nbytes: int) -> None:
        assert channel == "averaging"
        self.bytes[direction] += nbytes


async def _reducer(length: int, segment: int = 1 << 18):
    rejects: list[str] = []
    ar = ButterflyAllReduce(_Counted("me"), timeout_s=3, transport_mode="tcp", on_reject=rejects.append)
    server = bulk_tcp.BulkServer(ar._serve_bulk, host="127.0.0.1", on_reject=rejects.append)
    await server.start()
    ar.bulk = server
    red = _Reduction(expected={"me", "m"}, length=length, total=torch.empty(length), index=0, segment=segment)
    ar._groups["g"] = red
    return ar, server, red, rejects


async def _open(server: bulk_tcp.BulkServer) -> socket.socket:
    return await bulk_tcp.connect(server.hosts, server.port, server.issue(("g", "m"), ttl_s=10), timeout_s=3)


async def _reply(sock: socket.socket) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    status, _, detail_len = bulk_tcp.unpack_reply(await bulk_tcp.recv_exact(sock, bulk_tcp.REPLY.size, loop.time() + 3))
    return status, (await bulk_tcp.recv_exact(sock, detail_len, loop.time() + 3)).decode()


def test_a_wrong_token_is_refused_counted_and_never_reaches_the_handler():
    async def go():
        reached = []

        async def handler(sock, session):
            reached.append(session)

        rejects: list[str] = []
        server = bulk_tcp.BulkServer(handler, host="127.0.0.1", on_reject=rejects.append)
        await server.start()
        try:
            token = server.issue(("g", "m"), ttl_s=10)
            forged = bytes([token[0] ^ 1]) + token[1:]
            with pytest.raises(bulk_tcp.BulkUnavailable, match="refused"):
                await bulk_tcp.connect(server.hosts, server.port, forged, timeout_s=3)
            sock = await bulk_tcp.connect(server.hosts, server.port, token, timeout_s=3)  # the real one still works
            sock.close()
            with pytest.raises(bulk_tcp.BulkUnavailable):  # ...once
                await bulk_tcp.connect(server.hosts, server.port, token, timeout_s=3)
            await asyncio.sleep(0.1)
            assert rejects == ["bad_token", "bad_token"] and reached == [("g", "m")]
        finally:
            await server.close()

    asyncio.run(go())


def test_a_reachable_but_slow_server_gets_the_handshake_window_not_the_connect_budget():
    async def go():
        token = bytes(range(32))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)

        async def busy_server(delay_s: float):  # accepts at once, answers the proof late
            loop = asyncio.get_running_loop()
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            await bulk_tcp.recv_exact(conn, bulk_tcp.HELLO.size, loop.time() + 3)
            await asyncio.sleep(delay_s)
            try:
                await loop.sock_sendall(conn, bulk_tcp.WELCOME.pack(bulk_tcp.OK, token[16:]))
                await asyncio.sleep(0.2)
            except OSError:
                pass
            conn.close()

        port = listener.getsockname()[1]
        task = asyncio.create_task(busy_server(1.0))
        sock = await bulk_tcp.connect(["127.0.0.1"], port, token, timeout_s=0.5, handshake_s=3)
        sock.close()
        await task
        task = asyncio.create_task(busy_server(1.0))  # but the handshake window still bounds it
        with pytest.raises(bulk_tcp.BulkUnavailable, match="TimeoutError|timeout"):
            await bulk_tcp.connect(["127.0.0.1"], port, token, timeout_s=0.5, handshake_s=0.3)
        await task
        listener.close()

    asyncio.run(go())


def test_a_client_never_talks_to_a_server_that_cannot_prove_the_token():
    async def go():
        stranger = socket.socket()
        stranger.bind(("127.0.0.1", 0))
        stranger.listen(1)
        port = stranger.getsockname()[1]

        async def impostor():  # accepts, reads the hello, answers OK with a made-up proof
            loop = asyncio.get_running_loop()
            stranger.setblocking(False)
            conn, _ = await loop.sock_accept(stranger)
            conn.setblocking(False)
            await bulk_tcp.recv_exact(conn, bulk_tcp.HELLO.size, loop.time() + 3)
            await loop.sock_sendall(conn, bulk_tcp.WELCOME.pack(bulk_tcp.OK, bytes(16)))
            await asyncio.sleep(0.2)
            conn.close()

        task = asyncio.create_task(impostor())
        with pytest.raises(bulk_tcp.BulkUnavailable, match="refused"):
            await bulk_tcp.connect(["127.0.0.1"], port, bytes(range(32)), timeout_s=3)
        await task
        stranger.close()
        with pytest.raises(bulk_tcp.BulkUnavailable):  # nothing listening any more: unreachable
            await bulk_tcp.connect(["127.0.0.1"], port, bytes(range(32)), timeout_s=1)

    asyncio.run(go())


def test_wrong_length_truncated_and_nan_pushes_are_rejected_counted_and_not_added():
    async def go():
        ar, server, red, rejects = await _reducer(length=10)
        loop = asyncio.get_running_loop()
        try:
            sock = await _open(server)  # wrong length: refused before any payload is read
            await bulk_tcp.send_all(sock, bulk_tcp.pack_push(codec.NONE, 1.0, 36), deadline=loop.time() + 3)
            assert (await _reply(sock))[0] == bulk_tcp.REJECTED
            sock.close()

            sock = await _open(server)  # truncated: half the shard, then the connection closes
            await bulk_tcp.send_all(sock, bulk_tcp.pack_push(codec.NONE, 1.0, 40), bytes(20), deadline=loop.time() + 3)
            sock.close()
            await asyncio.sleep(0.2)

            sock = await _open(server)  # NaN inside the shard
            bad = torch.ones(10)
            bad[3] = float("nan")
            await bulk_tcp.send_all(sock, bulk_tcp.pack_push(codec.NONE, 1.0, 40), bulk_tcp.encode_payload(bad, codec.NONE),
                                    deadline=loop.time() + 3)
            await asyncio.sleep(0.2)
            sock.close()
            assert rejects == ["bad_shape", "truncated", "non_finite"]
            assert not red.contributors and not red.poisoned and not red.closed.is_set()

            sock = await _open(server)  # a good push after all that still counts
            await bulk_tcp.send_all(sock, bulk_tcp.pack_push(codec.NONE, 3.0, 40),
                                    bulk_tcp.encode_payload(torch.full((10,), 5.0), codec.NONE), deadline=loop.time() + 3)
            red.add("me", torch.ones(10), 1.0)
            assert (await _reply(sock)) == (bulk_tcp.OK, "")
            mean = torch.empty(10)
            await bulk_tcp.recv_into(sock, bulk_tcp.raw_view(mean), loop.time() + 3)
            trailer = bulk_tcp.unpack_trailer(await bulk_tcp.recv_exact(sock, bulk_tcp.TRAILER.size, loop.time() + 3), 2)
            sock.close()
            assert trailer == (bulk_tcp.OK, 2, 4.0) and torch.equal(mean, torch.full((10,), 4.0))  # (5*3 + 1) / 4
            assert ar.transport.bytes["rx"] >= 40 and ar.transport.bytes["tx"] >= 40
        finally:
            await server.close()

    asyncio.run(go())


def test_a_push_that_breaks_off_after_a_segment_makes_every_reply_say_unusable():
    async def go():
        ar, server, red, rejects = await _reducer(length=10, segment=4)
        loop = asyncio.get_running_loop()
        try:
            sock = await _open(server)
            await bulk_tcp.send_all(sock, bulk_tcp.pack_push(codec.NONE, 1.0, 40),
                                    bulk_tcp.encode_payload(torch.ones(6), codec.NONE), deadline=loop.time() + 3)
            status, _ = await _reply(sock)
            assert status == bulk_tcp.OK  # the reply starts before the outcome is known...
            sock.shutdown(socket.SHUT_WR)  # ...then the push breaks off after segment 0
            for _ in range(30):
                if red.closed.is_set():
                    break
                await asyncio.sleep(0.05)
            assert red.poisoned and red.closed.is_set()
            rest = bytearray()
            while True:  # the remaining mean bytes, then the trailer
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3)
                if not chunk:
                    break
                rest += chunk
            assert len(rest) == 40 + bulk_tcp.TRAILER.size
            assert bulk_tcp.unpack_trailer(bytes(rest[40:]), 2)[0] == bulk_tcp.REJECTED
            sock.close()
        finally:
            await server.close()

    asyncio.run(go())
