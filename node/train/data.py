"""Byte corpora and batch sampling: where training text comes from and how it is cut.

  * `load_corpus(source, max_bytes)` turns "stdlib" (the Python standard library's own
    top-level *.py sources, on every machine without downloading anything) or a user
    file/directory into one uint8 tensor, cached per process. Files are read in sorted order
    and capped at `max_bytes`, so a source and Python version always yield the same bytes.
  * `ByteDataset` splits it once: the last `val_fraction` is held out and never trained on.
  * Training windows are drawn from a caller-supplied `torch.Generator`; validation windows
    are fixed and evenly spaced, so every peer scores the same held-out bytes.
  * `batch_generator_seed` derives a per-(run, peer, step) seed, so peers draw different
    batches and a resumed or retried step draws the same batch again.

"stdlib" differs between Python versions; `ByteDataset.fingerprint` lets peers compare
corpora before trusting each other's validation losses.
"""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # 4 MiB: plenty for a small model, loads in well under 1 s
DEFAULT_VAL_FRACTION = 0.05
TEXT_SUFFIXES = (".txt", ".md", ".py")  # what a directory source contributes
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
        and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"no {'/'.join(TEXT_SUFFIXES)} files under {root}")
    return files


def _read_capped(files: list[Path], max_bytes: int | None) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for f in files:
        data = f.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(chunks)


@functools.lru_cache(maxsize=8)
def _load_cached(key: str, max_bytes: int | None) -> torch.Tensor:
    if key == STDLIB:
        files = _stdlib_files()
    else:
        path = Path(key)
        if not path.exists():
            raise DataError(f"data source {key!r} does not exist")
        files = [path] if path.is_file() else _directory_files(path)
    data = _read_capped(files, max_bytes)
    if not data:
        raise DataError(f"data source {key!r} is empty")
    # bytearray -> writable buffer, so frombuffer does not warn; the tensor owns a copy.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_corpus(source: str = STDLIB, max_bytes: int | None = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Return the corpus as a 1-D uint8 CPU tensor (cached per process; do not mutate it).

    `source` is "stdlib" or a path to a text file or a directory (its *.txt/*.md/*.py files,
    recursively, sorted). `max_bytes` caps the total (None = no cap).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive or None, got {max_bytes}")
    key = source if source == STDLIB else str(Path(source).expanduser().resolve())
    return _load_cached(key, max_bytes)


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
    """A byte corpus split into a training part and a held-out validation tail.

    Batches are `(x, y)` int64 CPU tensors of shape [B, T] with `y` = `x` shifted by one
    byte; the caller moves them to its device. Token ids (train/tokens.py) are windowed the
    same way; `fingerprint` then covers the ids, and so the tokenizer too.
    """

    def __init__(self, data: torch.Tensor, val_fraction: float = DEFAULT_VAL_FRACTION) -> None:
        if data.dtype not in TOKEN_DTYPES or data.dim() != 1:
            raise DataError("corpus must be a 1-D tensor of bytes (uint8) or token ids (int16/32/64)")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = max(1, int(len(data) * val_fraction))
        self.data = data
        self.train = data[: len(data) - n_val]  # views: no copy
        self.val = data[len(data) - n_val :]
        self.fingerprint = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]

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
        return (
            f"ByteDataset(train={len(self.train)} B, val={len(self.val)} B, "
            f"fingerprint={self.fingerprint})"
        )

    @staticmethod
    def _windows(split: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(seq_len + 1)  # [T+1]
        chunk = split[starts[:, None] + offsets[None, :]].long()  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:]  # x [B, T], y [B, T]

    @staticmethod
    def _check(split: torch.Tensor, name: str, batch_size: int, seq_len: int) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if len(split) < seq_len + 1:
            raise DataError(
                f"{name} split has {len(split)} bytes, fewer than seq_len + 1 = {seq_len + 1}"
            )

    def train_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows at uniformly random offsets of the training split.

        Consumes `generator` (a CPU generator) and nothing else, so the batch is a function
        of the generator's state.
        """
        self._check(self.train, "training", batch_size, seq_len)
        high = len(self.train) - seq_len  # last valid start + 1
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        return self._windows(self.train, starts, seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`max_batches` batches of fixed windows spread evenly over the validation split.

        Deterministic: the same arguments give the same windows on every call and every peer
        (with the same corpus). Windows overlap when the split is smaller than requested.
        """
        self._check(self.val, "validation", batch_size, seq_len)
        if max_batches <= 0:
            return
        n_windows = batch_size * max_batches
        last_start = len(self.val) - seq_len - 1
        # Integer arithmetic: first window at 0, last at last_start, no float rounding.
        starts = torch.tensor(
            [i * last_start // max(n_windows - 1, 1) for i in range(n_windows)], dtype=torch.long
        )
        for b in range(max_batches):
            yield self._windows(self.val, starts[b * batch_size : (b + 1) * batch_size], seq_len)
