"""Averaging rounds as transactions: freeze a group, all-reduce, commit only on agreement.

One round, as seen by a member:
  1. join    — tell the leader (lowest online peer id) "round r, my shared-state hash h,
               weight w". The leader freezes the group when every expected member joined
               or `grace_s` after its own join, and answers everyone with the sorted group
               and a group id. A member whose r or h differs is told RESYNC, unless it
               carries more merged work than the leader (see `RoundCoordinator._admit`).
  2. reduce  — butterfly all-reduce of the member's vector inside that group.
  3. commit  — each member votes (complete?, hash of the averaged vector); the leader
               commits iff every member of the group voted complete with the same hash.
The result is applied only on commit. On abort the caller keeps its shared state and retries,
never applying a local-only update (that silently forks the model); a dead leader makes every
member's join or vote fail, so all abort together. The leader's decision is the only commit
point; round numbers move forward only on commit; every wait is bounded by `timeout_s`/`grace_s`.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Callable

import torch

from swarm_node.protocol.averaging.butterfly import AllReduceOutcome, ButterflyAllReduce, path_counter
from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.protocol.averaging.robust import Combined, SuspicionLedger
from swarm_node.protocol.messages import rounds as rpb
from swarm_node.protocol.transport import ClosedWithoutAnswer, PeerUnavailable, Transport, drain, first_message

JoinStatus = rpb.RoundJoinReply.Status
JOIN, VOTE = "round.join", "round.commit"


def averaging_layer(ctx, *, timeout_s: float, compression: int = 0, max_numel: int = 1 << 31) -> ButterflyAllReduce:
    """The butterfly all-reduce every averaging strategy shares, wired to this node's config
    (data path, bulk TCP listener) and metrics (rejections, paths). Start it before use."""
    node = ctx.node
    return ButterflyAllReduce(
        ctx.transport, timeout_s=timeout_s, compression=compression, max_numel=max_numel,
        on_reject=lambda reason: ctx.metrics.rejected_messages.labels(reason=reason).inc(),
        transport_mode=node.allreduce_transport, bulk_host=node.host, bulk_port=node.allreduce_tcp_port,
        announce_host=node.announce_host, on_path=path_counter(ctx.metrics.registry),
        rule=node.aggregation_rule, report=robust_reporter(ctx), contribution_scale=node.lab_contribution_scale)


def robust_reporter(ctx) -> Callable[[Combined], None]:
    """Counts what robust aggregation clipped or dropped (`swarm_rejected_messages_total{reason}`),
    per peer in a ledger, and warns once when a peer becomes suspected (caught repeatedly)."""
    ledger = SuspicionLedger()

    def report(combined: Combined) -> None:
        for reason, peers in (("clipped_contribution", combined.clipped), ("non_finite_contribution", combined.dropped)):
            if peers:
                ctx.metrics.rejected_messages.labels(reason=reason).inc(len(peers))
        for peer in ledger.record(combined):
            ctx.progress.suspected[peer] = time.time()
            ctx.log.warning("peer %s suspected: its contributions were clipped or dropped in %d of the last %d "
                            "combinations", peer[-8:], ledger.threshold, ledger.window)

    return report


def group_digest(run_id: str, round_no: int, group: list[str], epoch: int = 0) -> str:
    return hashlib.sha256(f"{run_id}|{round_no}|{epoch}|{','.join(group)}".encode()).hexdigest()[:24]


def tensor_digest(t: torch.Tensor) -> str:
    # hashed in place (no tobytes copy: 100 MB of fresh pages cost more than the hash)
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(memoryview(t.reshape(-1).numpy()).cast("B")).hexdigest()[:16]


class RoundStatus(str, Enum):
    COMMITTED = "committed"  # every member of the frozen group agreed on `result`
    ABORTED = "aborted"  # nothing applies; `cause` says why
    RESYNC = "resync"  # our state is behind: download it from `leader` (round `round_no`)
    NOT_LEADER = "not_leader"  # the peer we asked is not the leader; `leader` is its hint


class AbortCause(str, Enum):
    NONE = ""
    LEADER_UNREACHABLE = "leader_unreachable"  # the join never got an answer from the leader
    LEADER_LOST = "leader_lost"  # the leader vanished between our join and its decision
    REFUSED = "refused"  # the leader answered the join with something other than OK
    LEFT_OUT = "left_out"  # the group froze without us
    INCOMPLETE = "incomplete"  # the all-reduce missed a member's part
    DISAGREED = "disagreed"  # members voted different results

    @property
    def leader_at_fault(self) -> bool:
        """The leader could not be reached: worth suspecting it for a while."""
        return self in (AbortCause.LEADER_UNREACHABLE, AbortCause.LEADER_LOST)


@dataclass
class RoundOutcome:
    status: RoundStatus  # (a str enum: compares equal to its value)
    result: torch.Tensor | None = None
    group: list[str] = field(default_factory=list)
    detail: str = ""
    leader: str = ""  # for resync: the peer to download from
    allreduce: AllReduceOutcome | None = None
    round_no: int = -1  # for resync: the round the downloaded state must have reached
    result_hash: str = ""  # tensor_digest of result, as voted
    cause: AbortCause = AbortCause.NONE

    def __post_init__(self) -> None:
        self.status, self.cause = RoundStatus(self.status), AbortCause(self.cause)


@dataclass
class _LeaderRound:
    round_no: int
    phi_hash: str
    expected: set[str]
    joined: dict[str, float] = field(default_factory=dict)
    frozen: asyncio.Event = field(default_factory=asyncio.Event)
    group: list[str] = field(default_factory=list)
    group_id: str = ""
    votes: dict[str, tuple[bool, str]] = field(default_factory=dict)
    voted: asyncio.Event = field(default_factory=asyncio.Event)
    decision: bool | None = None
    num_elements: int | None = None  # every member must all-reduce a vector of this length (the leader's)
    numel_of: dict[str, int] = field(default_factory=dict)  # what each joiner declared
    epoch: int = 0  # retries of one round are new epochs: fresh group, group id and votes
    freeze_at: float | None = None  # loop time the earliest freeze timer fires at
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    on_freeze: Callable[[int], None] | None = None  # called with the number of expected peers left out

    def freeze(self, run_id: str) -> None:
        if not self.frozen.is_set():
            # The length is the leader's own, else the most common declared one: a stranger who
            # joins first with another length is left out instead of locking the members out
            if self.num_elements is None and self.numel_of:
                self.num_elements = Counter(self.numel_of.values()).most_common(1)[0][0]
            self.group = sorted(p for p in self.joined if self.numel_of.get(p, self.num_elements) == self.num_elements)
            self.group_id = group_digest(run_id, self.round_no, self.group, self.epoch)
            self.frozen.set()
            if self.on_freeze is not None:
                self.on_freeze(len(self.expected - set(self.joined)))

    def abandon(self, run_id: str) -> None:
        """Freeze with nobody in the group: no one, the leader included, commits this round.
        It is decided (aborted) at once, so the next join of this round number, after the
        leader adopted the member's state, opens a fresh epoch instead of finding it frozen."""
        if not self.frozen.is_set():
            self.joined.clear()
            self.freeze(run_id)
        if self.decision is None and not self.group:
            self.decision = False
            self.decided.set()

    def vote(self, peer: str, complete: bool, result_hash: str) -> None:
        if peer in self.group:
            self.votes[peer] = (complete, result_hash)
            if set(self.votes) >= set(self.group):
                self.voted.set()

    def decide(self) -> bool:
        if self.decision is None:
            hashes = {h for _, h in self.votes.values()}
            self.decision = (set(self.votes) >= set(self.group) and all(c for c, _ in self.votes.values())
                             and len(hashes) == 1)
            self.decided.set()
        return self.decision


