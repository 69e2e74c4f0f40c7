"""Four real member processes (own p2pd each, real sockets on 127.0.0.1) all-reduce over
the bulk TCP path: the mean is exact and complete; a member presenting a forged token is
refused and counted while the round still completes; a reducer whose advertised TCP
address is unreachable (TEST-NET-1, as behind NAT) is reached over libp2p instead, counted
as a fallback, and the round is still exact and complete. A member that stalls its event
loop right after its run() returns does not stall the others.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback

import pytest

N = 4
NUMEL = 2_000_003  # 500k per shard: two pipelining segments, and shards of unequal length
UNREACHABLE = "192.0.2.1"  # TEST-NET-1: never routed
BIG_NUMEL = 16_000_000  # 64 MB: 16 MB replies per member, more than a loopback socket buffers


def _vector(rank: int, numel: int = NUMEL):
    import torch

    g = torch.Generator().manual_seed(77 + rank)
    # multiples of 1/64 in [-64, 64]: the fp32 mean of 4 is exact in any summation order
    return torch.randint(-4096, 4097, (numel,), generator=g, dtype=torch.int32).float().div_(64.0)


def _member(rank: int, cmd_q, res_q, parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # die with the test process
        if os.getppid() != parent:
            os._exit(3)
        threading.Thread(target=lambda: (time.sleep(150), os._exit(4)), daemon=True).start()
        import torch

        torch.set_num_threads(1)
        from swarm_node.processes import install_p2pd_reaper

        install_p2pd_reaper()
        asyncio.run(_member_main(rank, cmd_q, res_q))
    except BaseException:
        res_q.put(("error", rank, traceback.format_exc()[-3000:]))
        time.sleep(0.5)
        os._exit(2)


async def _member_main(rank: int, cmd_q, res_q) -> None:
    from collections import Counter

    import torch
    from hivemind.p2p import P2P, PeerID
    from multiaddr import Multiaddr

    from swarm_node.protocol import bulk_tcp
    from swarm_node.protocol.averaging.butterfly import OFFER_METHOD, ButterflyAllReduce
    from swarm_node.protocol.pb import swarm_node_bulk_pb2 as bpb
    from swarm_node.protocol.transport import Transport

    loop = asyncio.get_running_loop()
    rejects: Counter = Counter()
    paths: Counter = Counter()
    x = _vector(rank)
    expected = sum(_vector(r) for r in range(N)) / N

    async def get():
        while True:
            try:
                return await loop.run_in_executor(None, cmd_q.get, True, 1.0)
            except queue.Empty:
                continue

    p2p = await asyncio.wait_for(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), 30)
    transport = Transport(p2p, "bulktest", count_bytes=lambda *a: None)
    ar = ButterflyAllReduce(transport, timeout_s=8, transport_mode="tcp", bulk_host="127.0.0.1",
                            segment_elems=1 << 18,  # NUMEL's shards are two segments each
                            on_reject=lambda r: rejects.update([r]), on_path=lambda p: paths.update([p]))
    await ar.start()
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    res_q.put(("up", rank, {"peer": transport.peer_id, "maddrs": maddrs, "p2pd": p2p._child.pid}))
    try:
        while True:
            cmd = await get()
            if cmd[0] == "connect":
                for pid, addrs in cmd[1].items():
                    if pid != transport.peer_id:
                        await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(pid),
                                                                   [Multiaddr(a) for a in addrs]), 15)
                res_q.put(("ok", rank, None))
            elif cmd[0] == "readvertise":  # ("readvertise", host): restart the listener, advertised as host
                await ar.close()
                server = bulk_tcp.BulkServer(ar._serve_bulk, host="127.0.0.1", announce_host=cmd[1],
                                             on_reject=lambda r: rejects.update([r]))
                await server.start()
                ar.bulk = server
                res_q.put(("ok", rank, None))
            elif cmd[0] == "run":  # ("run", group_id, group, mode, forge_against_rank)
                _, gid, group, mode, forge = cmd
                ar.transport_mode = mode
                rejects.clear()
                paths.clear()
                task = asyncio.create_task(ar.run(gid, group, x, 1.0))
                forged = None
                if forge is not None:
                    # a real member asks reducer `forge` for a token over libp2p, then presents it altered
                    offer = None
                    async for reply in transport.call(group[forge], OFFER_METHOD, [bpb.BulkOffer(group_id=gid, shard=forge)],
                                                      bpb.BulkOfferReply, timeout_s=8, channel="averaging"):
                        offer = reply
                    bad = bytes([offer.token[0] ^ 0xFF]) + offer.token[1:]
                    try:
                        sock = await bulk_tcp.connect(list(offer.hosts), offer.port, bad, timeout_s=3)
                        sock.close()
                        forged = "accepted"
                    except bulk_tcp.BulkUnavailable as e:
                        forged = f"refused: {e}"
                out = await asyncio.wait_for(task, 30)
                err = float("inf") if out.result is None else float((out.result - expected).abs().max())
                await asyncio.sleep(0.2)  # let the reducer's side count what it refused
                res_q.put(("ran", rank, {"complete": out.complete, "counts": out.contributors_per_shard,
                                         "err": err, "paths": out.paths, "path_counts": dict(paths),
                                         "rejects": dict(rejects), "forged": forged}))
            elif cmd[0] == "run_blocking":  # ("run_blocking", group_id, group, block_s)
                # every member stalls its event loop right after run() returns, as a caller
                # hashing a 100 MB result does: the others must not need it any more by then
                _, gid, group, block_s = cmd
                ar.transport_mode = "tcp"
                big = _vector(rank, BIG_NUMEL)
                out = await asyncio.wait_for(ar.run(gid, group, big, 1.0), 60)
                returned = time.time()
                time.sleep(block_s)
                err = float("inf") if out.result is None else \
                    float((out.result - sum(_vector(r, BIG_NUMEL) for r in range(N)) / N).abs().max())
                res_q.put(("ran", rank, {"complete": out.complete, "err": err, "returned": returned,
                                         "unblocked": time.time(), "counts": out.contributors_per_shard,
                                         "phases": out.phases}))
            elif cmd[0] == "stop":
                break
    finally:
        await ar.close()
        await transport.close()
        try:
            await asyncio.wait_for(p2p.shutdown(), 5)
        except Exception:
            pass
        res_q.put(("bye", rank, None))


class _Members:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(N)]
        self.procs = [ctx.Process(target=_member, args=(i, self.cmd_qs[i], self.res_q, os.getpid()), daemon=True)
                      for i in range(N)]
        for p in self.procs:
            p.start()

    def send(self, cmd) -> None:
        for q in self.cmd_qs:
            q.put(cmd)

    def collect(self, kind: str, timeout_s: float) -> dict:
        got, until = {}, time.monotonic() + timeout_s
        while len(got) < N:
            left = until - time.monotonic()
            assert left > 0, f"members {sorted(set(range(N)) - set(got))} sent no {kind!r} in {timeout_s}s"
            try:
                k, rank, payload = self.res_q.get(timeout=min(1.0, left))
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if not p.is_alive() and i not in got]
                assert not dead, f"members {dead} died"
                continue
            assert k != "error", f"member {rank} failed:\n{payload}"
            assert k == kind, (k, rank)
            got[rank] = payload
        return got

    def close(self) -> None:
        for p in self.procs:
            p.join(10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)


@pytest.mark.multiprocess
@pytest.mark.timeout(170)
def test_four_processes_all_reduce_over_tcp_reject_a_forged_token_and_fall_back_when_unreachable():
    import psutil

    m = _Members()
    p2pds = []
    try:
        up = m.collect("up", 60)
        p2pds = [u["p2pd"] for u in up.values()]
        group = sorted(u["peer"] for u in up.values())
        rank_of = {u["peer"]: r for r, u in up.items()}
        m.send(("connect", {u["peer"]: u["maddrs"] for u in up.values()}))
        m.collect("ok", 60)

        # 1. tcp only: exact, complete, every shard over tcp
        m.send(("run", "g-tcp", group, "tcp", None))
        ran = m.collect("ran", 60)
        for r, res in ran.items():
            assert res["complete"] and res["counts"] == [N] * N and res["err"] == 0.0, (r, res)
            assert sorted(res["paths"]) == ["local"] + ["tcp"] * (N - 1) and res["path_counts"] == {"tcp": N - 1}
            assert not res["rejects"], res

        # 2. the member holding shard N-1 presents a forged token to the reducer of shard 0: refused there and
        # counted as bad_token; its real push still counts and the round completes everywhere
        forger, victim = rank_of[group[-1]], rank_of[group[0]]  # never the same process (no dial to self)
        cmds = {r: ("run", "g-forged", group, "tcp", 0 if r == forger else None) for r in range(N)}
        for r in range(N):
            m.cmd_qs[r].put(cmds[r])
        ran = m.collect("ran", 60)
        assert ran[forger]["forged"].startswith("refused"), ran[forger]
        assert ran[victim]["rejects"] == {"bad_token": 1}, ran[victim]
        for r, res in ran.items():
            assert res["complete"] and res["err"] == 0.0, (r, res)

        # 3. the reducer of shard 2 advertises an unreachable address: in auto, everyone else
        # falls back to libp2p for that shard (counted), and the mean is still exact and complete
        far = rank_of[group[2]]
        m.cmd_qs[far].put(("readvertise", UNREACHABLE))
        assert m.res_q.get(timeout=30)[:2] == ("ok", far)
        m.send(("run", "g-fallback", group, "auto", None))
        ran = m.collect("ran", 90)
        for r, res in ran.items():
            assert res["complete"] and res["counts"] == [N] * N and res["err"] == 0.0, (r, res)
            if r == far:
                assert res["path_counts"] == {"tcp": N - 1}, res
            else:
                assert res["paths"][2] == "fallback" and res["path_counts"] == {"tcp": N - 2, "fallback": 1}, res
        # 4. every member stalls its event loop for 6 s as soon as its run() returns: run()
        # returns only once this member's replies are out, so the last member holds the mean
        # before the first one's stall ends (it never waits out that stall)
        m.cmd_qs[far].put(("readvertise", "127.0.0.1"))  # reachable again: this step is tcp only
        assert m.res_q.get(timeout=30)[:2] == ("ok", far)
        m.send(("run_blocking", "g-blocking", group, 6.0))
        ran = m.collect("ran", 90)
        for r in ran.values():
            assert r["complete"] and r["err"] == 0.0, r
        assert max(r["returned"] for r in ran.values()) < min(r["unblocked"] for r in ran.values()) - 3.0, ran

        m.send(("stop",))
        m.collect("bye", 30)
    finally:
        m.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                                  for p in p2pds):
            time.sleep(0.2)
        left = [p for p in p2pds if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"p2pd processes outlived their members: {left}"
