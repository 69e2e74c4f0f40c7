"""Gradient codes: encode partition gradients so the full sum decodes from any n - s workers.

Setting (Tandon et al., ICML 2017): a step's data is n partitions with gradients g_0..g_{n-1}.
Worker i sends f_i = sum_j B[i, j] * g_j over its *support* (the non-zero columns of row i).
For any surviving set F with |F| >= n - s there are a with a^T B_F = 1^T: sum_F a_i f_i = sum_j g_j.

Schemes: `none` (B = I, s = 0: plain data parallel, every worker needed); `frc` (fractional
repetition, (s+1) | n: n/(s+1) groups of s+1 each compute their group's plain sum, decoded
exactly from one reply per group); `cyclic` (any n > s: worker i holds partitions i..i+s mod n;
B's rows lie in the null space of a random s x n H with H·1 = 0; float64 least-squares decode,
refused when the coefficients blow up). Invariants: B is a pure function of (scheme, n, s,
seed), so peers agree without a message (cyclic keeps the seeded H whose worst decode has the
smallest max |a|); `decoding` returns a `Decoding` within the residual and max |a| bounds or
`NotDecodable` ("insufficient", "ill_conditioned"); with more than n - s replies cyclic uses
all of them; all decoding arithmetic is float64.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SCHEMES = ("none", "frc", "cyclic", "auto")
MAX_COEFFICIENT = 1e4  # reject a decode whose max |a| exceeds this (fp32 inputs lose precision)
MAX_RESIDUAL = 1e-8  # reject a decode whose |a^T B_F - 1|_inf exceeds this
CYCLIC_CANDIDATES = 8  # random H draws tried; the best conditioned is kept
PATTERNS_SAMPLED = 400  # straggler patterns scored per candidate when C(n, s) is larger


class NotDecodable(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # "insufficient" | "ill_conditioned"


@dataclass(frozen=True)
class Decoding:
    coefficients: dict[int, float]  # worker index -> a_i (workers with a_i == 0 omitted for frc/none)
    max_coefficient: float
    residual: float


@dataclass(frozen=True)
class GradientCode:
    scheme: str  # "none" | "frc" | "cyclic" (never "auto": resolved at construction)
    n: int
    s: int
    matrix: np.ndarray  # n x n float64, row i = worker i's partition weights

    @property
    def redundancy(self) -> float:
        """Fraction of the step's data each worker computes: (s+1)/n."""
        return (self.s + 1) / self.n

    @property
    def min_replies(self) -> int:
        return self.n - self.s

    def support(self, worker: int) -> list[tuple[int, float]]:
        """(partition, weight) pairs worker `worker` must compute, in partition order."""
        row = self.matrix[worker]
        return [(j, float(row[j])) for j in range(self.n) if row[j] != 0.0]

    def group(self, worker: int) -> int:
        """frc: the repetition group of a worker (others: the worker itself)."""
        return worker // (self.s + 1) if self.scheme == "frc" else worker

    def decoding(self, available: Sequence[int], *, max_coefficient: float = MAX_COEFFICIENT,
                 max_residual: float = MAX_RESIDUAL) -> Decoding:
        """Coefficients to combine the replies of `available` workers into sum_j g_j.

        With more than n - s replies the cyclic decoder uses all of them: the minimum-norm
        solution over a superset is never larger (in 2-norm) than over the subset."""
        avail = sorted(set(int(i) for i in available))
        if any(not 0 <= i < self.n for i in avail):
            raise ValueError(f"worker index out of range 0..{self.n - 1}: {avail}")
        if self.scheme in ("none", "frc"):
            chosen: dict[int, int] = {}
            for i in avail:
                chosen.setdefault(self.group(i), i)  # lowest index of each group
            groups = self.n // (self.s + 1)
            if len(chosen) < groups:
                missing = sorted(set(range(groups)) - set(chosen))
                raise NotDecodable("insufficient", f"no reply from group(s) {missing}")
            return Decoding({i: 1.0 for i in chosen.values()}, 1.0, 0.0)
        if len(avail) < self.min_replies:
            raise NotDecodable("insufficient", f"{len(avail)} replies, need {self.min_replies}")
        rows = self.matrix[avail]  # |F| x n
        a, *_ = np.linalg.lstsq(rows.T, np.ones(self.n), rcond=None)  # minimum-norm solution
        residual = float(np.max(np.abs(rows.T @ a - 1.0)))
        biggest = float(np.max(np.abs(a)))
        if not (math.isfinite(residual) and math.isfinite(biggest)) or residual > max_residual \
                or biggest > max_coefficient:
            raise NotDecodable("ill_conditioned", f"max|a|={biggest:.3g} residual={residual:.3g}")
        return Decoding({i: float(c) for i, c in zip(avail, a)}, biggest, residual)


