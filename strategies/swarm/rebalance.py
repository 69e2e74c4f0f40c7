"""Who serves which stage: start choice, the CheckFree mover, and rebalancing moves.

Pure functions (bench/bench_pipeline.py and the tests drive them without a network).
Invariants:
  * A move never leaves its stage empty: only a stage with >= 2 peers gives one up.
  * Stage 0 (the trainers, who hold the data) neither gives nor receives peers by
    rebalancing; only to rebuild a lost stage that no server stage can spare a peer for does
    a spare trainer (stage 0 keeps >= 1) move (`designated_mover`).
  * Hysteresis: a peer moves only if the sorted vector of stage capacities improves by more
    than a factor (1 + delta) at its first changed position (see `rebalance_target`):
    moves strictly raise that vector, so they stop and cannot oscillate (undoing a move
    would lower it again).
  * One mover per stage per check: the lowest peer id of the stage, so peers evaluating
    the same view do not all move at once.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence


def choose_start_stage(counts: Sequence[int], capacities: Sequence[float], on_loan: Sequence[int] = ()) -> int:
    """An empty stage if any (lowest index), else a server stage served only by trainers on
    loan (they go back to training once it has another peer), else the non-trainer stage with
    the least capacity (peer count when no throughput is known yet)."""
    for k, n in enumerate(counts):
        if n == 0:
            return k
    if on_loan:
        return min(on_loan)
    pool = list(range(1, len(counts))) or [0]
    known = any(capacities[k] > 0 for k in pool)
    return min(pool, key=lambda k: ((capacities[k] if known else counts[k]), counts[k], k))


def recovery_targets(empty: Sequence[int], my_stage: int, ever_seen: Sequence[bool], empty_reads: Sequence[int],
                     patience_reads: float) -> list[int]:
    """The empty server stages the designated mover may move into. A trainer (stage 0) fills
    any: without every stage nothing trains. A server peer fills a stage that was served and
    lost, or one empty for `patience_reads` reads in a row: longer than any arriving peer takes
    to announce, so peers that joined together and all picked one stage spread out."""
    if my_stage == 0:
        return list(empty)
    return [k for k in empty if ever_seen[k] or empty_reads[k] >= patience_reads]


def designated_mover(peers_by_stage: Mapping[int, Sequence[str]],
                     trainer_steps: Mapping[str, int] | None = None) -> str | None:
    """The peer that moves to rebuild a lost stage: the lowest id of the most-populated
    non-trainer stage that keeps >= 1 peer after the move. If no server stage can spare a
    peer, a spare trainer (stage 0 with >= 2 peers): the one with the fewest announced
    training steps (`trainer_steps`; ties: lowest id), so the most-trained trainer keeps
    training. None: nobody can move without stranding a stage."""
    pool = [(len(p), -k, k) for k, p in peers_by_stage.items() if k != 0 and len(p) >= 2]
    if pool:
        _, _, k = max(pool)
        return min(peers_by_stage[k])
    trainers = list(peers_by_stage.get(0, ()))
    if len(trainers) >= 2:
        steps = trainer_steps or {}
        return min(trainers, key=lambda p: (steps.get(p, 0), p))
    return None


def rebalance_target(capacities: Sequence[float], current: int, mine: float, delta: float,
                     movable: Callable[[int], bool] = lambda k: k != 0) -> int | None:
    """Stage to move to, or None. capacities[k] = sum of throughput of stage k's peers
    (this peer included in `current`). The move goes to the least-capacity other stage and
    is made only if it improves the SORTED capacity vector: at the first position where the
    sorted vectors before and after differ, the new value exceeds the old by (1 + delta).
    The first position is the minimum, so a move that raises the weakest stage always
    qualifies; the later positions break ties (5/2/2 -> 4/3/2 raises no minimum but is
    progress). Each move strictly raises the vector in lexicographic order and there are
    finitely many assignments, so moves stop and never cycle."""
    stages = [k for k in range(len(capacities)) if movable(k)]
    if current not in stages or len(stages) < 2:
        return None
    target = min((k for k in stages if k != current), key=lambda k: (capacities[k], k))
    before = sorted(capacities[k] for k in stages)
    after = sorted(capacities[k] - (mine if k == current else 0) + (mine if k == target else 0) for k in stages)
    for old, new in zip(before, after):
        if abs(new - old) <= 1e-9 * max(abs(old), 1.0):
            continue
        return target if new > (1 + delta) * old else None
    return None
