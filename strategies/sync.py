"""`sync`: synchronous data parallel — every step, average gradients among the live peers.

The baseline the low-communication methods are measured against. One round per step: the
leader (smallest id among live, *online* sync peers not recently failed) collects pushes until
every expected peer arrived or `round_timeout_s` after its own contribution, then replies the
average (weighted by samples) to every follower. Invariants:
- Every peer that applies round t applies the leader's average: replicas stay bit-identical.
- A push carries its step and the hash of the parameters it started from; on a mismatch the leader
  answers RESYNC and the peer downloads its state instead of contributing (never a silent fork).
  A joiner pushes like anyone: one identical by seed (a fresh swarm) contributes at once.
- A late push still gets its round's average; if the leader fails, followers apply nothing and
  retry the step with the next one; a dead or resyncing peer delays a round by at most the timeout.
- Joiners announce `joining` and may not lead until their first completed round.
Known hole: all traffic goes through the leader (n x model size per step); DiLoCo is the scalable path.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import torch

from swarm_node.protocol import codec
from swarm_node.protocol.messages import wire
from swarm_node.protocol.transport import PeerUnavailable, Unavailable
from swarm_node.train.trainer import StepResult

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.data_parallel import DataParallelStrategy
from swarm_node.strategies.leader import LeaderElection
from swarm_node.protocol.averaging.star import GatherRound, PushResult, push_tensors, receive_push, tensor_messages
from swarm_node.protocol.averaging.state_transfer import StateService
from swarm_node.protocol.averaging.transaction import robust_reporter

PUSH = "sync.push"
Status = wire.SyncReply.Status
RESULTS_KEPT = 4
LEADER_GONE_S = 1.0  # out of the view this long (after its record expired) = the leader is gone


class SyncStrategy(DataParallelStrategy):
    name = "sync"
    # Replicas stay bit-identical (gradients averaged every step). The lab bounds a run by events: a
    # cut-off peer waits below the quorum, and once the scenario settled every survivor drains at
    # one common step, where their param hashes are compared; no step count decides the outcome.
    churn_profile = ChurnProfile(consistency="param_hash", stop_together=True, cut_off_holds=True)
    demo_profile = DemoProfile(steps=200, shows="every step averages the peers' gradients: each step learns from "
                               "every peer's batch")
    quorum_gated = True

    def __init__(self, ctx):
        super().__init__(ctx)
        self.rounds: dict[int, GatherRound] = {}
        self._last_group: set[str] = set()  # leader: contributors of the round it last committed
        self.election = LeaderElection(ctx, self.name, prefer_progress=True)
        self.state = StateService(ctx.transport, ctx.trainer, ctx.compute, timeout_s=ctx.deadlines.state_download)
        params = ctx.trainer.parameters_list()
        self._shapes = [tuple(p.shape) for p in params]
        self._numel = sum(p.numel() for p in params)
        self._rule = ctx.node.aggregation_rule
        self._report = robust_reporter(ctx)

    async def start(self) -> None:
        await self.ctx.transport.add_handler(PUSH, self._rpc_push, wire.SyncPush, channel="averaging")
        await self.state.start()

    # ------------------------------------------------------------ who takes part
    def leader(self) -> str:
        return self.election.leader()

    def _expected(self) -> set[str]:
        return self.election.expected()

    def _round(self, step: int) -> GatherRound:
        if step not in self.rounds:
            self.rounds[step] = GatherRound(step, self._expected(), rule=self._rule, report=self._report)
            for old in sorted(self.rounds)[:-RESULTS_KEPT]:
                del self.rounds[old]
        return self.rounds[step]

    # ------------------------------------------------------------ the step
    async def reduce(self, result: StepResult) -> list[torch.Tensor] | None:
        leader = self.leader()
        t0 = time.perf_counter()
        # A joiner pushes like any follower: the leader checks its step and parameter hash and answers
        # RESYNC (we download its state, contributing nothing) unless our replica already is the
        # swarm's. Downloading unasked cost every peer of a fresh swarm, identical by seed, a transfer,
        # and the leader the round timeout it waited for them meanwhile.
        if leader == self.ctx.peer_id:
            update, outcome, size = await self._lead(result)
        else:
            update, outcome, size = await self._follow(leader, result)
        self._account(outcome, size, time.perf_counter() - t0, leader)
        if update is not None:
            self.note_committed(size)
            # those I just committed with are online, even before their records say so (records lag by
            # up to an announce interval; without this a follower that went online first could take
            # itself for the only online peer, and lead a round of one)
            self.election.mark_committed(list(self._last_group) if leader == self.ctx.peer_id else [leader])
        if update is not None and self.ctx.progress.state != "online":
            self.ctx.progress.state = "online"
            await self.ctx.peers.announce("online")
        return update

    def _contribution(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        scale = self.ctx.node.lab_contribution_scale  # a lab's byzantine peer
        return grads if scale == 1.0 else [g * scale for g in grads]

    async def _lead(self, result: StepResult) -> tuple[list[torch.Tensor] | None, str, int]:
        rnd = self._round(result.step)
        # An early push may have opened this round when our view still lacked peers (a fresh swarm:
        # a follower past --min-peers before we were): expect whom we see now too, or the round
        # would close without peers about to push.
        rnd.expected |= self._expected() - rnd.excused
        rnd.param_hash = await self.ctx.compute(self.ctx.trainer.param_hash)
        rnd.leader_ready.set()
        rnd.add(self.ctx.peer_id, self._contribution(result.grads), result.num_samples)
        try:
            await asyncio.wait_for(rnd.closed.wait(), self.ctx.deadlines.gather)
        except asyncio.TimeoutError:
            missing = sorted(rnd.expected - set(rnd.contributions))
            self.ctx.metrics.stragglers.inc(len(missing))
            self.ctx.log.warning("round %d closed without %d peer(s): %s", rnd.step, len(missing),
                                 ", ".join(p[-8:] for p in missing))
            rnd.close()
        need = self.quorum_counts()[1]
        if len(rnd.contributions) < need:
            # A leader cut off from its swarm must not commit a step alone: nobody applies this
            # round (its waiters are told), and the step is retried in a fresh round.
            self.ctx.log.warning("round %d closed with %d contributor(s), below the quorum of %d: not applied",
                                 rnd.step, len(rnd.contributions), need)
            rnd.result = None
            if self.rounds.get(rnd.step) is rnd:
                del self.rounds[rnd.step]
            ahead = self.rounds.get(rnd.step + 1)
            if ahead is not None and ahead.early:
                # Nobody pushed my step because the others are one past it (I led on a stale replica
                # after a partition healed): catch up from one of them, then lead their step.
                await self._resync(min(ahead.early), f"the others are at step {rnd.step + 1}, I am at {rnd.step}")
                return None, "resync", 0
            return None, "no_peers", len(rnd.contributions)
        self._last_group = set(rnd.contributions)
        return rnd.result, "ok", len(rnd.contributions)

    async def _follow(self, leader: str, result: StepResult) -> tuple[list[torch.Tensor] | None, str, int]:
        ctx = self.ctx
        param_hash = await ctx.compute(ctx.trainer.param_hash)
        pushes = tensor_messages(self._contribution(result.grads), lambda chunk: wire.SyncPush(
            run_id=ctx.spec.run_id, step=result.step, param_hash=param_hash, num_samples=result.num_samples,
            num_tensors=len(result.grads), chunk=chunk))
        try:
            answer = await self._while_leader_visible(leader, push_tensors(
                ctx.transport, leader, PUSH, pushes, wire.SyncReply, timeout_s=ctx.deadlines.star_reply,
                is_ok=lambda r: r.status == Status.SYNC_STATUS_OK, shapes=self._shapes))
        except PeerUnavailable as e:
            ctx.log.warning("round %d: leader unavailable (%s); retrying the step without it", result.step, e)
            self.election.suspect(leader)
            return None, "timeout" if e.timed_out else "error", 0
        except codec.CodecError as e:
            ctx.metrics.rejected_messages.labels(reason=e.reason).inc()
            ctx.log.warning("round %d: leader's average rejected: %s", result.step, e)
            self.election.suspect(leader)
            return None, "error", 0
        status = answer.reply.status if answer.reply is not None else None
        detail = answer.reply.detail if answer.reply is not None else ""
        if status == Status.SYNC_STATUS_OK and answer.complete:
            return answer.tensors, "ok", answer.reply.num_contributors
        if status == Status.SYNC_STATUS_RESYNC:
            await self._resync(leader, detail)
            return None, "resync", 0
        if status == Status.SYNC_STATUS_NOT_LEADER:
            self.election.not_leader(leader)
        ctx.log.info("round %d: leader %s answered %s %s", result.step, leader[-8:],
                     Status.Name(status) if status is not None else "nothing", detail)
        return None, "error", 0

    async def _while_leader_visible(self, leader: str, exchange):
        """Run `exchange` until it ends, or until the leader has been out of our membership view
        for `LEADER_GONE_S`. The call's own deadline (round_timeout × 2 + 10 s, which a slow but
        live leader may need) is what a partitioned leader used to cost every follower; its
        record expiring says the same thing after one record lifetime."""
        task = asyncio.ensure_future(exchange)
        gone_since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                # any state counts: a fresh swarm's leader is not `online` yet
                if leader in {m.peer_id for m in self.election.peers()}:
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since >= LEADER_GONE_S:
                    raise PeerUnavailable(f"{leader[-8:]} left the membership view mid-round", Unavailable.GONE)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _resync(self, leader: str, why: str) -> None:
        ctx = self.ctx
        ctx.log.info("replica differs from leader %s (%s): downloading its state", leader[-8:], why)
        step = await self.state.adopt(leader, ctx.metrics, ctx.log)
        if step is None:
            return
        ctx.log.info("resynchronised to step %d", step)

    def _account(self, outcome: str, size: int, duration_s: float, leader: str) -> None:
        self.record_round(outcome, size, duration_s, step=self.ctx.trainer.step, leader=leader)

    # ------------------------------------------------------------ leader side RPC
    async def _rpc_push(self, requests: AsyncIterator[wire.SyncPush], caller: str) -> AsyncIterator[wire.SyncReply]:
        ctx = self.ctx
        timeout = ctx.deadlines.request
        got = await receive_push(requests, timeout_s=timeout, shapes=self._shapes,
                                 on_reject=lambda reason: ctx.metrics.rejected_messages.labels(reason=reason).inc())
        if got.result is PushResult.REJECTED:
            ctx.log.warning("rejected gradients from %s: %s", caller[-8:], got.error)
            yield _reply(Status.SYNC_STATUS_REJECTED, str(got.error))
            return
        if got.result is not PushResult.OK:
            return  # nothing arrived, or the follower vanished mid-push
        first, grads = got.first, got.tensors
        my_step = ctx.trainer.step
        if first.run_id != ctx.spec.run_id:
            yield _reply(Status.SYNC_STATUS_REJECTED, "wrong run id")
            return
        if self.leader() != ctx.peer_id:
            yield _reply(Status.SYNC_STATUS_NOT_LEADER, "", leader_hint=self.leader())
            return
        if first.step < my_step and first.step not in self.rounds or first.step > my_step + 1:
            ctx.metrics.rejected_messages.labels(reason="stale_step").inc()
            self._excuse(caller)
            yield _reply(Status.SYNC_STATUS_RESYNC, f"step {first.step}, leader at {my_step}")
            return
        rnd = self._round(first.step)
        if not rnd.leader_ready.is_set():
            rnd.early.add(caller)
        try:
            await asyncio.wait_for(rnd.leader_ready.wait(), timeout * 2)
        except asyncio.TimeoutError:
            yield _reply(Status.SYNC_STATUS_TIMEOUT, "leader did not reach this step in time")
            return
        if first.param_hash != rnd.param_hash:
            self._excuse(caller)
            yield _reply(Status.SYNC_STATUS_RESYNC, "parameter hash differs")
            return
        if first.num_samples > 0:
            rnd.add(caller, grads, min(int(first.num_samples), 1 << 20))  # no-op if already closed
        try:
            await asyncio.wait_for(rnd.closed.wait(), timeout * 2)
        except asyncio.TimeoutError:
            yield _reply(Status.SYNC_STATUS_TIMEOUT, "round did not close")
            return
        if rnd.result is None:
            yield _reply(Status.SYNC_STATUS_TIMEOUT, "round closed below the quorum")
            return
        for reply in tensor_messages(rnd.result, lambda chunk: wire.SyncReply(
                status=Status.SYNC_STATUS_OK, step=rnd.step, num_contributors=len(rnd.contributions),
                total_samples=rnd.total_samples, chunk=chunk)):
            yield reply

    def _excuse(self, peer: str) -> None:
        """`peer` was told to resync: it downloads our state instead of contributing, so no open
        round waits `round_timeout_s` for it (it pushes again, at our step, once it has the state)."""
        for rnd in self.rounds.values():
            rnd.excuse(peer)


def _reply(status: int, detail: str, *, leader_hint: str = "") -> wire.SyncReply:
    return wire.SyncReply(status=status, detail=detail, leader_hint=leader_hint)
