"""The Strategy interface every synchronization method implements.

A strategy owns the training loop of a node: it decides when to compute, what to exchange
with which peers, and when parameters change. The node gives it a `StrategyContext` and
never looks inside. Contract:
- `start()` registers RPC handlers (through `ctx.transport`) and returns quickly.
- `run()` trains until `ctx.should_stop()` is true, then returns; it must not hang past
  `round_timeout_s` after a stop request (every network await carries a deadline).
- `stop()` unregisters handlers; called once, after `run()` returned or was cancelled.
- Tensor math lives in plain functions (testable without a network); the class only maps
  rounds onto the transport.
Third parties add strategies through the `swarm_node.strategies` entry-point group.
"""
from __future__ import annotations

import abc
import asyncio
import time
from typing import Any, ClassVar

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.options import NoOptions, StrategyOptions
from swarm_node.strategies.page_panel import PagePanel, outcome_counts, short_peer
from swarm_node.strategies.context import NodeSettings, Progress, StrategyContext  # noqa: F401 (re-exported)
from swarm_node.strategies.quorum import QuorumRule

# How long a view must stay short of the quorum before the peer stops stepping. A step in that
# window cannot fork: a sync round and a gradcode decode each check the quorum themselves.
QUORUM_GRACE_S = 2.0



