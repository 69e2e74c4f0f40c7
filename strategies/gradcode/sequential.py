"""Sequential gradient coding (SGC): pure state machines, a bursty straggler model, a runtime model.

Network-free and deterministic: the two schemes of Krishnan, Ebrahimi, Khisti, "Sequential Gradient
Coding for Straggler Mitigation" (ICLR 2023, arXiv 2211.13802), reimplemented from the paper, and
plain per-round gradient coding (GC) as the baseline. No encode/decode arithmetic happens here: a
"result" only counts toward decodability; the real codes are in strategies/gradcode/codes.py.

Model: n workers and J jobs (job = one full gradient over a dataset of size 1). Job t (0-based)
starts in round t and must be decodable at the end of round t + T (T: the scheme's delay). Each
round the master gives every worker a list of tasks; a non-straggler delivers all of them at the
end of the round, a straggler none (erasure). The master learns who straggled when the round ends
and may adapt the next round; it never sees the future. The load is the fraction of one job's
dataset a worker computes in a steady-state round; task sizes are exact `Fraction`s, so loads
match the closed forms exactly. Stragglers follow the (B, W, λ)-bursty model (`conforms`); the
schemes are `GradientCodingScheme`, `SelectiveRepetitionSGC` and `MultiplexedSGC`.
"""
from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

GCRule = Literal["le", "lt"]


# ---------------------------------------------------------------------------------------------
# (B, W, λ)-bursty straggler model
# ---------------------------------------------------------------------------------------------

