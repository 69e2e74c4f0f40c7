"""DHT records validate strictly; config merges CLI > env > TOML and explains errors."""
from __future__ import annotations

import msgpack
import pytest

from swarm_node.cli import main as cli_main
from swarm_node.config import ConfigError, NodeConfig, load_config
from swarm_node.protocol.records import MAX_RECORD_BYTES, PeerRecord, RecordError, SpecRecord

PID = "QmPeer" + "x" * 40


def record(**kw) -> PeerRecord:
    base = dict(peer_id=PID, state="online", spec_hash="abc", strategy="sync", role="trainer", device="cpu",
                step=3, samples_per_s=12.5, software="0.1.0", maddrs=("/ip4/1.2.3.4/tcp/1/p2p/" + PID,))
    base.update(kw)
    return PeerRecord(**base)


def test_peer_record_round_trip():
    r = record()
    assert PeerRecord.from_wire(r.to_wire(), subkey=PID) == r


@pytest.mark.parametrize("index,value,needle", [
    (7, 3.0, "step must be an int"),          # float where an int belongs
    (7, True, "step must be an int"),         # bool is not a number here
    (7, -1, "out of range"),
    (8, float("nan"), "not finite"),
    (8, "fast", "must be a number"),
    (2, "dancing", "state"),
    (10, ["x"] * 9, "at most 8"),
])
def test_peer_record_rejects_bad_fields(index, value, needle):
    fields = list(msgpack.unpackb(record().to_wire()))
    fields[index] = value
    with pytest.raises(RecordError, match=needle):
        PeerRecord.from_wire(msgpack.packb(fields), subkey=PID)


def test_peer_record_rejects_spoofed_subkey_wrong_version_and_garbage():
    with pytest.raises(RecordError, match="stored under"):
        PeerRecord.from_wire(record().to_wire(), subkey="QmSomeoneElse")
    fields = list(msgpack.unpackb(record().to_wire()))
    fields[0] = 99
    with pytest.raises(RecordError, match="version"):
        PeerRecord.from_wire(msgpack.packb(fields))
    with pytest.raises(RecordError, match="msgpack"):
        PeerRecord.from_wire(b"\xc1\xc1\xc1")
    with pytest.raises(RecordError, match="bytes"):
        PeerRecord.from_wire({"not": "bytes"})
    with pytest.raises(RecordError, match="exceeds"):
        PeerRecord.from_wire(b"\x00" * (MAX_RECORD_BYTES + 1))


def test_oversized_record_refused_at_encode_time():
    with pytest.raises(RecordError, match="exceeds"):
        record(role="r" * (MAX_RECORD_BYTES + 10)).to_wire()


def test_spec_record_and_differences():
    spec = NodeConfig(lr=0.01).run_spec()
    other = NodeConfig().run_spec()
    assert spec.digest() != other.digest()
    assert spec.differences(other.canonical()) == ["lr: ours=0.01 theirs=0.003"]
    rec = SpecRecord(spec.digest(), spec.canonical())
    assert SpecRecord.from_wire(rec.to_wire()) == rec
    with pytest.raises(RecordError):
        SpecRecord.from_wire(msgpack.packb([1, "d", {"k": [1, 2]}]))


def test_config_precedence_cli_env_toml(tmp_path, monkeypatch):
    toml = tmp_path / "swarm.toml"
    toml.write_text('run_id = "from-toml"\nlr = 0.5\nbatch_size = 4\ninitial_peers = "/ip4/1.2.3.4/tcp/5/p2p/QmA"\n')
    monkeypatch.setenv("SWARM_NODE_LR", "0.25")
    monkeypatch.setenv("SWARM_NODE_BATCH_SIZE", "8")
    cfg = load_config({"batch_size": 2}, toml)
    assert cfg.run_id == "from-toml"  # TOML only
    assert cfg.lr == 0.25  # env beats TOML
    assert cfg.batch_size == 2  # CLI beats env
    assert cfg.initial_peers == ["/ip4/1.2.3.4/tcp/5/p2p/QmA"]


