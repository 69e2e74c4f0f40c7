"""`diloco`: H local AdamW steps, then one averaged outer step on shared weights φ.

Round r, on every member:
  θ ← φ  ·  H inner steps on its own data  ·  Δ = φ − θ (fp32)
  join round r with hash(φ)  ·  butterfly all-reduce of Δ (weighted)  ·  vote  ·  on commit:
  φ ← OuterSGD(φ, Δ̄) (lr 0.7, Nesterov 0.9)  ·  θ ← φ  ·  r ← r + 1

Invariants (see protocol/averaging/transaction.py):
- φ and the outer momentum change only on a committed round, identically on every member, so
  hash(φ) agrees across the swarm; a member whose hash or round differs is told to resync and
  downloads φ, momentum, round and the inner state from the leader.
- An aborted round is retried with fresh membership (Δ stays valid: φ did not move). After
  `MAX_ATTEMPTS` aborts the H steps are discarded (θ ← φ): never a local-only outer step.
- A joiner downloads the state, then joins the current round with weight 0 and a zero Δ.
- Inner AdamW state is local and persists across rounds; φ is fp32 on the CPU.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import torch

from swarm_node.protocol import codec

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.base import Strategy
from swarm_node.strategies.leader import LeaderElection
from swarm_node.strategies.lowcomm.outer_math import OuterOptimizer, pseudo_gradient, round_digest
from swarm_node.protocol.averaging.transaction import RoundCoordinator, RoundStatus, averaging_layer
from swarm_node.protocol.averaging.state_transfer import StateService, StateTransferError
from swarm_node.strategies.lowcomm.options import EARLY_TRAINING_OUTER, DiLoCoOptions
from swarm_node.strategies.lowcomm.panel import outer_rounds_panel
from swarm_node.strategies.page_panel import PagePanel

MAX_ATTEMPTS = 5  # with backoff 0.5, 1, 2, 4 s: membership views converge meanwhile
COMPRESSIONS = {"none": codec.NONE, "fp16": codec.FLOAT16, "int8": codec.INT8_BLOCKWISE, "e3m0": codec.E3M0}


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


def load_params(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """θ ← values (e.g. φ), in place, on each parameter's own device and dtype."""
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.device, p.dtype))


def _work(meta: dict) -> int:
    """The donor's merged work; 0 from a donor that does not send it (an older version)."""
    w = meta.get("work", 0)
    return w if isinstance(w, int) and w >= 0 else 0


def merged_work(group: list[str]) -> int:
    """What a committed round adds to `work`: its member count, or 0 for a round of one, so
    that a peer cut off alone, however many rounds it runs, never outweighs a side that kept
    averaging (after the heal the larger side's φ is kept)."""
    return len(group) if len(group) > 1 else 0


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view_as(t).clone())
        start += t.numel()
    return out