def check_model_params(B: int, W: int, lam: int, n: int | None = None) -> None:
    """Raise ValueError unless 1 <= B < W and 0 <= lam (< n when n is given)."""
    for name, v in (("B", B), ("W", W), ("lam", lam)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if B < 1 or W <= B:
        raise ValueError(f"need 1 <= B < W, got B={B} W={W}")
    if lam < 0:
        raise ValueError(f"need lam >= 0, got {lam}")
    if n is not None and lam >= n:
        raise ValueError(f"need lam < n, got lam={lam} n={n}")


def as_trace(trace: object, n: int | None = None) -> np.ndarray:
    """Turn `trace` into a 2-D bool array (rounds, n), rejecting malformed input."""
    arr = np.asarray(trace)
    if arr.ndim != 2:
        raise ValueError(f"a trace is a 2-D (rounds, n) array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError("a trace holds booleans (or 0/1)")
        arr = arr.astype(np.bool_)
    if n is not None and arr.shape[1] != n:
        raise ValueError(f"trace has {arr.shape[1]} workers, scheme has n={n}")
    return arr


def may_straggle(trace: np.ndarray, r: int, i: int, B: int, W: int, lam: int) -> bool:
    """Whether worker i can be marked straggling in round r without breaking C1 or C2.

    Looks only at rounds <= r, including what row r holds so far. The generator fills rows in
    order, so checking the window that ends at r is enough: each later window is checked when its
    own last row is filled.
    """
    lo = max(0, r - W + 1)
    hi = r - B  # C2 forbids an earlier straggle of i in [r-W+1, r-B]
    if hi >= lo and trace[lo:hi + 1, i].any():
        return False
    distinct = trace[lo:r + 1].any(axis=0)
    return bool(distinct[i]) or int(distinct.sum()) < lam


def round_conforms(history: np.ndarray, stragglers: Collection[int], B: int, W: int, lam: int) -> bool:
    """Whether history (conforming, rows 0..r-1) plus round r's `stragglers` still conforms."""
    n = history.shape[1] if history.ndim == 2 else 0
    r = history.shape[0]
    row = np.zeros((1, n), dtype=np.bool_)
    row[0, list(stragglers)] = True
    full = np.vstack([history, row]) if r else row
    lo = max(0, r - W + 1)
    if int(full[lo:].any(axis=0).sum()) > lam:
        return False
    hi = r - B
    return not (hi >= lo and full[lo:hi + 1, list(stragglers)].any())


def conforms(trace: object, B: int, W: int, lam: int) -> tuple[bool, str]:
    """Check both conditions of the (B, W, λ)-bursty model; (True, "ok") or (False, reason).

    A trace is a bool array of shape (rounds, n); trace[r, i] is True when worker i straggles in
    round r. The model needs 1 <= B < W and 0 <= λ < n.
      (C1) Any W consecutive rounds hold at most λ distinct stragglers.
      (C2) Within any W consecutive rounds, a worker's straggling rounds lie inside one run of at
           most B consecutive rounds. Equivalently, a worker that straggles in round r straggles
           in none of rounds [r-W+1, r-B]. We check this second form, which bounds the span of
           the run. A worker may therefore skip a round inside its run: straggling in r-2 and r,
           but not in r-1, is allowed when B >= 3.
    A window that reaches past either end of the trace is a subset of a full window, so only full
    windows are checked. A trace shorter than W is checked as one window.
    """
    check_model_params(B, W, lam)
    tr = as_trace(trace)
    rounds, n = tr.shape
    for w in range(max(1, rounds - W + 1)):
        who = np.flatnonzero(tr[w:w + W].any(axis=0))
        if who.size > lam:
            last = min(w + W, rounds) - 1
            return False, (f"C1: rounds {w}..{last} hold {who.size} distinct stragglers > lam={lam} "
                           f"(workers {who.tolist()})")
    for i in range(n):
        rs = np.flatnonzero(tr[:, i])
        for r in rs:
            earlier = rs[(rs >= r - W + 1) & (rs <= r - B)]
            if earlier.size:
                a = int(earlier[0])
                return False, (f"C2: worker {i} straggles in rounds {a} and {int(r)}, {int(r) - a} apart "
                               f"(in [B, W-1] = [{B}, {W - 1}]): not one run of <= B={B} rounds "
                               f"within a window of W={W}")
    return True, "ok"


def no_stragglers(n: int, rounds: int) -> np.ndarray:
    """The all-False trace."""
    return np.zeros((rounds, n), dtype=np.bool_)


def iid_trace(n: int, rounds: int, p: float, *, seed: int) -> np.ndarray:
    """Each worker straggles independently with probability p in each round. This usually breaks the bursty model."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return np.random.default_rng(seed).random((rounds, n)) < p


@dataclass(frozen=True, slots=True)
class BurstyStragglerModel:
    """A seeded generator of (B, W, λ)-conforming straggler traces, and of traces that break it.

    Generator: in each round, visit the workers in a random order. A worker in a burst asks to
    go on straggling until its drawn length (uniform in 1..B) runs out. Any other worker asks to
    start a burst with probability p_start. A request is granted only if `may_straggle` allows it,
    so the trace conforms by construction. A request that is refused ends the burst. p_start = 1
    saturates the model, which makes a hard test.
    """

    B: int
    W: int
    lam: int

    def __post_init__(self) -> None:
        check_model_params(self.B, self.W, self.lam)

    def trace(self, n: int, rounds: int, *, seed: int, p_start: float = 0.2) -> np.ndarray:
        if n < 1 or rounds < 0:
            raise ValueError(f"need n >= 1 and rounds >= 0, got n={n} rounds={rounds}")
        if not 0.0 <= p_start <= 1.0:
            raise ValueError(f"p_start must be in [0, 1], got {p_start}")
        rng = np.random.default_rng(seed)
        tr = np.zeros((rounds, n), dtype=np.bool_)
        left = np.zeros(n, dtype=np.int64)  # rounds left in each worker's current burst
        for r in range(rounds):
            for i in rng.permutation(n):
                starts = rng.random() < p_start  # draw every time: the stream does not depend on the state
                length = int(rng.integers(1, self.B + 1))
                if left[i] == 0 and starts:
                    left[i] = length
                if left[i] > 0:
                    if may_straggle(tr, r, int(i), self.B, self.W, self.lam):
                        tr[r, i] = True
                        left[i] -= 1
                    else:
                        left[i] = 0
        return tr

    def conforms(self, trace: object) -> tuple[bool, str]:
        return conforms(trace, self.B, self.W, self.lam)

    def nonconforming_trace(self, n: int, rounds: int, *, seed: int, kind: Literal["distinct", "burst"],
                            p_start: float = 0.2) -> np.ndarray:
        """A conforming background trace plus one injected violation, so it never conforms.

        kind "distinct" breaks C1: λ+1 workers straggle in one round.
        kind "burst" breaks C2: one worker straggles in B+1 consecutive rounds, which fit in a
        window because B+1 <= W.
        """
        rng = np.random.default_rng([seed, 1])
        tr = self.trace(n, rounds, seed=seed, p_start=p_start)
        if kind == "distinct":
            if self.lam + 1 > n or rounds < 1:
                raise ValueError("a C1 violation needs lam+1 <= n workers and >= 1 round")
            r = int(rng.integers(0, rounds))
            tr[r, rng.choice(n, size=self.lam + 1, replace=False)] = True
        elif kind == "burst":
            if rounds < self.B + 1:
                raise ValueError(f"a C2 violation needs >= B+1 = {self.B + 1} rounds")
            r = int(rng.integers(0, rounds - self.B))
            tr[r:r + self.B + 1, int(rng.integers(0, n))] = True
        else:
            raise ValueError(f"kind must be 'distinct' or 'burst', got {kind!r}")
        assert not self.conforms(tr)[0]
        return tr


# ---------------------------------------------------------------------------------------------
# Loads in closed form
# ---------------------------------------------------------------------------------------------

def sr_sgc_s(B: int, W: int, lam: int) -> int:
    """SR-SGC's code parameter: s = ceil(Bλ / (W-1+B)), computed in integers."""
    check_model_params(B, W, lam)
    return -(-B * lam // (W - 1 + B))


def gc_load(n: int, s: int) -> Fraction:
    """An (n, s) GC code stores s+1 of n equal partitions per worker."""
    return Fraction(s + 1, n)


def msgc_load_closed_form(n: int, B: int, W: int, lam: int) -> Fraction:
    """M-SGC's load for λ < n: (λ+1)(W-1+B) / (n (B + (W-1)(λ+1)))."""
    check_model_params(B, W, lam, n)
    return Fraction((lam + 1) * (W - 1 + B), n * (B + (W - 1) * (lam + 1)))


@dataclass(frozen=True, slots=True)
class MSGCSplit:
    """How M-SGC splits one job's dataset (size 1), with every size an exact Fraction.

    D1 is n*(W-1) uncoded chunks of size u, W-1 per worker. D2 is B groups, each cut into n
    partitions of size p and coded with an (n, λ) GC code. A worker's coded task on a group covers
    λ+1 partitions, so its size is (λ+1)p. Every slot must be able to hold either kind of mini-task,
    so (λ+1)p = u. Together with n(W-1)u + Bnp = 1 this gives u = (λ+1) / (n((W-1)(λ+1) + B)).
    """

    n: int
    B: int
    W: int
    lam: int

    def __post_init__(self) -> None:
        check_model_params(self.B, self.W, self.lam, self.n)

    @property
    def d1_chunks_per_worker(self) -> int:
        return self.W - 1

    @property
    def d1_chunk_size(self) -> Fraction:
        return Fraction(self.lam + 1, self.n * ((self.W - 1) * (self.lam + 1) + self.B))

    @property
    def d2_groups(self) -> int:
        return self.B

    @property
    def d2_partition_size(self) -> Fraction:
        return Fraction(1, self.n * ((self.W - 1) * (self.lam + 1) + self.B))

    @property
    def d2_task_size(self) -> Fraction:
        return (self.lam + 1) * self.d2_partition_size

    @property
    def d1_fraction(self) -> Fraction:
        return self.n * self.d1_chunks_per_worker * self.d1_chunk_size

    @property
    def d2_fraction(self) -> Fraction:
        return self.d2_groups * self.n * self.d2_partition_size

    @property
    def mini_tasks_per_round(self) -> int:
        return self.W - 1 + self.B

    @property
    def load(self) -> Fraction:
        """Per-worker work of a full round: W-1 D1 slots plus B D2 slots."""
        return self.d1_chunks_per_worker * self.d1_chunk_size + self.d2_groups * self.d2_task_size


# ---------------------------------------------------------------------------------------------
# State machines
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work for one worker in one round.

    kind "gc" is a GC-coded task over the worker's s+1 partitions. "d1" is an uncoded D1 chunk
    (index = chunk number). "d2" is a coded task on D2 group `index`. `repeat` is True only for
    redone work that the plain schedule would not have run: an SR-SGC redo, or a D1 chunk in an
    M-SGC D2 slot.
    """

    job: int
    kind: Literal["gc", "d1", "d2"]
    index: int
    size: Fraction
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class RoundReport:
    round: int
    tasks: tuple[tuple[Task, ...], ...]  # per worker, what it ran this round
    stragglers: frozenset[int]
    decoded: tuple[int, ...]  # jobs that became decodable at the end of this round
    missed: tuple[int, ...]  # jobs whose deadline was this round and that are not decodable
    repeats: int  # repeat tasks run this round (delivered or not)

    @property
    def work(self) -> tuple[Fraction, ...]:
        return tuple(sum((t.size for t in ts), Fraction(0)) for ts in self.tasks)


@dataclass(frozen=True, slots=True)
class RunResult:
    scheme: str
    decoded_round: tuple[int | None, ...]  # per job: the round it became decodable, None = deadline miss
    rounds: int
    repeats: int

    @property
    def jobs_decoded(self) -> int:
        return sum(r is not None for r in self.decoded_round)

    @property
    def deadline_misses(self) -> int:
        return sum(r is None for r in self.decoded_round)


class SequentialScheme:
    """Shared driver. A subclass supplies `assignments`, `_deliver`, `_decodable`, `tolerates`
    and, if it wants, `_after_round`.

    Round r plays the tasks from `assignments()` (the coming round's tasks per worker);
    `step(stragglers)` plays it and returns a `RoundReport`; `run(trace)` plays a whole trace.
    Deliveries come from the non-stragglers only. Then each undecided job with t <= r <= t + T
    either becomes decodable or, when r = t + T, is recorded as missed. The run lasts J + T rounds.

    Invariants (tests/unit/test_sequential_coding.py checks them):
      * On every trace that conforms to (B, W, λ), SR-SGC and M-SGC decode every job by t + T
        (the paper's theorems; the tests fuzz them), and GC with s = λ and rule "le" decodes
        every job in its own round.
      * In a steady-state round every worker's work equals `load` exactly, whatever the
        stragglers did. A repeat replaces a task of the same size; it never adds work.
      * A trace that does not conform never raises an exception. A job that cannot be decoded
        by t + T is a deadline miss, and the miss is final: no work is ever scheduled for it again.
    """

    name = "scheme"
    T: int
    load: Fraction

    def __init__(self, n: int, jobs: int) -> None:
        if n < 1 or jobs < 0:
            raise ValueError(f"need n >= 1 and jobs >= 0, got n={n} jobs={jobs}")
        self.n = n
        self.jobs = jobs
        self.round = 0
        self.decoded_round: list[int | None] = [None] * jobs
        self.missed: set[int] = set()
        self.repeats = 0

    @property
    def total_rounds(self) -> int:
        return self.jobs + self.T

    @property
    def done(self) -> bool:
        return self.round >= self.total_rounds

    @property
    def jobs_decoded(self) -> int:
        return sum(r is not None for r in self.decoded_round)

    @property
    def deadline_misses(self) -> int:
        return len(self.missed)

    def _open(self, job: int) -> bool:
        return 0 <= job < self.jobs and self.decoded_round[job] is None and job not in self.missed

    def assignments(self) -> tuple[tuple[Task, ...], ...]:
        raise NotImplementedError

    def _deliver(self, worker: int, task: Task) -> None:
        raise NotImplementedError

    def _decodable(self, job: int) -> bool:
        raise NotImplementedError

    def _after_round(self, stragglers: frozenset[int]) -> None:
        """Plan ahead from this round's outcome; runs before `round` advances."""

    def _forget(self, job: int) -> None:
        """Drop a decided job's bookkeeping, so the live state stays O(T*n) whatever J is."""

    def clone(self) -> SequentialScheme:
        """An independent copy, cheaper than copy.deepcopy: the runtime model trials every round on one."""
        new = copy.copy(self)
        new.decoded_round = list(self.decoded_round)
        new.missed = set(self.missed)
        return new

    def tolerates(self, history: np.ndarray, stragglers: Collection[int]) -> bool:
        """Whether the scheme's straggler model admits this round after the (effective) history."""
        raise NotImplementedError

    def step(self, stragglers: Iterable[int]) -> RoundReport:
        if self.done:
            raise RuntimeError(f"{self.name}: all {self.total_rounds} rounds already played")
        strag = frozenset(int(i) for i in stragglers)
        if any(not 0 <= i < self.n for i in strag):
            raise ValueError(f"straggler ids must be in [0, {self.n}), got {sorted(strag)}")
        r = self.round
        tasks = self.assignments()
        for i, ts in enumerate(tasks):
            if i not in strag:
                for t in ts:
                    self._deliver(i, t)
        decoded, missed = [], []
        for job in range(max(0, r - self.T), min(r, self.jobs - 1) + 1):
            if not self._open(job):
                continue
            if self._decodable(job):
                self.decoded_round[job] = r
                decoded.append(job)
                self._forget(job)
            elif r == job + self.T:
                self.missed.add(job)
                missed.append(job)
                self._forget(job)
        reps = sum(t.repeat for ts in tasks for t in ts)
        self.repeats += reps
        self._after_round(strag)
        self.round += 1
        return RoundReport(r, tasks, strag, tuple(decoded), tuple(missed), reps)

    def result(self) -> RunResult:
        return RunResult(self.name, tuple(self.decoded_round), self.round, self.repeats)

    def run(self, trace: object) -> RunResult:
        """Play the remaining rounds on `trace` (rows = rounds). Rows past its end have no stragglers."""
        tr = as_trace(trace, self.n)
        while not self.done:
            r = self.round
            self.step(np.flatnonzero(tr[r]).tolist() if r < tr.shape[0] else ())
        return self.result()


class GradientCodingScheme(SequentialScheme):
    """Plain GC: an (n, s) code applied to each round's job on its own, so T = 0 (s = λ in the
    comparisons, load (s+1)/n). Each round every worker computes its job-t task.

    rule "le" (ours, the default): a round decodes iff stragglers <= s. This is exact, because
    any n-s replies of an (n, s) code decode.
    rule "lt": a round decodes iff stragglers < s, as in the authors' baseline. This is
    conservative against GC, and with s = 0 it never decodes.
    """

    name = "GC"

    def __init__(self, n: int, jobs: int, s: int, rule: GCRule = "le") -> None:
        super().__init__(n, jobs)
        if not 0 <= s < n:
            raise ValueError(f"need 0 <= s < n, got s={s} n={n}")
        if rule not in ("le", "lt"):
            raise ValueError(f"rule must be 'le' or 'lt', got {rule!r}")
        self.s, self.rule = s, rule
        self.T = 0
        self.load = gc_load(n, s)
        if rule == "lt":
            self.name = "GC(<s)"
        self._received: dict[int, int] = {}  # open job -> results received

    def clone(self) -> GradientCodingScheme:
        new = super().clone()
        new._received = dict(self._received)
        return new

    def _forget(self, job: int) -> None:
        self._received.pop(job, None)

    def assignments(self) -> tuple[tuple[Task, ...], ...]:
        r = self.round
        task = (Task(r, "gc", 0, self.load),) if self._open(r) else ()
        return tuple(task for _ in range(self.n))

    def _deliver(self, worker: int, task: Task) -> None:
        self._received[task.job] = self._received.get(task.job, 0) + 1

    def _decodable(self, job: int) -> bool:
        missing = self.n - self._received.get(job, 0)
        return missing <= self.s if self.rule == "le" else missing < self.s

    def tolerates(self, history: np.ndarray, stragglers: Collection[int]) -> bool:
        k = len(stragglers)
        return k <= self.s if self.rule == "le" else k < self.s


class SelectiveRepetitionSGC(SequentialScheme):
    """SR-SGC: an (n, s) code with s = ceil(Bλ/(W-1+B)) plus selective repetition after B rounds.

    T = B, load (s+1)/n. In round t every worker computes its job-t task. The exception: if job
    t-B is still missing v > s results, then v - s of the workers that missed it spend round t
    redoing their job-(t-B) task instead. Workers that straggled in round t-B are picked first,
    because (C2) says they cannot straggle in round t. Job t-B decodes from the >= n-s distinct
    results of rounds t-B and t.
    """

    name = "SR-SGC"

    def __init__(self, n: int, jobs: int, B: int, W: int, lam: int) -> None:
        super().__init__(n, jobs)
        check_model_params(B, W, lam, n)
        self.B, self.W, self.lam = B, W, lam
        self.s = sr_sgc_s(B, W, lam)
        self.T = B
        self.load = gc_load(n, self.s)
        self._received: dict[int, set[int]] = {}  # open job -> workers whose result arrived
        self._redo: dict[int, dict[int, int]] = {}  # round -> {worker: job it redoes then}

    def clone(self) -> SelectiveRepetitionSGC:
        new = super().clone()
        new._received = {j: set(w) for j, w in self._received.items()}
        new._redo = {r: dict(p) for r, p in self._redo.items()}
        return new

    def _forget(self, job: int) -> None:
        self._received.pop(job, None)

    def assignments(self) -> tuple[tuple[Task, ...], ...]:
        r = self.round
        redo = self._redo.get(r, {})
        out = []
        for i in range(self.n):
            if i in redo and self._open(redo[i]):
                out.append((Task(redo[i], "gc", 0, self.load, repeat=True),))
            elif self._open(r):
                out.append((Task(r, "gc", 0, self.load),))
            else:
                out.append(())
        return tuple(out)

    def _deliver(self, worker: int, task: Task) -> None:
        self._received.setdefault(task.job, set()).add(worker)

    def _decodable(self, job: int) -> bool:
        return len(self._received.get(job, ())) >= self.n - self.s

    def _after_round(self, stragglers: frozenset[int]) -> None:
        r = self.round
        self._redo.pop(r, None)
        if not self._open(r):
            return
        got = self._received.get(r, set())
        missing = [i for i in range(self.n) if i not in got]
        need = len(missing) - self.s  # > 0, otherwise job r would have decoded this round
        # Stragglers of round r first: under C2 they cannot straggle again in round r+B. Then workers
        # that were busy with a redo. Ties go to the lowest id, which keeps runs deterministic.
        # (The opposite order never missed either, in the exhaustive tiny cases and the fuzzing we
        # ran, but only this order follows directly from C2.)
        chosen = sorted(missing, key=lambda i: (i not in stragglers, i))[:need]
        self._redo[r + self.B] = {i: r for i in chosen}

    def tolerates(self, history: np.ndarray, stragglers: Collection[int]) -> bool:
        return round_conforms(history, stragglers, self.B, self.W, self.lam)


class MultiplexedSGC(SequentialScheme):
    """M-SGC: uncoded D1 and GC-coded D2 mini-tasks, multiplexed along diagonals, with adaptive D1 repeats.

    Each job is split into D1 and D2 (see `MSGCSplit`). D1 is uncoded: W-1 chunks per worker. D2
    is B groups, each coded with an (n, λ) GC code. Every round every worker runs W-1+B
    equal-sized mini-tasks along a diagonal: slot m of round r belongs to job r-m, so T = W-2+B.
    Slots 0..W-2 compute the worker's next undelivered D1 chunk. Slot W-1+j computes D2 group j,
    but only if the worker has already delivered all W-1 of its D1 chunks of that job. Otherwise
    the slot repeats the missing D1 chunk. Job t decodes once every worker's D1 chunks have
    arrived and every D2 group has >= n-λ results.
    """

    name = "M-SGC"

    def __init__(self, n: int, jobs: int, B: int, W: int, lam: int) -> None:
        super().__init__(n, jobs)
        self.split = MSGCSplit(n, B, W, lam)
        self.B, self.W, self.lam = B, W, lam
        self.T = W - 2 + B
        self.load = self.split.load
        # Cached: Fraction properties are recomputed on every access, and assignments() is hot
        self._d1_size, self._d2_size = self.split.d1_chunk_size, self.split.d2_task_size
        self._d1_full, self._slots = self.split.d1_chunks_per_worker, self.split.mini_tasks_per_round
        self._d1_done: dict[int, list[int]] = {}  # open job -> per worker, D1 chunks delivered
        self._d2_got: dict[int, list[set[int]]] = {}  # open job -> per D2 group, workers delivered

    def clone(self) -> MultiplexedSGC:
        new = super().clone()
        new._d1_done = {j: list(d) for j, d in self._d1_done.items()}
        new._d2_got = {j: [set(g) for g in gs] for j, gs in self._d2_got.items()}
        return new

    def _forget(self, job: int) -> None:
        self._d1_done.pop(job, None)
        self._d2_got.pop(job, None)

    def _d1(self, job: int) -> list[int]:
        return self._d1_done.setdefault(job, [0] * self.n)

    def _d2(self, job: int) -> list[set[int]]:
        return self._d2_got.setdefault(job, [set() for _ in range(self.B)])

    def assignments(self) -> tuple[tuple[Task, ...], ...]:
        r = self.round
        out = []
        for i in range(self.n):
            tasks = []
            for m in range(self._slots):
                t = r - m
                if not self._open(t):
                    continue
                done = self._d1(t)[i]
                if m < self.W - 1:
                    tasks.append(Task(t, "d1", done, self._d1_size))
                elif done == self._d1_full:
                    tasks.append(Task(t, "d2", m - (self.W - 1), self._d2_size))
                else:  # adaptivity: behind on D1, so this D2 slot repeats the missing chunk
                    tasks.append(Task(t, "d1", done, self._d1_size, repeat=True))
            out.append(tuple(tasks))
        return tuple(out)

    def _deliver(self, worker: int, task: Task) -> None:
        if task.kind == "d1":
            d1 = self._d1(task.job)
            assert task.index == d1[worker]  # chunks are delivered in order
            d1[worker] += 1
        else:
            self._d2(task.job)[task.index].add(worker)

    def _decodable(self, job: int) -> bool:
        full = self._d1_full
        return (all(d == full for d in self._d1(job))
                and all(len(g) >= self.n - self.lam for g in self._d2(job)))

    def tolerates(self, history: np.ndarray, stragglers: Collection[int]) -> bool:
        return round_conforms(history, stragglers, self.B, self.W, self.lam)


def make_schemes(n: int, jobs: int, B: int, W: int, lam: int, *,
                 gc_rules: Sequence[GCRule] = ("le",)) -> list[SequentialScheme]:
    """Fresh GC (s = λ, one per rule), SR-SGC and M-SGC for one (B, W, λ)."""
    check_model_params(B, W, lam, n)
    return [*(GradientCodingScheme(n, jobs, lam, rule) for rule in gc_rules),
            SelectiveRepetitionSGC(n, jobs, B, W, lam), MultiplexedSGC(n, jobs, B, W, lam)]


# ---------------------------------------------------------------------------------------------
# Trace-driven runtime model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DelayModel:
    base_s: float = 0.05  # fixed cost of a round with work: dispatch, upload of results
    compute_s: float = 1.0  # c: time to compute the gradient of one job's whole dataset
    straggle_s: float = 1.0  # D: extra delay of a straggling worker

    def __post_init__(self) -> None:
        if min(self.base_s, self.compute_s, self.straggle_s) < 0:
            raise ValueError(f"delays must be >= 0, got {self}")


@dataclass(frozen=True, slots=True)
class RuntimeResult:
    scheme: str
    runtime_s: float
    round_s: tuple[float, ...]
    fallback_rounds: tuple[int, ...]  # rounds in which the master waited for everyone
    run: RunResult  # on the effective trace; no misses by construction

    @property
    def fallbacks(self) -> int:
        return len(self.fallback_rounds)


def simulate_runtime(scheme: SequentialScheme, trace: object, delays: DelayModel, *,
                     policy: Literal["model", "deadline"] = "model") -> RuntimeResult:
    """Play `trace` through the scheme (which must be fresh) under the delay model below.

    Worker i's delay in round r is base_s + work_i * compute_s, plus straggle_s if it straggles.
    Delays are homogeneous, so all non-stragglers finish together: a round lasts until the
    non-stragglers that have work finish, and a round with no work costs 0. Total runtime = the
    sum of all J + T round durations.

    Each round is first tried on a copy of the scheme. The master keeps the trial if no deadline
    is missed and, under policy "model" (the paper's method, the default), the scheme's model
    also tolerates the round (for GC: at most s stragglers, or fewer than s under rule "lt").
    Otherwise it waits for everyone: the round lasts until its slowest worker with work finishes
    and is played as straggler-free, so the effective trace always conforms and no deadline is
    missed. Policy "deadline" is an optimistic variant for comparison: the master waits only
    when a job due this round would otherwise miss; results lost in earlier rounds stay lost,
    so a miss can still happen and is counted.

    Known holes: delays do not vary between workers apart from the straggle penalty, so GC
    cannot finish early on its n-s fastest workers; the straggler sets are given and do not
    depend on load; there is no communication model beyond base_s.
    """
    if scheme.round != 0:
        raise ValueError("simulate_runtime needs a fresh scheme")
    if policy not in ("model", "deadline"):
        raise ValueError(f"policy must be 'model' or 'deadline', got {policy!r}")
    tr = as_trace(trace, scheme.n)
    effective = np.zeros((0, scheme.n), dtype=np.bool_)
    rounds_s: list[float] = []
    fallbacks: list[int] = []
    while not scheme.done:
        r = scheme.round
        strag = np.flatnonzero(tr[r]).tolist() if r < tr.shape[0] else []
        work = [sum(float(t.size) for t in ts) for ts in scheme.assignments()]
        trial = scheme.clone()
        ok = (policy == "deadline" or scheme.tolerates(effective, strag)) and not trial.step(strag).missed
        if ok:
            scheme = trial
            waited = [delays.base_s + w * delays.compute_s for i, w in enumerate(work) if w > 0 and i not in strag]
            row_set = strag
        else:
            scheme.step(())
            fallbacks.append(r)
            waited = [delays.base_s + w * delays.compute_s + (delays.straggle_s if i in strag else 0.0)
                      for i, w in enumerate(work) if w > 0]
            row_set = []
        rounds_s.append(max(waited, default=0.0))
        row = np.zeros((1, scheme.n), dtype=np.bool_)
        row[0, row_set] = True
        effective = np.vstack([effective, row])
    return RuntimeResult(scheme.name, float(sum(rounds_s)), tuple(rounds_s), tuple(fallbacks), scheme.result())


def ideal_runtime_s(scheme: SequentialScheme, delays: DelayModel) -> float:
    """Closed-form runtime with no stragglers.

    GC and SR-SGC: J rounds of base + load*c. Their trailing SR-SGC rounds have no work and cost 0.
    M-SGC: J + T rounds of base, plus c times J*load of work. Every worker does J*load in total,
    and in the ramp-up and ramp-down rounds it works less than load.
    """
    J = scheme.jobs
    if isinstance(scheme, MultiplexedSGC):
        return (J + scheme.T) * delays.base_s + delays.compute_s * J * float(scheme.load) if J else 0.0
    return J * (delays.base_s + float(scheme.load) * delays.compute_s)
