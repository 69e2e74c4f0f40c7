"""`--model DIR` with real daemons: two diloco peers train a tiny Hugging Face Llama together,
and a peer bringing another model is refused."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from swarm_node.strategies.sapo.hf_fixture import make_tiny_hf_model  # noqa: E402
from tests.byom_models import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.multiprocess


def test_two_diloco_peers_train_a_tiny_llama_and_refuse_a_gpt2_peer(swarm, tmp_path):
    """1. Write a tiny Llama and a tiny GPT-2 (offline), and a small text corpus.
    2. Start a (new swarm) and b on the Llama with diloco, H=5, 40 steps, min 2 peers.
    3. Start c on the GPT-2 against a while both train.
    Result: c exits 2 naming the differing model fields; a and b exit 0 with bit-identical
    weights after committed rounds, and a held-out loss below the first training loss."""
    llama = make_tiny_llama(tmp_path / "llama")
    gpt2 = make_tiny_hf_model(tmp_path / "gpt2", n_layer=1, n_embd=32)
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    common = ["--run-id", "byom", "--strategy", "diloco", "--inner-steps", "5", "--max-steps", "40",
              "--min-peers", "2", "--data", str(corpus), "--lr", "0.01"]
    a = swarm.add("a", [*common, "--model", str(llama)])
    a.wait_info()
    b = swarm.add("b", [*common, "--model", str(llama)], initial=a.join_maddr())
    c = swarm.add("c", [*common, "--model", str(gpt2)], initial=a.join_maddr())
    assert c.proc.wait(120) == 2, c.log_text()[-2000:]
    assert "differing fields" in c.log_text() and "arch: ours='GPT2LMHeadModel'" in c.log_text(), c.log_text()[-2000:]
    for n in (a, b):
        assert n.proc.wait(180) == 0, n.log_text()[-2000:]
    summaries = [json.loads((n.state_dir / "summary.json").read_text()) for n in (a, b)]
    assert summaries[0]["param_hash"] == summaries[1]["param_hash"]
    assert all(s["step"] == 40 and s["rounds"]["ok"] >= 1 for s in summaries), [s["rounds"] for s in summaries]
    first = summaries[0]["history"][0][1]
    assert all(s["val_loss"] < first for s in summaries), (first, [s["val_loss"] for s in summaries])


def test_demo_runs_a_swarm_on_a_model_directory(tmp_path):
    """`swarm-node demo --model DIR --data FILE`: two diloco peers and the solo baseline on a
    tiny Llama, real processes. Result: exit 0, and the summary names every node, its final
    held-out loss and the committed rounds, with no startup resync."""
    import subprocess
    import sys

    llama = make_tiny_llama(tmp_path / "llama")
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    out = subprocess.run([sys.executable, "-m", "swarm_node", "demo", "--peers", "2", "--strategy", "diloco",
                          "--steps", "30", "--model", str(llama), "--data", str(corpus), "--workdir",
                          str(tmp_path / "demo"), "--", "--inner-steps", "5", "--lr", "0.01"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"model {llama}" in out.stdout and "held-out loss: swarm" in out.stdout, out.stdout[-3000:]
    summaries = {n: json.loads((tmp_path / "demo" / n / "summary.json").read_text()) for n in ("peer-1", "peer-2")}
    for name, s in summaries.items():
        assert s["step"] == 30 and s["rounds"].get("ok", 0) >= 1 and s["rounds"].get("resync", 0) == 0, (name, s["rounds"])
    assert summaries["peer-1"]["param_hash"] == summaries["peer-2"]["param_hash"]
