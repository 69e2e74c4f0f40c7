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


def test_a_swarm_pipeline_trains_a_tiny_llama_and_checkfree_rebuilds_its_middle_stage(swarm, tmp_path):
    """1. A 3-layer tiny Llama (offline) in 3 stages: a trainer (stage 0), one stage-1 server and
       two stage-2 servers, all started with --model DIR.
    2. Once the pipeline trained a few steps, SIGKILL the only stage-1 server.
    Result: a stage-2 peer rebuilds stage 1 by CheckFree (the weighted average of stages 0 and 2),
    no micro-batch is lost, training goes on and its loss falls below the first step's, and the
    trainer reports a finite held-out loss measured through the pipeline."""
    import math

    from tests.live.test_swarm_live import _wait_metric, metric

    llama = make_tiny_llama(tmp_path / "llama", n_layer=3)
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    common = ["--run-id", "hfswarm", "--strategy", "swarm", "--stages", "3", "--micro-batches", "2",
              "--model", str(llama), "--data", str(corpus), "--lr", "0.01", "--seq-len", "16",
              "--stage-average-interval-s", "3", "--rebalance-interval-s", "0", "--eval-every", "5"]
    trainer = swarm.add("trainer", [*common, "--stage", "0"])
    trainer.wait_info()
    boot = trainer.join_maddr()
    s1 = swarm.add("s1", [*common, "--stage", "1"], initial=boot)
    s2 = [swarm.add(f"s2{c}", [*common, "--stage", "2"], initial=boot) for c in "ab"]
    for n in (s1, *s2):
        n.wait_info()
    first = float(trainer.wait_for(lambda s: s.get("step", 0) >= 1, 120, "a first pipeline step")["train_loss"])
    trainer.wait_for(lambda s: s.get("step", 0) >= 10, 120, "pipeline steps")
    step = trainer.status()["step"]
    s1.kill()
    rebuilt = _wait_metric(s2, "swarm_checkfree_recoveries_total", 1, 90, stage="1", method="wavg")
    assert rebuilt is not None, "\n".join(n.log_text()[-1500:] for n in s2)
    assert metric(rebuilt, "swarm_pipeline_stage") == 1
    st = trainer.wait_for(lambda s: s.get("step", 0) >= step + 10 and s.get("val_loss") is not None, 120,
                          "training after the rebuild")
    assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="lost") == 0
    assert float(st["train_loss"]) < first - 0.3, (first, st["train_loss"])
    assert math.isfinite(float(st["val_loss"]))
