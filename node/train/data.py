"""Training corpora and batches: where the text comes from and how it is cut into windows.

  * `load_corpus(source, max_bytes, text_field)` turns "stdlib" (the Python standard library's
    top-level *.py sources, on every machine without downloading anything), a text file, a
    record file (.jsonl, .parquet, .arrow: sources.py) or a directory of them into one uint8
    tensor, cached per process; files in sorted order, capped at `max_bytes`.
  * Pre-tokenized shards (.bin/.npy) are memory-mapped instead (shards.py, via tokens.py).
  * `ByteDataset` windows the ids on the grid of sampler.py: held-out windows are chosen by the
    split seed, identical on every peer and never trained on; `step_batch` gives each data shard
    its disjoint part of each step, `train_batch` draws windows from a caller's generator.
  * `batch_generator_seed` derives a per-(run, peer, step) seed for callers that draw their own.

"stdlib" differs between Python versions; `ByteDataset.fingerprint` lets peers compare
corpora before trusting each other's validation losses.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from swarm_node.train.sampler import WindowPlan, train_slots

DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # 4 MiB: plenty for a small model, loads in well under 1 s
DEFAULT_VAL_FRACTION = 0.05
TEXT_SUFFIXES = (".txt", ".md", ".py")  # plain text a directory source contributes
RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")  # one document per record (sources.py)
TEXT_SOURCE_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
DEFAULT_TEXT_FIELD = "text"
STDLIB = "stdlib"
TOKEN_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # bytes, or ids from a tokenizer


class DataError(ValueError):
    """The corpus cannot be loaded or is too small for the request."""


def _stdlib_files() -> list[Path]:
    # Top level only: subfolders include site-packages (which differs per machine) and tests.
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise DataError(f"no *.py files found in the standard library folder {root}")
    return files


def _directory_files(root: Path) -> list[Path]:
    # Sorted by relative path so the order is the same on every filesystem; hidden folders
    # (.git, .venv, ...) are skipped because they are rarely the text anyone meant.
    files = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in TEXT_SOURCE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"no {'/'.join(TEXT_SOURCE_SUFFIXES)} files (nor .bin/.npy token shards) under {root}")
    return files


def _read_capped(files: list[Path], max_bytes: int | None, text_field: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for f in files:
        if f.suffix.lower() in RECORD_SUFFIXES:
            from swarm_node.train.sources import read_records  # it imports this module

            data = read_records(f, text_field, None if max_bytes is None else max_bytes - total)
            if not data:
                raise DataError(f"{f} holds no text")
        else:
            data = f.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(chunks)


@functools.lru_cache(maxsize=8)
def _load_cached(key: str, max_bytes: int | None, text_field: str) -> torch.Tensor:
    if key == STDLIB:
        files = _stdlib_files()
    else:
        path = Path(key)
        if not path.exists():
            raise DataError(f"data source {key!r} does not exist")
        files = [path] if path.is_file() else _directory_files(path)
    data = _read_capped(files, max_bytes, text_field)
    if not data:
        raise DataError(f"data source {key!r} is empty")
    # bytearray -> writable buffer, so frombuffer does not warn; the tensor owns a copy.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_corpus(source: str = STDLIB, max_bytes: int | None = DEFAULT_MAX_BYTES,
                text_field: str = DEFAULT_TEXT_FIELD) -> torch.Tensor:
    """Return the corpus as a 1-D uint8 CPU tensor (cached per process; do not mutate it).

    `source` is "stdlib" or a path to a file or a directory (its text and record files,
    recursively, sorted). Record files yield their `text_field` strings, one document each.
    `max_bytes` caps the total (None = no cap).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive or None, got {max_bytes}")
    key = source if source == STDLIB else str(Path(source).expanduser().resolve())
    return _load_cached(key, max_bytes, text_field)


