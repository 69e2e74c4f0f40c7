"""`streaming-diloco`: DiLoCo whose parameters sync in P staggered fragments (contiguous groups
of whole layers, ~1/P of the parameters each), overlapped with training.

Fragment f is sent after every inner
step t with t ≡ (f+1)·H/P (mod H): its pseudo-gradient Δ_f = φ_f − θ_f goes into a round
(the same freeze / butterfly all-reduce / commit transaction as `diloco`) that runs on the
event loop while the next τ inner steps run on the compute thread. At step t+τ the
committed mean updates φ_f with fragment f's own outer Nesterov optimizer, and the local
fragment merges: θ_f ← α·θ_f + (1−α)·φ_f. Peak traffic per round is 1/P of DiLoCo's.

Invariants: as in diloco.py, φ and the outer momenta change only on a committed round,
identically everywhere (hash(φ) is checked at every join). τ < H/P guarantees each
fragment's round is applied before the next one is sent. An aborted fragment round is
retried with the same Δ_f up to `FRAGMENT_ATTEMPTS` times, then skipped until the fragment's
next turn, leaving φ_f and θ_f as they are (no local-only update). With P=1, τ=0, α=0 this is DiLoCo.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import torch

from swarm_node.strategies.churn_profile import ChurnProfile
from swarm_node.strategies.demo_profile import DemoProfile
from swarm_node.strategies.lowcomm.diloco import DiLoCoStrategy, merged_work, _work, flatten, unflatten
from swarm_node.strategies.lowcomm.outer_math import OuterOptimizer, fragment_due, layer_fragments, merge, round_digest
from swarm_node.protocol.averaging.transaction import RoundOutcome, RoundStatus
from swarm_node.protocol.averaging.state_transfer import StateTransferError
from swarm_node.strategies.lowcomm.options import EARLY_TRAINING_OUTER, StreamingOptions

FRAGMENT_ATTEMPTS = 3  # backoff 0.5 s, 1 s: a dead member's absence is settled by the grace window


@dataclass
class _InFlight:
    """One fragment round between its send and its apply step, with what a retry resends."""
    fragment: int
    round_no: int
    phi_hash: str
    weight: float
    delta: torch.Tensor
    task: asyncio.Task


class StreamingDiLoCoStrategy(DiLoCoStrategy):
    name = "streaming-diloco"
    options = StreamingOptions
    churn_profile = ChurnProfile(node_args=("--inner-steps", "10", "--fragments", "2"), consistency="phi_hash")
    demo_profile = DemoProfile(steps=200, node_args=(*EARLY_TRAINING_OUTER, "--fragments", "2"),
                               shows="DiLoCo with the model's fragments exchanged in turn, overlapped with training")

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.options
        self.P, self.tau, self.alpha = cfg.fragments, cfg.overlap_steps, cfg.mix_alpha
        self.every = self.H // self.P
        self.frags = layer_fragments(ctx.trainer.parameter_names(), [p.numel() for p in self.params], self.P)
        self.outers = [OuterOptimizer([self.phi[i] for i in idx], lr=cfg.outer_lr, momentum=cfg.momentum(),
                                      nesterov=True) for idx in self.frags]
        self.pending: dict[int, _InFlight] = {}  # apply step -> the fragment round applied there
        self._step_lock = asyncio.Lock()  # a step with its sends/applies, or a snapshot being served

    # ------------------------------------------------------------------ shared state
    def _extra_snapshot(self):
        momentum, has = [], []
        for f, idx in enumerate(self.frags):
            bufs = self.outers[f].state_dict()["optimizer"].get("state", {})
            present = all(bufs.get(j, {}).get("momentum_buffer") is not None for j in range(len(idx)))
            has.append(present)
            if present:
                momentum += [bufs[j]["momentum_buffer"] for j in range(len(idx))]
        return {"round": self.round_no, "has_momentum": has, "work": self.work}, list(self.phi) + momentum

    @contextlib.asynccontextmanager
    async def _snapshot_guard(self):
        """Serve state only between two steps, with no fragment round in flight. A snapshot taken
        between a send and its apply carries φ without that round's commit; one taken after a
        step but before that step's send leaves the adopter to skip the round everyone else
        joins. Either way the adopter is one commit behind at its next round and is sent to
        resync, into the same race, again and again (the churn lab's restarted peer). The run
        loop holds `_step_lock` for a step and its sends/applies; since τ < H/P there is a gap
        between steps with nothing in flight, so the wait is short. It is bounded anyway, the
        wait for the lock included (a step whose round retries holds it for whole round
        timeouts, which made the requester's download miss its deadline while it was the peer
        that round waited for): a stale snapshot only costs the adopter one more resync."""
        deadline = time.monotonic() + self.ctx.deadlines.in_flight_round
        held = False
        while True:
            try:
                await asyncio.wait_for(self._step_lock.acquire(), max(0.001, deadline - time.monotonic()))
                held = True
            except asyncio.TimeoutError:
                break
            if not self.pending or time.monotonic() >= deadline:
                break
            self._step_lock.release()  # let the loop reach the round's apply step
            held = False
            await asyncio.sleep(0.02)
        try:
            if self.pending or not held:
                self.ctx.log.warning("serving state with a fragment round still in flight")
            yield
        finally:
            if held:
                self._step_lock.release()

    def checkpoint_state(self) -> dict | None:
        # with a fragment round in flight φ lacks its commit: no outer state rather than a torn one
        return None if self.pending else super().checkpoint_state()

    def _extra_restore(self, meta: dict, tensors: list[torch.Tensor], reset_theta: bool = True) -> None:
        n, has = len(self.phi), meta.get("has_momentum")
        if not isinstance(meta.get("round"), int) or not isinstance(has, list) or len(has) != self.P:
            raise StateTransferError("streaming outer state does not match this configuration")
        expected = n + sum(len(idx) for idx, h in zip(self.frags, has) if h)
        if len(tensors) != expected or any(a.shape != b.shape for a, b in zip(tensors[:n], self.phi)):
            raise StateTransferError("outer weights have the wrong count or shapes")
        phi, cursor = tensors[:n], n
        for f, idx in enumerate(self.frags):
            opt = self.outers[f].state_dict()["optimizer"]
            if has[f]:
                opt["state"] = {j: {"momentum_buffer": tensors[cursor + j]} for j in range(len(idx))}
                cursor += len(idx)
            else:
                opt["state"] = {}
            self.outers[f].load_state_dict({"phi": [phi[i] for i in idx], "optimizer": opt})
        self.phi = [t.clone() for t in phi]
        self.phi_hash = round_digest(self.phi)
        self.round_no = meta["round"]
        self.work = _work(meta)
        self.pending.clear()
        if reset_theta:
            self._reset_theta()

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        ctx = self.ctx
        if self.election.online_peers():
            await self._adopt(self.election.leader(), "joining a running swarm")
        try:
            while not ctx.should_stop() and (ctx.node.max_steps == 0 or ctx.trainer.step < ctx.node.max_steps):
                if not await self.wait_for_peers():
                    break
                if self._adopt_from is not None and not self.pending:
                    await self._catch_up()
                async with self._step_lock:  # a step and its rounds are one unit to a snapshot
                    if not await self.local_step():
                        continue
                    t = ctx.trainer.step
                    if self.tau == 0:
                        await self._maybe_send(t)
                        await self._maybe_apply(t)
                    else:
                        await self._maybe_apply(t)
                        await self._maybe_send(t)
            # finish rounds already in flight so the final weights include them
            for t in sorted(self.pending):
                await self._maybe_apply(t)
        finally:
            for flight in self.pending.values():
                flight.task.cancel()

    async def _maybe_send(self, t: int) -> None:
        f = fragment_due(t, self.H, self.P)
        if f is None:
            return
        idx = self.frags[f]
        if self.weight > 0:
            delta = await self.ctx.compute(
                lambda: flatten([self.phi[i] - self.params[i].detach().float().cpu() for i in idx]))
        else:
            delta = torch.zeros(sum(self.params[i].numel() for i in idx))
        # A round is named by its place in the schedule, which fixes the fragment (and so the
        # vector length) for everyone; a peer that missed a commit differs in hash(φ) instead.
        self.round_no = t // self.every
        task = asyncio.create_task(self._round(self.round_no, self.phi_hash, self.weight, delta))
        self.pending[t + self.tau] = _InFlight(f, self.round_no, self.phi_hash, self.weight, delta, task)

    async def _round(self, round_no: int, phi_hash: str, weight: float, delta: torch.Tensor) -> RoundOutcome:
        out = await self.rounds.run_round(round_no, phi_hash, weight, delta)
        if out.status is RoundStatus.NOT_LEADER and out.leader in self.election.expected():
            # our view of the leader is off (e.g. we suspected it after one lost reply): ask the
            # peer it named, once, as diloco does; skipping instead would train on alone, fast
            out = await self.rounds.run_round(round_no, phi_hash, weight, delta, leader=out.leader)
        return out

    async def _maybe_apply(self, t: int) -> None:
        if t not in self.pending:
            return
        flight = self.pending[t]  # stays pending until settled: _snapshot_guard waits on it
        try:
            for attempt in range(1, FRAGMENT_ATTEMPTS + 1):
                if await self._settle(flight, attempt):
                    return
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
                flight.task = asyncio.create_task(
                    self._round(flight.round_no, flight.phi_hash, flight.weight, flight.delta))
        finally:
            self.pending.pop(t, None)

    async def _settle(self, flight: _InFlight, attempt: int) -> bool:
        """Wait for one attempt of a fragment round and act on it; False: retry it."""
        f, t0 = flight.fragment, time.perf_counter()
        out: RoundOutcome = await flight.task
        duration = time.perf_counter() - t0
        if out.status is RoundStatus.COMMITTED:
            await self.ctx.compute(self._apply_fragment, f, out.result)
            self.work += merged_work(out.group)
            self.election.mark_committed(out.group)
            self._account("ok", len(out.group), duration, out)
            self.ctx.log.debug("fragment %d round %d committed (attempt %d): phi %s (delta %s)", f, flight.round_no,
                               attempt, self.phi_hash, out.result_hash)
            return True
        if out.status is RoundStatus.RESYNC:
            self._account("resync", 0, duration, out)
            for other in self.pending.values():
                other.task.cancel()  # this attempt's task is done already
            self.pending.clear()
            await self._adopt(out.leader, out.detail)
            return True
        self._aborted(out, duration)
        if attempt == FRAGMENT_ATTEMPTS or self.ctx.should_stop():
            self.ctx.log.info("fragment %d round %d skipped after %d attempts: %s", f, flight.round_no, attempt,
                              out.detail)
            return True
        self.ctx.log.info("fragment %d round %d attempt %d/%d aborted, retrying: %s", f, flight.round_no, attempt,
                          FRAGMENT_ATTEMPTS, out.detail)
        return False

    def _apply_fragment(self, f: int, mean_delta: torch.Tensor) -> None:
        idx = self.frags[f]
        new_phi = self.outers[f].step(unflatten(mean_delta, [self.phi[i] for i in idx]))
        theta = [self.params[i].detach().float().cpu() for i in idx]
        mixed = merge(theta, new_phi, self.alpha)
        with torch.no_grad():
            for i, p_new, m in zip(idx, new_phi, mixed):
                self.phi[i] = p_new
                self.params[i].copy_(m.to(self.params[i].device, self.params[i].dtype))
        self.phi_hash = round_digest(self.phi)
        self.weight = 1.0
