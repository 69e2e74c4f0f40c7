"""`gradcode`: synchronous data parallel that never waits for up to s stragglers.

Each step's global batch is cut into n partitions (one per plan member; partition j of step
t is the same batch on every peer). Worker i computes the coded combination of the
partition gradients on its support (strategies/gradcode/codes.py) and sends that one
vector; the step decodes to the exact mean gradient from the first decodable set of
replies, so s late or dead workers cost nothing but their share of redundant compute.

Who decodes: a rotating aggregator, the lowest online peer id (strategies/leader.py); when it
dies, the next one takes over at the next request. One decode means every peer applies the
*same* tensor, so replicas stay bit-identical (independent decodes from different reply sets
would differ in the last bits, and cyclic codes amplify that); each worker still sends one
vector and receives one, like plain data parallel; and no peer is a fixed master.
`GradientCodingStrategy` describes one step, failures, and a moving aggregator role.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import torch
from prometheus_client import Counter, Gauge, Histogram

from swarm_node.protocol import codec
from swarm_node.protocol.messages import gradcode as gc_pb
from swarm_node.protocol.transport import MAX_MESSAGE, PeerUnavailable, drain, first_message
from swarm_node.train.trainer import NonFiniteError

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.base import Strategy
from swarm_node.strategies.gradcode.round import CodedRound, chosen_stragglers, make_plan
from swarm_node.strategies.gradcode.codes import build_code
from swarm_node.strategies.leader import LeaderElection
from swarm_node.protocol.averaging.state_transfer import StateService
from swarm_node.protocol.averaging.star import PushResult, push_tensors, receive_push, tensor_messages
from swarm_node.strategies.gradcode.options import GradcodeOptions
from swarm_node.strategies.page_panel import PagePanel, outcome_counts

ROUND = "gradcode.round"
PUSH = "gradcode.push"
RESULTS_KEPT = 32  # decoded steps kept for peers that replay to catch up
ROLE_CHECK_S = 0.5  # how often a waiting round checks that this peer is still the aggregator
R = gc_pb.CodedRoundReply.Status
P = gc_pb.CodedPushReply.Status
DECODE_OUTCOMES = ("exact", "wait_more", "failed")
STRAGGLER_REASONS = ("late", "missing")
PANEL_DECODES = 12


class StreamEnded(PeerUnavailable):
    """The round stream ended before a result: the aggregator is alive (it answered), so retry
    with it rather than suspecting it (suspicion would send us to another aggregator and fork)."""


class RoundAborted(Exception):
    def __init__(self, status: int, detail: str = "", donor: str = ""):
        super().__init__(f"{R.Name(status)} {detail}".strip())
        self.status, self.detail, self.donor = status, detail, donor


class GradcodeMetrics:
    """The strategy's own series (bounded labels)."""

    def __init__(self, registry) -> None:
        r = registry
        self.redundancy = Gauge("swarm_gradcode_redundancy_ratio", "(s+1)/n of the current plan.", registry=r)
        self.stragglers = Histogram("swarm_gradcode_stragglers", "Plan members not used by a step's decode.",
                                    buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32), registry=r)
        self.decodes = Counter("swarm_gradcode_decodes", "Decode attempts at the aggregator by outcome.",
                               ["outcome"], registry=r)
        for o in DECODE_OUTCOMES:
            self.decodes.labels(outcome=o)
        self.coefficient_max = Gauge("swarm_gradcode_decode_coefficient_max", "max |a| of the last decode.", registry=r)
        self.residual = Gauge("swarm_gradcode_decode_residual", "|a^T B_F - 1|_inf of the last decode.", registry=r)
        self.wait = Histogram("swarm_gradcode_wait_duration_seconds", "Plan to decode, at the aggregator.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.lateness = Histogram("swarm_gradcode_straggler_lateness_seconds",
                                  "How long after the decode a straggler's reply arrived.",
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.straggler_events = Counter("swarm_straggler_events", "Stragglers seen by the aggregator, by reason.",
                                        ["reason"], registry=r)
        for reason in STRAGGLER_REASONS:
            self.straggler_events.labels(reason=reason)
        self.last_stragglers = Gauge("swarm_stragglers", "Stragglers in the last decoded step.", registry=r)
        self.replayed = Counter("swarm_gradcode_replayed_steps", "Steps applied from an existing decode without "
                                "computing (catching up).", registry=r)
        self.skipped_pushes = Counter("swarm_gradcode_skipped_pushes", "Coded gradients not sent because the step "
                                      "decoded first.", registry=r)
        self.injected = Counter("swarm_gradcode_injected_delays", "Straggler delays injected into this peer "
                                "(--straggler-delay-s, for tests and benches).", registry=r)


class GradientCodingStrategy(Strategy):
    """One step, seen from any peer (the aggregator talks to itself through the same code path):
      1. ask the aggregator for step t (with my replica hash): it answers PLAN (members and
         code, fixed for this attempt) or, if t was already decoded, the result at once (a
         peer that fell behind replays results without computing and so catches up);
      2. if I am in the plan, compute my coded gradient and push it; meanwhile keep listening
         on the same stream: when the step decodes without me, a pending (injected) delay is
         abandoned and nothing is pushed;
      3. apply the decoded mean gradient, but only if my replica hash equals the hash of the
         replies it was decoded from; otherwise RESYNC: download state from a donor.
    A round not decodable within `round_timeout_s` fails; its silent members are suspected
    (left out of the next plans for one record lifetime) and everyone retries the step. Plans
    are rebuilt per step from the aggregator's membership view, so the code follows joins and
    leaves at step boundaries.

    When the role moves (the lowest online id changes), the new aggregator may be behind (a
    tolerated straggler, say, while the others went on under the previous one). A request for a
    step past the aggregator's own decodes makes it download that caller's state (the same
    trust as any donor) instead of waiting out a round nobody else is at; requests for older
    steps it never decoded are answered RESYNC at once; and an aggregator that is no longer the
    lowest online id answers its open rounds' waiters NOT_LEADER instead of holding them."""

    name = "gradcode"
    options = GradcodeOptions
    # the aggregator's one decoded tensor per step keeps replicas bit-identical: judged like sync
    churn_profile = ChurnProfile(node_args=("--gc-stragglers", "1"), consistency="param_hash", stop_together=True,
                                 cut_off_holds=True)
    demo_profile = DemoProfile(steps=200, node_args=("--straggler-delay-s", "1", "--straggler-prob", "0.2"),
                               shows="coded gradients: a step decodes without its slowest peer (a straggler held "
                                     "back 1 s on one step in five here)")
    quorum_gated = True

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, node = ctx.options, ctx.node
        self.scheme, self.s, self.code_seed = cfg.gc_scheme, cfg.gc_stragglers, node.seed
        self.election = LeaderElection(ctx, self.name, prefer_progress=True)
        self.state = StateService(ctx.transport, ctx.trainer, ctx.compute, timeout_s=ctx.deadlines.state_download)
        self.rounds: dict[int, CodedRound] = {}
        self.attempts: dict[int, int] = {}
        params = ctx.trainer.parameters_list()
        self._shapes = [tuple(p.shape) for p in params]
        self._numel = sum(p.numel() for p in params)
        self.gm = GradcodeMetrics(ctx.metrics.registry)
        self.last_decode: dict | None = None  # aggregator only: stragglers of the last decode, for /status
        self.max_step_s = 0.0  # longest applied step (request to apply), for summary.json
        self._plan_sizes: set[int] = set()  # group sizes n this peer was planned with
        self._replica_hashes: dict[int, str] = {}  # step (multiple of 10) -> replica hash at its start
        self._applied_at: list[float] = []  # monotonic time of each applied step (wall clock per step)
        # durations of applied steps, split by whether the injection chose a straggler for the step
        self._step_s: dict[bool, list[float]] = {True: [], False: []}
        self._straggled: set[int] = set()  # steps the injection chose a straggler for
        self._quorum_reached = False
        self._last_leader: str | None = None  # for one log line per aggregator change
        self._ahead: tuple[int, str] | None = None  # aggregator: (step, peer) of a caller past my decodes
        self._decodes: list[list] = []  # the page's table: this aggregator's recent decodes

    def page_panel(self) -> PagePanel:
        def count(metric) -> int:
            return int(sum(s.value for fam in metric.collect() for s in fam.samples if s.name.endswith("_total")))
        decodes = {o: int(self.gm.decodes.labels(outcome=o)._value.get()) for o in DECODE_OUTCOMES}
        return PagePanel(
            kind="coded", title="gradient coding",
            facts=[("decodes (as aggregator)", " · ".join(f"{k} {v}" for k, v in decodes.items())),
                   ("stragglers seen", str(count(self.gm.straggler_events))),
                   ("steps replayed while catching up", str(int(self.gm.replayed._value.get()))),
                   ("rounds", outcome_counts(self.round_history[-200:]))],
            columns=["step", "scheme", "s", "members", "stragglers", "wait s"],
            rows=[list(r) for r in self._decodes])

    def summary(self) -> dict:
        value = lambda c: int(c._value.get())  # noqa: E731  (our own counters, no labels)
        gaps = [b - a for a, b in zip(self._applied_at, self._applied_at[1:])]
        steady = sorted(gaps[len(gaps) // 4:])  # skip the start, when peers are still arriving
        return {"skipped_pushes": value(self.gm.skipped_pushes), "replayed_steps": value(self.gm.replayed),
                "injected_delays": value(self.gm.injected), "max_step_duration_s": round(self.max_step_s, 4),
                "median_step_interval_s": round(steady[len(steady) // 2], 4) if steady else None,
                "plan_sizes": sorted(self._plan_sizes),
                "median_step_s_with_straggler": _median(self._step_s[True]),
                "median_step_s_without_straggler": _median(self._step_s[False]),
                "steps_with_straggler": len(self._step_s[True]),
                "straggler_delay_s": self.ctx.options.straggler_delay_s,
                "replica_hashes": {str(k): v for k, v in sorted(self._replica_hashes.items())}}

    @classmethod
    def demo_lines(cls, summaries: list[dict], baseline: dict | None) -> list[str]:
        stats = [s.get("strategy_stats") or {} for s in summaries]
        with_s = [x["median_step_s_with_straggler"] for x in stats if x.get("median_step_s_with_straggler")]
        without = [x["median_step_s_without_straggler"] for x in stats if x.get("median_step_s_without_straggler")]
        delay = max((x.get("straggler_delay_s") or 0.0 for x in stats), default=0.0)
        if not with_s or not without:
            return ["straggler injection: no step with and without a straggler to compare (--straggler-delay-s)"]
        return [f"median step time: {_median(with_s):.3f} s on steps with a straggler held back {delay:g} s, "
                f"{_median(without):.3f} s without (waiting for every peer would add the whole delay)"]

    async def start(self) -> None:
        await self.ctx.transport.add_handler(ROUND, self._rpc_round, gc_pb.CodedRoundRequest, channel="averaging")
        await self.ctx.transport.add_handler(PUSH, self._rpc_push, gc_pb.CodedPush, channel="averaging")
        await self.state.start()

    # ================================================================ every peer: the loop
    async def run(self) -> None:
        ctx = self.ctx
        while not ctx.should_stop() and (ctx.node.max_steps == 0 or ctx.trainer.step < ctx.node.max_steps):
            if not await self.wait_for_peers():
                break
            if not await self._step():
                await asyncio.sleep(0.2)  # no agreed update: retry this step, without spinning
        await self._linger()

    async def _linger(self) -> None:
        """An aggregator that reached --max-steps keeps serving until every member of its last
        decoded step has fetched the result (bounded by the round timeout), so the others do
        not lose the step and fork by decoding it again without it."""
        decoded = [r for r in self.rounds.values() if r.decoded]
        if not decoded:
            return
        last = max(decoded, key=lambda r: r.step)
        deadline = time.monotonic() + min(self.ctx.deadlines.gather, self.ctx.node.shutdown_grace_s)

        def waiting() -> set[str]:  # live peers (plan members or not) that still lack the last step
            live = {m.peer_id for m in self.election.peers() if m.record.state != "leaving"}
            return (live | set(last.plan.members)) - last.fetched - {self.ctx.peer_id}

        while waiting() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def _step(self) -> bool:
        ctx, me = self.ctx, self.ctx.peer_id
        step, leader = ctx.trainer.step, self.election.leader()
        if leader != self._last_leader:
            ctx.log.info("step %d: aggregator is %s%s", step, leader[-8:], " (me)" if leader == me else "")
            self._last_leader = leader
        t0 = time.perf_counter()
        my_hash = await ctx.compute(ctx.trainer.param_hash)
        if step % 10 == 0:  # a sparse log of (step, replica) for consistency checks after the run
            self._replica_hashes[step] = my_hash
            for old in sorted(self._replica_hashes)[:-64]:
                del self._replica_hashes[old]
        request = gc_pb.CodedRoundRequest(run_id=ctx.spec.run_id, step=step, param_hash=my_hash)
        replies = (self._serve_round(request, me) if leader == me else
                   ctx.transport.call(leader, ROUND, [request], gc_pb.CodedRoundReply,
                                      timeout_s=ctx.deadlines.star_reply, channel="averaging"))
        reader = _ResultReader(replies, self._shapes, self._numel)
        computed, planned = None, False
        try:
            first = await reader.first()
            planned = first.status == R.CODED_PLAN
            if planned:
                update, computed = await self._work(first, reader, leader, step, my_hash)
            else:
                update = await reader.result(first)
                self.gm.replayed.inc()
        except RoundAborted as e:
            return await self._aborted(e, leader, step, time.perf_counter() - t0)
        except PeerUnavailable as e:
            ctx.log.warning("step %d: aggregator %s unavailable (%s); retrying", step, leader[-8:], e)
            if not isinstance(e, StreamEnded):
                self.election.suspect(leader)
            self._account("timeout" if e.timed_out else "error", 0, time.perf_counter() - t0, leader)
            return False
        except codec.CodecError as e:
            ctx.metrics.rejected_messages.labels(reason=e.reason).inc()
            ctx.log.warning("step %d: aggregator's result rejected: %s", step, e)
            self.election.suspect(leader)
            self._account("error", 0, time.perf_counter() - t0, leader)
            return False
        except NonFiniteError as e:
            ctx.metrics.rejected_messages.labels(reason="non_finite").inc()
            ctx.log.warning("step %d: coded gradient not finite, not sent: %s", step, e)
            return False
        try:
            await ctx.compute(ctx.trainer.apply_gradients, update)
        except NonFiniteError as e:
            ctx.metrics.rejected_messages.labels(reason="non_finite").inc()
            ctx.log.warning("decoded update for step %d not applied: %s", step, e)
            return False
        elapsed = time.perf_counter() - t0
        self.max_step_s = max(self.max_step_s, elapsed)
        self._applied_at.append(time.monotonic())
        if len(self._step_s[step in self._straggled]) < 100_000:
            self._step_s[step in self._straggled].append(elapsed)
        self._straggled.discard(step)
        ctx.log.debug("applied step %d (from replica %s) decoded by %s from %d replies%s", step, my_hash, leader[-8:],
                      len(reader.decoded_from), "" if computed is not None else " (replayed)")
        if computed is not None:
            self.record_step(computed.num_samples, computed.loss, elapsed)
        else:
            ctx.metrics.local_step.set(ctx.trainer.step)
        self._account("ok", len(reader.decoded_from), elapsed, leader, n=len(reader.members))
        self.note_committed(len(reader.members))
        # Those whose replies made this step are online, even before their records say so:
        # without this a follower that went online first would take itself for the aggregator.
        self.election.mark_committed([leader, *(reader.members[i] for i in reader.decoded_from
                                                if i < len(reader.members))])
        if planned:  # a replayed step means I am still behind: leading now would stall the swarm on my step
            await self._go_online()
        await ctx.on_step()
        return True

    async def _go_online(self) -> None:
        """Eligible as aggregator from now on: called once a step that was planned (not replayed)
        has been applied, i.e. this peer is at the swarm's newest step. A joiner that went online
        while still replaying would, with the lowest id, become the aggregator of a step the
        others finished long ago, and every round would wait out the timeout. Safe for a peer
        whose replica is stale: the aggregator decodes only from replies of one replica, and its
        own request is checked against that replica's hash like anyone else's."""
        if self.ctx.progress.state != "online":
            self.ctx.progress.state = "online"
            await self.ctx.peers.announce("online")

    async def _work(self, plan_msg, reader: "_ResultReader", leader: str, step: int, my_hash: str):
        """Compute and push my coded gradient (if the plan has me) while waiting for the result."""
        ctx, me = self.ctx, self.ctx.peer_id
        members = tuple(plan_msg.members)
        self._plan_sizes.add(len(members))
        code = build_code(plan_msg.scheme, len(members), plan_msg.stragglers, plan_msg.code_seed)
        self.gm.redundancy.set(code.redundancy)
        result = asyncio.ensure_future(reader.result())
        try:
            if me not in members:
                return await result, None
            worker = members.index(me)
            computed = await ctx.compute(ctx.trainer.compute_coded_gradients, step, code.support(worker))
            delay = self._injected_delay(step, members)
            if delay > 0:
                await asyncio.wait({result}, timeout=delay)  # a real wait, abandoned if the step decodes
            if result.done():
                self.gm.skipped_pushes.inc()
            else:
                await self._push(leader, plan_msg.plan_id, worker, step, my_hash, computed.grads)
            return await result, computed
        finally:
            if not result.done():
                result.cancel()

    def _injected_delay(self, step: int, members: tuple[str, ...]) -> float:
        cfg, node = self.ctx.options, self.ctx.node
        if cfg.straggler_delay_s <= 0:
            return 0.0
        chosen = chosen_stragglers(node.seed, step, members, cfg.straggler_count, cfg.straggler_prob)
        if chosen:  # the step has a straggler, whoever it is: its time counts apart (summary)
            if len(self._straggled) > 10_000:  # steps chosen but never applied (aborted rounds)
                self._straggled.clear()
            self._straggled.add(step)
        if self.ctx.peer_id not in chosen:
            return 0.0
        self.gm.injected.inc()
        return cfg.straggler_delay_s

    async def _push(self, leader: str, plan_id: str, worker: int, step: int, my_hash: str,
                    grads: list[torch.Tensor]) -> None:
        ctx = self.ctx
        grads = [g.detach().cpu() for g in grads]
        if leader == ctx.peer_id:
            status, detail = self._accept(plan_id, worker, step, my_hash, grads, ctx.peer_id)
        else:
            pushes = tensor_messages(grads, lambda chunk: gc_pb.CodedPush(
                plan_id=plan_id, worker=worker, step=step, param_hash=my_hash, num_tensors=len(grads), chunk=chunk))
            try:
                answer = await push_tensors(ctx.transport, leader, PUSH, pushes, gc_pb.CodedPushReply,
                                            timeout_s=ctx.deadlines.coded_partial, is_ok=lambda r: True)
            except PeerUnavailable as e:
                ctx.log.warning("step %d: push to %s failed: %s", step, leader[-8:], e)
                return
            status, detail = (answer.reply.status, answer.reply.detail) if answer.reply is not None else \
                (P.PUSH_REJECTED, "no reply")
        if status not in (P.PUSH_ACCEPTED, P.PUSH_LATE):
            ctx.log.warning("step %d: aggregator answered %s %s", step, P.Name(status), detail)

    async def _aborted(self, e: RoundAborted, leader: str, step: int, elapsed: float) -> bool:
        ctx = self.ctx
        if e.status == R.CODED_RESYNC:
            await self._resync(e.donor or leader, e.detail)
            self._account("resync", 0, elapsed, leader)
        elif e.status == R.CODED_NOT_LEADER:
            ctx.log.info("step %d: %s is not the aggregator (hint %s)", step, leader[-8:], e.detail[-8:])
            if e.detail == ctx.peer_id:
                await self._go_online()  # the others count on me: take the role (my replica is checked anyway)
            self._account("error", 0, elapsed, leader)
        else:
            ctx.log.warning("step %d: round %s", step, e)
            self._account("timeout" if e.status == R.CODED_FAILED else "error", 0, elapsed, leader)
        return False

    async def _resync(self, donor: str, why: str) -> None:
        ctx = self.ctx
        if donor == ctx.peer_id:
            return
        ctx.log.info("replica differs from the swarm (%s): downloading state from %s", why, donor[-8:])
        step = await self.state.adopt(donor, ctx.metrics, ctx.log)
        if step is None:
            if self._ahead is not None and self._ahead[1] == donor:
                self._ahead = None  # that peer cannot serve its state: back to plain rounds, not a loop
            return
        self._caught_up(step)
        ctx.log.info("resynchronised to step %d", step)

    def _account(self, outcome: str, size: int, duration_s: float, leader: str, n: int | None = None) -> None:
        """size = the replies the step was decoded from; n = the plan's group size, when this
        peer worked from a plan. The aggregator adds who straggled in its latest decode."""
        decode = self.last_decode if leader == self.ctx.peer_id else None
        self.record_round(outcome, size, duration_s, step=self.ctx.trainer.step, aggregator=leader,
                          **(decode or {}), **({"n": n} if n else {}))

    # ================================================================ the aggregator
    def _members(self) -> list[str]:
        """Every live peer of the run not suspected, joiners included: a joiner that is still
        catching up just counts as one of the s stragglers, while leaving it out would change
        n (and so the step's data) until its record says online."""
        live = {m.peer_id for m in self.election.peers() if m.record.state != "leaving"}
        return sorted((live - self.election.live_suspects()) | {self.ctx.peer_id})

    async def _quorum(self, timeout_s: float) -> bool:
        """Plans are made only once the aggregator itself sees `--min-peers` (so the first
        plans do not miss peers whose records are still on their way)."""
        deadline = time.monotonic() + timeout_s
        while len(self.ctx.peers.others()) + 1 < self.ctx.node.min_peers and not self._quorum_reached:
            if time.monotonic() > deadline or self.ctx.should_stop():
                return False
            await asyncio.sleep(0.1)
        self._quorum_reached = True
        return True

    def _round_for(self, step: int) -> CodedRound | None:
        """The live round of `step`, created on first touch; None if `step` is too old."""
        rnd = self.rounds.get(step)
        if rnd is not None and not rnd.failed:
            return rnd
        newest = self._newest_decoded()
        if newest is not None and step < newest.step - RESULTS_KEPT or (rnd is None and self.rounds
                                                                         and step < min(self.rounds)):
            return None
        if rnd is None and step < self.ctx.trainer.step:  # decoded by an earlier aggregator, not by me
            return None
        attempt = self.attempts.get(step, 0) + 1
        self.attempts[step] = attempt
        plan = make_plan(step, attempt, self._members(), self.scheme, self.s, self.code_seed)
        rnd = self.rounds[step] = CodedRound(plan, self.ctx.deadlines.gather,
                                             min_replies=self.quorum_counts()[1])
        for old in [k for k in self.rounds if k < max(self.rounds) - RESULTS_KEPT]:
            self._forget(self.rounds.pop(old))
            self.attempts.pop(old, None)
        return rnd

    def _forget(self, rnd: CodedRound) -> None:
        if rnd.decoded:
            self.gm.straggler_events.labels(reason="missing").inc(len(rnd.silent()))

    def _newest_decoded(self) -> CodedRound | None:
        decoded = [r for r in self.rounds.values() if r.decoded]
        return max(decoded, key=lambda r: r.step) if decoded else None

    def _donor(self, caller: str) -> str:
        """A peer whose reply made the newest decode (so it holds the agreed replica, at that
        step or later), not the caller; the aggregator itself only if it has applied that step
        (it may lag behind the rounds it serves)."""
        newest = self._newest_decoded()
        if newest is None:
            return self.ctx.peer_id
        used = [newest.plan.members[i] for i in sorted(newest.decoding.coefficients)]
        me_current = self.ctx.trainer.step > newest.step
        for peer in used:
            if peer != caller and (peer != self.ctx.peer_id or me_current):
                return peer
        return self.ctx.peer_id if me_current or not used else used[0]

    async def _serve_round(self, req: gc_pb.CodedRoundRequest, caller: str) -> AsyncIterator[gc_pb.CodedRoundReply]:
        ctx = self.ctx
        if req.run_id != ctx.spec.run_id:
            yield gc_pb.CodedRoundReply(status=R.CODED_REJECTED, detail="wrong run id")
            return
        leader = self.election.leader()
        if leader != ctx.peer_id:
            yield gc_pb.CodedRoundReply(status=R.CODED_NOT_LEADER, leader_hint=leader, detail=leader)
            return
        if not await self._quorum(ctx.deadlines.gather):
            yield gc_pb.CodedRoundReply(status=R.CODED_FAILED, detail="the aggregator is still waiting for peers")
            return
        if caller != ctx.peer_id:
            self._note_ahead(req.step, caller)
        elif (donor := self._ahead_of(req.step)) is not None:
            yield gc_pb.CodedRoundReply(status=R.CODED_RESYNC, donor=donor,
                                        detail=f"the swarm is at step {self._ahead[0]}, past my decodes")
            return
        rnd = self._round_for(req.step)
        if rnd is None:
            ctx.metrics.rejected_messages.labels(reason="stale_step").inc()
            yield gc_pb.CodedRoundReply(status=R.CODED_RESYNC, donor=self._donor(caller),
                                        detail=f"step {req.step} is not among the decodes kept")
            return
        if not rnd.decoded:
            plan = rnd.plan
            yield gc_pb.CodedRoundReply(status=R.CODED_PLAN, step=plan.step, plan_id=plan.plan_id,
                                        members=list(plan.members), scheme=plan.code.scheme,
                                        stragglers=plan.code.s, code_seed=plan.seed)
            moved_to = await self._wait_round(rnd)
            if moved_to is not None:
                yield gc_pb.CodedRoundReply(status=R.CODED_NOT_LEADER, leader_hint=moved_to, detail=moved_to)
                return
        if rnd.overtaken:
            yield gc_pb.CodedRoundReply(status=R.CODED_RESYNC,
                                        donor=self._ahead_of(ctx.trainer.step) or self._donor(caller),
                                        detail=f"step {rnd.step} was overtaken by the swarm")
            return
        if rnd.failed:
            newer = any(k > rnd.step and r.decoded for k, r in self.rounds.items())
            yield gc_pb.CodedRoundReply(status=R.CODED_RESYNC if newer else R.CODED_FAILED, donor=self._donor(caller),
                                        detail=f"step {rnd.step} not decodable in {rnd.timeout_s:.0f}s")
            return
        if req.param_hash != rnd.result_hash:
            yield gc_pb.CodedRoundReply(status=R.CODED_RESYNC, donor=self._donor(caller),
                                        detail=f"replica hash differs at step {rnd.step}")
            return
        if rnd.encoded is None:
            rnd.encoded = list(codec.tensors_to_chunks(rnd.result, codec.NONE, MAX_MESSAGE))
        rnd.fetched.add(caller)
        used = sorted(rnd.decoding.coefficients)
        for k, chunk in enumerate(rnd.encoded):
            yield gc_pb.CodedRoundReply(status=R.CODED_DECODED, step=rnd.step, plan_id=rnd.plan.plan_id,
                                        num_tensors=len(rnd.result) if k == 0 else 0,
                                        decoded_from=used if k == 0 else [], chunk=chunk)

    async def _wait_round(self, rnd: CodedRound) -> str | None:
        """Wait until `rnd` is done (decoded, failed at its deadline, or overtaken); or return
        the new aggregator if the role moved meanwhile (a lower id went online): its waiters,
        me included, must not sit out the deadline on a round the others no longer push to."""
        deadline = rnd.created + rnd.timeout_s
        while not rnd.done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(rnd)
                break
            try:
                await asyncio.wait_for(rnd.done.wait(), min(left, ROLE_CHECK_S))
            except asyncio.TimeoutError:
                leader = self.election.leader()
                if leader != self.ctx.peer_id and not rnd.done.is_set():
                    return leader
        return None

    def _note_ahead(self, step: int, caller: str) -> None:
        """A caller at a step past mine whose previous step I never decoded went on under another
        aggregator: I took this role while behind (a straggler with the lowest id, say). Then
        my own waiting round can never decode; it is overtaken, and my next request downloads
        the caller's state instead (`_caught_up` then releases whoever waits on older steps)."""
        before = self.rounds.get(step - 1)
        if step <= self.ctx.trainer.step or (before is not None and before.decoded):
            return
        if self._ahead is None or step > self._ahead[0]:
            self.ctx.log.info("step %d: %s is past my decodes; catching up from it", step, caller[-8:])
            self._ahead = (step, caller)
        mine = self.rounds.get(self.ctx.trainer.step)
        if mine is not None:
            mine.overtake()

    def _ahead_of(self, step: int) -> str | None:
        """The caller noted past my decodes, if it is beyond `step`: the donor to catch up from."""
        return self._ahead[1] if self._ahead is not None and self._ahead[0] > step else None

    def _caught_up(self, step: int) -> None:
        """After a state download to `step`: undecoded rounds of older steps will never decode."""
        if self._ahead_of(step) is None:
            self._ahead = None
        for k, rnd in self.rounds.items():
            if k < step:
                rnd.overtake()

    def _fail(self, rnd: CodedRound) -> None:
        if rnd.failed or rnd.decoded:
            return
        rnd.fail()
        self.gm.decodes.labels(outcome="failed").inc()
        silent = rnd.silent()
        for peer in silent:
            self.election.suspect(peer)
        self.ctx.log.warning("step %d not decodable before the deadline; silent: %s", rnd.step,
                             ", ".join(p[-8:] for p in silent) or "none")

    def _accept(self, plan_id: str, worker: int, step: int, param_hash: str, grads: list[torch.Tensor],
                caller: str) -> tuple[int, str]:
        rnd = self.rounds.get(step)
        if rnd is None or rnd.plan.plan_id != plan_id:
            return P.PUSH_UNKNOWN_PLAN, f"no plan {plan_id} for step {step}"
        if not 0 <= worker < len(rnd.plan.members) or rnd.plan.members[worker] != caller:
            self.ctx.metrics.rejected_messages.labels(reason="malformed").inc()
            return P.PUSH_REJECTED, f"worker {worker} of this plan is not {caller[-8:]}"
        was_decoded = rnd.decoded
        outcome = rnd.add(worker, param_hash, grads)
        if outcome == "late":
            self.gm.lateness.observe(rnd.late[worker])
            self.gm.straggler_events.labels(reason="late").inc()
            return P.PUSH_LATE, "decoded without it"
        if outcome == "failed":
            return P.PUSH_UNKNOWN_PLAN, "the round failed"
        if rnd.decoded and not was_decoded:
            self._decoded(rnd)
        return P.PUSH_ACCEPTED, ""

    def _decoded(self, rnd: CodedRound) -> None:
        gm, dec = self.gm, rnd.decoding
        gm.decodes.labels(outcome="exact").inc()
        if rnd.refused_decodes:
            gm.decodes.labels(outcome="wait_more").inc(rnd.refused_decodes)
        stragglers = rnd.stragglers()
        gm.stragglers.observe(len(stragglers))
        gm.last_stragglers.set(len(stragglers))
        gm.coefficient_max.set(dec.max_coefficient)
        gm.residual.set(dec.residual)
        gm.wait.observe(rnd.decoded_at - rnd.created)
        used = [rnd.plan.members[i] for i in sorted(dec.coefficients)]
        self.election.mark_committed(used)
        if self.ctx.progress.state != "online":  # the others now count on me as the aggregator
            self.ctx.progress.state = "online"
            self._announcing = asyncio.ensure_future(self.ctx.peers.announce("online"))
        self.last_decode = {"s": rnd.plan.code.s, "scheme": rnd.plan.code.scheme,
                            "stragglers": [p[-8:] for p in stragglers],
                            "wait_s": round(rnd.decoded_at - rnd.created, 4)}
        self._decodes.append([rnd.step, rnd.plan.code.scheme, rnd.plan.code.s, len(rnd.plan.members),
                              " ".join(p[-8:] for p in stragglers), self.last_decode["wait_s"]])
        del self._decodes[:-PANEL_DECODES]

    # ---------------------------------------------------------------- RPC handlers
    async def _rpc_round(self, requests: AsyncIterator[gc_pb.CodedRoundRequest],
                         caller: str) -> AsyncIterator[gc_pb.CodedRoundReply]:
        timeout = self.ctx.deadlines.request
        req = await first_message(requests, timeout)
        if req is None:
            return
        await drain(requests, timeout)  # the caller is done writing before we answer
        async for reply in self._serve_round(req, caller):
            yield reply

    async def _rpc_push(self, requests: AsyncIterator[gc_pb.CodedPush], caller: str) -> AsyncIterator[gc_pb.CodedPushReply]:
        ctx = self.ctx
        got = await receive_push(requests, timeout_s=ctx.deadlines.request, shapes=self._shapes,
                                 on_reject=lambda reason: ctx.metrics.rejected_messages.labels(reason=reason).inc())
        if got.result is PushResult.REJECTED:
            ctx.log.warning("rejected coded gradient from %s: %s", caller[-8:], got.error)
            yield gc_pb.CodedPushReply(status=P.PUSH_REJECTED, detail=str(got.error))
            return
        if got.result is not PushResult.OK:
            return  # nothing arrived, or the worker vanished mid-push: it is a straggler
        first, grads = got.first, got.tensors
        status, detail = self._accept(first.plan_id, first.worker, first.step, first.param_hash, grads, caller)
        yield gc_pb.CodedPushReply(status=status, detail=detail)


class _ResultReader:
    """Reads one CodedRound reply stream: the first message, then the decoded result."""

    def __init__(self, replies: AsyncIterator[gc_pb.CodedRoundReply], shapes, numel: int):
        self._replies, self._shapes, self._numel = replies.__aiter__(), shapes, numel
        self.members: list[str] = []  # the plan's members, when the stream started with a PLAN
        self.decoded_from: list[int] = []

    async def _next(self) -> gc_pb.CodedRoundReply:
        try:
            return await self._replies.__anext__()
        except StopAsyncIteration:
            raise StreamEnded("the aggregator closed the round stream early") from None

    async def first(self) -> gc_pb.CodedRoundReply:
        msg = await self._next()
        if msg.status not in (R.CODED_PLAN, R.CODED_DECODED):
            raise RoundAborted(msg.status, msg.detail or msg.leader_hint, msg.donor)
        self.members = list(msg.members)
        return msg

    async def result(self, first: gc_pb.CodedRoundReply | None = None) -> list[torch.Tensor]:
        msg = first if first is not None else await self._next()
        if msg.status != R.CODED_DECODED:
            raise RoundAborted(msg.status, msg.detail, msg.donor)
        if msg.num_tensors != len(self._shapes):
            raise codec.CodecError("bad_shape", f"{msg.num_tensors} tensors, model has {len(self._shapes)}")
        self.decoded_from = list(msg.decoded_from)
        assembler = codec.ChunkAssembler.for_shapes(self._shapes)
        assembler.add(msg.chunk)
        while not assembler.complete:
            msg = await self._next()
            if msg.status != R.CODED_DECODED:
                raise RoundAborted(msg.status, msg.detail, msg.donor)
            assembler.add(msg.chunk)
        return assembler.result()


def _median(values: list[float]) -> float | None:
    return round(sorted(values)[len(values) // 2], 4) if values else None