def batch_generator_seed(run_seed: int, peer: int | str, step: int) -> int:
    """Seed for the generator that draws `peer`'s training batch at `step` of run `run_seed`.

    `peer` is anything stable and distinct per peer: an index, or the peer id string.
    The seed is a hash of the triple, so
      * different peers get unrelated batch streams (data parallelism sees more data),
      * the same (run, peer, step) always reproduces the same batch, independent of what
        happened before: a resumed or retried step draws exactly the batch it drew before.
    Returns a non-negative int below 2**63 (valid for `torch.Generator.manual_seed`).
    """
    tag = f"{type(peer).__name__}:{peer}"  # keep peer 1 and peer "1" apart
    digest = hashlib.sha256(f"swarm-batch|{run_seed}|{tag}|{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ByteDataset:
    """Token ids (bytes, or ids of a tokenizer) cut into windows, with a held-out split.

    The ids are one in-RAM tensor (`data`) or a list of 1-D integer arrays read as one stream
    (memory-mapped shards; `data` is then None). Windows follow `sampler.WindowPlan`: a grid of
    disjoint `seq_len + 1`-token windows, some held out by `split_seed`, identical on every peer.
    Batches are `(x, y)` int64 CPU tensors of shape [B, T] with `y` = `x` shifted by one; the
    caller moves them to its device. `fingerprint` covers the ids (so the tokenizer too).
    """

    def __init__(self, data: torch.Tensor | Sequence[np.ndarray], val_fraction: float = DEFAULT_VAL_FRACTION,
                 *, split_seed: int = 0, fingerprint: str | None = None) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if isinstance(data, torch.Tensor):
            if data.dtype not in TOKEN_DTYPES or data.dim() != 1:
                raise DataError("corpus must be a 1-D tensor of bytes (uint8) or token ids (int16/32/64)")
            self.data: torch.Tensor | None = data
            self.shards: list[np.ndarray] = [data.numpy()]  # a view: no copy
            fingerprint = fingerprint or hashlib.sha256(self.shards[0].tobytes()).hexdigest()[:16]
        else:
            self.data = None
            self.shards = list(data)
            if not self.shards or any(a.ndim != 1 or a.dtype.kind not in "iu" for a in self.shards):
                raise DataError("token shards must be 1-D arrays of integer ids")
            if fingerprint is None:
                raise DataError("token shards need a fingerprint (shards.scan computes one)")
        self.fingerprint = fingerprint
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self._ends = np.cumsum([len(a) for a in self.shards]).tolist()  # stream offset after each shard
        self.n_tokens = self._ends[-1]
        self._plans: dict[int, WindowPlan] = {}

    @classmethod
    def from_source(
        cls,
        source: str = STDLIB,
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        val_fraction: float = DEFAULT_VAL_FRACTION,
    ) -> "ByteDataset":
        return cls(load_corpus(source, max_bytes), val_fraction)

    def __repr__(self) -> str:
        return (f"ByteDataset(tokens={self.n_tokens}, shards={len(self.shards)}, "
                f"fingerprint={self.fingerprint})")

    # ------------------------------------------------------------------ windows
    def plan(self, seq_len: int) -> WindowPlan:
        """The window grid for `seq_len`; raises `DataError` when the ids cannot fill one
        training and one held-out window."""
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        plan = self._plans.get(seq_len)
        if plan is None:
            plan = WindowPlan(self.n_tokens, seq_len, self.split_seed, self.val_fraction)
            if plan.n_windows < 2:
                raise DataError(f"the data hold {self.n_tokens} tokens, too few for one training and one "
                                f"held-out window of --seq-len {seq_len} + 1 = {plan.stride} tokens each")
            self._plans[seq_len] = plan
        return plan

    def _window(self, start: int, length: int) -> np.ndarray:
        if len(self.shards) == 1:
            return self.shards[0][start:start + length]
        pieces, i = [], bisect.bisect_right(self._ends, start)
        while length > 0:  # a window may run across the end of a shard into the next
            begin = start - (self._ends[i - 1] if i else 0)
            piece = self.shards[i][begin:begin + length]
            pieces.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return np.concatenate(pieces)

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows at stream offsets `starts`, as (x [B, T], y [B, T]) int64 tensors."""
        chunk = np.stack([self._window(int(s), seq_len + 1).astype(np.int64) for s in starts])  # [B, T+1]
        batch = torch.from_numpy(chunk)
        return batch[:, :-1], batch[:, 1:]

    @staticmethod
    def _check_batch(batch_size: int) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")

    def step_batch(self, batch_size: int, seq_len: int, *, seed: int, step: int, rank: int,
                   ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Data shard `rank` of `ranks` at `step` (sampler.train_slots): disjoint across ranks,
        a function of (seed, rank, ranks, step) alone."""
        self._check_batch(batch_size)
        plan = self.plan(seq_len)
        slots = train_slots(plan.n_train, seed=seed, step=step, batch_size=batch_size, rank=rank, ranks=ranks)
        return self.windows(plan.starts(plan.train_windows(slots)), seq_len)

    def train_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` training windows drawn uniformly (with replacement) with `generator`.

        Consumes `generator` (a CPU generator) and nothing else, so the batch is a function of
        its state; held-out windows are never drawn.
        """
        self._check_batch(batch_size)
        plan = self.plan(seq_len)
        slots = torch.randint(0, plan.n_train, (batch_size,), generator=generator).numpy()
        return self.windows(plan.starts(plan.train_windows(slots)), seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`max_batches` batches of held-out windows, the same on every call and every peer
        (with the same ids and split seed). Windows repeat when fewer are held out."""
        self._check_batch(batch_size)
        plan = self.plan(seq_len)
        if max_batches <= 0:
            return
        starts = plan.starts(plan.val_windows(batch_size * max_batches))
        for b in range(max_batches):
            yield self.windows(starts[b * batch_size : (b + 1) * batch_size], seq_len)
