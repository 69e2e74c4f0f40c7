"""`--data` a user brings: record files, memory-mapped token shards, the window sampler, bad data.

Every file is written into tmp_path; the model is a tiny built-in GPT, so nothing downloads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from swarm_node.config import ConfigError, load_config
from swarm_node.train import sampler
from swarm_node.train.data import ByteDataset, DataError
from swarm_node.train.model import GPTConfig, build_model
from swarm_node.train.tokens import load_dataset
from swarm_node.train.trainer import LocalTrainer, TrainConfig

SEQ_LEN = 16
TINY = GPTConfig(seq_len=SEQ_LEN, n_layer=1, n_head=2, d_model=32)
WIDE = GPTConfig(vocab_size=8192, seq_len=SEQ_LEN, n_layer=1, n_head=2, d_model=32)  # scores ids_dataset's ids
TEXT = "the cat sat on the mat. "


def trainer(ds: ByteDataset, peer: int | str = 0, **cfg: object) -> LocalTrainer:
    model = build_model(TINY if ds.n_tokens and int(ds.shards[0][:4096].max()) < 256 else WIDE, 0)
    return LocalTrainer(model, ds, TrainConfig(batch_size=4, seed=0, **cfg), peer=peer)


def ids_dataset(n: int, **kw: object) -> ByteDataset:
    """Token ids 0..n-1 (n <= 8192): a window's first id names its start."""
    return ByteDataset(torch.arange(n, dtype=torch.int32), **kw)


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_bin(path: Path, ids: np.ndarray, dtype: str | None) -> Path:
    ids.astype(np.dtype(dtype or "uint16").newbyteorder("<")).tofile(path)
    if dtype is not None:
        path.with_suffix(".json").write_text(json.dumps({"dtype": dtype}))
    return path


def byte_ids(n: int) -> np.ndarray:
    return np.frombuffer((TEXT * (n // len(TEXT) + 1)).encode()[:n], dtype=np.uint8).astype(np.int64)


# ---- formats --------------------------------------------------------------------------------
def _parquet(path: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [TEXT * 5] * 60, "n": list(range(60))}), path)
    return path


def _arrow(path: Path, stream: bool) -> Path:
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"body": [TEXT * 5] * 60})
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            writer.write_table(table)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow-file", "arrow-stream", "bin-sidecar", "bin-flag",
                                 "npy", "npy-2d", "shard-dir"])
def test_each_format_loads_and_trains(fmt, tmp_path):
    flags: dict[str, object] = {}
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "d.jsonl", [{"body": TEXT * 5, "id": i} for i in range(60)])
        flags["text_field"] = "body"
    elif fmt == "parquet":
        source, flags["text_field"] = _parquet(tmp_path / "d.parquet"), "body"
    elif fmt.startswith("arrow"):
        source, flags["text_field"] = _arrow(tmp_path / "d.arrow", fmt == "arrow-stream"), "body"
    elif fmt == "bin-sidecar":
        source = write_bin(tmp_path / "d.bin", byte_ids(8000), "uint16")
    elif fmt == "bin-flag":
        source, flags["token_dtype"] = write_bin(tmp_path / "d.bin", byte_ids(8000), None), "uint16"
    elif fmt == "npy":
        source = tmp_path / "d.npy"
        np.save(source, byte_ids(8000).astype(np.int32))
    elif fmt == "npy-2d":
        source = tmp_path / "d.npy"
        np.save(source, byte_ids(8000).astype(np.uint16).reshape(100, 80))
    else:
        source = tmp_path / "shards"
        source.mkdir()
        for i in range(3):  # windows run across shard ends
            write_bin(source / f"part-{i}.bin", byte_ids(3001), "uint32")
    ds = load_dataset(str(source), vocab_size=256, seq_len=SEQ_LEN, **flags)
    if fmt.startswith(("bin", "npy", "shard")):
        assert all(isinstance(s, np.memmap) for s in ds.shards) and ds.data is None
    else:
        assert bytes(ds.data[:len(TEXT)].tolist()).decode() == TEXT
    tr = trainer(ds)
    losses = [tr.train_step().loss for _ in range(3)]
    assert all(np.isfinite(losses)) and tr.step == 3
    assert np.isfinite(tr.evaluate(max_batches=2))
    x, y = ds.step_batch(4, SEQ_LEN, seed=0, step=0, rank=0, ranks=4)
    assert x.shape == (4, SEQ_LEN) and torch.equal(x[:, 1:], y[:, :-1])


