"""`noloco`: DiLoCo without all-reduce — each round a peer averages with one random partner.

Round r (every H local steps), on peer i:
  pairs = a seeded random perfect matching of the sorted live noloco peers (seed from
          run id and r): every peer computes the same pairs without any message
  the lower id of a pair streams θ_i to its partner, which answers with θ_j
  δ_i ← β·δ_i + η·(mean(θ_i, θ_j) − φ_i);  φ_i ← φ_i + δ_i;  θ_i ← φ_i
(the NoLoCo update with consensus weight γ = η: the partner's φ cancels, only θ crosses the wire.)

Invariants: φ_i and δ_i are per-peer, with no global commit. Only partners wait for each
other, at most `round_timeout_s`; a peer without a partner (odd count, refused, timeout) keeps
φ_i and θ and trains on. A partner is accepted only if the receiver's own matching agrees,
else both skip the round. A joiner downloads a live peer's θ_j, φ_j and δ_j. Heavy-ball
momentum, not Nesterov: with the group set to all peers this is exactly heavy-ball DiLoCo
(tests/unit/test_outer_math.py checks the equivalence).
"""
from __future__ import annotations

import asyncio
import time


import torch

from swarm_node.protocol.averaging.pairwise import PairExchange, PairFailed, PairOutcome

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.base import Strategy
from swarm_node.strategies.lowcomm.diloco import COMPRESSIONS, load_params
from swarm_node.strategies.leader import LeaderElection
from swarm_node.strategies.lowcomm.outer_math import noloco_update, pair_peers, pairing_seed, replica_spread
from swarm_node.protocol.averaging.state_transfer import StateService, StateTransferError
from swarm_node.strategies.lowcomm.options import EARLY_TRAINING_OUTER, NoLoCoOptions
from swarm_node.strategies.lowcomm.panel import pair_rounds_panel
from swarm_node.strategies.page_panel import PagePanel

REFUSED_RETRY_S = 0.25  # between asks of a partner whose view paired it otherwise



