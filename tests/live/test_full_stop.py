"""A whole swarm stops (SIGTERM to every peer) and comes back from its state dirs.

diloco: the checkpoint carries the outer state (φ, momentum, round, merged work), so the swarm
goes on at the round it stopped at, with the φ it had, instead of starting the outer loop again
at round 0 with φ ← θ (which set the step back to H at the first commit).
noloco: φ and the momentum, so a pair goes on from the outer weights it had.
swarm: each peer's checkpoint carries the stage it served (weights, Adam moments, step) and the
trainer's step counter; with nobody else serving, each takes its stage back from it.
"""
from __future__ import annotations

import json
import re
import signal
import time

import pytest

from swarm_node.lab.launcher import NodeProcess

pytestmark = pytest.mark.multiprocess

H = 5
COMMON = ["--run-id", "fullstop", "--strategy", "diloco", "--inner-steps", str(H), "--min-peers", "2",
          "--checkpoint-every", "5", "--eval-every", "5"]


def _summary(node: NodeProcess) -> dict:
    return json.loads((node.state_dir / "summary.json").read_text())


def _ok_rounds(summary: dict) -> list[dict]:
    return [r for r in summary.get("round_history", []) if r.get("outcome") == "ok"]


def _vals(summary: dict) -> list[tuple[int, float]]:
    return [(h[0], h[2]) for h in summary.get("history", []) if h[2] is not None]


def test_a_diloco_swarm_resumes_its_round_and_outer_weights_after_a_full_stop(swarm):
    a = swarm.add("a", COMMON)
    a.wait_info()
    b = swarm.add("b", COMMON, initial=a.join_maddr())
    for n in (a, b):
        n.wait_for(lambda s: s["last_round"].get("group_size") == 2 and s["last_round"].get("round", 0) >= 8,
                   120, "eight rounds of two")
    for n in (a, b):  # every peer at once: one left alone would go on with rounds of one
        n.proc.send_signal(signal.SIGTERM)
    for n in (a, b):
        assert n.proc.wait(60) == 0, n.log_text()[-2000:]
    before = {n.name: _summary(n) for n in (a, b)}
    last = {k: _ok_rounds(s)[-1] for k, s in before.items()}
    # both stopped on one φ (they drain between rounds, or one round apart at most)
    top = max(r["round"] for r in last.values())

    a2 = swarm.add("a", COMMON)
    a2.wait_info()
    b2 = swarm.add("b", COMMON, initial=a2.join_maddr())
    for n in (a2, b2):
        n.wait_for(lambda s: s["last_round"].get("outcome") == "ok" and s["last_round"].get("group_size") == 2,
                   120, "a round of two after the restart")
        assert "resumed the diloco state from the checkpoint" in n.log_text()
    for n in (a2, b2):
        n.terminate(30)
    after = {n.name: _summary(n) for n in (a2, b2)}
    for name, s in after.items():
        first = _ok_rounds(s)[0]
        # the round number goes on from where the swarm stopped (not from 1), and so does the step
        assert first["round"] in (top, top + 1), (name, first["round"], top)
        assert s["history"][-1][0] >= before[name]["step"], (name, s["history"][-1][0], before[name]["step"])
        # the held-out loss after the restart is where it was before the stop, not a fresh start's
        v_before = _vals(before[name])[-1][1]
        v_after = _vals(s)[0][1]
        assert v_after <= v_before + 0.05, (name, v_before, v_after)
    # and the two peers agree on φ after their first common round
    assert _ok_rounds(after["a"])[0]["phi_hash"] == _ok_rounds(after["b"])[0]["phi_hash"]