def test_jsonl_text_is_tokenized_with_the_models_tokenizer(tmp_path):
    class Upper:
        def encode(self, text: str) -> list[int]:
            return [ord(c) % 32 for c in text]

    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}] * 100)
    ds = load_dataset(str(source), tokenizer=Upper(), vocab_size=32)
    assert ds.data.dtype == torch.int32 and ds.data[:4].tolist() == [1, 2, 3, 10]  # 10 = the "\n" between records


def test_a_directory_mixes_text_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "a.txt").write_text("AAAA")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "BB"}, {"text": "CC"}])
    ds = load_dataset(str(tmp_path), max_bytes=None)
    assert bytes(ds.data.tolist()) == b"AAAABB\nCC"


def test_shards_are_mapped_not_read_so_the_byte_cap_does_not_apply(tmp_path):
    source = write_bin(tmp_path / "big.bin", byte_ids(50_000), "uint16")
    ds = load_dataset(str(source), max_bytes=2048, vocab_size=256)
    assert ds.n_tokens == 50_000 and isinstance(ds.shards[0], np.memmap)
    assert Path(ds.shards[0].filename) == source.resolve()


def test_the_fingerprint_covers_the_ids_and_their_dtype(tmp_path):
    a = write_bin(tmp_path / "a.bin", byte_ids(4000), "uint16")
    b = write_bin(tmp_path / "b.bin", byte_ids(4000), "uint32")
    fa, fb = (load_dataset(str(p)).fingerprint for p in (a, b))
    assert fa != fb and fa == load_dataset(str(a)).fingerprint


# ---- the sampler ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    out = sampler.Permutation(n, key=5)(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_four_peers_draw_disjoint_windows_every_step():
    """1. Four trainers, peers 0..3 (ranks 0..3 of 4 data shards), on ids 0..N-1.
    2. Each draws its batch for steps 0..19 (two epochs and more).
    Result: at every step the 16 windows are distinct; within an epoch no window repeats."""
    ds = ids_dataset(17 * 400)  # 400 windows of 17 ids
    peers = [trainer(ds, peer=p, data_shards=4) for p in range(4)]
    n_train = ds.plan(SEQ_LEN).n_train
    steps_per_epoch = n_train // 16
    seen_in_epoch: set[int] = set()
    for step in range(20):
        if step % steps_per_epoch == 0:
            seen_in_epoch = set()
        starts = [int(s) for tr in peers for s in ds.step_batch(4, SEQ_LEN, seed=0, step=step, rank=tr.data_rank,
                                                                ranks=4)[0][:, 0]]
        assert len(set(starts)) == 16, step
        assert seen_in_epoch.isdisjoint(starts)
        seen_in_epoch |= set(starts)
    # the trainer really trains on its shard's windows
    xs = []
    orig = ds.step_batch
    ds.step_batch = lambda *a, **kw: xs.append(kw) or orig(*a, **kw)  # type: ignore[method-assign]
    peers[2].compute_gradients(7)
    assert xs == [dict(seed=0, step=7, rank=2, ranks=4)]


def test_hashed_ranks_and_a_pinned_rank():
    assert sampler.rank_of("QmPeerA", 64) == sampler.rank_of("QmPeerA", 64) < 64
    assert len({sampler.rank_of(f"peer-{i}", 1 << 20) for i in range(50)}) == 50
    ds = ids_dataset(17 * 100)
    assert trainer(ds, peer="QmPeerA", data_rank=5).data_rank == 5
    with pytest.raises(ValueError, match="data_rank"):
        trainer(ds, data_rank=64)
    with pytest.raises(ConfigError, match="--data-rank 9 must be below --data-shards"):
        load_config({"data_shards": 8, "data_rank": 9})


def test_small_corpus_still_gives_full_batches():
    ds = ids_dataset(17 * 10)  # 9 training windows, fewer than 64 shards x 4
    x, _ = ds.step_batch(4, SEQ_LEN, seed=0, step=3, rank=63, ranks=64)
    assert x.shape == (4, SEQ_LEN)