def resolve_scheme(scheme: str, n: int, s: int) -> tuple[str, int]:
    """The concrete (scheme, s) for a group of n workers asked to tolerate s stragglers."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown gradient-coding scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if n < 1:
        raise ValueError("a gradient code needs at least one worker")
    s = max(0, min(s, n - 1))
    if scheme == "none" or s == 0:
        return "none", 0
    if scheme == "auto":
        scheme = "frc" if n % (s + 1) == 0 else "cyclic"
    if scheme == "frc" and n % (s + 1):
        raise ValueError(f"fractional repetition needs (s+1) | n; got n={n}, s={s} (use cyclic or auto)")
    return scheme, s


@functools.lru_cache(maxsize=64)
def build_code(scheme: str, n: int, s: int, seed: int = 0) -> GradientCode:
    scheme, s = resolve_scheme(scheme, n, s)
    if scheme == "none":
        return GradientCode("none", n, 0, np.eye(n))
    if scheme == "frc":
        m = np.zeros((n, n))
        for i in range(n):
            k = i // (s + 1)
            m[i, k * (s + 1):(k + 1) * (s + 1)] = 1.0
        return GradientCode("frc", n, s, m)
    rng = np.random.default_rng([seed, n, s])
    best: tuple[float, np.ndarray] | None = None
    for _ in range(CYCLIC_CANDIDATES):
        m = _cyclic_matrix(n, s, rng)
        if m is None:
            continue
        score = worst_coefficient(GradientCode("cyclic", n, s, m), rng)
        if best is None or score < best[0]:
            best = (score, m)
    if best is None:
        raise RuntimeError(f"could not build a cyclic code for n={n}, s={s}")
    return GradientCode("cyclic", n, s, best[1])


def _cyclic_matrix(n: int, s: int, rng: np.random.Generator) -> np.ndarray | None:
    h = rng.standard_normal((s, n))
    h[:, -1] = -h[:, :-1].sum(axis=1)  # H·1 = 0, so 1 lies in null(H)
    m = np.zeros((n, n))
    for i in range(n):
        others = [(i + k) % n for k in range(1, s + 1)]
        sub = h[:, others]
        if abs(np.linalg.det(sub)) < 1e-12:
            return None
        m[i, i] = 1.0
        m[i, others] = np.linalg.solve(sub, -h[:, i])
    return m


def straggler_patterns(n: int, s: int, rng: np.random.Generator | None = None,
                       limit: int = PATTERNS_SAMPLED) -> list[tuple[int, ...]]:
    """Every set of s stragglers when there are at most `limit`, else a random sample."""
    total = math.comb(n, s)
    if total <= limit or rng is None:
        return list(itertools.combinations(range(n), s))
    return [tuple(sorted(rng.choice(n, size=s, replace=False).tolist())) for _ in range(limit)]


def worst_coefficient(code: GradientCode, rng: np.random.Generator | None = None) -> float:
    """Largest max |a| over straggler patterns of size s (inf if any pattern fails)."""
    worst = 0.0
    for missing in straggler_patterns(code.n, code.s, rng):
        avail = [i for i in range(code.n) if i not in missing]
        try:
            worst = max(worst, code.decoding(avail, max_coefficient=math.inf, max_residual=1e-6).max_coefficient)
        except NotDecodable:
            return math.inf
    return worst


def combine(decoding: Decoding, replies: Mapping[int, Sequence[torch.Tensor]],
            dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """sum_i a_i * f_i, accumulated in float64, returned as `dtype` (same shapes as the replies)."""
    used = [i for i, c in decoding.coefficients.items() if c != 0.0]
    if not used:
        raise ValueError("decoding uses no reply")
    first = replies[used[0]]
    out = [torch.zeros(t.shape, dtype=torch.float64) for t in first]
    for i in used:
        coef = decoding.coefficients[i]
        for acc, t in zip(out, replies[i]):
            acc.add_(t.detach().to("cpu", torch.float64), alpha=coef)
    return [t.to(dtype) for t in out]