class Strategy(abc.ABC):
    name: ClassVar[str]
    role: ClassVar[str] = "trainer"
    # Step-synchronous strategies stop stepping below the run-long quorum (`wait_for_peers`);
    # the others keep their local steps, which their next round merges or resyncs.
    quorum_gated: ClassVar[bool] = False
    # the strategy's own settings: flags, env vars, TOML keys and run-spec fields (options.py)
    options: ClassVar[type[StrategyOptions]] = NoOptions
    # how the churn lab runs and judges it (None: the generic scenarios, no consistency check)
    churn_profile: ClassVar[ChurnProfile | None] = None
    # how `swarm-node demo` runs and judges it
    demo_profile: ClassVar[DemoProfile] = DemoProfile()

    # True: the node's held-out loss comes from `evaluate()`, not from the local model (which
    # is not what this strategy trains, e.g. a pipeline whose stages live on other peers)
    evaluates_itself: ClassVar[bool] = False

    async def evaluate(self) -> float | None:
        """Held-out loss of what this strategy trains, when `evaluates_itself`; None: nothing
        to report now (the node keeps its last value)."""
        return None

    def checkpoint_state(self) -> dict[str, Any] | None:
        """What this strategy must keep across a full stop (tensors, numbers, strings, lists and
        dicts of them), saved with the trainer's checkpoint; None = nothing of its own. Called
        on the compute thread. Key `agreed_weights`, if given: the weights the swarm agreed on
        (such as φ), in parameter order, which `swarm-node export` publishes instead of θ."""
        return None

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Take back what `checkpoint_state` saved, before `start()`; raise if it does not fit."""

    @classmethod
    def check_model(cls, module: Any, options: StrategyOptions) -> str:
        """Why this strategy cannot train `module` (the loaded --model) with these options, ""
        when it can. Checked before the node joins anyone."""
        return ""

    @classmethod
    def options_of(cls, config: Any) -> StrategyOptions:
        """This strategy's own settings, read by name from the node's config."""
        return cls.options(**{n: getattr(config, n) for n in cls.options.model_fields if hasattr(config, n)})

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        self.quorum = QuorumRule(fixed=ctx.node.quorum, joined=ctx.node.joined)
        self._short_since: float | None = None  # when the view first fell short of the quorum
        # one entry per round attempt, for summary.json (bounded): what the round cost against
        # the local compute since the previous one, which is what straggler benches compare
        self.round_history: list[dict[str, Any]] = []
        self._compute_since_round = 0.0
        self._last_round_at = time.monotonic()

    def current_step(self) -> int:
        """The step this peer reports (progress, /status): the trainer's, unless the strategy
        trains something else (a pipeline stage, an HF policy)."""
        return self.ctx.trainer.step

    async def start(self) -> None:
        """Register handlers; default: none."""

    @abc.abstractmethod
    async def run(self) -> str | None:
        """Train until ctx.should_stop(). A strategy whose work is over before that (a stage
        server whose trainers all finished) returns why, in words: the node then drains with
        that reason. Returning None without being asked to stop is a bug the node reports."""

    async def stop(self) -> None:
        """Unregister handlers; default: nothing to undo."""

    def status(self) -> dict[str, Any]:
        return dict(self.ctx.progress.last_round)

    def summary(self) -> dict[str, Any]:
        """Strategy-specific totals for summary.json (default: none)."""
        return {}

    def page_panel(self) -> PagePanel:
        """What the node's page shows for this strategy; called on the event loop, every few
        seconds. Default: its recent rounds (outcome, group, duration, coordinating peer)."""
        recent = self.round_history[-12:]
        return PagePanel(
            kind="rounds", title=f"{self.name} rounds",
            facts=[("rounds", outcome_counts(self.round_history[-200:])),
                   ("last group", str(recent[-1]["group_size"]) if recent else "none yet")],
            columns=["round", "step", "outcome", "group", "duration s", "peer"],
            rows=[[h.get("round"), h.get("step"), h["outcome"], h["group_size"], h["duration_s"],
                   short_peer(h.get("peer"))] for h in recent])

    @classmethod
    def demo_lines(cls, summaries: list[dict[str, Any]], baseline: dict[str, Any] | None) -> list[str]:
        """Lines `swarm-node demo` adds to its verdict, in words, from the swarm peers' and the
        baseline node's summary.json contents (`strategy_stats` there comes from `summary()`);
        default: none."""
        return []

    # ---- helpers shared by the strategies' loops ----
    async def wait_for_peers(self) -> bool:
        """Before the first step, block (re-checking stop) until `--min-peers` are present.
        Afterwards a `quorum_gated` strategy blocks while this peer sees fewer peers than the
        run-long quorum (see quorum.py), and comes back as a joiner: its replica is checked
        against the swarm's (and downloaded if it differs) before it contributes or leads.
        Other strategies never block after the start. False if stopping."""
        ctx = self.ctx
        while not ctx.should_stop():
            if not getattr(self, "_quorum_reached", False):
                have, need = len(ctx.peers.others()) + 1, ctx.node.min_peers
                if have < need:
                    ctx.progress.waiting_for = f"peers: {have}/{need} needed"
                    await asyncio.sleep(0.5)
                    continue
                self._quorum_reached = True
            if self.quorum_gated:
                have, need = self.quorum_counts()
                now = time.monotonic()
                if have >= need:
                    self._short_since = None
                    if ctx.progress.below_quorum:
                        self._quorum_regained(have, need)
                elif ctx.progress.below_quorum or now - (self._short_since or now) >= QUORUM_GRACE_S:
                    self._wait_below_quorum(have, need)
                    await asyncio.sleep(0.5)
                    continue
                elif self._short_since is None:
                    self._short_since = now  # a view that is short for a moment (a slow record) is no split
            ctx.progress.waiting_for = None
            return True
        return False

    def quorum_counts(self) -> tuple[int, int]:
        """(peers of this strategy in my view, me included; peers the quorum needs)."""
        ms = self.ctx.peers
        have = 1 + sum(1 for m in ms.others() if m.record.strategy == self.name)
        # A round that committed within one record lifetime is first-hand proof of that many live
        # peers, fresher than records (whose stores and reads stall while part of the DHT is cut off).
        if ms.now() - self.quorum.committed_at <= self.ctx.node.ttl_s:
            have = max(have, self.quorum.last_group)
        # A draining peer announces LEAVING first and then finishes its round, so its leave can be
        # seen just before the commit that still counted it: leaves up to one record lifetime
        # before the commit count too.
        left = ms.left_since(self.quorum.committed_at - self.ctx.node.ttl_s, self.name)
        return have, self.quorum.needed(left)

    def note_committed(self, group_size: int) -> None:
        """A round this peer applied committed with `group_size` contributors: the group the
        quorum's majority is taken of, from now on."""
        self.quorum.committed(group_size, self.ctx.peers.now())

    def _wait_below_quorum(self, have: int, need: int) -> None:
        ctx = self.ctx
        if not ctx.progress.below_quorum:
            ctx.progress.below_quorum = True
            ctx.metrics.quorum_waits.inc()
            ctx.log.warning("below quorum: I see %d of the %d peers needed (last committed round: %d); "
                            "waiting instead of training alone", have, need, self.quorum.last_group)
        # not in sync with the swarm any more: not eligible to lead until a round checks my replica
        ctx.progress.state = "joining"
        election = getattr(self, "election", None)
        if election is not None:
            election.forget_commits()
        ctx.progress.waiting_for = f"quorum: {have}/{need} peers"
        ctx.metrics.quorum_waiting.set(1)
        ctx.metrics.quorum_needed.set(need)

    def _quorum_regained(self, have: int, need: int) -> None:
        ctx = self.ctx
        ctx.progress.below_quorum = False
        ctx.metrics.quorum_waiting.set(0)
        ctx.metrics.quorum_needed.set(need)
        ctx.log.info("quorum regained (I see %d peers, %d needed): rejoining; my replica is checked against "
                     "the swarm's before I contribute", have, need)

    async def local_step(self) -> bool:
        """One local optimizer step on this peer's own batch (no exchange). Returns False,
        with nothing changed, when the loss or gradients were NaN/inf (counted)."""
        from swarm_node.train.trainer import NonFiniteError  # the trainer imports torch; keep base light

        ctx = self.ctx
        t0 = time.perf_counter()
        try:
            result = await ctx.compute(ctx.trainer.compute_gradients, ctx.trainer.step)
            await ctx.compute(ctx.trainer.apply_gradients, result.grads)
        except NonFiniteError as e:
            ctx.metrics.rejected_messages.labels(reason="non_finite").inc()
            ctx.log.warning("local step skipped: %s", e)
            return False
        compute_s = time.perf_counter() - t0
        self._compute_since_round += compute_s
        if ctx.node.compute_slowdown > 1.0:  # a simulated slower device: idle, not busy, so the box stays fair
            await asyncio.sleep((ctx.node.compute_slowdown - 1.0) * compute_s)
        self.record_step(result.num_samples, result.loss, time.perf_counter() - t0)
        await ctx.on_step()
        return True

    def record_round(self, outcome: str, size: int, duration_s: float, **details: Any) -> None:
        """Round metrics (by outcome; for ok rounds also duration, group size and the time of
        the last success) and `progress.last_round` = details + outcome, group_size, duration_s."""
        m = self.ctx.metrics
        m.rounds.labels(strategy=self.name, outcome=outcome).inc()
        if outcome == "ok":
            m.round_duration.observe(duration_s)
            m.group_size.set(size)
            m.last_successful_round.set(time.time())
        self.ctx.progress.last_round = {**details, "outcome": outcome, "group_size": size,
                                        "duration_s": round(duration_s, 4)}
        now = time.monotonic()
        if len(self.round_history) < 20_000:
            # compute_s: local steps' compute (a simulated slowdown's sleep excluded); wall_s: time
            # since the previous round attempt ended, so wall_s - compute_s is what this peer waited
            self.round_history.append({"round": details.get("round"), "outcome": outcome, "group_size": size,
                                       "duration_s": round(duration_s, 4),
                                       "compute_s": round(self._compute_since_round, 4),
                                       "wall_s": round(now - self._last_round_at, 4),
                                       "peer": details.get("partner") or details.get("leader") or details.get("aggregator") or "",
                                       # when (wall clock) and on which shared weights: lets a judge compare
                                       # peers' whole round histories, not samples of /status
                                       "at": round(time.time(), 3),
                                       **({"phi_hash": details["phi_hash"]} if details.get("phi_hash") else {}),
                                       **({"step": details["step"]} if details.get("step") is not None else {})})
        self._compute_since_round, self._last_round_at = 0.0, now

    def record_step(self, num_samples: int, loss: float, elapsed_s: float) -> None:
        """Progress and metrics after one applied local step."""
        ctx, m = self.ctx, self.ctx.metrics
        ctx.progress.train_loss = loss
        sps = num_samples / max(elapsed_s, 1e-9)
        prev = ctx.progress.samples_per_s  # EMA so one slow round does not make the console jump
        ctx.progress.samples_per_s = sps if prev == 0 else 0.8 * prev + 0.2 * sps
        m.local_step.set(ctx.trainer.step)
        m.train_loss.set(loss)
        m.local_samples.inc(num_samples)
        m.local_tokens.inc(num_samples * ctx.spec.seq_len)
        m.step_duration.observe(elapsed_s)
        m.samples_per_second.set(ctx.progress.samples_per_s)
