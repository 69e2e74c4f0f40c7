"""Pre-tokenized token shards (`--data` *.bin / *.npy, or a directory of them), memory-mapped.

  * `.npy` opens with `np.load(mmap_mode="r")`: its header gives dtype and shape (integer, C order).
  * `.bin` is raw little-endian ids; the dtype comes from a sidecar `<stem>.json`
    (`{"dtype": "uint16"}`) or `--token-dtype`; when both are given they must agree.
  * A directory contributes its *.bin/*.npy files in sorted order, as one stream of ids.
Nothing is read whole into RAM: `scan` walks each map in bounded chunks to check the ids against
the vocabulary and to compute the fingerprint, and batches gather only their windows.
Every problem is a `DataError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swarm_node.train.data import TEXT_SOURCE_SUFFIXES, DataError

SHARD_SUFFIXES = (".bin", ".npy")
BIN_DTYPES = ("uint8", "uint16", "uint32", "int32")  # --token-dtype choices for .bin shards
SCAN_CHUNK = 1 << 24  # ids per chunk of the scan: bounds its working memory (64 MiB at int32)


@dataclass(frozen=True)
class ShardScan:
    """What one pass over the shards found: their fingerprint and the id range."""

    fingerprint: str
    n_tokens: int
    low: int
    high: int


def is_shard_source(path: Path) -> bool:
    """A shard file, or a directory holding shards and no text (text wins, as it always did)."""
    if path.is_file():
        return path.suffix.lower() in SHARD_SUFFIXES
    if not path.is_dir():
        return False
    suffixes = {p.suffix.lower() for p in _visible_files(path)}
    return bool(suffixes & set(SHARD_SUFFIXES)) and not suffixes & set(TEXT_SOURCE_SUFFIXES)


def _visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [p for p in _visible_files(path) if p.suffix.lower() in SHARD_SUFFIXES]
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    return files


def open_shards(path: Path, token_dtype: str = "auto") -> list[np.ndarray]:
    """Each shard of `path` as a read-only 1-D memory map, in stream order."""
    maps = [_open_one(f, token_dtype) for f in shard_files(path)]
    if not maps:
        raise DataError(f"no {'/'.join(SHARD_SUFFIXES)} shards under {path}")
    return maps


def _open_one(path: Path, token_dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"token shard {path} is empty")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"token shard {path} is not a readable .npy file: {e}") from None
        if arr.dtype.kind not in "iu":
            raise DataError(f"token shard {path} holds {arr.dtype} values, not integer token ids")
        if not arr.flags.c_contiguous:
            raise DataError(f"token shard {path} is stored in Fortran order; save it C-ordered")
        if arr.size == 0:
            raise DataError(f"token shard {path} is empty")
        return arr.reshape(-1)  # a view of the same map: rows of a 2-D array are read in order
    dtype = _bin_dtype(path, token_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"token shard {path} has {size} bytes, not a whole number of {dtype.name} ids "
                        f"({dtype.itemsize} bytes each): wrong --token-dtype?")
    return np.memmap(path, dtype=dtype, mode="r")


def _bin_dtype(path: Path, token_dtype: str) -> np.dtype:
    sidecar = path.with_suffix(".json")
    declared: str | None = None
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            declared = meta["dtype"] if isinstance(meta, dict) else None
        except (OSError, ValueError, KeyError):
            declared = None
        if declared not in BIN_DTYPES:
            raise DataError(f"{sidecar} must be a JSON object with \"dtype\" one of {', '.join(BIN_DTYPES)}")
    if token_dtype != "auto":
        if declared is not None and declared != token_dtype:
            raise DataError(f"--token-dtype {token_dtype} contradicts {sidecar} ({declared})")
        declared = token_dtype
    if declared is None:
        raise DataError(f"token shard {path} has no dtype: give --token-dtype ({'/'.join(BIN_DTYPES)}) "
                        f"or a sidecar {sidecar.name} like {{\"dtype\": \"uint16\"}}")
    return np.dtype(declared).newbyteorder("<")


def scan(maps: list[np.ndarray], paths: list[Path], vocab_size: int) -> ShardScan:
    """Fingerprint the shards and check every id is in [0, vocab_size), chunk by chunk."""
    h = hashlib.sha256(b"token-shards-v1")
    total, low, high = 0, 0, 0
    for arr, path in zip(maps, paths):
        h.update(f"|{arr.dtype.str}|{len(arr)}|".encode())
        for start in range(0, len(arr), SCAN_CHUNK):
            chunk = np.asarray(arr[start:start + SCAN_CHUNK])
            h.update(chunk.tobytes())
            c_low, c_high = int(chunk.min()), int(chunk.max())
            if c_low < 0 or c_high >= vocab_size:
                bad = c_low if c_low < 0 else c_high
                pos = start + int(np.argmax(chunk == bad))
                raise DataError(f"token shard {path}: id {bad} at position {pos} is outside the model's "
                                f"vocabulary of {vocab_size} ids (shards tokenized for another model?)")
            low, high = min(low, c_low) if total else c_low, max(high, c_high)
            total += len(chunk)
    return ShardScan(fingerprint=h.hexdigest()[:16], n_tokens=total, low=low, high=high)
