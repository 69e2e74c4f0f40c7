"""Model construction/determinism and the byte corpus / batch sampling."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm_node.train.data import (
    ByteDataset,
    DataError,
    batch_generator_seed,
    load_corpus,
)
from swarm_node.train.model import GPT, GPTConfig, build_model

TINY = GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=32)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------ model


def test_build_model_is_bit_identical_for_same_seed() -> None:
    a, b = build_model(GPTConfig(), seed=7), build_model(GPTConfig(), seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = build_model(GPTConfig(), seed=8)
    assert not torch.equal(sa["tok_emb.weight"], c.state_dict()["tok_emb.weight"])


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(TINY, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_forward_shapes_tied_weights_and_param_count() -> None:
    m = build_model(TINY, seed=0)
    idx = torch.randint(0, 256, (3, 16), generator=_gen(0))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 16, 256)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    assert m(idx[:, :5])[1] is None  # shorter than seq_len is fine, no targets -> no loss
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    # Near-uniform predictions at init: loss close to ln(256) ~= 5.55.
    assert 4.5 < loss.item() < 6.5


def test_forward_is_causal() -> None:
    m = build_model(TINY, seed=0).eval()
    idx = torch.randint(0, 256, (1, 16), generator=_gen(1))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 256
    a, b = m(idx)[0], m(changed)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # earlier positions unaffected
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_sequence_and_bad_config_rejected() -> None:
    m = build_model(TINY, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_head=4)
    assert isinstance(m, GPT)


# ------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def stdlib() -> ByteDataset:
    return ByteDataset.from_source("stdlib")


def test_stdlib_corpus_is_capped_cached_and_split(stdlib: ByteDataset) -> None:
    corpus = load_corpus("stdlib")
    assert corpus.dtype == torch.uint8 and corpus.dim() == 1
    assert 1_000_000 < len(corpus) <= 4 * 1024 * 1024
    assert load_corpus("stdlib") is corpus  # cached per process
    assert len(load_corpus("stdlib", max_bytes=1000)) == 1000
    plan = stdlib.plan(32)
    assert plan.n_train + plan.n_val == plan.n_windows == len(stdlib.data) // 33
    assert plan.n_val == int(plan.n_windows * 0.05)
    assert len(stdlib.fingerprint) == 16


def test_train_batches_are_shifted_windows_from_train_split(stdlib: ByteDataset) -> None:
    x, y = stdlib.train_batch(8, 32, _gen(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Same generator state -> same batch; a different seed -> a different one.
    x2, _ = stdlib.train_batch(8, 32, _gen(0))
    x3, _ = stdlib.train_batch(8, 32, _gen(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_training_never_samples_validation_windows() -> None:
    data = torch.arange(99, dtype=torch.uint8)
    ds = ByteDataset(data, val_fraction=0.2)  # 11 windows of 9 bytes, 2 held out
    val_starts = {int(x[0, 0]) for x, _ in ds.val_batches(1, 8, 2)}
    assert len(val_starts) == 2 and all(s % 9 == 0 for s in val_starts)
    x, y = ds.train_batch(500, 8, _gen(0))
    train_starts = {int(s) for s in x[:, 0]}
    assert train_starts.isdisjoint(val_starts) and len(train_starts) == 9
    assert torch.equal(y[:, -1], x[:, 0] + 8)  # whole windows: inputs plus the last target


def test_val_batches_are_fixed(stdlib: ByteDataset) -> None:
    a = list(stdlib.val_batches(4, 32, 3))
    b = list(stdlib.val_batches(4, 32, 3))
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])


def test_batch_seeds_differ_by_peer_and_step_and_are_stable(stdlib: ByteDataset) -> None:
    s = batch_generator_seed
    assert s(0, 0, 5) == s(0, 0, 5)
    assert len({s(0, 0, 5), s(0, 1, 5), s(0, 0, 6), s(1, 0, 5), s(0, "0", 5)}) == 5
    assert all(0 <= s(r, p, t) < 2**63 for r in range(3) for p in range(3) for t in range(3))
    xa, _ = stdlib.train_batch(4, 16, _gen(s(0, "peer-a", 3)))
    xb, _ = stdlib.train_batch(4, 16, _gen(s(0, "peer-b", 3)))
    assert not torch.equal(xa, xb)


def test_file_and_directory_sources(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"BBBB")
    (tmp_path / "a.md").write_bytes(b"AAAA")
    (tmp_path / "ignored.bin").write_bytes(b"XXXX")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_bytes(b"CCCC")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_bytes(b"DDDD")
    assert bytes(load_corpus(str(tmp_path)).tolist()) == b"AAAABBBBCCCC"  # sorted, filtered
    assert bytes(load_corpus(str(tmp_path), max_bytes=6).tolist()) == b"AAAABB"
    assert bytes(load_corpus(str(tmp_path / "b.txt")).tolist()) == b"BBBB"


def test_bad_sources_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no "):
        load_corpus(str(tmp_path / "nothing"))
    tiny = ByteDataset(torch.zeros(17, dtype=torch.uint8), val_fraction=0.1)
    with pytest.raises(DataError, match="too few for one training and one held-out window"):
        next(tiny.val_batches(1, 8, 1))
