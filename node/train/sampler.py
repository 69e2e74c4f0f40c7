"""Which token windows a peer trains on at a step, and which are held out: pure arithmetic.

The corpus is cut into `n_windows` disjoint windows of `seq_len + 1` tokens (inputs plus the
shifted target). A permutation keyed by the split seed puts the first `n_val` windows in the
held-out set, identical on every peer and never trained on; the rest are training slots.
Training walks epochs; each epoch visits the slots in its own seeded order, cut per step into
`ranks` consecutive slices of `batch_size`, one per data shard. So, for fixed (seed, ranks):
  * two different ranks never draw the same window at the same step (when one step of all
    ranks fits into an epoch: n_train >= ranks * batch_size; otherwise only within an epoch),
  * the windows of (rank, step) depend on nothing else: a restarted peer resumes its stream.
Permutations are small Feistel networks evaluated on demand, so memory is O(batch), whatever
the corpus size. `rank_of` maps a peer id to its shard by hash: no coordination is needed, and
a peer keeps its shard when the membership changes (two peers may share one; see README).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

FEISTEL_ROUNDS = 4  # Luby-Rackoff: four rounds of a good round function look random enough for a shuffle
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finalizer constants
_MIX1, _MIX2 = np.uint64(MIX1), np.uint64(MIX2)
U64 = (1 << 64) - 1
SMALL_BATCH = 64


def _key(*parts: object) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in ("swarm-sampler", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@functools.lru_cache(maxsize=4096)
def _round_keys(key: int) -> tuple[int, ...]:
    return tuple(_key(key, r) for r in range(FEISTEL_ROUNDS))


def _mix_int(x: int, key: int) -> int:
    """`_mix` on one Python int (uint64 arithmetic made explicit with the mask)."""
    z = (x ^ key) & U64
    z = ((z ^ (z >> 30)) * MIX1) & U64
    z = ((z ^ (z >> 27)) * MIX2) & U64
    return z ^ (z >> 31)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    # uint64 arrays wrap on overflow silently, which is the arithmetic a hash wants
    z = x ^ np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Permutation:
    """A seeded bijection of [0, n), evaluated element-wise: a Feistel network on the smallest
    even bit width covering n, with cycle walking back into range (at most 4x the domain)."""

    n: int
    key: int

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64)
        if self.n <= 1:
            return x.astype(np.int64)
        bits = max(2, (self.n - 1).bit_length())
        half = np.uint64((bits + 1) // 2)
        mask = np.uint64((1 << int(half)) - 1)
        keys = _round_keys(self.key)
        if x.size <= SMALL_BATCH:  # a step's batch: plain ints beat numpy's per-call overhead
            return np.array([self._one(int(v), int(half), int(mask), keys) for v in x.reshape(-1)],
                            dtype=np.int64).reshape(x.shape)

        def rounds(v: np.ndarray) -> np.ndarray:
            left, right = v >> half, v & mask
            for k in keys:
                left, right = right, left ^ (_mix(right, k) & mask)
            return (left << half) | right

        out = rounds(x)
        outside = out >= np.uint64(self.n)
        while outside.any():  # walk the cycle until it re-enters [0, n): still a bijection
            out[outside] = rounds(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)

    def _one(self, v: int, half: int, mask: int, keys: tuple[int, ...]) -> int:
        """The same bijection as the vectorised path, for one index, in Python ints."""
        while True:
            left, right = v >> half, v & mask
            for k in keys:
                left, right = right, left ^ (_mix_int(right, k) & mask)
            v = (left << half) | right
            if v < self.n:
                return v


@dataclass(frozen=True)
class WindowPlan:
    """The window grid of one corpus and its held-out split; equal inputs give equal plans."""

    n_tokens: int
    seq_len: int
    split_seed: int
    val_fraction: float

    @property
    def stride(self) -> int:
        return self.seq_len + 1  # a window holds the inputs and one more token for the last target

    @property
    def n_windows(self) -> int:
        return self.n_tokens // self.stride

    @property
    def n_val(self) -> int:
        return max(1, int(self.n_windows * self.val_fraction))

    @property
    def n_train(self) -> int:
        return self.n_windows - self.n_val

    def _split(self) -> Permutation:
        return Permutation(self.n_windows, _key("split", self.split_seed))

    def train_windows(self, slots: np.ndarray) -> np.ndarray:
        """Window indices of training slots in [0, n_train)."""
        return self._split()(np.asarray(slots, dtype=np.int64) + self.n_val)

    def val_windows(self, count: int) -> np.ndarray:
        """The first `count` held-out windows (cycling when fewer exist): the same on every peer."""
        return self._split()(np.arange(count, dtype=np.int64) % self.n_val)

    def starts(self, windows: np.ndarray) -> np.ndarray:
        return np.asarray(windows, dtype=np.int64) * self.stride


def train_slots(n_train: int, *, seed: int, step: int, batch_size: int, rank: int, ranks: int) -> np.ndarray:
    """Training slots (indices into [0, n_train)) of `rank` out of `ranks` at `step`.

    Stream position k of the run is the k-th slot of the run's sequence of epochs; step s of
    rank r takes positions [(s * ranks + r) * B, ... + B). When one step of all ranks fits into
    an epoch, epochs are cut to a whole number of steps (the remainder of each epoch, a
    different one every epoch, is skipped), so a step never straddles two epochs.
    """
    if n_train <= 0 or batch_size <= 0 or ranks <= 0 or not 0 <= rank < ranks or step < 0:
        raise ValueError(f"bad sampler request: n_train={n_train} batch_size={batch_size} "
                         f"rank={rank} ranks={ranks} step={step}")
    per_step = ranks * batch_size
    offsets = np.arange(batch_size, dtype=np.int64)
    if per_step <= n_train:
        steps_per_epoch = n_train // per_step
        epoch, within = divmod(step, steps_per_epoch)
        positions = within * per_step + rank * batch_size + offsets
        return Permutation(n_train, _key("epoch", seed, epoch))(positions)
    # a small corpus: one step spans several epochs, and ranks may meet across them
    k = (step * ranks + rank) * batch_size + offsets
    epochs, positions = k // n_train, k % n_train
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = Permutation(n_train, _key("epoch", seed, epoch))(positions[sel])
    return out


def rank_of(peer: int | str, ranks: int) -> int:
    """The data shard of `peer`: an int is its own rank (mod `ranks`); a peer id is hashed."""
    if isinstance(peer, int):
        return peer % ranks
    return _key("rank", peer) % ranks