def test_a_restarted_peer_continues_its_stream(tmp_path):
    """1. Peer "a" trains steps 0..5 from scratch, recording each step's batch; it checkpoints at 3.
    2. A new process (trainer) loads the checkpoint and trains steps 3..5.
    Result: steps 3, 4, 5 see the same batches (not a replay of 0, 1, 2), and end bit-identical."""
    ds = ids_dataset(17 * 300)
    seen: dict[str, list[list[int]]] = {"full": [], "resumed": []}

    def record(into: list[list[int]]):
        def spy(*a, **kw):
            out = ByteDataset.step_batch(ds, *a, **kw)
            into.append(out[0][:, 0].tolist())
            return out
        return spy

    full = trainer(ds, peer="a")
    ds.step_batch = record(seen["full"])  # type: ignore[method-assign]
    for step in range(6):
        if step == 3:
            full.save_checkpoint(tmp_path / "ck.pt")
        full.train_step()
    resumed = trainer(ds, peer="a")
    resumed.load_checkpoint(tmp_path / "ck.pt")
    ds.step_batch = record(seen["resumed"])  # type: ignore[method-assign]
    for _ in range(3):
        resumed.train_step()
    assert seen["resumed"] == seen["full"][3:]
    assert seen["resumed"][0] != seen["full"][0]
    assert resumed.param_hash() == full.param_hash()


def test_held_out_windows_are_identical_on_every_peer_and_never_trained_on():
    ds_a, ds_b = ids_dataset(17 * 200, split_seed=3), ids_dataset(17 * 200, split_seed=3)
    val_a = {int(s) for x, _ in ds_a.val_batches(4, SEQ_LEN, 3) for s in x[:, 0]}
    val_b = {int(s) for x, _ in ds_b.val_batches(4, SEQ_LEN, 3) for s in x[:, 0]}
    assert val_a == val_b and len(val_a) == ds_a.plan(SEQ_LEN).n_val == 10
    assert {int(s) for x, _ in ids_dataset(17 * 200, split_seed=4).val_batches(4, SEQ_LEN, 3)
            for s in x[:, 0]} != val_a  # another run seed holds out other windows
    trained: set[int] = set()
    for step in range(5):  # one epoch of 8 shards: 5 steps of 32 of the 190 training windows
        for rank in range(8):
            trained |= {int(s) for s in ds_a.step_batch(4, SEQ_LEN, seed=0, step=step, rank=rank, ranks=8)[0][:, 0]}
    assert len(trained) == 160 and trained.isdisjoint(val_a)
    drawn = {int(s) for s in ds_a.train_batch(3000, SEQ_LEN, torch.Generator().manual_seed(0))[0][:, 0]}
    assert drawn.isdisjoint(val_a) and len(drawn | val_a) == 200  # a caller's generator: every other window
    a, b = trainer(ds_a, peer="x"), trainer(ds_b, peer="y")
    assert a.evaluate(max_batches=2) == b.evaluate(max_batches=2)


def test_gradcode_partitions_are_disjoint_shards_of_the_step():
    ds = ids_dataset(17 * 300)
    tr, other = trainer(ds, peer="p"), trainer(ds, peer="q")
    parts = [tr.partition_batch(4, j)[0][:, 0].tolist() for j in range(5)]
    assert len({s for p in parts for s in p}) == 20
    assert other.partition_batch(4, 3)[0][:, 0].tolist() == parts[3]  # any replica computes any partition