def test_a_swarm_pipeline_resumes_its_stages_and_trainer_step_after_a_full_stop(tmp_path):
    """1. A 2-stage pipeline, one trainer (stage 0) and one stage-1 server, trains 12 steps.
    2. Both get SIGTERM and exit 0; both restart from their state dirs.
    Result: each logs that it serves its stage from the checkpoint at the step it had; the
    trainer's step goes on from where it stopped (not from 0) and training continues. Before
    the stop the trainer reports a held-out loss measured through the pipeline."""
    from swarm_node.lab.launcher import Swarm

    from tests.conftest import FAST_NODE_ARGS

    args = [*FAST_NODE_ARGS, "--strategy", "swarm", "--stages", "2", "--micro-batches", "2",
            "--rebalance-interval-s", "0", "--run-id", "swarmstop"]
    args[args.index("--n-layer") + 1] = "2"
    args[args.index("--d-model") + 1] = "32"
    with Swarm(tmp_path, args) as sw:
        trainer = sw.add("trainer", ["--stage", "0"])
        trainer.wait_info(90)
        server = sw.add("server", ["--stage", "1"], initial=trainer.join_maddr())
        server.wait_info(90)
        trainer.wait_for(lambda s: s.get("step", 0) >= 12, 120, "twelve pipeline steps")
        for n in (trainer, server):
            n.proc.send_signal(signal.SIGTERM)
        for n in (trainer, server):
            assert n.proc.wait(60) == 0, n.log_text()[-2000:]
        before = {n.name: _summary(n)["step"] for n in (trainer, server)}
        # the trainer's held-out loss is measured through the pipeline (an untrained model's is
        # about ln 256 = 5.55); a stage server has none to report
        assert _summary(trainer)["val_loss"] < 5.3 and _summary(server)["val_loss"] is None

        trainer2 = sw.add("trainer", ["--stage", "0"])
        trainer2.wait_info(90)
        server2 = sw.add("server", ["--stage", "1"], initial=trainer2.join_maddr())
        trainer2.wait_for(lambda s: s.get("step", 0) >= before["trainer"] + 3, 120, "three more steps")
        deadline = time.monotonic() + 30
        for n in (trainer2, server2):
            while "from the checkpoint" not in n.log_text():
                assert time.monotonic() < deadline, n.log_text()[-3000:]
                time.sleep(0.5)
        assert "resumed stage 0 at its step" in trainer2.log_text()
        found = re.search(r"resumed stage 1 at its step (\d+) from the checkpoint", server2.log_text())
        # the stage's step as saved at the drain (a backward may land between that and the summary)
        assert found and 0 < int(found.group(1)) <= before["server"] <= int(found.group(1)) + 2, (found, before)
        for n in (trainer2, server2):
            assert n.terminate(60) == 0, n.log_text()[-2000:]
        history = _summary(trainer2)["history"]
        assert history[0][0] > before["trainer"], (history[:3], before)


def test_a_noloco_pair_resumes_its_step_and_outer_weights_after_a_full_stop(swarm):
    """1. Two noloco peers (H=5) pair up for at least six rounds, then both get SIGTERM.
    2. Both restart from their state dirs.
    Result: each resumes its noloco state (φ, momentum) from the checkpoint, its step goes on
    from where it stopped, its first pair round after the restart is past the rounds before the
    stop, and its first held-out loss is within 0.05 of the last one before the stop."""
    common = ["--run-id", "nolocostop", "--strategy", "noloco", "--inner-steps", str(H), "--min-peers", "2",
              "--checkpoint-every", "5", "--eval-every", "5"]
    a = swarm.add("a", common)
    a.wait_info()
    b = swarm.add("b", common, initial=a.join_maddr())
    for n in (a, b):
        n.wait_for(lambda s: s["last_round"].get("outcome") == "ok" and s["last_round"].get("round", 0) >= 6,
                   120, "six pair rounds")
    for n in (a, b):
        n.proc.send_signal(signal.SIGTERM)
    for n in (a, b):
        assert n.proc.wait(60) == 0, n.log_text()[-2000:]
    before = {n.name: _summary(n) for n in (a, b)}

    a2 = swarm.add("a", common)
    a2.wait_info()
    b2 = swarm.add("b", common, initial=a2.join_maddr())
    for n in (a2, b2):
        n.wait_for(lambda s: s["last_round"].get("outcome") == "ok", 120, "a pair round after the restart")
        assert "resumed the noloco state from the checkpoint" in n.log_text(), n.log_text()[-3000:]
    for n in (a2, b2):
        n.terminate(30)
    for name, s in {n.name: _summary(n) for n in (a2, b2)}.items():
        assert s["history"][0][0] > before[name]["step"], (name, s["history"][0][0], before[name]["step"])
        assert _ok_rounds(s)[0]["round"] >= _ok_rounds(before[name])[-1]["round"], name
        v_before, v_after = _vals(before[name])[-1][1], _vals(s)[0][1]
        assert v_after <= v_before + 0.05, (name, v_before, v_after)
