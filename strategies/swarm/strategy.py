"""`swarm`: SWARM pipeline parallelism over real peers, with CheckFree stage recovery.

The GPT is cut into S stages (node/train/model.py split_stages). Every peer serves one stage;
stage-0 peers also act as trainers: they hold the data, run stage 0 locally and drive
micro-batches through *temporary pipelines* chosen per call by stochastic wiring
(strategies/swarm/router.py). Servers are stateless (a backward re-sends its inputs), so any
replica of a stage can run any call; failed calls go to another replica; replicas of a stage
average their weights periodically; a stage that lost every replica is rebuilt from its
neighbours (strategies/swarm/checkfree.py); peers rebalance towards the stage of least
capacity. `SwarmStrategy` states the invariants of each of these parts.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import AsyncIterator

import torch
import torch.nn.functional as F

from swarm_node.protocol import codec
from swarm_node.protocol.averaging.butterfly import ButterflyAllReduce
from swarm_node.protocol.transport import PeerUnavailable, drain, first_message

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.base import Strategy
from swarm_node.strategies.page_panel import PagePanel, short_peer
from swarm_node.protocol.averaging.transaction import averaging_layer, group_digest
from swarm_node.strategies.swarm.checkfree import CheckFreeConfig, NotRecoverable, RecoveryPlan, is_body_key, plan_recovery, rebuild_state, \
    stage_route, swapped_pairs
from swarm_node.strategies.swarm.metrics import SwarmMetrics
from swarm_node.strategies.swarm.rebalance import choose_start_stage, designated_mover, rebalance_target, recovery_targets
from swarm_node.strategies.swarm.router import BACKWARD_COST, NoPeers, StageRouter
from swarm_node.strategies.swarm.stage import StageWorker
from swarm_node.strategies.swarm.staging import staging_of, why_not_staged
from swarm_node.strategies.swarm.wire import COMPRESSIONS, Op, StageRecord, Status, encode_reply, encode_request, read_reply, \
    read_request, request_part, stage_key
from swarm_node.strategies.swarm.options import SwarmOptions

METHOD = "swarm.stage"
EDGE_PREFIX = "edge_copy."  # STATE reply keys of the next stage's head, held by stage S-2
MAX_QUEUE = 64
MICROBATCH_DEADLINE_S = 120.0
EVAL_BATCHES = 8  # held-out batches per evaluation, as the local trainer uses
RECOVERY_FETCH_ATTEMPTS = 3  # reads of a lost stage's neighbours, an announce interval apart
HYSTERESIS = 0.20  # upper end of the usual 0.05-0.25: CPU timings on a shared box are noisy
SERVE_EMA_ALPHA = 0.05


@dataclass
class StageView:
    peers: dict[str, tuple[StageRecord, float]]  # peer id -> (record, expiration)

    def online(self) -> dict[str, tuple[StageRecord, float]]:
        return {p: v for p, v in self.peers.items() if v[0].state != "leaving"}


class SwarmStrategy(Strategy):
    """The invariants the strategy keeps:

    * Discovery: each peer announces a `StageRecord` (stage, throughput, queue, step, last
      grad norm) under swarm/{run}/stage/{k}, subkey = its peer id, with the node's record
      TTL; it re-reads every stage's key each announce interval. A peer that stops
      announcing drops out when its record expires.
    * Stateless servers: a FORWARD returns the stage's outputs and keeps nothing; a BACKWARD
      carries the stage's inputs again, recomputes the forward, backpropagates, accumulates
      and returns the input gradients. The trainer keeps each stage's inputs until that
      stage's backward succeeded, so any replica can run it.
    * Failover: every call goes to the router's pick; a timeout, error, rejection or
      wrong-stage answer re-sends it to another replica of the same stage (errors ban the
      peer until its record expires). While a stage has no live peer the call waits (DHT
      re-read every 0.5 s) up to `MICROBATCH_DEADLINE_S`: a micro-batch is lost only if a
      stage stays empty that long, and that is counted.
    * Replica sync: replicas of a stage apply their own optimizer steps (one per
      --micro-batches backwards) and every --stage-average-interval-s (a DHT-clock epoch)
      average their weights with the shared butterfly all-reduce (protocol/averaging/butterfly.py), the
      group being the stage's online replicas in this peer's view; a round left incomplete by
      differing views falls back to a 50/50 mix with one random replica (pull gossip).
      Between rounds replicas differ; a cross-replica backward is exact only between identical
      replicas (see tests/unit/test_swarm_units.py), as in SWARM between averaging rounds.
    * Recovery (CheckFree, strategies/swarm/checkfree.py): a stage with no live peer in two
      consecutive reads is lost. The designated mover (lowest peer id of the most-populated
      non-trainer stage with >= 2 peers, so no stage is stranded) fetches its neighbours'
      weights and grad norms, rebuilds the stage, starts a fresh optimizer at lr x
      --checkfree-lr-scale and announces it. A peer that joins with --stage auto and finds a
      stage empty does the same. The last stage is rebuilt by copying stage S-2's body plus
      the copy of the last stage's ln_f/head that stage-S-2 peers keep (refreshed every
      averaging interval). Without --checkfree-swaps that is a naive copy (stage S-2 never
      trained the last role); with it it is CheckFree+'s copy of the swap partner. Stage 0
      (the trainers) is never rebuilt.
    * CheckFree+ swaps (--checkfree-swaps, part of the run spec, default off): odd micro-batches
      (counted over the trainer's run, step x M + m) run the bodies of stages 0<->1 and
      S-2<->S-1 in swapped order (checkfree.body_order; with S == 3 the pairs alternate). The
      trainer routes it (checkfree.stage_route): a swapped last pair is ... -> body(S-1) ->
      body(S-2) -> head(S-1), two calls to stage S-1 with `part` BODY and HEAD; a swapped first
      pair runs embed(0) -> body(1) -> body(0) on the trainer itself. Each call keeps the
      failover and replay rules above (a part-wise backward re-sends that part's inputs). Off,
      every call is a FULL one and no message carries a `part`.
    * Rebalancing: at random times in [0, 2T] (T = --rebalance-interval-s) a peer of a
      non-trainer stage with >= 2 peers considers moving itself to the stage of least
      capacity; it moves only if the sorted capacity vector improves by more than 20 % at its
      first changed position (hysteresis, strategies/swarm/rebalance.py) and only the lowest
      peer id of its stage may move in one check; it downloads the target stage's weights
      from a replica first. Nobody decides while the view is unsettled: after any change of
      who serves which stage, checks wait two record lifetimes (a move is seen everywhere
      before the next one is weighed), which is what stops stale views from oscillating."""

    name = "swarm"
    options = SwarmOptions
    # 3 stages of one layer; stage-0 peers train, so only the trainers' training loss means
    # anything, and replicas of a stage differ between gossip rounds. Rebalancing is off so the
    # churn, not a move, decides who serves what. With 4 peers for 3 stages, after the kill and
    # the drain a stage stays empty until the restart, which must take it (not become a trainer).
    churn_profile = ChurnProfile(node_args=("--n-layer", "3", "--stages", "3", "--micro-batches", "2", "--d-model",
                                            "32", "--rebalance-interval-s", "0"), loss="train")
    demo_profile = DemoProfile(steps=200, shows="the model cut into pipeline stages served by different peers; "
                                                "trainers send micro-batches through them")
    role = "stage"

    @classmethod
    def check_model(cls, module, options) -> str:
        return why_not_staged(module, options.stages)

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, spec = ctx.options, ctx.spec
        self.S = cfg.stages
        self.staging = staging_of(ctx.trainer.model, spec, self.S)
        self.model_cfg = self.staging.cfg
        self.compression = COMPRESSIONS[cfg.act_compression]
        self.swaps = bool(getattr(spec, "checkfree_swaps", False))  # CheckFree+ swap schedule (run spec: the same on every peer)
        self.cf = CheckFreeConfig(lr_scale=cfg.checkfree_lr_scale, swaps=self.swaps)
        self.sm = SwarmMetrics(ctx.metrics.registry, self.S)
        for outcome in ("ok", "failed"):  # exported at 0 from the start, for dashboards and alerts
            ctx.metrics.recoveries.labels(kind="checkfree_stage", outcome=outcome)
        self.worker: StageWorker | None = None
        self.serving = False  # answering FORWARD/BACKWARD for worker.index
        self.queue = 0
        self.serve_ema = 0.0  # seconds per sample on this server
        self.views: list[StageView] = [StageView({}) for _ in range(self.S)]
        self.empty_reads = [0] * self.S
        self.ever_seen = [False] * self.S
        self.routers = [StageRouter(initial_cost_s=0.005) for _ in range(self.S)]
        self.max_numel = self.staging.max_numel
        self.steps = 0
        self.totals = {"microbatches_ok": 0, "microbatches_lost": 0, "retries": 0, "recoveries": 0, "rebalances": 0,
                       "returns": 0}
        self._next_rebalance = None
        self.edge_copy: dict[str, torch.Tensor] | None = None  # stage S-2 only: last stage's ln_f/lm_head
        self._view_shape: tuple = ()
        self._views_changed_at = time.monotonic()  # last change of who serves which stage
        self._tasks: list[asyncio.Task] = []
        self._pending_move: int | None = None  # a trainer chosen to rebuild this stage moves between steps
        # a trainer that moved to rebuild a server stage is on loan: it says so in its record
        # (`trainer`), a --stage auto joiner takes such a stage first, and the trainer goes back
        # to stage 0 once another peer serves it (else the swarm would lose a trainer for good)
        self._on_loan = False
        self._return_reads = 0
        self._own: tuple[int, dict[str, torch.Tensor], float, int, dict[str, torch.Tensor] | None] | None = None
        self._finished = False  # trainer: reached --max-steps and announced so (servers stop on it)
        self.allreduce: ButterflyAllReduce | None = None  # made in start(): it needs the transport
        self._avg_epoch = -1
        self._avg_task: asyncio.Task | None = None
        self._saved: _SavedStage | None = None  # the stage this peer served before a full stop

    # ================================================================ evaluation
    evaluates_itself = True

    async def evaluate(self) -> float | None:
        """A trainer's held-out loss through the pipeline (stage 0 here, the others on their
        servers, whole stages); None on a stage server, or when a stage could not be reached."""
        w, spec = self.worker, self.ctx.spec
        if w is None or w.index != 0 or not self.serving:
            return None
        total, n = 0.0, 0
        try:
            for x, y in self.ctx.trainer.dataset.val_batches(spec.batch_size, spec.seq_len, EVAL_BATCHES):
                h = await self.ctx.compute(w.forward, x, "full")
                for k in range(1, self.S):
                    h = (await self._call(k, Op.STAGE_FORWARD, [h], f"eval.{uuid.uuid4().hex[:6]}"))[1][0]
                total += float(F.cross_entropy(h.float().reshape(-1, h.shape[-1]), y.reshape(-1)))
                n += 1
        except (NoPeers, asyncio.TimeoutError, _Moving) as e:
            self.ctx.log.info("held-out loss through the pipeline not measured: %s", e)
            return None
        return total / n if n else None

    # ================================================================ checkpoint
    def checkpoint_state(self) -> dict | None:
        w = self.worker
        if w is None:
            return None
        keys, tensors = w.state()
        return {"stage": w.index, "stage_keys": keys, "stage_tensors": tensors, "stage_step": w.step,
                "stage_optimizer": w.optimizer.state_dict(), "lr_scale": w.lr_scale, "trainer_steps": self.steps}

    def restore_checkpoint_state(self, state: dict) -> None:
        k = int(state["stage"])
        keys, tensors = list(state["stage_keys"]), list(state["stage_tensors"])
        if not 0 <= k < self.S or len(keys) != len(tensors):
            raise ValueError(f"saved stage {k} does not fit a {self.S}-stage pipeline")
        self._saved = _SavedStage(k, dict(zip(keys, tensors)), int(state["stage_step"]), state.get("stage_optimizer"),
                                  float(state.get("lr_scale", 1.0)))
        self.steps = int(state.get("trainer_steps", 0))

    # ================================================================ lifecycle
    async def start(self) -> None:
        ctx, cfg, node = self.ctx, self.ctx.options, self.ctx.node
        await ctx.transport.add_handler(METHOD, self._rpc, _request_type(), channel="activations")
        # within-stage averaging goes through the butterfly all-reduce the DiLoCo family uses
        self.allreduce = averaging_layer(ctx, timeout_s=min(node.round_timeout_s, 2 * cfg.stage_average_interval_s),
                                         max_numel=self.max_numel)
        await self.allreduce.start()

    async def stop(self) -> None:
        for t in [*self._tasks, *([self._avg_task] if self._avg_task else [])]:
            t.cancel()
        if self.worker is not None and not self._finished:
            await self._announce("leaving", ttl_s=2.0)
        if self.allreduce is not None:
            await self.allreduce.close()

    def status(self) -> dict:
        return {"stage": self.worker.index if self.worker else None, "stage_step": self.worker.step if self.worker
                else 0, "stage_peers": [len(v.online()) for v in self.views], **self.totals}

    def summary(self) -> dict:
        return self.status()

    def page_panel(self) -> PagePanel:
        """One row per stage: who serves it, how fast and how busy, from the stage records."""
        me = self.ctx.peer_id
        rows: list[list] = []
        for k, view in enumerate(self.views):
            online = sorted(view.online().items())
            rows.append([k, len(online), " ".join(short_peer(p) + ("*" if p == me else "") for p, _ in online),
                         round(sum(r.throughput for _, (r, _) in online), 2), sum(r.queue for _, (r, _) in online),
                         max((r.step for _, (r, _) in online), default=0)])
        t = self.totals
        return PagePanel(
            kind="pipeline", title=f"pipeline of {self.S} stages",
            facts=[("this peer", f"stage {self.worker.index}" if self.worker else "no stage yet"),
                   ("micro-batches", f"ok {t['microbatches_ok']} · lost {t['microbatches_lost']} · "
                                     f"re-sent {t['retries']}"),
                   ("stage recoveries", str(t["recoveries"])), ("rebalances", str(t["rebalances"]))],
            columns=["stage", "servers", "peers (* = this one)", "samples/s", "queue", "step"], rows=rows)

    @classmethod
    def demo_lines(cls, summaries: list[dict], baseline: dict | None) -> list[str]:
        by_stage: dict[int, list[str]] = {}
        rates = []
        for s in summaries:
            stats = s.get("strategy_stats") or {}
            if stats.get("stage") is None:
                continue
            by_stage.setdefault(stats["stage"], []).append(str(s.get("peer_id") or "?")[-8:])
            hist = s.get("history") or []
            if stats["stage"] == 0 and len(hist) >= 2 and hist[-1][3] > hist[0][3]:
                rates.append(stats.get("microbatches_ok", 0) / (hist[-1][3] - hist[0][3]))
        stage_map = " | ".join(f"stage {k}{' (trainers)' if k == 0 else ''}: {', '.join(v)}"
                               for k, v in sorted(by_stage.items()))
        lines = [f"stage map at the end: {stage_map or 'none reported'}"]
        if rates:
            lines.append(f"micro-batches through the pipeline: {sum(rates):.1f}/s over {len(rates)} trainer(s); "
                         "held-out loss above is the trainers' own, measured through the stages")
        return lines

    async def run(self) -> str | None:
        ctx = self.ctx
        await self._initial_views()
        stage = await self._choose_stage()
        await self._take_stage(stage, reason="start")
        self._tasks.append(asyncio.ensure_future(self._maintenance()))
        ctx.progress.state = "online"
        last_step = -1
        while not ctx.should_stop():
            if self._pending_move is not None:  # only trainers defer a move to here, between steps
                k, self._pending_move = self._pending_move, None
                await self._take_stage(k, reason="checkfree")
                self.empty_reads[k] = 0
                self._on_loan = self.worker.index != 0
                continue
            if self.worker.index == 0:
                if ctx.node.max_steps and self.steps >= ctx.node.max_steps:
                    await self._finish()
                    break
                await self._train_step()
            else:
                if ctx.node.max_steps and self._trainers_done(ctx.node.max_steps):
                    ctx.log.info("every trainer finished (--max-steps %d): stage %d server stops",
                                 ctx.node.max_steps, self.worker.index)
                    return f"every trainer finished (--max-steps {ctx.node.max_steps})"
                await asyncio.sleep(0.2)
                if self.worker.step != last_step:  # a server's step is its stage replica's
                    last_step = self.worker.step
                    ctx.trainer.align_step(self.worker.step)
                    ctx.metrics.local_step.set(self.worker.step)
                    await ctx.on_step()

    async def _finish(self) -> None:
        """A trainer at --max-steps: stop upkeep (no more "online" records) and announce LEAVING
        with its final step for a whole record lifetime, so that every stage server sees it
        within one announce interval (servers stop on `_trainers_done`)."""
        for t in self._tasks:
            t.cancel()
        self._finished = True
        await self._announce("leaving")

    def _trainers_done(self, max_steps: int) -> bool:
        """No trainer is online any more, and one left announcing a step >= max_steps. A trainer
        that just vanished (killed, partitioned) below max_steps is not "done": it may come back."""
        v = self.views[0]
        if v.online():
            return False
        return any(rec.state == "leaving" and rec.step >= max_steps for rec, _ in v.peers.values())

    # ================================================================ DHT
    def _record(self, state: str) -> StageRecord:
        w = self.worker
        thr = 1.0 / self.serve_ema if self.serve_ema > 0 else 0.0
        # a trainer announces its training step (what --max-steps counts), a server its replica's step
        step = self.steps if w.index == 0 else w.step
        return StageRecord(self.ctx.peer_id, w.index, state, min(thr, 1e8), self.queue, step,
                           float(w.last_grad_norm or 0.0), w.index == 0 or self._on_loan)

    async def _announce(self, state: str = "online", ttl_s: float | None = None) -> None:
        if self.worker is None:
            return
        await self.ctx.records.publish(stage_key(self.ctx.spec.run_id, self.worker.index),
                                       self._record(state).to_wire(),
                                       ttl_s=ttl_s if ttl_s is not None else self.ctx.node.ttl_s)

    async def _refresh_views(self, only: int | None = None) -> None:
        from swarm_node.protocol.clock import swarm_time

        now = swarm_time()
        decode = partial(_decode_stage_record, num_stages=self.S)
        for k in range(self.S) if only is None else [only]:
            entries = await self.ctx.records.read(stage_key(self.ctx.spec.run_id, k), decode, now=now)
            peers = {e.record.peer_id: (e.record, e.expires_at) for e in entries.values() if e.record.stage == k}
            if self.worker is not None and self.worker.index == k and self.serving:
                peers[self.ctx.peer_id] = (self._record("online"), now + self.ctx.node.ttl_s)
            self.views[k] = StageView(peers)
            online = self.views[k].online()
            self.routers[k].update({p: (exp, rec.throughput) for p, (rec, exp) in online.items()
                                    if p != self.ctx.peer_id})
            self.empty_reads[k] = 0 if online else self.empty_reads[k] + 1
            self.ever_seen[k] = self.ever_seen[k] or bool(online)
            self.sm.stage_peers.labels(stage=str(k)).set(len(online))
            self.sm.capacity.labels(stage=str(k)).set(sum(r.throughput for r, _ in online.values()))
        if only is None:
            shape = tuple(tuple(sorted(v.online())) for v in self.views)
            if shape != self._view_shape:
                self._view_shape, self._views_changed_at = shape, time.monotonic()
        caps = [max(sum(r.throughput for r, _ in v.online().values()), 1e-9) for v in self.views]
        loads = [sum(r.queue for r, _ in v.online().values()) / c for v, c in zip(self.views, caps)]
        mean = sum(loads) / len(loads) if loads else 0.0
        for k, ld in enumerate(loads):
            self.sm.load_ratio.labels(stage=str(k)).set(ld / mean if mean > 0 else 1.0)

    # ================================================================ stage choice / moves
    async def _initial_views(self) -> None:
        """Read every stage before choosing one. A joiner whose first read finds no stage at all
        (DHT not bootstrapped yet, a dial to a dead peer timing out) would pick stage 0 as
        "empty" and become a trainer: so unless it started the swarm it re-reads for one record
        lifetime plus one announce interval, within which any live peer has announced."""
        cfg, node = self.ctx.options, self.ctx.node
        await self._refresh_views()
        if node.new_swarm or cfg.stage != "auto":
            return
        deadline = time.monotonic() + node.ttl_s + node.announce_interval_s
        while not any(v.online() for v in self.views) and time.monotonic() < deadline and not self.ctx.should_stop():
            await asyncio.sleep(0.5)
            await self._refresh_views()
        if not any(v.online() for v in self.views):
            self.ctx.log.info("no stage announced by anyone: starting as a trainer")

    async def _choose_stage(self) -> int:
        want = self.ctx.options.stage
        if want != "auto":
            return int(want)
        if self._saved is not None and not self.views[self._saved.index].online():
            return self._saved.index  # nobody serves what we served before the stop: it is ours
        counts = [len(v.online()) for v in self.views]
        caps = [sum(r.throughput for r, _ in v.online().values()) for v in self.views]
        on_loan = [k for k in range(1, self.S)
                   if self.views[k].online() and all(r.trainer for r, _ in self.views[k].online().values())]
        return choose_start_stage(counts, caps, on_loan)

    async def _take_stage(self, k: int, reason: str) -> None:
        """Serve stage k: download it from a live replica, or rebuild it by CheckFree when
        its neighbours have trained and it has no live peer, or start it from the seed."""
        ctx, spec = self.ctx, self.ctx.spec
        old = self.worker.index if self.worker is not None else None
        self.serving = False
        if old is not None and old != k:
            await self._announce("leaving", ttl_s=2.0)
        self._own = None
        if self.worker is None:
            self.worker = StageWorker(self.model_cfg, spec.seed, k, self.S, lr=spec.lr, accumulate=spec.micro_batches,
                                      make_stage=self.staging.make_stage)
        elif old != k:
            # what this peer held is a CheckFree source when it moves next to it (the mover may be
            # the only live peer of a neighbouring stage): keep it before the switch drops it
            keys, tensors = await ctx.compute(self.worker.state)
            self._own = (old, dict(zip(keys, tensors)), float(self.worker.last_grad_norm or 0.0), self.worker.step,
                         self.edge_copy)
            await ctx.compute(self.worker.switch, k)
            self.serve_ema = 0.0  # the old stage's speed says nothing about this one
        replicas = [p for p in self.views[k].online() if p != ctx.peer_id]
        done = False
        if replicas:
            done = await self._download_replica(k, replicas)
        saved, self._saved = self._saved, None  # only the first stage taken after a restart
        if not done and saved is not None and saved.index == k:
            # stage 0's steps count one trainer's, its neighbours' every trainer's: not comparable
            ahead = [r.step for j in (k - 1, k + 1) if 0 <= j < self.S for r, _ in self.views[j].online().values()]
            if k > 0 and saved_stage_is_stale(saved.step, ahead):
                ctx.log.info("the checkpoint's stage %d (step %d) is behind its neighbours (step %d): not resumed",
                             k, saved.step, max(ahead))
            else:
                done = await self._load_saved(saved)
        neighbours_trained = any(r.step > 0 for j in (k - 1, k + 1) if 0 <= j < self.S
                                 for r, _ in self.views[j].online().values())
        if not done and not replicas and neighbours_trained and reason != "start-fresh":
            copy_kind = await self._checkfree(k)
            if copy_kind is not None:
                self.sm.copies.labels(stage=str(k), kind=copy_kind).inc()
        self.sm.stage.set(k)
        self.sm.lr_multiplier.labels(stage=str(k)).set(self.worker.lr_scale)
        self.serving = True
        await self._announce("online")
        ctx.log.info("serving stage %d (%s)", k, reason)

    async def _load_saved(self, saved: _SavedStage) -> bool:
        """Serve the stage from the checkpoint: weights, optimizer moments and step."""
        def load() -> None:
            keys, shapes = self.worker.expected_state()
            if list(saved.tensors) != keys or [tuple(t.shape) for t in saved.tensors.values()] != shapes:
                raise ValueError("its tensors differ from this stage's")
            self.worker.load_state(saved.tensors, step=saved.step, fresh_optimizer=True, lr_scale=saved.lr_scale)
            if saved.optimizer is not None:
                self.worker.optimizer.load_state_dict(saved.optimizer)

        try:
            await self.ctx.compute(load)
        except Exception as e:  # another model or pipeline shape: rebuild the stage as if new
            self.ctx.log.warning("the checkpoint's stage %d does not fit (%s): not resumed", saved.index, e)
            return False
        self.ctx.log.info("resumed stage %d at its step %d from the checkpoint", saved.index, saved.step)
        return True

    async def _download_replica(self, k: int, replicas: list[str]) -> bool:
        t0 = time.perf_counter()
        for pid in random.sample(replicas, len(replicas)):
            got = await self._fetch_state(pid, k)
            if got is None:
                continue
            state, _, step, _ = got
            try:
                await self.ctx.compute(partial(self.worker.load_state, state, step=step))
            except Exception as e:  # wrong keys/shapes: a broken replica, try another
                self.ctx.log.warning("state of stage %d from %s unusable: %s", k, pid[-8:], e)
                continue
            self.sm.state_download.observe(time.perf_counter() - t0)
            self.ctx.metrics.recoveries.labels(kind="state_download", outcome="ok").inc()
            return True
        self.ctx.metrics.recoveries.labels(kind="state_download", outcome="failed").inc()
        return False

    async def _fetch_state(self, pid: str, k: int) -> tuple[dict[str, torch.Tensor], float, int,
                                                          dict[str, torch.Tensor]] | None:
        """(stage k's state dict, its last grad norm, its step, the edge copy it holds) or None."""
        req = encode_request(self.ctx.spec.run_id, Op.STAGE_STATE, k, "state", [], codec.NONE)
        try:
            replies = self.ctx.transport.call(pid, METHOD, req, _reply_type(), timeout_s=self.ctx.deadlines.request,
                                              channel="state")
            first, tensors = await read_reply(replies, max_numel=self.max_numel, max_tensors=4096,
                                              timeout_s=self.ctx.deadlines.request)
        except (PeerUnavailable, codec.CodecError, asyncio.TimeoutError) as e:
            self.ctx.log.info("state of stage %d from %s failed: %s", k, pid[-8:], e)
            return None
        if first.status != Status.STAGE_OK or first.stage != k or len(first.keys) != len(tensors):
            return None
        state = {key: t for key, t in zip(first.keys, tensors) if not key.startswith(EDGE_PREFIX)}
        edge = {key[len(EDGE_PREFIX):]: t for key, t in zip(first.keys, tensors) if key.startswith(EDGE_PREFIX)}
        return state, float(first.grad_norm), int(first.stage_step), edge

    async def _source_state(self, j: int):
        """Stage j's (state, grad norm, step, edge copy) for a rebuild: our own from before a
        move, else from its most advanced reachable peer; None if none answers."""
        if self._own is not None and self._own[0] == j:
            _, state, norm, step, edge = self._own
            return state, norm, step, edge
        online = self.views[j].online()
        for pid in sorted(online, key=lambda p: -online[p][0].step):
            got = (await self._fetch_state(pid, j)) if pid != self.ctx.peer_id else None
            if got is not None:
                return got
        return None

    async def _checkfree(self, k: int) -> str | None:
        """Rebuild stage k from its neighbours. Returns the kind of a copy rebuild
        ("checkfree_plus", "naive", "one_neighbour"; the caller counts it), else None."""
        t0 = time.perf_counter()
        self.sm.stage_lost.labels(stage=str(k)).inc()
        rec = self.ctx.metrics.recoveries
        edges: dict[str, torch.Tensor] | None = None
        try:
            copy_kind = "checkfree_plus"  # with swaps, plan_recovery's copy is CheckFree+'s
            try:
                plan = plan_recovery(k, self.S, self.cf)
            except NotRecoverable:
                if k != self.S - 1 or self.S < 2:
                    raise
                # Without --checkfree-swaps stage S-2 never learnt the last role: a naive copy
                # of it is still better than nothing.
                plan, copy_kind = RecoveryPlan(k, "copy", (k - 1,)), "naive"
                self.ctx.log.warning("last stage lost: copying stage %d's body (no CheckFree+ swaps ran) and the "
                                     "head copy it holds", k - 1)
            states, norms, steps = {}, {}, []
            # a neighbour can be briefly unreachable (its replica moving, a partition healing):
            # ask again a few times before settling for less
            for attempt in range(RECOVERY_FETCH_ATTEMPTS):
                for j in plan.sources:
                    got = None if j in states else await self._source_state(j)
                    if got is not None:
                        states[j], norms[j], step, edge = got
                        edges = edges or (edge or None)
                        steps.append(step)
                if len(states) == len(plan.sources) or self.ctx.should_stop() \
                        or attempt == RECOVERY_FETCH_ATTEMPTS - 1:
                    break
                await asyncio.sleep(self.ctx.node.announce_interval_s)
                await self._refresh_views()
            if plan.method == "wavg" and len(states) == 1:
                # one neighbour answered: its copy keeps what the pipeline learnt there, which a
                # seeded re-init would throw away
                (j,) = states
                self.ctx.log.warning("stage %d: neighbour stage %d unreachable after %d tries: copying stage %d",
                                     k, next(x for x in plan.sources if x != j), RECOVERY_FETCH_ATTEMPTS, j)
                plan, copy_kind = RecoveryPlan(k, "copy", (j,)), "one_neighbour"
            keys, _ = self.worker.expected_state()
            state = rebuild_state(plan, keys, states, norms, self.cf, edge_copy=edges)
            await self.ctx.compute(partial(self.worker.load_state, state, step=max(steps), fresh_optimizer=True,
                                           lr_scale=self.cf.lr_scale))
        except NotRecoverable as e:
            rec.labels(kind="checkfree_stage", outcome="failed").inc()
            self.edge_copy = None
            self.ctx.log.warning("stage %d lost and not rebuildable (%s): restarting it from its seeded init", k, e)
            return None
        for j in plan.sources:
            self.sm.neighbor_norm.labels(stage=str(j)).set(norms[j])
        rec.labels(kind="checkfree_stage", outcome="ok").inc()
        self.edge_copy = None
        self.sm.cf_recoveries.labels(stage=str(k), method=plan.method).inc()
        self.sm.cf_duration.observe(time.perf_counter() - t0)
        self.totals["recoveries"] += 1
        self.ctx.log.info("stage %d rebuilt by CheckFree (%s of stages %s, norms %s) in %.2fs", k,
                          plan.method if plan.method != "copy" else f"copy, {copy_kind}", plan.sources,
                          {j: round(n, 4) for j, n in norms.items()}, time.perf_counter() - t0)
        return copy_kind if plan.method == "copy" else None

    # ================================================================ background upkeep
    async def _maintenance(self) -> None:
        from swarm_node.protocol.clock import swarm_time

        cfg, node = self.ctx.options, self.ctx.node
        while not self.ctx.should_stop():
            await asyncio.sleep(node.announce_interval_s)
            try:
                await self._announce("online")
                await self._refresh_views()
                await self._maybe_recover()
                epoch = int(swarm_time() // cfg.stage_average_interval_s)
                if epoch != self._avg_epoch:
                    # epochs of the DHT clock: every replica of a stage starts the same round within
                    # about one announce interval, without a leader
                    self._avg_epoch = epoch
                    if self._avg_task is None or self._avg_task.done():
                        self._avg_task = asyncio.ensure_future(self._average_stage(epoch))
                    await self._refresh_edge_copy()
                elif self.edge_copy is None and self.worker.index == self.S - 2:
                    # hold a head copy from the first tick on: a last stage lost before the first
                    # averaging interval could otherwise not be rebuilt at all (seen in the churn lab)
                    await self._refresh_edge_copy()
                await self._maybe_return()
                await self._maybe_rebalance()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # upkeep must never kill the node; the next round retries
                self.ctx.log.warning("swarm upkeep failed: %s", e)

    async def _maybe_recover(self) -> None:
        # empty = no live peer in two reads in a row (one missed DHT read is not a loss); lost =
        # empty after having been served. A server peer moves into a lost stage, or into one that
        # stayed empty for longer than any arriving peer takes to announce (peers that joined
        # together may all have picked the same stage); a spare trainer fills any empty server
        # stage, since without one nothing trains at all.
        empty = [k for k in range(1, self.S) if self.empty_reads[k] >= 2]
        if not empty or self._pending_move is not None:
            return
        peers = {j: sorted(self.views[j].online()) for j in range(self.S)}
        trainer_steps = {p: rec.step for p, (rec, _) in self.views[0].online().items()}
        if designated_mover(peers, trainer_steps) != self.ctx.peer_id:
            return
        me = self.worker.index
        node = self.ctx.node
        patience = (node.ttl_s + 2 * node.announce_interval_s) / node.announce_interval_s  # reads
        targets = recovery_targets(empty, me, self.ever_seen, self.empty_reads, patience)
        if not targets:
            return
        k = targets[0]
        self.ctx.log.warning("stage %d has no live peer: moving from stage %d to rebuild it", k, me)
        if me == 0:  # a trainer is mid-step: its micro-batches are abandoned and it moves between steps
            self._pending_move = k
            return
        await self._take_stage(k, reason="checkfree")
        self.empty_reads[k] = 0

    async def _average_stage(self, epoch: int) -> None:
        """One averaging round among my stage's replicas: the group is the stage's online peers
        as my view has them, so replicas whose views agree share a group id; a view that differs
        (churn) leaves the all-reduce incomplete, and this round falls back to a pull-gossip mix
        with one replica. The mean is applied as a shift (mean - my snapshot), so steps this
        replica took while the round ran are kept."""
        w, me = self.worker, self.ctx.peer_id
        k = w.index
        group = sorted(set(self.views[k].online()) | {me})
        if len(group) < 2 or self.allreduce is None:
            return
        try:
            snap = await self.ctx.compute(w.float_vector)
            gid = group_digest(f"{self.ctx.spec.run_id}/stage{k}", epoch, group)
            out = await self.allreduce.run(gid, group, snap, 1.0)
            if out.complete and out.result is not None and w.index == k and out.result.numel() == snap.numel():
                await self.ctx.compute(w.shift_floats, out.result - snap)
                self.sm.averaging.labels(outcome="ok").inc()
                return
            self.ctx.log.info("stage %d averaging round %d incomplete (%s): mixing with one replica", k, epoch,
                              ", ".join(p[-8:] for p in out.failed) or "stage moved")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.ctx.log.info("stage %d averaging round %d failed: %s", k, epoch, e)
        if w.index == k:
            await self._gossip_average(fallback=True)

    async def _gossip_average(self, fallback: bool = False) -> None:
        w = self.worker
        others = [p for p in self.views[w.index].online() if p != self.ctx.peer_id]
        if not others:
            return
        pid = random.choice(others)
        got = await self._fetch_state(pid, w.index)
        if got is None:
            self.sm.averaging.labels(outcome="failed").inc()
            return
        state, _, _, _ = got
        try:
            await self.ctx.compute(w.mix_with, state, 0.5)
        except Exception as e:
            self.sm.averaging.labels(outcome="failed").inc()
            self.ctx.log.info("averaging with %s failed: %s", pid[-8:], e)
            return
        self.sm.averaging.labels(outcome="gossip" if fallback else "ok").inc()

    async def _refresh_edge_copy(self) -> None:
        """Stage S-2 keeps a copy of the last stage's head (CheckFree+'s "embeddings copied to
        the neighbours"), so that the last stage can be rebuilt when it loses every peer."""
        last = self.S - 1
        if self.S < 3 or self.worker.index != last - 1:
            self.edge_copy = None
            return
        peers = [p for p in self.views[last].online() if p != self.ctx.peer_id]
        if not peers:
            return
        got = await self._fetch_state(random.choice(peers), last)
        if got is not None:
            self.edge_copy = {key: t for key, t in got[0].items() if not is_body_key(key)}

    async def _maybe_return(self) -> None:
        """A trainer on loan goes back to stage 0 once a peer that is not on loan has served its
        stage for two reads in a row (the stage keeps a live replica; it downloaded ours)."""
        if not self._on_loan or self.worker.index == 0:
            self._on_loan = False
            return
        k = self.worker.index
        others = [p for p, (r, _) in self.views[k].online().items() if p != self.ctx.peer_id and not r.trainer]
        self._return_reads = self._return_reads + 1 if others else 0
        if self._return_reads < 2 or not self.views[0].online():
            return
        self.ctx.log.info("stage %d is served by %s now: back to training (stage 0)", k, others[0][-8:])
        self._on_loan, self._return_reads = False, 0
        self.totals["returns"] += 1
        await self._take_stage(0, reason="return")

    async def _maybe_rebalance(self) -> None:
        T = self.ctx.options.rebalance_interval_s
        if T <= 0 or self.worker.index == 0:
            return
        now = time.monotonic()
        if self._next_rebalance is None:
            self._next_rebalance = now + random.uniform(0, 2 * T)
        if now < self._next_rebalance:
            return
        self._next_rebalance = now + random.uniform(0, 2 * T)
        if now - self._views_changed_at < 2 * self.ctx.node.ttl_s:
            return  # a move (or join/leave) is still propagating: decide on a settled view only
        self.sm.rebalance_checks.inc()
        me, k = self.ctx.peer_id, self.worker.index
        online = self.views[k].online()
        if len(online) < 2 or min(online) != me:
            return
        known = [r.throughput for v in self.views for r, _ in v.online().values() if r.throughput > 0]
        default = sum(known) / len(known) if known else 1.0  # a peer with no measurement counts as average
        thr = lambda r: r.throughput if r.throughput > 0 else default  # noqa: E731
        caps = [sum(thr(r) for r, _ in v.online().values()) for v in self.views]
        mine = thr(online[me][0])
        target = rebalance_target(caps, k, mine, HYSTERESIS, movable=lambda j: j != 0)
        if target is None:
            return
        self.ctx.log.info("rebalancing: stage %d -> %d (capacities %s)", k, target, [round(c, 1) for c in caps])
        self.sm.rebalances.inc()
        self.totals["rebalances"] += 1
        await self._take_stage(target, reason="rebalance")

    # ================================================================ trainer
    async def _train_step(self) -> None:
        ctx, mb_n = self.ctx, self.ctx.spec.micro_batches
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self._microbatch(self.steps, m) for m in range(mb_n)))
        losses = [r for r in results if r is not None]
        if not losses:
            if self._pending_move is None:
                await asyncio.sleep(0.5)
            return
        self.steps += 1
        ctx.trainer.align_step(self.steps)
        self.record_step(ctx.spec.batch_size * len(losses), sum(losses) / len(losses), time.perf_counter() - t0)
        self.sm.stage_step.labels(stage="0").set(self.worker.step)
        await ctx.on_step()

    def _batch(self, step: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        from swarm_node.train.data import batch_generator_seed

        spec = self.ctx.spec
        gen = torch.Generator().manual_seed(batch_generator_seed(spec.seed, f"{self.ctx.peer_id}:{mb}", step))
        return self.ctx.trainer.dataset.train_batch(spec.batch_size, spec.seq_len, gen)

    async def _microbatch(self, step: int, mb: int) -> float | None:
        t0 = time.perf_counter()
        mb_id = f"{step}.{mb}.{uuid.uuid4().hex[:6]}"
        x, y = self._batch(step, mb)
        S, w = self.S, self.worker
        n = step * self.ctx.spec.micro_batches + mb  # over the whole run: with S == 3 both pairs get turns
        try:
            if S == 1:
                _, loss = await self.ctx.compute(w.backward, x, y)
            else:
                loss = await self._run_route(stage_route(S, n, self.swaps), x, y, mb_id)
        except _Moving as e:  # stage servers keep nothing: dropping it here leaves no state behind
            self.sm.microbatches.labels(outcome="abandoned").inc()
            self.ctx.log.info("micro-batch %s abandoned: %s", mb_id, e)
            return None
        except (NoPeers, asyncio.TimeoutError) as e:
            self.sm.microbatches.labels(outcome="lost").inc()
            self.totals["microbatches_lost"] += 1
            self.ctx.log.warning("micro-batch %s lost: %s", mb_id, e)
            return None
        except ValueError as e:  # non-finite gradients or loss at our own stage 0
            self.ctx.metrics.rejected_messages.labels(reason="non_finite").inc()
            self.ctx.log.warning("micro-batch %s dropped: %s", mb_id, e)
            return None
        self.sm.microbatches.labels(outcome="ok").inc()
        self.totals["microbatches_ok"] += 1
        for pair in swapped_pairs(S, n, self.swaps):
            self.sm.swapped.labels(pair=pair).inc()
        self.sm.mb_duration.observe(time.perf_counter() - t0)
        return loss

    async def _run_route(self, route: list[tuple[int, str]], x: torch.Tensor, y: torch.Tensor, mb_id: str) -> float:
        """One micro-batch along `route` ((stage, part) calls, checkfree.stage_route): forwards
        up to the last call, which is the last stage's backward with the targets (it computes the
        loss), then the backwards in reverse. inputs[i] is call i's input, kept until call i's
        backward succeeded, so any replica can run it. Stage 0's pieces run here."""
        inputs = [x]
        for k, part in route[:-1]:
            if k == 0:
                inputs.append(await self.ctx.compute(self.worker.forward, inputs[-1], part))
            else:
                inputs.append((await self._call(k, Op.STAGE_FORWARD, [inputs[-1]], mb_id, part))[1][0])
        grad_or_y, loss = y, None
        for i in range(len(route) - 1, -1, -1):
            k, part = route[i]
            if k == 0:
                grad_or_y, _ = await self.ctx.compute(self.worker.backward, inputs[i], grad_or_y.float(), part)
            else:
                first, out = await self._call(k, Op.STAGE_BACKWARD, [inputs[i], grad_or_y], mb_id, part)
                grad_or_y = out[0]
                loss = float(first.loss) if loss is None else loss
        assert loss is not None  # route[-1] is the last stage (S >= 2): its backward gave the loss
        return loss

    async def _call(self, k: int, op: int, tensors: list[torch.Tensor], mb_id: str, part: str = "full"):
        """Send one stage call, re-sending to other replicas of stage k until one answers."""
        cfg = self.ctx.options
        router, opname = self.routers[k], ("forward" if op == Op.STAGE_FORWARD else "backward")
        size = tensors[0].shape[0] * (BACKWARD_COST if op == Op.STAGE_BACKWARD else 1.0)
        deadlines = self.ctx.deadlines
        timeout = (deadlines.backward if op == Op.STAGE_BACKWARD else deadlines.request) + cfg.swarm_backward_delay_s
        deadline = time.monotonic() + MICROBATCH_DEADLINE_S
        attempt = 0
        while True:
            if self._pending_move is not None:
                raise _Moving(f"this trainer moves to stage {self._pending_move}")
            if self.ctx.should_stop() or time.monotonic() > deadline:
                raise asyncio.TimeoutError(f"stage {k} {opname} not served in time")
            try:
                pid = router.pick(size)
            except NoPeers:
                self._retry(k, "no_peers", attempt)
                attempt += 1
                await asyncio.sleep(0.5)
                await self._refresh_views(only=k)
                continue
            t0 = time.monotonic()
            req = encode_request(self.ctx.spec.run_id, op, k, mb_id, tensors, self.compression, part)
            try:
                replies = self.ctx.transport.call(pid, METHOD, req, _reply_type(), timeout_s=timeout,
                                                  channel="activations")
                first, out = await read_reply(replies, max_numel=self.max_numel, max_tensors=1, timeout_s=timeout)
            except PeerUnavailable as e:
                timed_out = e.timed_out
                self.sm.rpcs.labels(stage=str(k), op=opname, outcome="timeout" if timed_out else "error").inc()
                if timed_out:
                    router.report_timeout(pid)
                else:
                    router.report_error(pid)
                    self.sm.bans.labels(stage=str(k)).inc()
                self._retry(k, "timeout" if timed_out else "error", attempt)
                attempt += 1
                continue
            except codec.CodecError as e:
                self.ctx.metrics.rejected_messages.labels(reason=e.reason).inc()
                router.report_error(pid)
                self._retry(k, "rejected", attempt)
                attempt += 1
                continue
            if first.status != Status.STAGE_OK or len(out) != 1:
                reason = {Status.STAGE_WRONG_STAGE: "wrong_stage", Status.STAGE_BUSY: "busy"}.get(first.status,
                                                                                                  "rejected")
                self.sm.rpcs.labels(stage=str(k), op=opname, outcome="error").inc()
                router.report_error(pid)
                self._retry(k, reason, attempt)
                attempt += 1
                if reason == "wrong_stage":
                    await self._refresh_views(only=k)
                continue
            router.report_ok(pid, size, time.monotonic() - t0)
            self.sm.rpcs.labels(stage=str(k), op=opname, outcome="ok").inc()
            return first, out

    def _retry(self, k: int, reason: str, attempt: int) -> None:
        if reason != "no_peers" or attempt == 0:
            self.sm.retries.labels(stage=str(k), reason=reason).inc()
            self.totals["retries"] += 1

    # ================================================================ server
    async def _rpc(self, requests: AsyncIterator, caller: str) -> AsyncIterator:
        cfg = self.ctx.options
        first = await first_message(requests, self.ctx.deadlines.request)
        if first is None:
            return
        w = self.worker
        if w is None or first.stage != w.index or (first.op != Op.STAGE_STATE and not self.serving):
            await drain(requests, 2.0)
            for m in encode_reply(Status.STAGE_WRONG_STAGE, w.index if w else -1, detail="not serving that stage"):
                yield m
            return
        if first.op == Op.STAGE_STATE:
            try:  # the shared header checks: run id, no tensors, no part
                await read_request(first, requests, run_id=self.ctx.spec.run_id, max_numel=self.max_numel,
                                   timeout_s=self.ctx.deadlines.request)
            except codec.CodecError as e:
                self._reject(e.reason)
                await drain(requests, 2.0)
                for m in encode_reply(Status.STAGE_REJECTED, w.index, detail=f"malformed state request: {e}"):
                    yield m
                return
            await drain(requests, 2.0)
            keys, tensors = await self.ctx.compute(w.state)
            if self.edge_copy:
                keys = [*keys, *(EDGE_PREFIX + key for key in self.edge_copy)]
                tensors = [*tensors, *self.edge_copy.values()]
            self.sm.served.labels(op="state", outcome="ok").inc()
            for m in encode_reply(Status.STAGE_OK, w.index, tensors=tensors, keys=keys,
                                  grad_norm=float(w.last_grad_norm or 0.0), stage_step=w.step):
                yield m
            return
        if self.queue >= MAX_QUEUE:
            await drain(requests, 2.0)
            for m in encode_reply(Status.STAGE_BUSY, w.index, detail="queue full"):
                yield m
            return
        opname = "forward" if first.op == Op.STAGE_FORWARD else "backward"
        try:
            tensors = await read_request(first, requests, run_id=self.ctx.spec.run_id, max_numel=self.max_numel,
                                         timeout_s=self.ctx.deadlines.request)
            part = request_part(first)
            if part == "head" and not w.is_last:
                raise codec.CodecError("malformed", f"stage {w.index} has no head part")
        except codec.CodecError as e:
            self._reject(e.reason)
            self.sm.served.labels(op=opname, outcome="rejected").inc()
            await drain(requests, 2.0)
            for m in encode_reply(Status.STAGE_REJECTED, w.index, detail=str(e)):
                yield m
            return
        await drain(requests, 2.0)
        self.queue += 1
        self.sm.queue_depth.set(self.queue)
        busy = 0.0  # seconds of this request's own compute (+ injected delay), queueing excluded
        try:
            if first.op == Op.STAGE_BACKWARD and cfg.swarm_backward_delay_s > 0:
                await asyncio.sleep(cfg.swarm_backward_delay_s)
                busy += cfg.swarm_backward_delay_s
            if first.op == Op.STAGE_FORWARD:
                (out, loss), dt = await self.ctx.compute(_timed, lambda: (w.forward(tensors[0], part), None))
            else:
                # targets where the output is logits (the last stage run whole, or its head)
                grad_or_y = tensors[1] if w.is_last and part != "body" else tensors[1].float()
                (out, loss), dt = await self.ctx.compute(_timed, lambda: w.backward(tensors[0].float(), grad_or_y,
                                                                                    part))
            busy += dt
        except ValueError as e:  # wrong shapes, dtypes, vocabulary, non-finite values
            self._reject("non_finite" if "finite" in str(e) else "bad_shape")
            self.sm.served.labels(op=opname, outcome="rejected").inc()
            for m in encode_reply(Status.STAGE_REJECTED, w.index, detail=str(e)):
                yield m
            return
        finally:
            self.queue -= 1
            self.sm.queue_depth.set(self.queue)
        # Throughput in forward-equivalent samples per second of compute: a backward (with its
        # recomputed forward) counts BACKWARD_COST, so stages serving different op mixes compare,
        # and queueing is left out, so a stage does not look faster just because it got a peer.
        # A split stage's two parts (CheckFree+ swaps) count half a call each: together, one.
        work = int(tensors[0].shape[0]) * (BACKWARD_COST if first.op == Op.STAGE_BACKWARD else 1.0) * \
            (1.0 if part == "full" else 0.5)
        per = busy / max(work, 1e-9)
        self.serve_ema = per if self.serve_ema == 0 else (1 - SERVE_EMA_ALPHA) * self.serve_ema + SERVE_EMA_ALPHA * per
        self.sm.served.labels(op=opname, outcome="ok").inc()
        self.sm.stage_step.labels(stage=str(w.index)).set(w.step)
        for m in encode_reply(Status.STAGE_OK, w.index, tensors=[out], compression=self.compression,
                              loss=loss or 0.0, grad_norm=float(w.last_grad_norm or 0.0), stage_step=w.step):
            yield m

    def _reject(self, reason: str) -> None:
        self.ctx.metrics.rejected_messages.labels(reason=reason).inc()


def saved_stage_is_stale(saved_step: int, neighbour_steps: list[int]) -> bool:
    """A checkpointed stage is worth serving after a full stop, when its neighbours come back
    from checkpoints of the same moment. After a crash the swarm may have trained on (an old
    checkpoint, neighbours far ahead): then rebuilding the stage from them is the better start."""
    ahead = max(neighbour_steps, default=0)
    return saved_step + max(5, 0.1 * ahead) < ahead


def _decode_stage_record(value, subkey: str, *, num_stages: int) -> StageRecord:
    return StageRecord.from_wire(value, subkey=subkey, num_stages=num_stages)


@dataclass
class _SavedStage:
    index: int
    tensors: dict[str, torch.Tensor]
    step: int
    optimizer: dict | None
    lr_scale: float


class _Moving(Exception):
    """This trainer was designated to rebuild a lost stage: stop driving micro-batches."""


def _timed(fn):
    """Run fn() on the compute thread and return (its result, seconds it took there)."""
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def _request_type():
    from swarm_node.protocol.messages import pipeline as pl

    return pl.StageRequest


def _reply_type():
    from swarm_node.protocol.messages import pipeline as pl

    return pl.StageReply
