"""The aggregator's book of gradient-coded steps: plans, coded replies, decodes, stragglers.

No transport here: `strategy.py` maps RPCs onto these objects. One `CodedRound` per step attempt:
  plan      the sorted members (worker i = members[i]) and the code for n = len(members),
            fixed when the round is created; a retry is a new round.
  replies   coded gradients bucketed by the replica hash they were computed from; only one
            bucket is ever combined (a drifted peer cannot poison a decode), as soon as its
            workers form a decodable set.
  result    the decoded MEAN gradient (sum / n), tagged with its bucket hash; a peer applies
            it only if its own replica hash equals that tag.
  deadline  `timeout_s` after creation: an undecodable round fails, and its silent members
            are reported so the next plan can leave them out.
  overtaken a round the swarm has moved past (a new aggregator that was behind caught up):
            its waiters are told to download state, without waiting out the deadline.
Stragglers are the plan members missing from the decode set; a late reply's lateness is recorded.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass, field

import torch

from swarm_node.strategies.gradcode.codes import Decoding, GradientCode, NotDecodable, build_code, combine


@dataclass(frozen=True)
class Plan:
    step: int
    attempt: int
    members: tuple[str, ...]
    code: GradientCode
    seed: int

    @property
    def plan_id(self) -> str:
        blob = f"{self.step}|{self.attempt}|{','.join(self.members)}|{self.code.scheme}|{self.code.s}|{self.seed}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def index(self, peer: str) -> int | None:
        return self.members.index(peer) if peer in self.members else None


def make_plan(step: int, attempt: int, members: list[str], scheme: str, stragglers: int, seed: int) -> Plan:
    """The plan for `members`; an frc request the current n does not fit (churn changed n so
    that (s+1) does not divide it) becomes cyclic for this plan instead of stopping training."""
    members = sorted(set(members))
    n = len(members)
    if scheme == "frc" and n % (min(stragglers, n - 1) + 1):
        scheme = "cyclic"
    return Plan(step, attempt, tuple(members), build_code(scheme, n, stragglers, seed), seed)


@dataclass
class DecodeEvent:
    outcome: str  # "exact" | "wait_more"
    decoding: Decoding | None = None


@dataclass
class CodedRound:
    plan: Plan
    timeout_s: float
    created: float = field(default_factory=time.monotonic)
    buckets: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)
    arrivals: dict[int, float] = field(default_factory=dict)  # worker -> seconds after creation
    result: list[torch.Tensor] | None = None
    result_hash: str | None = None
    decoding: Decoding | None = None
    decoded_at: float | None = None
    failed: bool = False
    overtaken: bool = False  # the swarm is past this step under another aggregator: waiters resync
    refused_decodes: int = 0  # ill-conditioned attempts (each means: wait for one more reply)
    late: dict[int, float] = field(default_factory=dict)  # straggler -> seconds after the decode
    done: asyncio.Event = field(default_factory=asyncio.Event)
    encoded: list | None = None  # result chunks, encoded once for every reader
    fetched: set[str] = field(default_factory=set)  # peers the result was served to
    # replies needed before a decode counts (the run-long quorum): a cut-off aggregator whose plan
    # still lists peers it cannot reach must not decode a step from its own reply alone
    min_replies: int = 1

    @property
    def step(self) -> int:
        return self.plan.step

    @property
    def decoded(self) -> bool:
        return self.result is not None

    def add(self, worker: int, param_hash: str, grads: list[torch.Tensor]) -> str:
        """Record worker's coded gradient; returns "accepted", "late" or "failed"."""
        now = time.monotonic()
        if self.failed or self.overtaken:
            return "failed"
        if self.decoded:
            self.late.setdefault(worker, now - (self.decoded_at or now))
            return "late"
        self.arrivals.setdefault(worker, now - self.created)
        bucket = self.buckets.setdefault(param_hash, {})
        bucket.setdefault(worker, grads)
        self._try_decode(param_hash, bucket)
        return "accepted"

    def _try_decode(self, param_hash: str, bucket: dict[int, list[torch.Tensor]]) -> None:
        code = self.plan.code
        if len(bucket) < self.min_replies:
            return
        try:
            dec = code.decoding(sorted(bucket))
        except NotDecodable as e:
            if e.reason == "ill_conditioned":
                self.refused_decodes += 1
            return
        total = combine(dec, bucket)
        self.result = [t.div_(code.n) for t in total]  # the mean over the step's partitions
        self.result_hash, self.decoding, self.decoded_at = param_hash, dec, time.monotonic()
        self.done.set()

    def fail(self) -> None:
        if not self.decoded and not self.failed:
            self.failed = True
            self.done.set()

    def overtake(self) -> None:
        """Not a failure: nobody will reply to this step any more (the others are past it), so
        wake its waiters to download state instead of waiting out the deadline."""
        if not self.decoded and not self.failed:
            self.overtaken = True
            self.done.set()

    def expired(self) -> bool:
        return time.monotonic() - self.created > self.timeout_s

    def stragglers(self) -> list[str]:
        """Plan members whose reply was not used (late, missing or from another replica)."""
        used = set(self.decoding.coefficients) if self.decoding else set()
        return [p for i, p in enumerate(self.plan.members) if i not in used]

    def silent(self) -> list[str]:
        """Plan members that sent nothing at all (for a failed round: suspects)."""
        return [p for i, p in enumerate(self.plan.members) if i not in self.arrivals and i not in self.late]


def chosen_stragglers(seed: int, step: int, members: tuple[str, ...], count: int, prob: float) -> set[str]:
    """Straggler injection for tests and benches: the same `count` random members of step
    `step` on every peer (seeded by run seed and step), with probability `prob`."""
    rng = random.Random(f"straggle|{seed}|{step}")
    if not members or count <= 0 or rng.random() >= prob:
        return set()
    return set(rng.sample(list(members), min(count, len(members))))
