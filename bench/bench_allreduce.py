"""Averaging throughput: our ButterflyAllReduce (both data paths) vs torch.distributed gloo.

N worker processes (spawn) on 127.0.0.1 each hold a flat fp32 vector (default 100 MB) and
average it, in turn with gloo (all_reduce(SUM) then /N), ours over libp2p ("p2p", keys `ours_*`)
and ours over bulk TCP ("tcp", protocol/bulk_tcp.py, keys `tcp_*`), after one warm-up of each.
Every repetition starts at one instant chosen by the parent after all workers are ready; its
time is the wall time until the LAST worker holds the mean. Correctness is checked on every
repetition: values are multiples of 1/64 in [-64, 64], so the fp32 mean is exact in any order
(error 0 for gloo and uncompressed ours, within the codec's bound otherwise; `complete` true).
Where each path spends its time: see `summarize`.

  .venv/bin/python bench/bench_allreduce.py [--mb 100] [--peers 4] [--repeats 3]
        [--compression none|fp16|int8|e3m0] [--smoke]
Prints tables and one JSON line (last); exit status non-zero on any failure; every worker is
killed in all cases. Absolute numbers are for this machine: quote the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import defaultdict

COMPRESSIONS = ("none", "fp16", "int8", "e3m0")
VALUE_MAX = 64.0  # |x| <= 64, multiples of 1/64: fp32 sums of a few peers are exact
GOAL_RATIO = 0.8  # goal: gloo_time / our_time >= 0.8 (judged on the tcp path, the node's default)
METHODS = ("gloo", "ours", "tcp")  # ours = the libp2p stream path
TCP_PHASES = ("offer_s", "connect_s", "send_s", "reply_s", "own_shard_closed_s", "all_shards_back_s", "replies_sent_s")
FOREIGN_WARN_CORES = 0.25  # other processes' CPU during a timed run above this: say the numbers are perturbed


class BenchError(RuntimeError):
    pass


# =========================================================================== worker side


def _make_vector(rank: int, numel: int):
    import torch

    g = torch.Generator().manual_seed(1234 + rank)
    v = torch.randint(-4096, 4097, (numel,), generator=g, dtype=torch.int32).float()
    return v.div_(64.0)


def _error_bound(compression: str) -> float:
    """Max abs error of the mean vs the exact mean: the peer's shard goes through the codec
    twice at most (push, then the reducer's answer); |x| and |mean| are <= VALUE_MAX."""
    per_pass = {"none": 0.0, "fp16": VALUE_MAX * 2.0**-11, "int8": VALUE_MAX / 254, "e3m0": VALUE_MAX / 3}
    return 2 * per_pass[compression] * (1 + 1e-6)


def _worker(rank: int, cfg: dict, cmd_q, res_q) -> None:
    """Entry point of a worker process: bounded lifetime, dies with the parent."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the parent
        if os.getppid() != cfg["parent_pid"]:
            os._exit(3)

        def watchdog() -> None:
            time.sleep(cfg["lifetime_s"])
            os._exit(4)  # our p2pd dies with us (install_p2pd_reaper)

        threading.Thread(target=watchdog, daemon=True).start()
        import torch

        torch.set_num_threads(1)
        from swarm_node.processes import install_p2pd_reaper

        install_p2pd_reaper()
        import uvloop

        uvloop.run(_worker_main(rank, cfg, cmd_q, res_q))
    except BaseException:
        try:
            res_q.put(("error", rank, traceback.format_exc()[-4000:]))
            res_q.close()
            res_q.join_thread()
        finally:
            os._exit(2)


class _Stats:
    """Per-run timers filled by the wrappers installed in _instrument()."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.closed_at: float | None = None

    def reset(self) -> None:
        self.t.clear()
        self.closed_at = None


def _instrument(stats: _Stats) -> None:
    """Wrap codec / reduction / hivemind framing functions of THIS process to time them.
    Nothing in protocol/ is edited; the wrappers call the originals (framing: same bytes).
    Timers are CPU time of the event-loop thread (torch runs 1 thread): wall time would also
    count the time this process waits for a core while 2N processes share the machine."""
    from hivemind.p2p import P2P
    from hivemind.proto.p2pd_pb2 import RPCError

    from swarm_node.protocol.averaging import butterfly as ar
    from swarm_node.protocol import bulk_tcp, codec

    orig_finite = bulk_tcp.check_finite

    def check_finite(x):
        t = time.thread_time()
        try:
            return orig_finite(x)
        finally:
            stats.t["finite_check_s"] += time.thread_time() - t

    bulk_tcp.check_finite = check_finite

    orig_chunks = codec.tensors_to_chunks

    def tensors_to_chunks(*a, **k):
        gen = orig_chunks(*a, **k)
        while True:
            t = time.thread_time()
            try:
                item = next(gen)
            except StopIteration:
                stats.t["encode_s"] += time.thread_time() - t
                return
            stats.t["encode_s"] += time.thread_time() - t
            yield item

    codec.tensors_to_chunks = tensors_to_chunks

    orig_asm_add = codec.ChunkAssembler.add

    def asm_add(self, chunk):
        t = time.thread_time()
        try:
            return orig_asm_add(self, chunk)
        finally:
            stats.t["assemble_decode_s"] += time.thread_time() - t

    codec.ChunkAssembler.add = asm_add

    # add_segment: every contribution on either path goes through it (and the mean's division)
    orig_red_add, orig_red_close = ar._Reduction.add_segment, ar._Reduction.close

    def red_add(self, peer, k, x, w):
        t = time.thread_time()
        try:
            return orig_red_add(self, peer, k, x, w)
        finally:
            stats.t["reduce_s"] += time.thread_time() - t

    def red_close(self):
        was_closed = self.closed.is_set()
        orig_red_close(self)
        if not was_closed:
            stats.closed_at = time.monotonic()

    ar._Reduction.add_segment, ar._Reduction.close = red_add, red_close

    orig_as_sent = getattr(ar.ButterflyAllReduce, "_as_sent", None)
    if orig_as_sent is not None:  # lossy wire: a reducer round-trips its own mean through the codec
        def as_sent(self, x):
            t = time.thread_time()
            try:
                return orig_as_sent(self, x)
            finally:
                stats.t["own_shard_codec_s"] += time.thread_time() - t

        ar.ButterflyAllReduce._as_sent = as_sent

    # hivemind 1.1.12's send_protobuf / receive_protobuf, with the (de)serialization timed
    async def send_protobuf(protobuf, writer):
        writer.write(P2P.ERROR_MARKER if isinstance(protobuf, RPCError) else P2P.MESSAGE_MARKER)
        t = time.thread_time()
        data = protobuf.SerializeToString()
        stats.t["serialize_s"] += time.thread_time() - t
        await P2P.send_raw_data(data, writer)

    async def receive_protobuf(input_protobuf_type, reader):
        msg_type = await reader.readexactly(1)
        if msg_type not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
            raise TypeError("Invalid Protobuf message type")
        raw = await P2P.receive_raw_data(reader)
        t = time.thread_time()
        msg = (input_protobuf_type if msg_type == P2P.MESSAGE_MARKER else RPCError)()
        msg.ParseFromString(raw)
        stats.t["parse_s"] += time.thread_time() - t
        return (msg, None) if msg_type == P2P.MESSAGE_MARKER else (None, msg)

    P2P.send_protobuf = staticmethod(send_protobuf)
    P2P.receive_protobuf = staticmethod(receive_protobuf)


async def _worker_main(rank: int, cfg: dict, cmd_q, res_q) -> None:
    import psutil
    import torch

    stats = _Stats()
    if cfg["instrument"]:
        _instrument(stats)
    import torch.distributed as dist
    from hivemind.p2p import P2P, PeerID
    from multiaddr import Multiaddr

    from swarm_node.protocol import codec
    from swarm_node.protocol.averaging.butterfly import ButterflyAllReduce, shard_bounds
    from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rpb
    from swarm_node.protocol.transport import MAX_MESSAGE, Transport

    loop = asyncio.get_running_loop()
    n, numel, step_s = cfg["peers"], cfg["numel"], cfg["step_timeout_s"]
    comp_name = cfg["compression"]
    comp = {"none": codec.NONE, "fp16": codec.FLOAT16, "int8": codec.INT8_BLOCKWISE, "e3m0": codec.E3M0}[comp_name]
    bound = _error_bound(comp_name)

    def put(kind: str, payload=None) -> None:
        res_q.put((kind, rank, payload))

    async def get() -> tuple:
        while True:  # the lifetime watchdog bounds this loop
            try:
                return await loop.run_in_executor(None, cmd_q.get, True, 1.0)
            except queue.Empty:
                continue

    async def expect(kind: str) -> tuple:
        cmd = await get()
        if cmd[0] != kind:
            raise BenchError(f"worker {rank}: expected {kind!r}, got {cmd[0]!r}")
        return cmd

    x = _make_vector(rank, numel)
    expected = torch.zeros(numel)
    for r in range(n):
        expected.add_(x if r == rank else _make_vector(r, numel))
    expected.div_(n)
    put("hello", {"pid": os.getpid()})

    p2p = transport = allreduce = None
    p2pd = None
    counters: dict[tuple[str, str], int] = defaultdict(int)
    group: list[str] = []
    pg = False
    out_buf = None  # ours: the mean's buffer, reused across runs (allocated outside the timed window)

    def count(direction: str, channel: str, nbytes: int) -> None:
        counters[(direction, channel)] += nbytes

    def p2pd_cpu() -> float:
        try:
            c = p2pd.cpu_times() if p2pd is not None else None
            return (c.user + c.system) if c else 0.0
        except psutil.Error:
            return 0.0

    async def sink(requests, caller):
        got = 0
        async for _ in requests:
            got += 1
        yield rpb.ShardReply(status=rpb.ShardReply.Status.SHARD_STATUS_OK, num_contributors=got)

    def shard_messages(j: int) -> list:
        s, e = shard_bounds(numel, n)[j]
        return [rpb.ShardPush(group_id="xfer", shard=j, weight=1.0, chunk=c)
                for c in codec.tensors_to_chunks([x[s:e]], comp, MAX_MESSAGE)]

    async def send_to(peer: str, msgs: list) -> None:
        replies = [r async for r in transport.call(peer, "bench.sink", msgs, rpb.ShardReply,
                                                   timeout_s=step_s, channel="bench")]
        if len(replies) != 1 or replies[0].num_contributors != len(msgs):
            raise BenchError(f"sink at {peer[-8:]} answered {replies!r:.200}")

    async def sleep_until(t: float) -> float:
        await asyncio.sleep(max(0.0, t - time.monotonic()))
        return time.monotonic() - t

    try:
        while True:
            cmd = await get()
            kind = cmd[0]
            if kind == "p2p":
                p2p = await asyncio.wait_for(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), step_s)
                p2pd = psutil.Process(p2p._child.pid) if p2p._child is not None else None
                transport = Transport(p2p, "bench", count_bytes=count)
                # auto starts the TCP listener; each run then pins the path it measures
                allreduce = ButterflyAllReduce(transport, timeout_s=60, compression=comp, transport_mode="auto")
                await allreduce.start()
                await transport.add_handler("bench.sink", sink, rpb.ShardPush, channel="bench")
                maddrs = [str(m) for m in await asyncio.wait_for(p2p.get_visible_maddrs(), 10)]
                put("p2p", {"peer_id": transport.peer_id, "maddrs": maddrs,
                            "p2pd_pid": p2pd.pid if p2pd is not None else None})
            elif kind == "connect":
                peers = cmd[1]  # {peer_id: [maddr, ...]}
                for pid, maddrs in peers.items():
                    if pid != transport.peer_id:
                        await asyncio.wait_for(
                            p2p._client.connect(PeerID.from_base58(pid), [Multiaddr(m) for m in maddrs]), 15)
                group = sorted(peers)
                put("connected")
            elif kind == "gloo_init":
                from datetime import timedelta

                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cmd[1]}", rank=rank,
                                        world_size=n, timeout=timedelta(seconds=step_s))
                pg = True
                put("gloo_ready")
            elif kind == "prep":  # ("prep", method, tag): get ready, report, wait for "go"
                method, tag = cmd[1], cmd[2]
                # both get their output buffer before the clock starts: gloo reduces in place into a
                # clone of x, ours writes the mean into a reused buffer (`out=`)
                buf = x.clone() if method == "gloo" else None
                if method != "gloo" and out_buf is None:
                    out_buf = torch.empty(numel)
                stats.reset()
                counters.clear()
                put("ready")
                _, start_at = await expect("go")
                cpu0, p2pd0 = time.process_time(), p2pd_cpu()
                lag = await sleep_until(start_at)
                out_complete, counts, phases, paths, errors = True, None, {}, [], {}
                if method != "gloo":
                    allreduce.transport_mode = "p2p" if method == "ours" else "tcp"
                if method == "gloo":
                    dist.all_reduce(buf)  # blocking; nothing else runs in this worker meanwhile
                    buf.div_(n)
                    result = buf
                else:
                    out = await asyncio.wait_for(
                        allreduce.run(group_id=f"{tag}", group=group, vector=x, weight=1.0, out=out_buf), step_s)
                    result, out_complete, counts = out.result, out.complete, out.contributors_per_shard
                    phases, paths, errors = out.phases, out.paths, out.errors
                end = time.monotonic()
                cpu1, p2pd1 = time.process_time(), p2pd_cpu()
                err = float("inf") if result is None else float((result - expected).abs().max())
                digest = None if result is None else hashlib.blake2b(result.numpy().tobytes(), digest_size=16).hexdigest()
                rep = {"wall_s": end - start_at, "lag_s": lag, "py_cpu_s": cpu1 - cpu0, "p2pd_cpu_s": p2pd1 - p2pd0,
                       "max_abs_err": err, "complete": bool(out_complete), "counts": counts, "digest": digest,
                       "timers": dict(stats.t), "phases": phases, "paths": paths,
                       "closed_s": None if stats.closed_at is None else stats.closed_at - start_at,
                       "tx_bytes": sum(v for (d, _), v in counters.items() if d == "tx"),
                       "rx_bytes": sum(v for (d, _), v in counters.items() if d == "rx")}
                limit = 0.0 if method == "gloo" else bound
                want_path = {"ours": "p2p", "tcp": "tcp"}.get(method)
                if want_path and any(pth not in (want_path, "local") for pth in paths):
                    raise BenchError(f"worker {rank} {method} {tag}: shards took paths {paths}")
                if result is None or not out_complete or not err <= limit:
                    raise BenchError(f"worker {rank} {method} {tag}: wrong or incomplete result: complete="
                                     f"{out_complete} counts={counts} max_abs_err={err} (allowed {limit}) errors={errors}")
                rep["window_cpu_s"] = time.process_time() - cpu0 + p2pd_cpu() - p2pd0
                put("result", rep)
            elif kind == "micro":  # codec steps for one shard, this worker alone
                reps = cmd[1]
                s, e = shard_bounds(numel, n)[0]
                shard = x[s:e].clone()
                res = defaultdict(list)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    chunks = list(codec.tensors_to_chunks([shard], comp, MAX_MESSAGE))
                    t1 = time.perf_counter()
                    msgs = [rpb.ShardPush(group_id="g", shard=0, weight=1.0, chunk=c) for c in chunks]
                    t2 = time.perf_counter()
                    datas = [m.SerializeToString() for m in msgs]
                    t3 = time.perf_counter()
                    parsed = [rpb.ShardPush.FromString(d) for d in datas]
                    t4 = time.perf_counter()
                    asm = codec.ChunkAssembler(1, max_numel_total=e - s, expected_shapes=[(e - s,)])
                    for m in parsed:
                        asm.add(m.chunk)
                    back = asm.result()[0]
                    t5 = time.perf_counter()
                    total = torch.zeros(e - s)
                    for _ in range(n):
                        total.add_(back, alpha=1.0)
                    total.div_(float(n))
                    t6 = time.perf_counter()
                    for k, v in (("encode_chunk_s", t1 - t0), ("wrap_msgs_s", t2 - t1), ("serialize_s", t3 - t2),
                                 ("parse_s", t4 - t3), ("assemble_decode_s", t5 - t4), ("reduce_s", t6 - t5)):
                        res[k].append(v)
                    wire_bytes = sum(len(d) for d in datas)
                    del chunks, msgs, datas, parsed, asm, back, total
                put("micro", {"shard_bytes": (e - s) * 4, "wire_bytes": wire_bytes,
                              **{k: min(v) for k, v in res.items()}})
            elif kind == "xfer_pair":  # ("xfer_pair", target_peer, reps): one shard's messages, alone
                msgs = shard_messages(1)
                times = []
                for _ in range(cmd[2]):
                    t0 = time.perf_counter()
                    await send_to(cmd[1], msgs)
                    times.append(time.perf_counter() - t0)
                put("xfer_pair", {"wire_bytes": sum(m.ByteSize() for m in msgs), "s": min(times)})
            elif kind == "xfer_all_prep":  # every worker sends its shard j to group[j], all at once
                me = group.index(transport.peer_id)
                batches = {group[j]: shard_messages(j) for j in range(n) if j != me}
                put("ready")
                _, start_at = await expect("go")
                cpu0, p2pd0 = time.process_time(), p2pd_cpu()
                lag = await sleep_until(start_at)
                await asyncio.wait_for(asyncio.gather(*(send_to(p, m) for p, m in batches.items())), step_s)
                end = time.monotonic()
                py_cpu, p2_cpu = time.process_time() - cpu0, p2pd_cpu() - p2pd0
                put("result", {"wall_s": end - start_at, "lag_s": lag, "py_cpu_s": py_cpu, "p2pd_cpu_s": p2_cpu,
                               "window_cpu_s": py_cpu + p2_cpu,
                               "wire_bytes": sum(m.ByteSize() for ms in batches.values() for m in ms)})
                del batches
            elif kind == "stop":
                break
            else:
                raise BenchError(f"worker {rank}: unknown command {kind!r}")
    finally:
        if pg:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        if transport is not None:
            await transport.close()
        if p2p is not None:
            try:
                await asyncio.wait_for(p2p.shutdown(), 5)
            except Exception:
                pass
    put("bye")