class RoundCoordinator:
    """Runs rounds for one strategy. `leader_fn()` names the leader; `expected_fn()` the
    members the leader should wait for; `state_fn()` gives the leader's own (round, hash)."""

    def __init__(self, transport: Transport, run_id: str, *, timeout_s: float, grace_s: float,
                 allreduce: ButterflyAllReduce, leader_fn: Callable[[], str], expected_fn: Callable[[], set[str]],
                 state_fn: Callable[[], tuple[int, str]], on_stragglers: Callable[[int], None] | None = None,
                 work_fn: Callable[[], int] | None = None, on_behind: Callable[[str], None] | None = None,
                 open_on_first_join: bool = False, on_left_out: Callable[[], None] | None = None):
        self.transport, self.run_id = transport, run_id
        # False: the grace window opens when the leader itself is ready (it is always in its own
        # group, but a slow leader sets everyone's pace). True (the deadline quorum): it opens at
        # the first join; a leader that misses it still coordinates the round, then downloads
        # the committed state from a member, as a late member would
        self.open_on_first_join = open_on_first_join
        self.on_left_out = on_left_out  # called when a round committed without this leader in it
        # the deadline quorum: expected members that missed the grace window are left out of the
        # frozen group (fast peers are not held hostage) and counted here
        self.on_stragglers = on_stragglers
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.deadlines = Deadlines(timeout_s)
        self.allreduce, self.leader_fn, self.expected_fn, self.state_fn = allreduce, leader_fn, expected_fn, state_fn
        self._rounds: dict[int, _LeaderRound] = {}
        # work_fn: member-rounds merged into this peer's shared state; on_behind(peer): called
        # on the leader when that member's state carries more, so the strategy adopts it
        self.work_fn, self.on_behind = work_fn or (lambda: 0), on_behind

    async def start(self) -> None:
        await self.allreduce.start()
        await self.transport.add_handler(JOIN, self._rpc_join, rpb.RoundJoin, channel="averaging")
        await self.transport.add_handler(VOTE, self._rpc_vote, rpb.CommitVote, channel="averaging")

    # ------------------------------------------------------------------ member side
    async def run_round(self, round_no: int, phi_hash: str, weight: float, vector: torch.Tensor,
                        leader: str | None = None) -> RoundOutcome:
        leader = leader or self.leader_fn()
        me = self.transport.peer_id
        join = rpb.RoundJoin(run_id=self.run_id, round=round_no, phi_hash=phi_hash, weight=weight,
                             num_elements=vector.numel(), work=self.work_fn())
        try:
            if leader == me:
                reply = await self._lead_join(join)
            else:
                reply = await self._call_one(leader, JOIN, join, rpb.RoundJoinReply, self.grace_s + self.timeout_s)
        except PeerUnavailable as e:
            return RoundOutcome(RoundStatus.ABORTED, detail=f"leader unreachable: {e}", leader=leader,
                                cause=AbortCause.LEADER_UNREACHABLE)
        if reply.status == JoinStatus.ROUND_STATUS_RESYNC:
            # the hint names whom to download from when it is not the leader (a leader left out)
            return RoundOutcome(RoundStatus.RESYNC, detail=reply.detail, leader=reply.leader_hint or leader, round_no=reply.round)
        if reply.status == JoinStatus.ROUND_STATUS_NOT_LEADER and reply.leader_hint:
            return RoundOutcome(RoundStatus.NOT_LEADER, detail=f"{leader[-8:]} points to {reply.leader_hint[-8:]}",
                                leader=reply.leader_hint)
        if reply.status != JoinStatus.ROUND_STATUS_OK:
            return RoundOutcome(RoundStatus.ABORTED, detail=f"{JoinStatus.Name(reply.status)} {reply.detail}", leader=leader,
                                cause=AbortCause.REFUSED)
        group = list(reply.group)
        if me not in group:
            return RoundOutcome(RoundStatus.ABORTED, detail="left out of the frozen group", group=group, leader=leader,
                                cause=AbortCause.LEFT_OUT)
        ar = await self.allreduce.run(reply.group_id, group, vector, weight)
        # off the event loop: hashing 100 MB there stalls every handler of this peer (sha256
        # releases the GIL)
        result_hash = await asyncio.to_thread(tensor_digest, ar.result) if ar.result is not None else ""
        vote = rpb.CommitVote(group_id=reply.group_id, complete=ar.complete, result_hash=result_hash)
        try:
            if leader == me:
                commit = await self._lead_vote(me, vote)
            else:
                decision = await self._call_one(leader, VOTE, vote, rpb.CommitDecision,
                                                  self.deadlines.exchange)
                commit = decision.commit
        except PeerUnavailable as e:
            return RoundOutcome(RoundStatus.ABORTED, detail=f"leader lost during commit: {e}", group=group,
                                leader=leader, allreduce=ar, cause=AbortCause.LEADER_LOST)
        if commit and ar.result is not None:
            return RoundOutcome(RoundStatus.COMMITTED, ar.result, group, leader=leader, allreduce=ar,
                                result_hash=result_hash)
        cause = AbortCause.INCOMPLETE if not ar.complete else AbortCause.DISAGREED
        why = "incomplete all-reduce" if not ar.complete else "members disagreed"
        return RoundOutcome(RoundStatus.ABORTED, detail=f"{why}; missing {[p[-8:] for p in ar.failed]}", group=group,
                            leader=leader, allreduce=ar, cause=cause)

    async def _call_one(self, peer: str, method: str, msg, reply_type, timeout_s: float):
        """One request, one reply. Join and vote are idempotent at the leader (a second join of
        an admitted member returns the same group; a second vote overwrites the first), so a
        stream that ended without a reply is retried once instead of costing the round: a
        member whose join reply was lost would otherwise stay in the frozen group, and the
        others' all-reduce would wait the full timeout for its shard."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        for attempt in (1, 2):
            try:
                async for reply in self.transport.call(peer, method, [msg], reply_type, timeout_s=timeout_s,
                                                       channel="averaging"):
                    return reply
                raise ClosedWithoutAnswer(f"{peer[-8:]} closed {method} without answering")
            except ClosedWithoutAnswer:
                timeout_s = deadline - asyncio.get_running_loop().time()
                if attempt == 2 or timeout_s < 0.5:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ leader side
    def _round(self, round_no: int, phi_hash: str) -> _LeaderRound:
        rnd = self._rounds.get(round_no)
        if rnd is None or rnd.decision is False or rnd.phi_hash != phi_hash:
            # an aborted round is retried as a new epoch; reusing it would hand out the old
            # group, the old group id (reducers still hold that epoch's shards) and the old verdict.
            # Another hash under the same number: a round of a history this leader left when it
            # adopted a member's state, likewise not to be reused
            epoch = 0 if rnd is None else rnd.epoch + 1
            rnd = _LeaderRound(round_no, phi_hash, self.expected_fn() | {self.transport.peer_id}, epoch=epoch,
                               on_freeze=self._count_stragglers)
            # rounds above this one belong to that left history too; without dropping them, the
            # new round would be the oldest in the book and pruned at once (every join then opens
            # a round of its own that never freezes with the others)
            for old in [r for r in self._rounds if r > round_no]:
                del self._rounds[old]
            self._rounds[round_no] = rnd
            for old in sorted(self._rounds)[:-4]:
                del self._rounds[old]
        return rnd

    def _count_stragglers(self, missing: int) -> None:
        if missing and self.on_stragglers is not None:
            self.on_stragglers(missing)

    async def _admit(self, join: rpb.RoundJoin, caller: str) -> rpb.RoundJoinReply:
        """The leader's answer to a join. A member whose round or hash differs is told RESYNC,
        unless its state carries more merged work (member-rounds) than the leader's: then the
        leader is the stale side (it was cut off, or frozen, while the others went on), adopts
        that member's state, and the member is told LEADER_BEHIND and retries. After a split the
        side that merged more work keeps its model, whichever side the lowest id is on."""
        if join.run_id != self.run_id:
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_REJECTED, detail="wrong run id")
        me = self.transport.peer_id
        if self.leader_fn() != me:
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_NOT_LEADER, leader_hint=self.leader_fn())
        loop = asyncio.get_running_loop()
        # answer before the member's own join deadline (grace + timeout) runs out: a reply it
        # never sees makes it suspect a leader that is merely slow
        answer_by = loop.time() + max(0.5, self.grace_s + self.timeout_s - 1.0)
        my_round, my_hash = self.state_fn()
        decided = self._rounds.get(my_round)
        if join.round > my_round and decided is not None and decided.decision:
            # a member can finish its local steps before the leader applied the round it just
            # committed: give the leader a moment to catch up instead of sending it to resync
            # (ahead of a round the leader did not commit, the member comes from elsewhere, and
            # waiting would only let this round freeze without it)
            deadline = min(loop.time() + self.timeout_s, answer_by)
            while join.round > my_round and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                my_round, my_hash = self.state_fn()
        if join.round != my_round or join.phi_hash != my_hash:
            if self.on_behind is not None and join.work > self.work_fn():
                self.on_behind(caller)
                stale = self._rounds.get(my_round)
                if stale is not None:  # my own join returns now, and commits nothing: I adopt instead
                    stale.abandon(self.run_id)
                return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_LEADER_BEHIND, round=my_round,
                                          detail=f"leader at round {my_round} with work {self.work_fn()}, member "
                                                 f"at {join.round} with {join.work}: the leader adopts its state")
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_RESYNC, round=my_round,
                                      detail=f"leader at round {my_round}, member at {join.round}"
                                      + ("" if join.phi_hash == my_hash else " with a different state"))
        if not (join.weight >= 0 and join.weight < 1e9):
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_REJECTED, detail="bad weight")
        rnd = self._round(my_round, my_hash)
        if caller == me and not rnd.frozen.is_set():
            rnd.num_elements = join.num_elements  # the leader's own vector sets the length
        if rnd.num_elements is not None and join.num_elements != rnd.num_elements:
            return self._wrong_length(join, rnd)
        rnd.numel_of[caller] = join.num_elements
        if not rnd.frozen.is_set():
            self._open_window(rnd, caller == me, join.weight)
            rnd.joined[caller] = join.weight
            if set(rnd.joined) >= rnd.expected:
                rnd.freeze(self.run_id)
        try:
            if not rnd.frozen.is_set():
                await asyncio.wait_for(rnd.frozen.wait(), max(0.0, answer_by - loop.time()))
        except asyncio.TimeoutError:
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_TIMEOUT, detail="group never froze")
        if caller not in rnd.group and join.num_elements != rnd.num_elements:
            return self._wrong_length(join, rnd)
        if caller not in rnd.group:
            if caller == me and rnd.group:
                return await self._left_out_leader(rnd)
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_TIMEOUT, detail="joined after the group froze")
        return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_OK, round=my_round, group=rnd.group,
                                  group_id=rnd.group_id)

    @staticmethod
    def _wrong_length(join: rpb.RoundJoin, rnd: _LeaderRound) -> rpb.RoundJoinReply:
        return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_REJECTED,
                                  detail=f"vector of {join.num_elements} elements, round uses {rnd.num_elements}")

    def _open_window(self, rnd: _LeaderRound, by_leader: bool, weight: float) -> None:
        """Start (or bring forward) the round's freeze timer. Wait for all: the leader's own join
        opens a window of grace_s. Quorum: the first join that contributes (weight > 0) opens
        it, from anyone; a leader with nothing to contribute (it just downloaded the state)
        opens only a fallback window of timeout_s, since it alone must not freeze a group of
        one before the contributors arrive (a weight-0 round still moves φ by momentum)."""
        if self.open_on_first_join:
            delay = self.grace_s if weight > 0 else (self.timeout_s if by_leader else None)
        else:
            delay = self.grace_s if by_leader else None
        if delay is None:
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if rnd.freeze_at is None or at < rnd.freeze_at:
            rnd.freeze_at = at
            loop.call_later(delay, rnd.freeze, self.run_id)

    async def _left_out_leader(self, rnd: _LeaderRound) -> rpb.RoundJoinReply:
        """This leader was not ready when its round froze. It coordinates the round all the
        same; once the round is decided, a commit means its own state is one round behind, so
        it downloads the state from a member (RESYNC with that member as the hint), and an
        abort means the round will be retried as a new epoch, with the leader in it."""
        try:
            await asyncio.wait_for(rnd.decided.wait(), self.deadlines.left_out_leader)
        except asyncio.TimeoutError:
            pass
        if rnd.decision:
            return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_RESYNC, round=rnd.round_no + 1,
                                      leader_hint=rnd.group[0],
                                      detail=f"round {rnd.round_no} committed without the leader (it was late)")
        return rpb.RoundJoinReply(status=JoinStatus.ROUND_STATUS_TIMEOUT, detail="joined after the group froze")

    async def _lead_join(self, join: rpb.RoundJoin) -> rpb.RoundJoinReply:
        return await self._admit(join, self.transport.peer_id)

    async def _rpc_join(self, requests: AsyncIterator[rpb.RoundJoin], caller: str) -> AsyncIterator[rpb.RoundJoinReply]:
        join = await first_message(requests, self.timeout_s)
        if join is not None:
            await drain(requests, self.timeout_s)
            yield await self._admit(join, caller)

    async def _decide(self, caller: str, vote: rpb.CommitVote) -> rpb.CommitDecision:
        rnd = next((r for r in self._rounds.values() if r.group_id == vote.group_id), None)
        if rnd is None:
            return rpb.CommitDecision(commit=False, detail="unknown round")
        rnd.vote(caller, vote.complete, vote.result_hash)
        try:
            await asyncio.wait_for(rnd.voted.wait(), self.deadlines.shard_parts)
        except asyncio.TimeoutError:
            pass
        first = rnd.decision is None
        commit = rnd.decide()
        if first and commit and self.transport.peer_id not in rnd.group and self.on_left_out is not None:
            self.on_left_out()  # this leader's own steps for the round are moot: stop them early
        return rpb.CommitDecision(commit=commit)

    async def _lead_vote(self, me: str, vote: rpb.CommitVote) -> bool:
        return (await self._decide(me, vote)).commit

    async def _rpc_vote(self, requests: AsyncIterator[rpb.CommitVote], caller: str) -> AsyncIterator[rpb.CommitDecision]:
        vote = await first_message(requests, self.timeout_s)
        if vote is not None:
            await drain(requests, self.timeout_s)
            yield await self._decide(caller, vote)