@pytest.mark.parametrize("values,needle", [
    ({"port": 70000}, "--port"),
    ({"initial_peers": ["1.2.3.4:5"]}, "not a peer multiaddr"),
    ({"d_model": 100, "n_head": 3}, "divisible"),
    ({"metrics_addr": "nope"}, "host:port"),
    ({"lr": "fast"}, "--lr"),
])
def test_config_errors_are_plain_words(values, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(values)


def test_cli_exit_code_2_on_bad_config_and_missing_join_target(capsys, tmp_path):
    assert cli_main(["join", "--port", "-5", "--state-dir", str(tmp_path)]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli_main(["join", "--state-dir", str(tmp_path)]) == 2
    assert "--new-swarm" in capsys.readouterr().err
    toml = tmp_path / "bad.toml"
    toml.write_text("lr = [")
    assert cli_main(["join", "--new-swarm", "--config", str(toml), "--state-dir", str(tmp_path)]) == 2
    assert cli_main(["join", "--new-swarm", "--config", str(tmp_path / "missing.toml")]) == 2


def test_check_command_grades_and_exit_codes(capsys, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli_main(["check", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                         "--state-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 3 and str(port) in out
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    maddr = f"/ip4/127.0.0.1/tcp/{dead}/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    code = cli_main(["check", "--host", "127.0.0.1", "--device", "cpu", "--initial-peers", maddr,
                     "--state-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and str(dead) in out and "warn" in out.lower()  # unreachable peer: a warning


@pytest.mark.parametrize("values,needle", [
    ({"strategy": "streaming-diloco", "inner_steps": 50, "fragments": 4}, "divisible by --fragments"),
    ({"strategy": "streaming-diloco", "inner_steps": 20, "fragments": 4, "overlap_steps": 5}, "< inner-steps/fragments"),
])
def test_streaming_rejects_invalid_schedule(values, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(values)
    assert "--config" not in str(pytest.raises(ConfigError, load_config, values).value)


def test_demo_passes_flags_after_double_dash_to_every_node(monkeypatch):
    import swarm_node.lab.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda opts: seen.setdefault("opts", opts) and 0)
    assert cli_main(["demo", "--strategy", "diloco", "--steps", "5", "--", "--inner-steps", "10"]) == 0
    assert seen["opts"].extra == ["--inner-steps", "10"] and seen["opts"].strategy == "diloco"


@pytest.mark.parametrize("value", ["/ip4/1.2.3.4/tcp/1/p2p/QmA /ip4/1.2.3.5/tcp/2/p2p/QmB",
                                   "/ip4/1.2.3.4/tcp/1/p2p/QmA,/ip4/1.2.3.5/tcp/2/p2p/QmB",
                                   '["/ip4/1.2.3.4/tcp/1/p2p/QmA", "/ip4/1.2.3.5/tcp/2/p2p/QmB"]'])
def test_initial_peers_from_env_as_plain_string(monkeypatch, value):
    """SWARM_NODE_INITIAL_PEERS takes a space- or comma-separated string (compose, systemd)
    as well as a JSON list."""
    monkeypatch.setenv("SWARM_NODE_INITIAL_PEERS", value)
    assert load_config({}).initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/QmA", "/ip4/1.2.3.5/tcp/2/p2p/QmB"]


def test_abbreviated_join_flags_are_refused(capsys):
    from swarm_node.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["join", "--shutdown-grace", "5"])
    assert "unrecognized arguments: --shutdown-grace" in capsys.readouterr().err


def test_spec_fields_at_their_defaults_leave_the_digest_alone():
    """A node spec field added in a later version (at its default) must not split a run between
    peers of the two versions: the digest covers only non-default node fields."""
    base = NodeConfig().run_spec()
    assert "compression" not in base.canonical() and "inner_steps" not in base.canonical()
    assert {"run_id", "strategy", "lr", "seed"} <= set(base.canonical())
    older = {k: v for k, v in base.canonical().items()}  # what a peer without the field publishes
    assert base.differences(older) == []
    fp16 = NodeConfig(compression="fp16").run_spec()
    assert fp16.digest() != base.digest()
    assert fp16.differences(base.canonical()) == ["compression: ours='fp16' theirs='none'"]


def test_a_strategy_puts_its_own_fields_in_the_spec_and_only_its_own():
    """The spec carries the chosen strategy's own fields (its options' SPEC_FIELDS): another
    strategy's settings never split a run, and a differing field is named."""
    assert NodeConfig(gc_scheme="cyclic").run_spec().digest() == NodeConfig().run_spec().digest()  # sync
    coded = NodeConfig(strategy="gradcode", gc_scheme="cyclic").run_spec()
    plain = NodeConfig(strategy="gradcode").run_spec()
    assert coded.canonical()["gc_scheme"] == "cyclic" and plain.canonical()["gc_scheme"] == "auto"
    assert "straggler_delay_s" not in coded.canonical()  # injection is per peer
    assert coded.differences(plain.canonical()) == ["gc_scheme: ours='cyclic' theirs='auto'"]


def test_cosine_lr_schedule_needs_max_steps_and_joins_the_spec():
    with pytest.raises(ValueError, match="--max-steps"):
        NodeConfig(lr_schedule="cosine", lr_warmup_steps=10)
    base = NodeConfig(max_steps=100).run_spec()
    cos = NodeConfig(lr_schedule="cosine", max_steps=100, lr_warmup_steps=10).run_spec()
    shorter = NodeConfig(lr_schedule="cosine", max_steps=50, lr_warmup_steps=10).run_spec()
    assert "lr_schedule" not in base.canonical()  # constant: the digest of older runs is unchanged
    assert cos.digest() != base.digest() and cos.digest() != shorter.digest()  # horizon is shared state
    assert any("lr_total_steps" in d for d in cos.differences(shorter.canonical()))


def test_slowdown_and_round_grace_are_per_peer_settings_with_bounds():
    """A simulated slow device and a peer's own grace window must not split the run (they stay
    out of the spec), and nonsense values are refused with the field named."""
    base = NodeConfig().run_spec()
    assert NodeConfig(compute_slowdown=3.0, round_grace_s=1.0).run_spec().digest() == base.digest()
    with pytest.raises(ValueError, match="compute_slowdown"):
        NodeConfig(compute_slowdown=0.5)  # < 1 would be a speed-up it cannot deliver
    with pytest.raises(ValueError, match="round_grace_s"):
        NodeConfig(round_grace_s=0)


def test_demo_model_and_data_reach_every_node_and_bad_ones_stop_it_before_any_daemon(monkeypatch, tmp_path, capsys):
    import swarm_node.lab.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda opts: seen.setdefault("opts", opts) and 0)
    corpus = tmp_path / "text.txt"
    corpus.write_text("hello\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert cli_main(["demo", "--model", str(model), "--data", str(corpus)]) == 0
    assert seen["opts"].node_args() == ["--model", str(model), "--data", str(corpus)]
    assert demo.DemoOptions().node_args() == []  # builtin on the built-in corpus: nothing added
    monkeypatch.undo()
    started = []
    monkeypatch.setattr(demo.Swarm, "add", lambda *a, **k: started.append(a))
    assert cli_main(["demo", "--model", str(tmp_path / "nope")]) == 2
    assert cli_main(["demo", "--model", str(tmp_path)]) == 2  # a directory without config.json
    assert cli_main(["demo", "--data", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err and "has no config.json" in err
    assert "missing.txt: no such file" in err
    assert started == []


def test_record_store_publishes_under_our_id_and_reads_what_decodes_counting_the_rest():
    """The strategies' view of the DHT: our record goes under our peer id; a read decodes each
    peer's value, drops expired ones and (optionally) our own, and counts every value that does
    not decode, or that sits under a subkey no peer id could be, without raising."""
    import asyncio
    from types import SimpleNamespace

    from swarm_node.protocol.records import RecordStore

    class Net:
        def __init__(self):
            self.stored, self.value = [], None

        async def store(self, key, value, ttl_s, subkey=None):
            self.stored.append((key, value, ttl_s, subkey))
            return True

        async def get(self, key):
            return self.value

    def item(value, exp):
        return SimpleNamespace(value=value, expiration_time=exp)

    def decode(value, subkey):
        if not isinstance(value, int):
            raise TypeError("not an int")
        return (subkey, value)

    net, rejected = Net(), []
    store = RecordStore(net, "me", lambda: rejected.append(1))
    assert asyncio.run(store.publish("k", b"v", 5.0)) and net.stored == [("k", b"v", 5.0, "me")]
    net.value = SimpleNamespace(value={"me": item(1, 100.0), "a": item(2, 100.0), "old": item(3, 9.0),
                                       "bad": item("x", 100.0), 7: item(4, 100.0)})
    got = asyncio.run(store.read("k", decode, now=10.0))
    assert {p: e.record for p, e in got.items()} == {"me": ("me", 1), "a": ("a", 2)} and len(rejected) == 2
    assert set(asyncio.run(store.read("k", decode, skip_own=True))) == {"a", "old"}
    net.value = None  # a failed read
    assert asyncio.run(store.read("k", decode)) == {}