# =========================================================================== parent side


class Pool:
    """N spawned workers, one command queue each, one shared result queue; every wait is
    bounded by a step timeout and the overall deadline, and notices a dead worker."""

    def __init__(self, n: int, cfg: dict, deadline: float):
        self.n, self.deadline = n, deadline
        self.ctx = mp.get_context("spawn")
        self.res_q = self.ctx.Queue()
        self.cmd_qs = [self.ctx.Queue() for _ in range(n)]
        self.procs = [self.ctx.Process(target=_worker, args=(i, cfg, self.cmd_qs[i], self.res_q),
                                       name=f"bench-worker-{i}", daemon=True) for i in range(n)]
        self.p2pd_pids: set[int] = set()
        for p in self.procs:
            p.start()

    def send(self, cmd: tuple, ranks=None) -> None:
        for i in (range(self.n) if ranks is None else ranks):
            self.cmd_qs[i].put(cmd)

    def collect(self, kind: str, timeout_s: float, ranks=None) -> dict[int, object]:
        want = set(range(self.n) if ranks is None else ranks)
        got: dict[int, object] = {}
        until = min(time.monotonic() + timeout_s, self.deadline)
        while want - set(got):
            left = until - time.monotonic()
            if left <= 0:
                late = sorted(want - set(got))
                why = "overall deadline" if until == self.deadline else f"{timeout_s:.0f}s step timeout"
                raise BenchError(f"workers {late} did not send {kind!r} within the {why}")
            try:
                msg_kind, rank, payload = self.res_q.get(timeout=min(0.5, left))
            except queue.Empty:
                dead = [i for i in want - set(got) if not self.procs[i].is_alive()]
                if dead:
                    codes = {i: self.procs[i].exitcode for i in dead}
                    # an error report may still be in the queue: give it a moment
                    try:
                        msg_kind, rank, payload = self.res_q.get(timeout=1.0)
                    except queue.Empty:
                        raise BenchError(f"worker(s) died without a report, exit codes {codes}") from None
                else:
                    continue
            if msg_kind == "error":
                raise BenchError(f"worker {rank} failed:\n{payload}")
            if msg_kind != kind:
                raise BenchError(f"worker {rank} sent {msg_kind!r} while waiting for {kind!r}")
            got[rank] = payload
        return got

    def barrier_round(self, prep: tuple, timeout_s: float) -> tuple[list[dict], float]:
        """Send `prep`, wait until every worker is ready, then start all at one instant.
        Returns the workers' reports and the CPU (in cores) that processes other than ours
        used meanwhile: machine-wide busy time minus our workers', p2pds' and our own."""
        import psutil

        self.send(prep)
        self.collect("ready", timeout_s)
        me = psutil.Process()
        t0, busy0, mine0 = time.monotonic(), _busy_cpu_s(), sum(me.cpu_times()[:2])
        self.send(("go", t0 + 0.05))
        res = self.collect("result", timeout_s)
        window, busy, mine = time.monotonic() - t0, _busy_cpu_s() - busy0, sum(me.cpu_times()[:2]) - mine0
        ours = mine + sum(r["window_cpu_s"] for r in res.values())
        return [res[i] for i in range(self.n)], max(0.0, busy - ours) / window

    def close(self, grace_s: float = 0.0) -> list[int]:
        """Stop everything (after `grace_s` for workers told to stop to exit on their own, so
        that their exit handlers run); return the pids of our p2pds that were still running."""
        import psutil

        from swarm_node.processes import is_running_process

        me = psutil.Process()
        try:  # p2pds we never heard of (a worker that failed mid-start)
            for c in me.children(recursive=True):
                if c.name() == "p2pd":
                    self.p2pd_pids.add(c.pid)
        except psutil.Error:
            pass
        until = time.monotonic() + grace_s
        for p in self.procs:
            p.join(max(0.0, until - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
        until = time.monotonic() + 5
        while time.monotonic() < until and any(is_running_process(pid) for pid in self.p2pd_pids):
            time.sleep(0.1)
        left = sorted(pid for pid in self.p2pd_pids if is_running_process(pid))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for q in [self.res_q, *self.cmd_qs]:
            q.cancel_join_thread()
            q.close()
        return left


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes)."""
    import psutil

    ct = psutil.cpu_times()
    idle = ct.idle + getattr(ct, "iowait", 0.0) + getattr(ct, "guest", 0.0) + getattr(ct, "guest_nice", 0.0)
    return sum(ct) - idle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_bench(args) -> dict:
    n, numel = args.peers, int(args.mb * 1e6 / 4)
    state_mb = numel * 4 / 1e6
    t_begin = time.monotonic()
    deadline = t_begin + args.deadline_s
    cfg = {"peers": n, "numel": numel, "compression": args.compression, "step_timeout_s": args.step_timeout_s,
           "lifetime_s": args.deadline_s + 30, "parent_pid": os.getpid(), "instrument": not args.no_instrument}
    pool = Pool(n, cfg, deadline)
    grace_s = 0.0  # on failure: kill at once
    try:
        pool.collect("hello", args.step_timeout_s)
        pool.send(("p2p",))
        infos = pool.collect("p2p", args.step_timeout_s)
        pool.p2pd_pids |= {i["p2pd_pid"] for i in infos.values() if i["p2pd_pid"]}
        peers = {i["peer_id"]: i["maddrs"] for i in infos.values()}
        pool.send(("connect", peers))
        pool.collect("connected", args.step_timeout_s)
        pool.send(("gloo_init", _free_port()))
        pool.collect("gloo_ready", args.step_timeout_s)
        setup_s = time.monotonic() - t_begin
        print(f"setup: {n} workers, p2p connected, gloo ready in {setup_s:.1f}s", flush=True)

        runs: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
        foreign: dict[str, list[float]] = {m: [] for m in METHODS}
        for r in range(-1, args.repeats):  # r = -1: warm-up of each, not counted
            tag = "w" if r < 0 else f"r{r}"
            for method in args.methods:
                res, other = pool.barrier_round(("prep", method, tag), args.step_timeout_s)
                wall = max(x["wall_s"] for x in res)
                print(f"  {'warm-up' if r < 0 else f'repeat {r}'}: {method:4s} {wall:7.3f}s  "
                      f"max_abs_err {max(x['max_abs_err'] for x in res):.3g}  "
                      f"start lag <= {max(x['lag_s'] for x in res) * 1e3:.1f} ms  "
                      f"other processes' CPU {other:.2f} cores", flush=True)
                if len({x["digest"] for x in res}) != 1:  # a commit needs every member to hold the same vector
                    raise BenchError(f"{method} {tag}: the workers' results differ bit-wise")
                if r >= 0:
                    runs[method].append(res)
                    foreign[method].append(other)

        pool.send(("micro", 3), ranks=[0])
        micro = pool.collect("micro", args.step_timeout_s, ranks=[0])[0]
        pool.send(("xfer_pair", infos[1]["peer_id"], 3), ranks=[0])
        pair = pool.collect("xfer_pair", args.step_timeout_s, ranks=[0])[0]
        xfer_all, _ = pool.barrier_round(("xfer_all_prep",), args.step_timeout_s)

        pool.send(("stop",))
        pool.collect("bye", 30)
        grace_s = 15.0
    finally:
        leftover = pool.close(grace_s)
    if leftover:
        raise BenchError(f"p2pd processes survived their workers (killed now): {leftover}")
    return summarize(args, n, numel, state_mb, runs, foreign, micro, pair, xfer_all, setup_s, pool.p2pd_pids)


def summarize(args, n, numel, state_mb, runs, foreign, micro, pair, xfer_all, setup_s, p2pd_pids) -> dict:
    """The report. Where the tcp path spends its time: each worker's AllReduceOutcome.phases
    (slowest of its exchanges: libp2p offer, connect+handshake, then, overlapping and both
    counted from the connect since the reducer streams each segment's mean back while pushes
    still arrive, push sent and mean received; when its own shard closed, when all shards were
    back, when its own replies were all sent, which is when run() returns), its Python CPU
    (p2pd CPU is ~0 there: only the offers use it), fp32 accumulation and the finite checks.

    Where the p2p path spends its time (workers time their own phases with `_instrument`):
      * per run: CPU seconds of each worker's Python process and of its p2pd, time spent in
        codec encode+chunking / protobuf serialize / protobuf parse / chunk assembly+decode /
        fp32 accumulation, and when the worker's own shard closed (end of scatter-reduce);
      * in isolation (worker 0 alone, the others idle): the same codec steps for one shard;
      * raw Transport streaming of one shard's messages worker 0 -> worker 1, and of all
        shards all-to-all at once (the transport floor of one butterfly phase, no codec).
    """
    walls = {m: [max(w["wall_s"] for w in rep) for rep in runs[m]] for m in runs}
    med = {m: _med(walls[m]) for m in walls}
    ratio = med["gloo"] / med["ours"]
    tcp_ratio = med["gloo"] / med["tcp"]
    busf = 2 * (n - 1) / n  # bytes each peer must send (and receive) per byte of state

    ours = [w for rep in runs["ours"] for w in rep]  # every worker of every counted repetition
    gloo = [w for rep in runs["gloo"] for w in rep]
    timer_keys = ("encode_s", "serialize_s", "parse_s", "assemble_decode_s", "reduce_s", "own_shard_codec_s")
    per_worker = {k: _med([w["timers"].get(k, 0.0) for w in ours]) for k in timer_keys}
    py_cpu, p2pd_cpu = _med([w["py_cpu_s"] for w in ours]), _med([w["p2pd_cpu_s"] for w in ours])
    timed = sum(per_worker.values())
    closed = [w["closed_s"] for w in ours if w["closed_s"] is not None]
    skew = [max(w["closed_s"] for w in rep) - min(w["closed_s"] for w in rep)  # (empty if p2p was skipped)
            for rep in runs["ours"] if all(w["closed_s"] is not None for w in rep)]
    # model: per run a worker encodes 3+3 shards (its pushes, and its reducer answer once
    # per contributor), parses and assembles 3+3, and accumulates n contributions
    k = 2 * (n - 1)
    codec_model = k * (micro["encode_chunk_s"] + micro["wrap_msgs_s"] + micro["serialize_s"] + micro["parse_s"]
                       + micro["assemble_decode_s"]) + micro["reduce_s"]
    ncpu = os.cpu_count() or 1
    tcp = [w for rep in runs["tcp"] for w in rep]
    tcp_phases = {k: _med([w["phases"][k] for w in tcp if k in w["phases"]]) for k in TCP_PHASES}
    tcp_py, tcp_p2pd = _med([w["py_cpu_s"] for w in tcp]), _med([w["p2pd_cpu_s"] for w in tcp])
    xfer_wall = max(w["wall_s"] for w in xfer_all)
    res = {
        "bench": "allreduce", "mb": round(state_mb, 3), "numel": numel, "peers": n, "compression": args.compression,
        "repeats": args.repeats, "cpus": ncpu, "setup_s": round(setup_s, 2),
        "gloo_s_median": med["gloo"], "ours_s_median": med["ours"], "gloo_s": walls["gloo"], "ours_s": walls["ours"],
        "tcp_s_median": med["tcp"], "tcp_s": walls["tcp"],
        "ratio_gloo_over_ours": ratio, "ratio_gloo_over_tcp": tcp_ratio, "ratio_tcp_speedup_over_p2p": med["ours"] / med["tcp"],
        "goal_ratio": GOAL_RATIO, "goal_met": tcp_ratio >= GOAL_RATIO, "goal_judged_on": "tcp",
        "tcp_mb_s": state_mb / med["tcp"], "tcp_busbw_mb_s": busf * state_mb / med["tcp"],
        "tcp_max_abs_err": max((w["max_abs_err"] for w in tcp), default=float("nan")), "tcp_complete": all(w["complete"] for w in tcp),
        "tcp_tx_mb_per_worker": _med([w["tx_bytes"] for w in tcp]) / 1e6,
        "tcp_phases_per_worker_per_run": {
            **tcp_phases,
            "python_cpu_s": tcp_py, "p2pd_cpu_s": tcp_p2pd,
            "reduce_cpu_s": _med([w["timers"].get("reduce_s", 0.0) for w in tcp]),
            "finite_check_cpu_s": _med([w["timers"].get("finite_check_s", 0.0) for w in tcp]),
            "cpu_floor_s": n * (tcp_py + tcp_p2pd) / ncpu,
        },
        "gloo_mb_s": state_mb / med["gloo"], "ours_mb_s": state_mb / med["ours"],
        "gloo_busbw_mb_s": busf * state_mb / med["gloo"], "ours_busbw_mb_s": busf * state_mb / med["ours"],
        "ours_max_abs_err": max((w["max_abs_err"] for w in ours), default=float("nan")), "gloo_max_abs_err": max((w["max_abs_err"] for w in gloo), default=float("nan")),
        "error_bound": _error_bound(args.compression),
        "ours_complete": all(w["complete"] for w in ours),
        "results_identical_across_workers": True,  # checked on every run, else the bench fails
        "ours_tx_mb_per_worker": _med([w["tx_bytes"] for w in ours]) / 1e6,
        "phases_per_worker_per_run": {
            **{k: per_worker[k] for k in timer_keys},
            "python_cpu_s": py_cpu, "python_cpu_other_s": py_cpu - timed, "p2pd_cpu_s": p2pd_cpu,
            "own_shard_closed_s": _med(closed), "after_close_s": med["ours"] - _med(closed) if closed else None,
            "reducer_close_skew_s": _med(skew) if skew else None,
            "total_cpu_all_workers_s": n * (py_cpu + p2pd_cpu),
            "cpu_floor_s": n * (py_cpu + p2pd_cpu) / ncpu,
        },
        "gloo_cpu_per_worker_s": _med([w["py_cpu_s"] for w in gloo]),
        "micro_one_shard": {**micro, "modeled_codec_cpu_per_worker_s": codec_model},
        "transport": {
            "pair_one_shard_s": pair["s"], "pair_mb_s": pair["wire_bytes"] / 1e6 / pair["s"],
            "all_to_all_one_phase_s": xfer_wall,
            "all_to_all_mb_s_per_worker": _med([w["wire_bytes"] for w in xfer_all]) / 1e6 / xfer_wall,
            "all_to_all_py_cpu_s": _med([w["py_cpu_s"] for w in xfer_all]),
            "all_to_all_p2pd_cpu_s": _med([w["p2pd_cpu_s"] for w in xfer_all]),
        },
        "other_processes_cpu_cores_max": max(v for m in foreign for v in foreign[m]),
        "p2pd_reaped": len(p2pd_pids),
    }
    return res


def report(res: dict) -> None:
    ph, mi, tr = res["phases_per_worker_per_run"], res["micro_one_shard"], res["transport"]
    n = res["peers"]
    print()
    print(f"{'method':<28}{'median s':>10}{'all s':>28}{'MB/s':>9}{'bus MB/s':>10}{'max err':>10}")
    for m, label in (("gloo", "gloo all_reduce (fp32)"), ("ours", f"ours p2p path ({res['compression']})"),
                     ("tcp", f"ours tcp path ({res['compression']})")):
        walls = " ".join(f"{w:.3f}" for w in res[f"{m}_s"])
        print(f"{label:<28}{res[f'{m}_s_median']:>10.3f}{walls:>28}{res[f'{m}_mb_s']:>9.1f}"
              f"{res[f'{m}_busbw_mb_s']:>10.1f}{res[f'{m}_max_abs_err']:>10.3g}")
    verdict = "MET" if res["goal_met"] else "NOT met"
    if res["other_processes_cpu_cores_max"] > FOREIGN_WARN_CORES:
        print(f"WARNING: other processes used up to {res['other_processes_cpu_cores_max']:.2f} of {res['cpus']} cores "
              f"during the timed runs: these numbers are perturbed, re-run on a quiet machine")
    print(f"ratio gloo_time / tcp_time = {res['ratio_gloo_over_tcp']:.3f}  (goal >= {res['goal_ratio']}: {verdict}); "
          f"gloo_time / p2p_time = {res['ratio_gloo_over_ours']:.3f}; tcp is {res['ratio_tcp_speedup_over_p2p']:.1f}x p2p")
    print(f"complete on every run: p2p {res['ours_complete']}, tcp {res['tcp_complete']}; "
          f"error bound {res['error_bound']:.3g}")
    tp = res["tcp_phases_per_worker_per_run"]
    print()
    print(f"where the tcp path spends a run (median per worker; slowest of its {n - 1} exchanges per phase):")
    for label, key in (("libp2p offer (token + address)", "offer_s"), ("TCP connect + token handshake", "connect_s"),
                       ("push sent, from connect (scatter)", "send_s"),
                       ("mean received, from connect (gather)", "reply_s"), ("own shard closed after", "own_shard_closed_s"),
                       ("all shards back after", "all_shards_back_s"),
                       ("my replies all sent after (run returns)", "replies_sent_s"), ("python CPU, total", "python_cpu_s"),
                       ("  fp32 accumulate + mean", "reduce_cpu_s"), ("  finite checks", "finite_check_cpu_s"),
                       ("p2pd CPU (offers only)", "p2pd_cpu_s"),
                       (f"CPU floor: all workers' CPU / {res['cpus']} cores", "cpu_floor_s")):
        v = tp.get(key)
        print(f"  {label:<44}{'n/a' if v is None or v != v else f'{v:8.3f} s':>10}")
    print()
    print(f"where the p2p path spends a run (median per worker; {n} workers + {n} p2pds share {res['cpus']} cores):")
    rows = [
        ("own shard closed after (scatter-reduce)", ph["own_shard_closed_s"]),
        ("  then until last worker done (gather)", ph["after_close_s"]),
        ("  skew between reducers closing", ph["reducer_close_skew_s"]),
        ("python CPU, total", ph["python_cpu_s"]),
        ("  codec encode + chunking", ph["encode_s"]),
        ("  protobuf serialize (hivemind framing)", ph["serialize_s"]),
        ("  protobuf parse", ph["parse_s"]),
        ("  chunk assembly + decode", ph["assemble_decode_s"]),
        ("  fp32 accumulate + mean", ph["reduce_s"]),
        ("  own mean through the codec (lossy only)", ph["own_shard_codec_s"]),
        ("  other (stream I/O, asyncio, hivemind)", ph["python_cpu_other_s"]),
        ("p2pd CPU (libp2p, encryption, muxing)", ph["p2pd_cpu_s"]),
        (f"CPU floor: all workers' CPU / {res['cpus']} cores", ph["cpu_floor_s"]),
        ("gloo: CPU per worker per run", res["gloo_cpu_per_worker_s"]),
    ]
    for label, v in rows:
        print(f"  {label:<44}{'n/a' if v is None else f'{v:8.3f} s':>10}")
    print(f"one shard ({mi['shard_bytes'] / 1e6:.1f} MB, {mi['wire_bytes'] / 1e6:.1f} MB on the wire), worker 0 alone:")
    for k in ("encode_chunk_s", "wrap_msgs_s", "serialize_s", "parse_s", "assemble_decode_s", "reduce_s"):
        print(f"  {k:<44}{mi[k]:8.3f} s")
    print(f"  {'modeled codec CPU per worker per run':<44}{mi['modeled_codec_cpu_per_worker_s']:8.3f} s  "
          f"(x{2 * (n - 1)} shards + accumulate)")
    print("raw Transport streaming (pre-built messages, sink handler):")
    print(f"  {'one shard worker0 -> worker1, alone':<44}{tr['pair_one_shard_s']:8.3f} s  ({tr['pair_mb_s']:.0f} MB/s)")
    print(f"  {'all-to-all, one butterfly phase':<44}{tr['all_to_all_one_phase_s']:8.3f} s  "
          f"({tr['all_to_all_mb_s_per_worker']:.0f} MB/s out per worker; python CPU "
          f"{tr['all_to_all_py_cpu_s']:.2f}s, p2pd CPU {tr['all_to_all_p2pd_cpu_s']:.2f}s per worker)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="state size in MB (1e6 bytes) of fp32")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compression", choices=COMPRESSIONS, default="none")
    ap.add_argument("--smoke", action="store_true", help="4 MB, 1 repeat: a quick end-to-end check")
    ap.add_argument("--deadline-s", type=float, default=600.0, help="overall limit for the whole run")
    ap.add_argument("--step-timeout-s", type=float, default=120.0, help="limit for each step (start, one run, ...)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="what to time (gloo is always included: it is the reference)")
    ap.add_argument("--no-instrument", action="store_true", help="do not wrap codec/framing functions with timers")
    args = ap.parse_args(argv)
    if args.smoke:
        args.mb, args.repeats = 4.0, 1
    args.methods = ["gloo", *[m for m in METHODS if m in args.methods and m != "gloo"]]
    if args.peers < 2 or args.repeats < 1 or args.mb <= 0:
        ap.error("need --peers >= 2, --repeats >= 1, --mb > 0")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")  # inherited by the workers
    import hivemind
    import torch

    print(f"env: python {platform.python_version()} torch {torch.__version__} hivemind {hivemind.__version__} "
          f"cpus {os.cpu_count()} | state {args.mb:g} MB fp32, {args.peers} peers, compression {args.compression}, "
          f"repeats {args.repeats}", flush=True)
    try:
        res = run_bench(args)
    except BenchError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr, flush=True)
        return 130
    report(res)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