class DiLoCoStrategy(Strategy):
    name = "diloco"
    options = DiLoCoOptions
    churn_profile = ChurnProfile(node_args=("--inner-steps", "5"), consistency="phi_hash")
    # early in training the outer momentum hurts (bench_byom: plain averaging beat solo, lr 0.7 Nesterov 0.9 did
    # not), and a demo is all early training: it runs the outer step as plain averaging
    demo_profile = DemoProfile(steps=200, node_args=EARLY_TRAINING_OUTER,
                               shows="peers train alone for H steps, then average what they learned: one exchange "
                                     "per H steps")

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, node = ctx.options, ctx.node
        self.H = cfg.inner_steps
        self.params = ctx.trainer.parameters_list()
        self.outer = OuterOptimizer([p.detach() for p in self.params], lr=cfg.outer_lr,
                                    momentum=cfg.momentum(), nesterov=True)
        self.phi = self.outer.phi
        self.phi_hash = round_digest(self.phi)
        self.round_no = 0
        self.weight = 1.0
        # member-rounds merged into φ (+ group size per commit; taken over on adoption): after a
        # split, the side whose φ holds more work keeps it (see the transaction's `_admit`); rounds of one count 0
        self.work = 0
        self._adopt_from: str | None = None  # set on the leader when a member's φ holds more work
        self._overtaken = False  # set on a late leader once its round committed without it
        self.election = LeaderElection(ctx, self.name)
        self.allreduce = averaging_layer(ctx, timeout_s=node.round_timeout_s, compression=COMPRESSIONS[node.compression])
        self.rounds = RoundCoordinator(
            ctx.transport, ctx.spec.run_id, timeout_s=node.round_timeout_s, grace_s=cfg.round_grace_s or node.round_timeout_s,
            allreduce=self.allreduce, leader_fn=self.election.leader, expected_fn=self.election.expected,
            state_fn=lambda: (self.round_no, self.phi_hash), on_stragglers=ctx.metrics.stragglers.inc,
            work_fn=lambda: self.work, on_behind=self._behind, open_on_first_join=cfg.round_grace_s is not None,
            on_left_out=self._left_out)
        self.state = StateService(ctx.transport, ctx.trainer, ctx.compute, timeout_s=ctx.deadlines.state_download,
                                  extra_snapshot=self._extra_snapshot, extra_restore=self._extra_restore,
                                  snapshot_guard=self._snapshot_guard)

    async def start(self) -> None:
        await self.rounds.start()
        await self.state.start()

    async def stop(self) -> None:
        await self.allreduce.close()  # the bulk TCP listener

    # ------------------------------------------------------------------ shared state
    def _extra_snapshot(self):
        st = self.outer.state_dict()
        buffers = st["optimizer"].get("state", {})
        momentum = [buffers.get(i, {}).get("momentum_buffer") for i in range(len(self.phi))]
        has_momentum = all(m is not None for m in momentum)
        tensors = list(self.phi) + (momentum if has_momentum else [])
        return {"round": self.round_no, "has_momentum": has_momentum, "work": self.work}, tensors

    def checkpoint_state(self) -> dict | None:
        """φ, outer momentum, round and merged work: a full stop resumes the outer trajectory."""
        meta, tensors = self._extra_snapshot()
        return {"meta": meta, "tensors": list(tensors), "agreed_weights": list(self.phi)}

    def restore_checkpoint_state(self, state: dict) -> None:
        # θ is the checkpoint's own (its local steps since φ), so it is not reset to φ
        self._extra_restore(dict(state["meta"]), list(state["tensors"]), reset_theta=False)

    def _extra_restore(self, meta: dict, tensors: list[torch.Tensor], reset_theta: bool = True) -> None:
        n = len(self.phi)
        has_momentum = meta.get("has_momentum") is True
        if not isinstance(meta.get("round"), int) or len(tensors) != n * (2 if has_momentum else 1):
            raise StateTransferError("outer state does not match this model")
        phi = tensors[:n]
        if any(a.shape != b.shape for a, b in zip(phi, self.phi)):
            raise StateTransferError("outer weights have the wrong shapes")
        opt = self.outer.state_dict()["optimizer"]
        opt["state"] = {i: {"momentum_buffer": tensors[n + i]} for i in range(n)} if has_momentum else {}
        self.outer.load_state_dict({"phi": phi, "optimizer": opt})
        self.phi = self.outer.phi
        self.phi_hash = round_digest(self.phi)
        self.round_no = meta["round"]
        self.work = _work(meta)
        if reset_theta:
            self._reset_theta()

    def _behind(self, member: str) -> None:
        if self._adopt_from is None:
            self.ctx.log.warning("a member's state holds more work than mine: adopting it from %s", member[-8:])
            self._adopt_from = member

    def _left_out(self) -> None:
        self._overtaken = True

    async def _catch_up(self) -> None:
        """Adopt the state a member showed to hold more work than ours (we led a stale side)."""
        member, self._adopt_from = self._adopt_from, None
        if member is not None:
            await self._adopt(member, "its state holds more merged work than mine")

    def _snapshot_guard(self) -> contextlib.AbstractAsyncContextManager[None]:
        # φ, momentum and the round number change together on the compute thread, where the
        # snapshot is taken too, so any moment is consistent.
        return contextlib.nullcontext()

    def _reset_theta(self) -> None:
        load_params(self.params, self.phi)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        ctx = self.ctx
        if self.election.online_peers():
            await self._adopt(self.election.leader(), "joining a running swarm")
        while not ctx.should_stop() and (ctx.node.max_steps == 0 or ctx.trainer.step < ctx.node.max_steps):
            if not await self.wait_for_peers():
                break
            await self._catch_up()
            if self.weight > 0:
                await self._inner_phase()
                if ctx.should_stop() and ctx.trainer.step % self.H:
                    break  # draining mid-phase: the local steps are checkpointed, not averaged
            await self._outer_round()

    async def _inner_phase(self) -> None:
        ctx = self.ctx
        self._overtaken = False
        # H steps from a round's start; fewer after a resume in mid-phase, so the next round
        # still begins at a multiple of H
        for _ in range(self.H - ctx.trainer.step % self.H):
            if ctx.should_stop() or (ctx.node.max_steps and ctx.trainer.step >= ctx.node.max_steps):
                return
            if self._overtaken:  # a slow leader's round went on without it: its join now resyncs it
                ctx.log.info("round %d committed without me: cutting my local steps short", self.round_no)
                return
            await self.local_step()

    async def _outer_round(self) -> None:
        ctx = self.ctx
        if self.weight > 0:
            theta = [p.detach() for p in self.params]
            delta = await ctx.compute(lambda: flatten(pseudo_gradient(self.phi, theta)))
        else:
            delta = torch.zeros(sum(p.numel() for p in self.params))
        hint: str | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            t0 = time.perf_counter()
            out = await self.rounds.run_round(self.round_no, self.phi_hash, self.weight, delta, leader=hint)
            hint = None
            duration = time.perf_counter() - t0
            if out.status is RoundStatus.NOT_LEADER and out.leader in self.election.expected():
                hint = out.leader  # ask the peer it named, once, without waiting
                continue
            if out.status is RoundStatus.COMMITTED:
                before = self.phi_hash
                await ctx.compute(self._apply, out.result)
                self.work += merged_work(out.group)
                self.election.mark_committed(out.group)
                self._account("ok", len(out.group), duration, out)
                ctx.log.info("round %d committed by %d peers in %.2fs: phi %s -> %s (delta %s, weight %g)",
                             self.round_no - 1, len(out.group), duration, before, self.phi_hash,
                             out.result_hash, self.weight)
                return
            if out.status is RoundStatus.RESYNC:
                self._account("resync", 0, duration, out)
                await self._adopt(out.leader, out.detail, min_round=out.round_no)
                return
            self._aborted(out, duration)
            ctx.log.warning("round %d attempt %d/%d aborted: %s", self.round_no, attempt, MAX_ATTEMPTS, out.detail)
            if self._adopt_from is not None:
                return  # a member holds more work: the loop adopts its state (θ ← its φ) before anything else
            if ctx.should_stop():
                break
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        ctx.log.warning("round %d failed %d times: discarding the local steps (θ ← φ)", self.round_no, MAX_ATTEMPTS)
        await ctx.compute(self._reset_theta)

    def _apply(self, mean_delta: torch.Tensor) -> None:
        self.phi = self.outer.step(unflatten(mean_delta, self.phi))
        self.phi_hash = round_digest(self.phi)
        self.round_no += 1
        self.ctx.trainer.align_step(self.round_no * self.H)  # a joiner lines up with the swarm's step count
        self._reset_theta()
        if self.weight == 0:
            self.ctx.log.info("first round done: contributing from now on")
        self.weight = 1.0

    async def _adopt(self, leader: str, why: str, min_round: int = -1) -> None:
        """Download φ, momentum, round and inner state from `leader` (the donor). A donor that
        has not applied the round it just committed yet (a left-out leader downloads from a
        member right at the commit) is asked again, a little later, a few times."""
        ctx = self.ctx
        ctx.log.info("adopting the swarm's state from %s (%s)", leader[-8:], why)
        for attempt in range(3):
            if await self.state.adopt(leader, ctx.metrics, ctx.log) is None:
                self.election.suspect(leader)
                return
            if self.round_no >= min_round:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        self.weight = 0.0  # take part in the next round without changing its average

    # ------------------------------------------------------------------ bookkeeping
    def _aborted(self, out, duration_s: float) -> None:
        """Count an aborted round; a leader that was unreachable or lost is skipped for a while."""
        self._account("error", len(out.group), duration_s, out)
        if out.cause.leader_at_fault:
            self.election.suspect(out.leader)

    def page_panel(self) -> PagePanel:
        return outer_rounds_panel(self.round_history, title=f"{self.name} outer rounds", inner_steps=self.H,
                                  round_no=self.round_no, phi_hash=self.phi_hash)

    def _account(self, outcome: str, size: int, duration_s: float, out) -> None:
        if outcome == "ok":
            self.ctx.progress.state = "online"
        self.record_round(outcome, size, duration_s, round=self.round_no, leader=out.leader,
                          phi_hash=self.phi_hash, detail=out.detail[:200])
