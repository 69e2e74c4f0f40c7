"""Training text as token ids, for a model that brings its own tokenizer (`--model`).

`load_dataset` is what the daemon calls: bytes for a model without a tokenizer (the built-in
GPT), token ids otherwise, both as a `ByteDataset`; pre-tokenized shards are mapped as they are.

  * The text is the same capped bytes `data.load_corpus` reads, decoded as UTF-8 (a character
    cut by the cap becomes U+FFFD), split at line ends into chunks, each encoded without
    special tokens. So (source, cap, tokenizer) always gives the same ids.
  * Ids are int32 whatever the vocabulary, so the data fingerprint (which the run spec carries)
    does not depend on the tokenizer's size.
  * The ids are cached per process and, when the tokenizer has a fingerprint, on disk under
    `cache_dir`, keyed by (tokenizer fingerprint, corpus hash); a damaged file is re-tokenized.
  * An id outside [0, vocab_size) is a `DataError`: tokenizer (or shards) and model do not match.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from swarm_node.train import shards
from swarm_node.train.data import (DEFAULT_MAX_BYTES, DEFAULT_TEXT_FIELD, DEFAULT_VAL_FRACTION, STDLIB, ByteDataset,
                                   DataError, load_corpus)

log = logging.getLogger(__name__)

CACHE_FORMAT = "tokens-v1"  # bump when the encoding rule above changes
CHUNK_CHARS = 1 << 16  # characters per encode call: bounds the tokenizer's working memory

_memory: dict[str, torch.Tensor] = {}


def load_dataset(source: str, *, max_bytes: int | None = DEFAULT_MAX_BYTES, tokenizer: Any | None = None,
                 tokenizer_fingerprint: str = "", vocab_size: int = 256, cache_dir: Path | None = None,
                 text_field: str = DEFAULT_TEXT_FIELD, token_dtype: str = "auto", split_seed: int = 0,
                 seq_len: int | None = None) -> ByteDataset:
    """The training data for a model scoring `vocab_size` ids; raises `DataError`.

    Token shards (.bin/.npy, or a directory of them) are memory-mapped and ignore `max_bytes`
    and the tokenizer; text is read, capped and tokenized. With `seq_len`, data too short for
    one training and one held-out window is refused here, before any peer traffic."""
    path = Path(source).expanduser()
    if source != STDLIB and path.exists() and shards.is_shard_source(path):
        maps = shards.open_shards(path, token_dtype)
        found = shards.scan(maps, shards.shard_files(path), vocab_size)
        dataset = ByteDataset(maps, DEFAULT_VAL_FRACTION, split_seed=split_seed, fingerprint=found.fingerprint)
    else:
        if tokenizer is None:
            data = load_corpus(source, max_bytes, text_field)
        else:
            data = load_tokens(source, max_bytes=max_bytes, tokenizer=tokenizer, text_field=text_field,
                               tokenizer_fingerprint=tokenizer_fingerprint, cache_dir=cache_dir)
        check_vocab(data, vocab_size)
        dataset = ByteDataset(data, split_seed=split_seed)
    if seq_len is not None:
        dataset.plan(seq_len)
    return dataset


def check_vocab(data: torch.Tensor, vocab_size: int) -> None:
    if len(data) == 0:
        return
    low, high = int(data.min()), int(data.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"token id {bad} is outside the model's vocabulary of {vocab_size} ids "
                        "(the tokenizer does not match the model)")


def load_tokens(source: str, *, max_bytes: int | None, tokenizer: Any, tokenizer_fingerprint: str = "",
                cache_dir: Path | None = None, text_field: str = DEFAULT_TEXT_FIELD) -> torch.Tensor:
    """Token ids of the corpus as a 1-D int32 CPU tensor (shared; do not mutate it)."""
    raw = load_corpus(source, max_bytes, text_field)
    corpus_hash = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    tok_key = tokenizer_fingerprint or f"object-{id(tokenizer)}"  # no fingerprint: this process only
    key = hashlib.sha256(f"{CACHE_FORMAT}|{tok_key}|{corpus_hash}".encode()).hexdigest()[:24]
    if key in _memory:
        return _memory[key]
    path = cache_dir / f"{key}.pt" if cache_dir is not None and tokenizer_fingerprint else None
    ids = _read_cache(path) if path is not None else None
    if ids is None:
        ids = encode_text(tokenizer, bytes(raw.numpy()).decode("utf-8", errors="replace"))
        if len(ids) == 0:
            raise DataError(f"data source {source!r} encodes to no tokens")
        if path is not None:
            _write_cache(path, ids)
    _memory[key] = ids
    return ids


def encode_text(tokenizer: Any, text: str) -> torch.Tensor:
    """`text` as int32 ids, encoded chunk by chunk (see the module docstring)."""
    chunks = _chunks(text)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast HF tokenizer: batch encode, and no over-length warnings
        encoded = [e.ids for e in backend.encode_batch(chunks, add_special_tokens=False)]
    elif _is_hf_tokenizer(tokenizer):
        encoded = [tokenizer.encode(c, add_special_tokens=False) for c in chunks]
    else:
        encoded = [list(tokenizer.encode(c)) for c in chunks]
    flat = [i for ids in encoded for i in ids]
    return torch.tensor(flat, dtype=torch.int32)


def _chunks(text: str) -> list[str]:
    """Pieces of about CHUNK_CHARS characters, each ending at a line end when there is one."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + CHUNK_CHARS)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
        out.append(text[start:end])
        start = end
    return out


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    import sys

    base = getattr(sys.modules.get("transformers"), "PreTrainedTokenizerBase", None)
    return base is not None and isinstance(tokenizer, base)


def _read_cache(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file is only a cache miss
        log.warning("token cache %s unreadable (%s); tokenizing again", path, e)
        return None
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int32 or ids.dim() != 1 or len(ids) == 0:
        log.warning("token cache %s has the wrong shape; tokenizing again", path)
        return None
    return ids


def _write_cache(path: Path, ids: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(ids, f)
            os.replace(tmp, path)  # readers see the old file or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only or full disk costs a re-tokenization next time, nothing more
        log.warning("could not write the token cache %s: %s", path, e)
