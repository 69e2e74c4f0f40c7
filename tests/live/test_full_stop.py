"""A whole diloco swarm stops (SIGTERM to every peer) and comes back from its state dirs.

The checkpoint carries the outer state (φ, momentum, round, merged work), so the swarm goes on
at the round it stopped at, with the φ it had, instead of starting the outer loop again at
round 0 with φ ← θ (which set the step back to H at the first commit).
"""
from __future__ import annotations

import json
import signal

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