# ---- bad data -------------------------------------------------------------------------------
def _bad(tmp_path: Path, case: str) -> tuple[Path, dict[str, object]]:
    p = tmp_path
    if case == "empty-jsonl":
        (p / "e.jsonl").write_text("")
        return p / "e.jsonl", {}
    if case == "jsonl-not-json":
        (p / "d.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
        return p / "d.jsonl", {}
    if case == "jsonl-no-field":
        return write_jsonl(p / "d.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "x"}]), {}
    if case == "jsonl-not-string":
        return write_jsonl(p / "d.jsonl", [{"text": 5}]), {}
    if case == "jsonl-not-object":
        return write_jsonl(p / "d.jsonl", [[1, 2]]), {}
    if case == "empty-bin":
        (p / "e.bin").write_bytes(b"")
        return p / "e.bin", {"token_dtype": "uint16"}
    if case == "bin-odd-size":
        (p / "d.bin").write_bytes(b"\x01\x00" * 100 + b"\x01")
        return p / "d.bin", {"token_dtype": "uint16"}
    if case == "bin-no-dtype":
        (p / "d.bin").write_bytes(b"\x01\x00" * 100)
        return p / "d.bin", {}
    if case == "bin-dtype-conflict":
        return write_bin(p / "d.bin", byte_ids(100), "uint16"), {"token_dtype": "uint32"}
    if case == "bin-bad-sidecar":
        (p / "d.bin").write_bytes(b"\x01\x00" * 100)
        (p / "d.json").write_text('{"dtype": "float16"}')
        return p / "d.bin", {}
    if case == "npy-float":
        np.save(p / "d.npy", np.zeros(100, dtype=np.float32))
        return p / "d.npy", {}
    if case == "npy-empty":
        np.save(p / "d.npy", np.zeros(0, dtype=np.int32))
        return p / "d.npy", {}
    if case == "ids-beyond-vocab":
        ids = byte_ids(5000)
        ids[4321] = 300
        return write_bin(p / "d.bin", ids, "uint16"), {}
    if case == "too-short":
        return write_bin(p / "d.bin", byte_ids(30), "uint16"), {}
    if case == "parquet-no-column":
        return _parquet(p / "d.parquet"), {}
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("empty-jsonl", r"d?e\.jsonl holds no text"),
    ("jsonl-not-json", r"d\.jsonl line 2 is not JSON \(Expecting value\)"),
    ("jsonl-no-field", r"d\.jsonl line 3 has no 'text' field \(set --text-field\)"),
    ("jsonl-not-string", r"line 1: field 'text' is a int, not a string"),
    ("jsonl-not-object", r"line 1 is a JSON list, not an object"),
    ("empty-bin", r"token shard .*e\.bin is empty"),
    ("bin-odd-size", r"has 201 bytes, not a whole number of uint16 ids \(2 bytes each\): wrong --token-dtype\?"),
    ("bin-no-dtype", r"has no dtype: give --token-dtype"),
    ("bin-dtype-conflict", r"--token-dtype uint32 contradicts .*d\.json \(uint16\)"),
    ("bin-bad-sidecar", r"d\.json must be a JSON object with \"dtype\""),
    ("npy-float", r"holds float32 values, not integer token ids"),
    ("npy-empty", r"d\.npy is empty"),
    ("ids-beyond-vocab", r"id 300 at position 4321 is outside the model's vocabulary of 256 ids"),
    ("too-short", r"the data hold 30 tokens, too few for one training and one held-out window of --seq-len 16"),
    ("parquet-no-column", r"has no column 'text' \(columns: body, n; set --text-field\)"),
])
def test_bad_data_is_a_one_line_data_error(case, message, tmp_path):
    source, flags = _bad(tmp_path, case)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(source), vocab_size=256, seq_len=SEQ_LEN, **flags)
    assert "\n" not in str(info.value)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'swarm-node\[parquet\]'"):
        load_dataset(str(tmp_path / "d.parquet"))


def test_cli_exit_2_on_bad_data_before_the_network(tmp_path):
    """1. `join --new-swarm --data bad.jsonl` where line 2 is not JSON.
    Result: exit code 2, one line on stderr naming the line, no traceback, no p2pd started."""
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "swarm_node", "join", "--new-swarm", "--data",
                           str(tmp_path / "bad.jsonl"), "--state-dir", str(tmp_path / "state"),
                           "--metrics-addr", "off"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "swarm-node" in line]
    assert len(lines) == 1 and "bad.jsonl line 2 is not JSON" in lines[0], proc.stderr
    assert "p2pd" not in proc.stderr


def test_data_shards_enter_the_run_spec_only_when_changed():
    base = load_config({"strategy": "sync"}).run_spec()
    assert "data_shards" not in base.canonical()
    other = load_config({"strategy": "sync", "data_shards": 8}).run_spec()
    assert other.digest() != base.digest()
    assert load_config({"strategy": "sync", "data_rank": 3}).run_spec().digest() == base.digest()


def test_the_small_batch_path_of_the_permutation_is_the_same_bijection():
    """A step's batch goes through plain ints, larger arrays through numpy: one function."""
    from swarm_node.train.sampler import SMALL_BATCH, Permutation

    for n in (2, 3, 17, 1000, 65_537, 1_000_003):
        p = Permutation(n, 12345)
        idx = np.arange(min(n, 5 * SMALL_BATCH))
        whole = p(idx)  # numpy
        pieces = np.concatenate([p(idx[i:i + SMALL_BATCH]) for i in range(0, len(idx), SMALL_BATCH)])
        assert (whole == pieces).all(), n