class NoLoCoStrategy(Strategy):
    name = "noloco"
    options = NoLoCoOptions
    churn_profile = ChurnProfile(node_args=("--inner-steps", "5"))  # per-peer φ by design
    demo_profile = DemoProfile(steps=200, node_args=EARLY_TRAINING_OUTER,
                               shows="no global round: every H steps each peer averages with one random partner")

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg, node = ctx.options, ctx.node
        self.H = cfg.inner_steps
        self.params = ctx.trainer.parameters_list()
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numel = sum(p.numel() for p in self.params)
        self.phi = [p.detach().float().cpu().clone() for p in self.params]
        self.momentum: list[torch.Tensor] | None = None
        self.compression = COMPRESSIONS[node.compression]
        self.election = LeaderElection(ctx, self.name)
        self.pairs = PairExchange(ctx.transport, run_id=ctx.spec.run_id, shapes=self.shapes,
                                  compression=self.compression, deadlines=ctx.deadlines,
                                  is_partner=lambda round_no, caller: self.partner(round_no) == caller,
                                  on_reject=lambda reason: ctx.metrics.rejected_messages.labels(reason=reason).inc())
        self._resumed = False  # restored from this peer's own checkpoint
        self.state = StateService(ctx.transport, ctx.trainer, ctx.compute, timeout_s=ctx.deadlines.state_download,
                                  extra_snapshot=self._extra_snapshot, extra_restore=self._extra_restore)

    async def start(self) -> None:
        await self.pairs.start()
        await self.state.start()

    # ------------------------------------------------------------------ joiner state
    def _extra_snapshot(self):
        """A joiner takes the donor's φ_j and momentum δ_j along with its θ_j, not θ_j as its
        φ: it then continues the donor's outer trajectory."""
        has = self.momentum is not None
        return {"noloco": 1, "has_momentum": has}, list(self.phi) + (list(self.momentum) if has else [])

    def checkpoint_state(self) -> dict | None:
        """φ_i and δ_i: a full stop resumes this peer's own outer trajectory."""
        meta, tensors = self._extra_snapshot()
        return {"meta": meta, "tensors": list(tensors), "agreed_weights": list(self.phi)}

    def restore_checkpoint_state(self, state: dict) -> None:
        self._extra_restore(dict(state["meta"]), list(state["tensors"]))
        self._resumed = True

    def _extra_restore(self, meta: dict, tensors: list[torch.Tensor]) -> None:
        n = len(self.params)
        if meta.get("noloco") != 1:  # a donor without outer state (older version): φ ← its θ
            self.phi, self.momentum = [p.detach().float().cpu().clone() for p in self.params], None
            return
        has = meta.get("has_momentum") is True
        if len(tensors) != n * (2 if has else 1) or any(tuple(t.shape) != s for t, s in zip(tensors, self.shapes * 2)):
            raise StateTransferError("noloco outer state does not match this model")
        self.phi = [t.float().clone() for t in tensors[:n]]
        self.momentum = [t.float().clone() for t in tensors[n:]] if has else None

    # ------------------------------------------------------------------ pairing
    def partner(self, round_no: int) -> str | None:
        members = sorted({m.peer_id for m in self.election.peers()} | {self.ctx.peer_id})
        return pair_peers(members, pairing_seed(self.ctx.spec.run_id, round_no))[self.ctx.peer_id]

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        ctx = self.ctx
        peer_steps = [m.record.step for m in self.election.peers()]
        if self.election.online_peers() and joins_from_a_peer(self._resumed, ctx.trainer.step, peer_steps, self.H):
            try:
                await self.state.download(self.election.leader())  # θ_j, φ_j and δ_j (see _extra_restore)
            except Exception as e:
                ctx.log.warning("could not download a peer's state, starting from the seed: %s", e)
        ctx.progress.state = "online"
        while not ctx.should_stop() and (ctx.node.max_steps == 0 or ctx.trainer.step < ctx.node.max_steps):
            if not await self.wait_for_peers():
                break
            for _ in range(self.H - ctx.trainer.step % self.H):  # fewer after a resume in mid-round
                if ctx.should_stop() or (ctx.node.max_steps and ctx.trainer.step >= ctx.node.max_steps):
                    break
                await self.local_step()
            if ctx.trainer.step % self.H == 0 and not ctx.should_stop():
                await self._pair_round(ctx.trainer.step // self.H)

    async def _pair_round(self, round_no: int) -> None:
        ctx, t0 = self.ctx, time.perf_counter()
        theta = [p.detach().float().cpu().clone() for p in self.params]
        # Views of the membership differ for up to an announce interval (a peer that just
        # started): a partner that refuses is asked again, with the pairing recomputed, until
        # the round's window ends. Skipping at once let a fresh peer race through its rounds alone.
        retry_until = time.monotonic() + ctx.deadlines.gather
        while True:
            partner = self.partner(round_no)
            self.pairs.post(round_no, theta, partner)
            if partner is None:
                self._account("no_peers", 1, time.perf_counter() - t0, None, "odd one out")
                return
            try:
                theirs = await self.pairs.exchange(round_no, partner, initiate=ctx.peer_id < partner)
                break
            except PairFailed as e:  # a partner ahead will not come back for this round: catch up instead
                if (e.outcome is PairOutcome.REFUSED and not ctx.should_stop()
                        and time.monotonic() + REFUSED_RETRY_S < retry_until):
                    await asyncio.sleep(REFUSED_RETRY_S)
                    continue
                timed_out = e.outcome in (PairOutcome.TIMEOUT, PairOutcome.PARTNER_AHEAD)
                self._account("timeout" if timed_out else "error", 1, time.perf_counter() - t0, partner, str(e))
                return
        lr, beta = ctx.options.outer_lr, ctx.options.momentum()
        # γ = η: the partner's φ cancels, so our own φ stands in for it in the group
        self.phi, self.momentum = await ctx.compute(lambda: noloco_update(
            self.phi, self.momentum, [self.phi, self.phi], [theta, theirs], lr=lr, gamma=lr, beta=beta))
        await ctx.compute(load_params, self.params, self.phi)
        spread = replica_spread([theta, theirs])
        self._account("ok", 2, time.perf_counter() - t0, partner, f"pair spread {spread:.4g}")

    # ------------------------------------------------------------------ helpers
    def page_panel(self) -> PagePanel:
        return pair_rounds_panel(self.round_history, inner_steps=self.H)

    def _account(self, outcome: str, size: int, duration_s: float, partner: str | None, detail: str) -> None:
        if outcome not in ("ok", "no_peers"):
            self.ctx.log.info("pair round skipped (%s): %s", outcome, detail)
        self.record_round(outcome, size, duration_s, round=self.ctx.trainer.step // self.H, partner=partner or "",
                          detail=detail)


def joins_from_a_peer(resumed: bool, my_step: int, peer_steps: list[int], inner_steps: int) -> bool:
    """Whether a peer starting among online peers takes a live peer's weights. A new peer does.
    A peer back from its own checkpoint goes on with its own θ, φ and δ after a full stop (the
    pair rounds pull the replicas together), unless the swarm trained a round or more past it
    (a crash with an older checkpoint): its rounds would then pair with no one."""
    return not resumed or max(peer_steps, default=0) >= my_step + inner_steps
