"""Weighted butterfly all-reduce of one flat fp32 vector among a frozen group.

The vector is cut into len(group) contiguous shards; member i reduces shard i. Every member
streams its shard j to group[j] (its own shard stays local); the reducer averages what arrived
(Σ wᵢxᵢ / Σ wᵢ, accumulated in fp32 whatever the wire compression) and streams the mean back to
each contributor: about 2·(N−1)/N of the vector per peer, spread over all links.

Contract:
- The group and its `group_id` come from a coordinator (transaction.py); a push stamped
  with another group id, a wrong shard index or a wrong size is rejected and counted.
- A reducer waits for all members until `timeout_s`, then closes with who arrived. `complete`
  is true only if every shard came back with every member counted: a partial average is
  reported, never hidden (hivemind's averager silently fills missing parts with local values).
- Nothing here commits anything: the caller decides (see transaction.py's commit vote).
- Data paths (p2p, tcp, auto) are chosen per (member, reducer) pair; see `ButterflyAllReduce`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from swarm_node.protocol import bulk_tcp, codec
from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.protocol.averaging.robust import AggregationRule, Combined, Contribution, combine
from swarm_node.protocol.pb import swarm_node_bulk_pb2 as bpb
from swarm_node.protocol.pb import swarm_node_rounds_pb2 as rpb
from swarm_node.protocol.transport import MAX_MESSAGE, PeerUnavailable, Transport, drain, first_message

log = logging.getLogger(__name__)
METHOD = "allreduce.shard"
OFFER_METHOD = "allreduce.bulk_offer"
ShardStatus = rpb.ShardReply.Status
OfferStatus = bpb.BulkOfferReply.Status
KEEP_GROUPS = 8
TRANSPORT_MODES = ("auto", "p2p", "tcp")
CONNECT_TIMEOUT_S = 3.0  # an unreachable (NAT) bulk address costs at most this before the fallback
PATHS = ("tcp", "p2p", "fallback")  # on_path labels: one per pushed shard
# 8 MiB of fp32 per pipelining segment: every segment costs a wakeup and a send per
# contributor, so 1 MiB ones spent more CPU on that than on the bytes (100 MB, 4 peers on
# 2 cores: tcp/gloo 0.59 with 1 MiB, 0.75 with 4, 0.81 with 8, 0.75 with 16)
SEGMENT_ELEMS = 1 << 21


def path_counter(registry):
    """`on_path` for a node: swarm_allreduce_shards_total{path} in `registry` (fallback = a
    shard that went over p2p because the reducer's TCP address was unreachable)."""
    from prometheus_client import Counter

    c = Counter("swarm_allreduce_shards", "Shards this peer pushed in all-reduces, by data path "
                "(fallback: tcp unreachable, sent over libp2p).", ["path"], registry=registry)
    for path in PATHS:
        c.labels(path=path)
    return lambda path: c.labels(path=path).inc()


def shard_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges; the first numel % parts shards are one longer."""
    if parts < 1:
        raise ValueError("need at least one part")
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass
class _Reduction:
    """This member's shard of one group: accumulates contributions until closed.

    The shard is cut into segments (bulk_tcp.segment_bounds). A contribution is added
    segment by segment, in order (`add_segment`, the pipelined TCP path) or all at once
    (`add`); segment k is final — divided by the weight of everyone in it — as soon as
    every expected member's part of it is in, and `seg_ready[k]` is set, so its mean can
    go back before later segments arrived. A contributor counts only once all its segments
    are in. One whose stream fails after some of its segments were added cannot be taken
    out again: the shard is `poisoned` and closes at once, and every reply says so, so
    the round is incomplete everywhere (never a silently wrong mean)."""

    expected: set[str]
    length: int
    total: torch.Tensor
    index: int = -1  # which shard of the group this member reduces
    segment: int = SEGMENT_ELEMS  # elements per pipelining segment
    weight: float = 0.0
    contributors: set[str] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    result: torch.Tensor | None = None
    encoded: list | None = None  # the result's wire chunks, encoded once for every contributor
    wire: memoryview | None = None  # the result's compressed bulk payload, encoded once
    poisoned: str = ""  # why this shard's mean cannot be trusted ("" = it can)
    serving: int = 0  # contributors whose reply is still being sent
    served: asyncio.Event = field(default_factory=asyncio.Event)  # set while serving == 0
    # robust rules keep every contribution's segment until the segment is complete, then combine
    rule: AggregationRule = field(default_factory=AggregationRule)
    report: Callable[[Combined], None] | None = None

    def __post_init__(self) -> None:
        self.served.set()
        self.segments = bulk_tcp.segment_bounds(self.length, self.segment)
        self.seg_count = [0] * len(self.segments)
        self.seg_weight = [0.0] * len(self.segments)
        self.seg_ready = [asyncio.Event() for _ in self.segments]
        self.progress: dict[str, int] = {}  # contributor -> segments added so far
        # this member's own part, counted at once but written into `total` only together
        # with the first other contribution of each segment (one pass over memory saved)
        self._local: tuple[torch.Tensor, float] | None = None
        self._local_pending = [False] * len(self.segments)
        self._parts: list[dict[str, tuple[torch.Tensor, float]]] = [{} for _ in self.segments]
        self._clipped: set[str] = set()
        self._dropped: set[str] = set()

    def add_local(self, peer: str, x: torch.Tensor, w: float) -> None:
        """The reducer's own contribution (first, before any other): `x` must stay unchanged
        until the shard is closed."""
        assert not self.progress and not self.contributors and peer in self.expected
        self._local = (x, w)
        self._local_peer = peer
        self._local_pending = [True] * len(self.segments)
        self.seg_count = [1] * len(self.segments)
        self.seg_weight = [w] * len(self.segments)
        self.contributors.add(peer)
        self.weight += w
        if len(self.expected) == 1:
            self.close()

    def _write_local(self, k: int, other: torch.Tensor | None = None, w: float = 0.0) -> None:
        """Segment k of total = own part (+ w * other), in one pass where the own weight is 1."""
        s, e = self.segments[k]
        mine, wl = self._local
        self._local_pending[k] = False
        if other is not None and wl == 1.0:
            torch.add(mine[s:e], other.float(), alpha=w, out=self.total[s:e])
            return
        torch.mul(mine[s:e], wl, out=self.total[s:e])
        if other is not None:
            self.total[s:e].add_(other.float(), alpha=w)

    def begin(self, peer: str) -> bool:
        """Reserve the shard for `peer`'s segmented contribution: False if it is not
        expected, the shard is closed, or it already contributes (one stream per peer)."""
        if self.closed.is_set() or peer not in self.expected or peer in self.contributors or peer in self.progress:
            return False
        self.progress[peer] = 0
        return True

    def add_segment(self, peer: str, k: int, x: torch.Tensor, w: float) -> None:
        if self.closed.is_set() or peer in self.contributors or self.progress.get(peer, 0) != k:
            return
        s, e = self.segments[k]
        if self.rule.robust:  # a copy: `x` may be a receive buffer that is reused
            self._parts[k][peer] = (x.float().clone(), w)
        elif self._local_pending[k]:
            self._write_local(k, x, w)
        elif self.seg_count[k] == 0:  # the first one overwrites: `total` may be uninitialised memory
            torch.mul(x.float(), w, out=self.total[s:e])
        else:
            self.total[s:e].add_(x.float(), alpha=w)
        self.seg_count[k] += 1
        self.seg_weight[k] += w
        self.progress[peer] = k + 1
        if self.seg_count[k] >= len(self.expected):
            self._finish_segment(k)
        if k + 1 == len(self.segments):
            self.contributors.add(peer)
            self.weight += w
            if self.contributors >= self.expected:
                self.close()

    def add(self, peer: str, x: torch.Tensor, w: float, *, reserved: bool = False) -> None:
        """The whole contribution at once (`reserved`: after this peer's `begin`)."""
        if self.closed.is_set() or peer in self.contributors or (peer in self.progress) != reserved:
            return
        for k, (s, e) in enumerate(self.segments):
            self.add_segment(peer, k, x[s:e], w)

    def serve_begin(self) -> None:
        self.serving += 1
        self.served.clear()

    def serve_end(self) -> None:
        self.serving -= 1
        if self.serving <= 0:
            self.served.set()

    def fail(self, peer: str, why: str) -> None:
        """`peer`'s contribution broke off: harmless before its first segment, fatal after."""
        if self.progress.pop(peer, 0) > 0 and peer not in self.contributors and not self.closed.is_set():
            self.poisoned = f"{peer[-8:]} broke off mid-contribution: {why}"
            self.close()

    def _finish_segment(self, k: int) -> None:
        if not self.seg_ready[k].is_set() and self.rule.robust:
            self._combine_segment(k)
            self.seg_ready[k].set()
        if not self.seg_ready[k].is_set():
            s, e = self.segments[k]
            if self._local_pending[k]:  # nobody else's part arrived (alone, or a timeout)
                self._write_local(k)
            # all-zero weights (only joiners): the mean update is zero, not NaN; in place,
            # since a fresh 25 MB tensor costs more in page faults than the division
            if self.seg_weight[k] > 0:
                self.total[s:e].div_(self.seg_weight[k])
            else:
                self.total[s:e].zero_()
            self.seg_ready[k].set()

    def _combine_segment(self, k: int) -> None:
        s, e = self.segments[k]
        parts = []
        if self._local is not None:
            mine, wl = self._local
            parts.append(Contribution(self._local_peer, mine[s:e], wl))
        parts += [Contribution(peer, x, w) for peer, (x, w) in self._parts[k].items()]
        self._parts[k] = {}
        if not parts:
            self.total[s:e].zero_()
            return
        combined = combine(parts, self.rule)
        self.total[s:e].copy_(combined.result)
        self._clipped.update(combined.clipped)
        self._dropped.update(combined.dropped)

    def close(self) -> None:
        if not self.closed.is_set():
            for k in range(len(self.segments)):  # after a timeout: the mean of whoever is in
                self._finish_segment(k)
            self.result = self.total
            self.closed.set()
            if self.rule.robust and self.report is not None:
                used = tuple(sorted(self.contributors - self._dropped))
                self.report(Combined(self.total, used, tuple(sorted(self._clipped)), tuple(sorted(self._dropped))))


@dataclass
class AllReduceOutcome:
    result: torch.Tensor | None  # the averaged vector, None if some shard never came back
    complete: bool  # every shard returned with every member counted
    contributors_per_shard: list[int]
    failed: list[str]  # reducers we got nothing from, or members missing from a shard
    duration_s: float
    bytes_sent: int = 0
    paths: list[str] = field(default_factory=list)  # per shard: tcp | p2p | fallback | local
    phases: dict[str, float] = field(default_factory=dict)  # seconds: own shard closed, all shards back
    errors: dict[int, str] = field(default_factory=dict)  # shard index -> why it did not come back


class ButterflyAllReduce:
    """One member's side of every group it is in: pushes its shards, reduces its own shard.

    `run()` returns once this member holds every shard AND its own shard's mean has been
    handed to the kernel for every contributor (bounded by timeout_s), so a caller that
    blocks the event loop right after (hashing the result) stalls nobody else.

    Two data paths, chosen per (member, reducer) pair by `transport_mode`:
    - `p2p`: every shard travels as protobuf chunks on a libp2p stream (encrypted, NAT-friendly
      through p2pd, but CPU-heavy: several copies per byte).
    - `tcp`: the member asks the reducer over libp2p for a single-use token and its bulk TCP
      address (protocol/bulk_tcp.py), then pushes raw bytes on a direct socket and reads the
      mean back on it. Group membership, shard index and caller identity still come from the
      authenticated libp2p stream; the TCP bytes are authenticated by the token, not encrypted.
    - `auto` (the node's default): tcp, and the p2p stream for a reducer whose TCP address
      cannot be reached or has no listener (NAT), before anything was sent; counted via
      `on_path("fallback")`. A failure after bytes were sent is not retried here: the shard is
      missing and the round is incomplete, exactly as on the p2p path.
    Both paths feed the same `_Reduction`, so a reducer may serve a mixed group.
    """

    def __init__(self, transport: Transport, *, timeout_s: float, compression: int = codec.NONE,
                 max_numel: int = 1 << 31, on_reject=None, transport_mode: str = "p2p",
                 bulk_host: str = "127.0.0.1", bulk_port: int = 0, announce_host: str | None = None,
                 on_path=None, segment_elems: int = SEGMENT_ELEMS, rule: AggregationRule | None = None,
                 report: Callable[[Combined], None] | None = None, contribution_scale: float = 1.0):
        if transport_mode not in TRANSPORT_MODES:
            raise ValueError(f"transport_mode must be one of {TRANSPORT_MODES}, got {transport_mode!r}")
        self.transport, self.timeout_s, self.compression = transport, timeout_s, compression
        self.deadlines = Deadlines(timeout_s)
        self.max_numel = max_numel
        self.on_reject = on_reject or (lambda reason: None)
        self.on_path = on_path or (lambda path: None)
        self.transport_mode = transport_mode
        self.segment_elems = segment_elems  # of the shard this peer reduces
        self.rule = rule or AggregationRule()
        self.report = report
        self.contribution_scale = contribution_scale
        self._bulk_args = (bulk_host, bulk_port, announce_host)
        self.bulk: bulk_tcp.BulkServer | None = None
        self._groups: dict[str, _Reduction] = {}
        self._registered: dict[str, asyncio.Event] = {}
        self._scratch: list[torch.Tensor] = []  # receive buffers for raw TCP pushes, reused across rounds

    def _take_scratch(self, numel: int) -> torch.Tensor:
        """A receive buffer of `numel` fp32 (recycled: fresh pages cost ~14 ms per 25 MB)."""
        for i, t in enumerate(self._scratch):
            if t.numel() == numel:
                return self._scratch.pop(i)
        return torch.empty(numel)

    def _give_scratch(self, t: torch.Tensor) -> None:
        self._scratch.append(t)
        # keep at most 8 buffers, and only of the size in use now (the group or model changed)
        self._scratch = [b for b in self._scratch if b.numel() == t.numel()][-8:]

    async def start(self) -> None:
        await self.transport.add_handler(METHOD, self._rpc_shard, rpb.ShardPush, channel="averaging")
        await self.transport.add_handler(OFFER_METHOD, self._rpc_offer, bpb.BulkOffer, channel="averaging")
        if self.transport_mode != "p2p":
            host, port, announce = self._bulk_args
            server = bulk_tcp.BulkServer(self._serve_bulk, host=host, port=port, announce_host=announce,
                                         on_reject=self.on_reject)
            try:
                await server.start()
            except OSError as e:
                if self.transport_mode == "tcp":
                    raise
                # auto: the p2p stream still works; members that ask are told to use it
                log.warning("all-reduce TCP listener on %s:%s failed (%s): using libp2p streams only",
                            host, port, e)
                return
            self.bulk = server
            log.info("all-reduce bulk TCP listener on %s:%d, advertised as %s", host, server.port, server.hosts)

    async def close(self) -> None:
        if self.bulk is not None:
            await self.bulk.close()
            self.bulk = None

    def _count(self, direction: str, nbytes: int) -> None:
        # the very counter the libp2p streams feed (swarm_network_*_bytes_total{channel})
        self.transport._count(direction, "averaging", nbytes)

    def _event(self, group_id: str) -> asyncio.Event:
        if group_id not in self._registered:
            self._registered[group_id] = asyncio.Event()
            for old in list(self._registered)[:-KEEP_GROUPS]:
                self._registered.pop(old, None)
                self._groups.pop(old, None)
        return self._registered[group_id]

    async def run(self, group_id: str, group: list[str], vector: torch.Tensor, weight: float,
                  out: torch.Tensor | None = None) -> AllReduceOutcome:
        """All-reduce `vector`; the mean lands in `out` (a fresh tensor if None; pass a reused
        contiguous fp32 CPU buffer of the same length to skip ~1 page fault per 4 KiB)."""
        t0 = time.perf_counter()
        me = self.transport.peer_id
        if me not in group:
            raise ValueError("this peer is not a member of the group")
        vector = vector.detach().reshape(-1).float().cpu().contiguous()
        if self.contribution_scale != 1.0:  # a lab's byzantine peer
            vector = vector * self.contribution_scale
        bounds = shard_bounds(vector.numel(), len(group))
        my_index = group.index(me)
        lo, hi = bounds[my_index]
        if out is None:
            out = torch.empty(vector.numel())  # TCP replies land here directly; other pieces are copied in
        elif out.shape != (vector.numel(),) or out.dtype != torch.float32 or not out.is_contiguous() \
                or out.device.type != "cpu" or out.data_ptr() == vector.data_ptr():
            raise ValueError("out must be a separate contiguous fp32 CPU vector of the input's length")
        # raw: my shard's mean is computed in `out` itself (no copy); a lossy codec needs it
        # apart, since `out` gets the mean as the others decode it
        total = out[lo:hi] if self.compression == codec.NONE else torch.empty(hi - lo)
        mine = _Reduction(expected=set(group), length=hi - lo, total=total, index=my_index, segment=self.segment_elems,
                          rule=self.rule, report=self.report)
        self._groups[group_id] = mine
        self._event(group_id).set()
        mine.add_local(me, vector[lo:hi], weight)
        deadline = asyncio.get_running_loop().time() + self.deadlines.exchange
        paths = ["local"] * len(group)
        timings: list[dict[str, float]] = []  # per TCP exchange: where its time went

        async def exchange(j: int) -> tuple[torch.Tensor | None, int, str]:
            s, e = bounds[j]
            if self.transport_mode != "p2p":
                try:
                    timing: dict[str, float] = {}
                    timings.append(timing)
                    res = await self._push_tcp(group[j], group_id, j, vector[s:e], weight, out[s:e], deadline, timing,
                                               max_contributors=len(group))
                    paths[j] = "tcp"
                    self.on_path("tcp")
                    return res
                except bulk_tcp.BulkUnavailable as why:
                    if self.transport_mode == "tcp":
                        paths[j] = "tcp"
                        return None, 0, f"tcp path unavailable: {why}"
                    log.info("shard %d to %s: falling back to libp2p (%s)", j, group[j][-8:], why)
                    paths[j] = "fallback"
                    self.on_path("fallback")
            else:
                paths[j] = "p2p"
                self.on_path("p2p")
            # the fallback shares the exchange's deadline: a hung reducer costs no more than on p2p alone
            return await self._push(group[j], group_id, j, vector[s:e], weight,
                                    timeout_s=max(0.1, deadline - asyncio.get_running_loop().time()))

        tasks = {j: asyncio.create_task(exchange(j)) for j in range(len(group)) if j != my_index}
        try:
            await asyncio.wait_for(mine.closed.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            mine.close()
        t_closed = time.perf_counter() - t0
        counts = [0] * len(group)
        failed: list[str] = []
        errors: dict[int, str] = {}
        have_all = True
        # Others receive my shard's mean through the (possibly lossy) codec: use exactly what
        # they decode, or members would hold different vectors and never agree on a commit.
        if mine.result.data_ptr() != out[lo:hi].data_ptr():
            out[lo:hi] = self._as_sent(mine.result)
        counts[my_index] = len(mine.contributors)
        failed += sorted(set(group) - mine.contributors)
        for j, task in tasks.items():
            piece, n, err = await task
            counts[j] = n
            if piece is None:
                have_all = False
                failed.append(group[j])
                errors[j] = err
                log.info("shard %d from %s missing: %s", j, group[j][-8:], err)
            elif piece.data_ptr() != out[bounds[j][0]:bounds[j][1]].data_ptr():
                s, e = bounds[j]
                out[s:e] = piece
        complete = have_all and all(c == len(group) for c in counts)
        t_back = time.perf_counter() - t0
        # The caller may block this event loop as soon as we return (it hashes the result):
        # my shard's mean must be out to every contributor first, or that stall is theirs
        # (a 100 MB hash here holds the other peer's reply for ~0.4 s). A contributor that
        # does not read its reply costs at most timeout_s; its round is incomplete anyway.
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(mine.served.wait(), max(0.0, min(self.timeout_s, deadline - loop.time())))
        except asyncio.TimeoutError:
            log.info("group %s: %d replies of my shard still unsent after the wait", group_id[-8:], mine.serving)
        dur = time.perf_counter() - t0
        phases = {"own_shard_closed_s": t_closed, "all_shards_back_s": t_back, "replies_sent_s": dur}
        for k in ("offer_s", "connect_s", "send_s", "reply_s"):
            if any(k in t for t in timings):  # the slowest exchange is the critical path
                phases[k] = max(t.get(k, 0.0) for t in timings)
        return AllReduceOutcome(out if have_all else None, complete, counts, sorted(set(failed)), dur,
                                paths=paths, phases=phases, errors=errors)

    # ------------------------------------------------------------------ tcp path, member side
    async def _push_tcp(self, peer: str, group_id: str, shard: int, x: torch.Tensor, weight: float,
                        dest: torch.Tensor, deadline: float,
                        timing: dict[str, float] | None = None,
                        max_contributors: int = 1 << 20) -> tuple[torch.Tensor | None, int, str]:
        """Push my part of `shard` to its reducer over TCP and read the mean into `dest`.
        Raises BulkUnavailable only before any shard byte was sent (the caller may fall back).
        `timing` gets seconds: offer, connect, then (overlapping, from connect) send and reply."""
        loop = asyncio.get_running_loop()
        timing = {} if timing is None else timing
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timing[name] = now - t
            t = now

        offer = None
        try:
            # the reducer answers within timeout_s (it waits that long for the group at most)
            async for reply in self.transport.call(peer, OFFER_METHOD, [bpb.BulkOffer(group_id=group_id, shard=shard)],
                                                   bpb.BulkOfferReply, channel="averaging",
                                                   timeout_s=max(0.1, min(self.timeout_s + 2, deadline - loop.time()))):
                offer = reply
                break
        except PeerUnavailable as e:
            # a peer without the handler (older version) or with a broken stream: the p2p
            # path decides whether it is really gone
            raise bulk_tcp.BulkUnavailable(f"no bulk offer: {e}") from None
        if offer is None:
            raise bulk_tcp.BulkUnavailable("reducer closed the offer stream")
        if offer.status == OfferStatus.BULK_STATUS_REJECTED:
            return None, 0, f"reducer refused: {offer.detail}"
        if offer.status != OfferStatus.BULK_STATUS_OK:
            raise bulk_tcp.BulkUnavailable(f"reducer has no bulk listener ({offer.detail})")
        lap("offer_s")
        sock = await bulk_tcp.connect(list(offer.hosts), offer.port, offer.token,
                                      timeout_s=min(CONNECT_TIMEOUT_S, max(0.1, deadline - loop.time())),
                                      handshake_s=max(0.1, min(self.timeout_s, deadline - loop.time())))
        lap("connect_s")
        t_connected = t
        numel = dest.numel()
        payload = bulk_tcp.encode_payload(x, self.compression)

        async def push() -> None:
            # full duplex: the reducer streams the mean back while we are still sending
            self._count("tx", await bulk_tcp.send_all(
                sock, bulk_tcp.pack_push(self.compression, weight, len(payload)), payload, deadline=deadline))
            timing["send_s"] = time.perf_counter() - t_connected

        sender = asyncio.create_task(push())
        try:
            head = await bulk_tcp.recv_exact(sock, bulk_tcp.REPLY.size, deadline)
            status, nbytes, detail_len = bulk_tcp.unpack_reply(head)
            detail = (await bulk_tcp.recv_exact(sock, detail_len, deadline)).decode(errors="replace") if detail_len else ""
            self._count("rx", len(head) + detail_len)
            if status != bulk_tcp.OK:
                return None, 0, f"reducer refused the push: {detail}"
            bulk_tcp.check_payload_size(self.compression, nbytes, numel)
            if self.compression == codec.NONE:
                await bulk_tcp.recv_into(sock, bulk_tcp.raw_view(dest), deadline)
                piece = dest
            else:
                piece = bulk_tcp.decode_payload(self.compression, await bulk_tcp.recv_exact(sock, nbytes, deadline), numel)
            trailer = await bulk_tcp.recv_exact(sock, bulk_tcp.TRAILER.size, deadline)
            status, n, _ = bulk_tcp.unpack_trailer(trailer, max_contributors)
            self._count("rx", nbytes + len(trailer))
            timing["reply_s"] = time.perf_counter() - t_connected
            await sender
            if status != bulk_tcp.OK:
                return None, 0, "reducer reports the shard as unusable (a member broke off mid-contribution)"
            if self.compression == codec.NONE:
                bulk_tcp.check_finite(piece)
            return piece, n, ""
        except bulk_tcp.BulkError as e:
            if e.reason not in ("timeout", "truncated"):
                self.on_reject(e.reason)
            return None, 0, f"tcp shard exchange failed: {e}"
        finally:
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            sock.close()

    # ------------------------------------------------------------------ tcp path, reducer side
    async def _rpc_offer(self, requests: AsyncIterator[bpb.BulkOffer], caller: str) -> AsyncIterator[bpb.BulkOfferReply]:
        first = await first_message(requests, self.timeout_s)
        if first is None:
            return
        await drain(requests, self.timeout_s)
        if self.bulk is None:
            yield bpb.BulkOfferReply(status=OfferStatus.BULK_STATUS_UNAVAILABLE, detail=f"mode {self.transport_mode}")
            return
        try:  # as for a shard push: the member may be faster than our coordinator reply
            await asyncio.wait_for(self._event(first.group_id).wait(), self.timeout_s)
        except asyncio.TimeoutError:
            yield bpb.BulkOfferReply(status=OfferStatus.BULK_STATUS_REJECTED, detail="unknown group")
            return
        red = self._groups.get(first.group_id)
        if red is None or caller not in red.expected or first.shard != red.index or caller == self.transport.peer_id:
            self.on_reject("malformed")
            yield bpb.BulkOfferReply(status=OfferStatus.BULK_STATUS_REJECTED, detail="not a member / wrong shard")
            return
        token = self.bulk.issue((first.group_id, caller), ttl_s=self.deadlines.exchange)
        yield bpb.BulkOfferReply(status=OfferStatus.BULK_STATUS_OK, hosts=self.bulk.hosts, port=self.bulk.port,
                                 token=token)

    async def _serve_bulk(self, sock, session: tuple[str, str]) -> None:
        """One member's push on an authenticated connection: read and add it (segment by
        segment for raw fp32), stream the mean back as it becomes final, then the trailer."""
        loop = asyncio.get_running_loop()
        group_id, caller = session
        deadline = loop.time() + self.deadlines.exchange
        red = self._groups.get(group_id)

        async def refuse(status: int, detail: str) -> None:
            try:
                await bulk_tcp.send_all(sock, bulk_tcp.pack_reply(status, 0, detail), deadline=loop.time() + 1)
            except bulk_tcp.BulkError:
                pass

        if red is None or not red.begin(caller):
            await refuse(bulk_tcp.REJECTED, "group closed or unknown, or already contributed")
            return
        red.serve_begin()
        try:
            await self._serve_push(sock, red, caller, deadline, refuse)
        finally:
            red.serve_end()

    async def _serve_push(self, sock, red: _Reduction, caller: str, deadline: float, refuse) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = await bulk_tcp.recv_exact(sock, bulk_tcp.PUSH.size, loop.time() + self.timeout_s)
            compression, weight, nbytes = bulk_tcp.unpack_push(head, red.length)
        except bulk_tcp.BulkError as e:
            self.on_reject(e.reason)
            log.warning("rejected bulk push from %s: %s", caller[-8:], e)
            red.fail(caller, str(e))
            await refuse(bulk_tcp.REJECTED, str(e))
            return
        self._count("rx", len(head))
        if compression != codec.NONE:
            try:
                x = bulk_tcp.decode_payload(compression, await bulk_tcp.recv_exact(sock, nbytes, deadline), red.length)
            except bulk_tcp.BulkError as e:
                self.on_reject(e.reason)
                log.warning("rejected bulk shard from %s: %s", caller[-8:], e)
                red.fail(caller, str(e))  # nothing was added: frees the reservation
                await refuse(bulk_tcp.REJECTED, str(e))
                return
            self._count("rx", nbytes)
            red.add(caller, x, weight, reserved=True)
            del x
            try:
                await asyncio.wait_for(red.closed.wait(), self.deadlines.shard_parts)
            except asyncio.TimeoutError:
                await refuse(bulk_tcp.TIMEOUT, "shard never closed")
                return
            if red.wire is None:
                red.wire = bulk_tcp.encode_payload(red.result, self.compression)
            parts = [bulk_tcp.pack_reply(bulk_tcp.OK, len(red.wire)), red.wire]
            try:
                self._count("tx", await bulk_tcp.send_all(sock, *parts, self._trailer(red), deadline=deadline))
            except bulk_tcp.BulkError as e:
                log.info("bulk reply to %s failed: %s", caller[-8:], e)
            return

        sender = asyncio.create_task(self._stream_mean(sock, red, caller, deadline))
        scratch = self._take_scratch(min(red.segment, red.length))
        try:
            for k, (s, e) in enumerate(red.segments):
                seg = scratch[:e - s]
                await bulk_tcp.recv_into(sock, bulk_tcp.raw_view(seg), deadline)
                bulk_tcp.check_finite(seg)
                red.add_segment(caller, k, seg, weight)
            self._count("rx", nbytes)
            self._give_scratch(scratch)
        except bulk_tcp.BulkError as e:
            # the buffer may still be the target of a cancelled read: it is not recycled
            if e.reason not in ("timeout", "truncated") or red.progress.get(caller, 0) == 0:
                self.on_reject(e.reason)
            log.warning("bulk shard from %s broke off: %s", caller[-8:], e)
            red.fail(caller, str(e))
        finally:
            try:
                await sender
            except bulk_tcp.BulkError as e:
                log.info("bulk reply to %s failed: %s", caller[-8:], e)

    async def _stream_mean(self, sock, red: _Reduction, caller: str, deadline: float) -> None:
        """Raw path: the mean's segments as they become final, then the trailer."""
        loop = asyncio.get_running_loop()
        sent = await bulk_tcp.send_all(sock, bulk_tcp.pack_reply(bulk_tcp.OK, red.length * 4), deadline=deadline)
        k, nseg = 0, len(red.segments)
        while k < nseg:
            try:
                await asyncio.wait_for(red.seg_ready[k].wait(), max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise bulk_tcp.BulkError("timeout", "shard never closed") from None
            last = k  # every segment final by now goes in one send: fewer wakeups, same bytes
            while last + 1 < nseg and red.seg_ready[last + 1].is_set():
                last += 1
            s, e = red.segments[k][0], red.segments[last][1]
            sent += await bulk_tcp.send_all(sock, bulk_tcp.raw_view(red.total[s:e]), deadline=deadline)
            k = last + 1
        try:  # every segment final means every member is in, or the shard was closed early
            await asyncio.wait_for(red.closed.wait(), max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise bulk_tcp.BulkError("timeout", "shard never closed") from None
        sent += await bulk_tcp.send_all(sock, self._trailer(red), deadline=deadline)
        self._count("tx", sent)

    @staticmethod
    def _trailer(red: _Reduction) -> bytes:
        # as on the p2p path, a late contributor still gets the mean: its count shows it was left out
        status = bulk_tcp.REJECTED if red.poisoned else bulk_tcp.OK
        return bulk_tcp.pack_trailer(status, len(red.contributors), red.weight)

    def _as_sent(self, x: torch.Tensor) -> torch.Tensor:
        if self.compression == codec.NONE:
            return x
        return codec.decode_tensor(codec.encode_tensor(x, self.compression), max_numel=x.numel())

    async def _push(self, peer: str, group_id: str, shard: int, x: torch.Tensor,
                    weight: float, timeout_s: float | None = None) -> tuple[torch.Tensor | None, int, str]:
        def messages():
            for chunk in codec.tensors_to_chunks([x], self.compression, MAX_MESSAGE):
                yield rpb.ShardPush(group_id=group_id, shard=shard, weight=weight, chunk=chunk)

        assembler = codec.ChunkAssembler(1, max_numel_total=x.numel(), expected_shapes=[tuple(x.shape)])
        n, status, detail = 0, None, ""
        try:
            async for reply in self.transport.call(peer, METHOD, messages(), rpb.ShardReply, channel="averaging",
                                                   timeout_s=self.deadlines.exchange if timeout_s is None else timeout_s):
                status, detail, n = reply.status, reply.detail, reply.num_contributors
                if status != ShardStatus.SHARD_STATUS_OK:
                    break
                assembler.add(reply.chunk)
        except PeerUnavailable as e:
            return None, 0, str(e)
        except codec.CodecError as e:
            self.on_reject(e.reason)
            return None, 0, f"reducer sent a bad shard: {e}"
        if status == ShardStatus.SHARD_STATUS_OK and assembler.complete:
            return assembler.result()[0], n, ""
        return None, 0, f"{ShardStatus.Name(status) if status is not None else 'no answer'} {detail}"

    async def _rpc_shard(self, requests: AsyncIterator[rpb.ShardPush], caller: str) -> AsyncIterator[rpb.ShardReply]:
        first = await first_message(requests, self.timeout_s)
        if first is None:
            return
        # the pusher may be faster than our coordinator reply: wait briefly for the group
        try:
            await asyncio.wait_for(self._event(first.group_id).wait(), self.timeout_s)
        except asyncio.TimeoutError:
            await drain(requests, self.timeout_s)
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail="unknown group")
            return
        red = self._groups.get(first.group_id)
        ok_weight = first.weight >= 0 and first.weight == first.weight and first.weight < 1e9
        if red is None or caller not in red.expected or not ok_weight or first.shard != red.index:
            self.on_reject("malformed")
            await drain(requests, self.timeout_s)
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail="not a member / bad weight / wrong shard")
            return
        assembler = codec.ChunkAssembler(1, max_numel_total=red.length, expected_shapes=[(red.length,)])
        try:
            assembler.add(first.chunk)
            while not assembler.complete:
                msg = await first_message(requests, self.timeout_s)
                if msg is None:
                    return  # pusher vanished: it does not contribute
                assembler.add(msg.chunk)
        except codec.CodecError as e:
            self.on_reject(e.reason)
            log.warning("rejected shard from %s: %s", caller[-8:], e)
            await drain(requests, self.timeout_s)
            yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail=str(e))
            return
        await drain(requests, self.timeout_s)
        red.serve_begin()  # before add: the add may close the shard and wake run()
        try:
            red.add(caller, assembler.result()[0], float(first.weight))
            try:
                await asyncio.wait_for(red.closed.wait(), self.deadlines.shard_parts)
            except asyncio.TimeoutError:
                yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_TIMEOUT, detail="shard never closed")
                return
            if red.poisoned:
                yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_REJECTED, detail=red.poisoned[:200])
                return
            if red.encoded is None:
                red.encoded = list(codec.tensors_to_chunks([red.result], self.compression, MAX_MESSAGE))
            for chunk in red.encoded:
                yield rpb.ShardReply(status=ShardStatus.SHARD_STATUS_OK, num_contributors=len(red.contributors),
                                     total_weight=red.weight, chunk=chunk)
        finally:
            red.serve_end()
