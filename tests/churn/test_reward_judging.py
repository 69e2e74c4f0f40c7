"""The churn runner's reward judging (loss="reward", SAPO), on made-up observations: no process.

Each case is a timeline a real run could produce (what the runner's /status and /metrics polls
record) and checks that the verdict catches the failure it is meant to catch: a peer stuck after
the churn, gossip dead after a heal (sharing by pull only), a reward that did not rise, gossip
that kept arriving through a partition; and that a restarted process's counter reset is counted
as what the new process received."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm_node.lab.churn import ChurnRunner, Fired, RunOptions
from swarm_node.strategies.sapo.churn_profile import SAPO_CHURN
from swarm_node.lab.scenario import Scenario

pytestmark = pytest.mark.churn

FIRED_AT = {"kill n1": 24.0, "term n2": 30.0, "restart n1": 36.0, "partition n3": 44.0, "heal n3": 56.0}
SINCE = 60.0  # heal n3 re-joined 4 s after the heal


@dataclass
class _Stub:
    restarted: bool = False


def _runner(tmp_path: Path) -> ChurnRunner:
    r = ChurnRunner(RunOptions(strategy="sapo", peers=4, scenario=Scenario.parse(SAPO_CHURN, "churn"),
                               loss="reward", workdir=tmp_path))
    r.report.fired = [Fired(e, at_s=FIRED_AT[f"{e.action} {e.target}"]) for e in r.o.scenario.events]
    r.last_fire_s = FIRED_AT["heal n3"]
    r.watch = {"restart n1": {"done_at_s": 44.0}, "heal n3": {"done_at_s": SINCE}}
    r.nodes = {"n0": _Stub(), "n1": _Stub(restarted=True), "n2": _Stub(), "n3": _Stub()}  # type: ignore[dict-item]
    # a healthy run: rounds every 4 s, reward 0.10 before the churn and 0.20 after it, 4 external
    # groups a round, 10 rollouts a poll by gossip (n1's new process counting from 0 at 40 s)
    for n in ("n0", "n1", "n2", "n3"):
        r.sapo_rounds[n] = {k: (t, 0.1 if t <= 24 else 0.2, 4) for k, t in enumerate(range(2, 100, 4))
                            if not (n == "n1" and 24 < t < 40) and not (n == "n2" and t > 30)}
        r.gossip_rx[n] = [(float(t), 10.0 * t) for t in range(0, 100)
                          if not (n == "n1" and 24 < t < 40) and not (n == "n2" and t > 30)]
    r.gossip_rx["n1"] = [(t, v if t <= 24 else 10.0 * (t - 40)) for t, v in r.gossip_rx["n1"]]
    # n3 cut off from 44 s to 56 s: nothing by gossip, local-only rounds
    r.gossip_rx["n3"] = [(t, v if t < 44 else 440.0 + 10 * max(0.0, t - 56)) for t, v in r.gossip_rx["n3"]]
    r.sapo_rounds["n3"] = {k: (t, rw, 0 if 44 < t < 56 else u) for k, (t, rw, u) in r.sapo_rounds["n3"].items()}
    return r


SURVIVORS = ["n0", "n1", "n3"]


def test_a_healthy_run_passes_and_reports_rejoin_times(tmp_path):
    r = _runner(tmp_path)
    r._judge_reward(SURVIVORS)
    assert r.report.problems == []
    assert r.report.reward["before"] == pytest.approx(0.1) and r.report.reward["end"] == pytest.approx(0.2)
    heal = r.report.fired[-1].detail
    assert heal["gossip_while_partitioned"] == 0 and heal["gossip_after_s"] == 1.0 and heal["external_after_s"] == 2.0
    # n1's counter restarted at 0: what the new process counted, not "went down"
    restart = r.report.fired[2].detail
    assert restart["gossip_after_s"] == 5.0
    assert r.report.reward["gossip_after"]["n1"] == pytest.approx(10 * (99 - 60))


def test_a_peer_stuck_after_the_heal_fails(tmp_path):
    r = _runner(tmp_path)
    r.sapo_rounds["n3"] = {k: v for k, v in r.sapo_rounds["n3"].items() if v[0] < 44}
    r._judge_reward(SURVIVORS)
    assert any(p.startswith("n3: 0 SAPO rounds after the churn") for p in r.report.problems), r.report.problems


def test_gossip_dead_after_the_heal_fails_even_if_pulls_feed_training(tmp_path):
    r = _runner(tmp_path)
    r.gossip_rx["n3"] = [(t, min(v, 440.0)) for t, v in r.gossip_rx["n3"]]  # external groups still used
    r._judge_reward(SURVIVORS)
    assert "n3: received no rollouts by gossip after the churn (gossip dead?)" in r.report.problems
    assert r.report.fired[-1].detail["gossip_after_s"] is None


def test_training_on_no_external_rollouts_after_the_restart_fails(tmp_path):
    r = _runner(tmp_path)
    r.sapo_rounds["n1"] = {k: (t, rw, 0 if t > 36 else u) for k, (t, rw, u) in r.sapo_rounds["n1"].items()}
    r._judge_reward(SURVIVORS)
    assert "n1: trained on no external rollouts after the churn" in r.report.problems
    assert r.report.fired[2].detail["external_after_s"] is None


def test_a_reward_that_did_not_rise_fails(tmp_path):
    r = _runner(tmp_path)
    for n in r.sapo_rounds:
        r.sapo_rounds[n] = {k: (t, 0.1, u) for k, (t, _, u) in r.sapo_rounds[n].items()}
    r._judge_reward(SURVIVORS)
    assert "reward did not rise through the churn: 0.100 -> 0.100" in r.report.problems


def test_the_restarted_peer_is_reported_apart_from_the_rise(tmp_path):
    r = _runner(tmp_path)  # n1 resumed from an old checkpoint: its reward is back at 0.05
    r.sapo_rounds["n1"] = {k: (t, 0.05 if t > 36 else rw, u) for k, (t, rw, u) in r.sapo_rounds["n1"].items()}
    r._judge_reward(SURVIVORS)
    assert r.report.problems == []
    assert r.report.reward["end"] == pytest.approx(0.2) and r.report.reward["end_restarted"] == pytest.approx(0.05)


def test_gossip_through_a_partition_means_the_lab_did_not_cut_it(tmp_path):
    r = _runner(tmp_path)
    r.gossip_rx["n3"] = [(float(t), 10.0 * t) for t in range(0, 100)]
    r._judge_reward(SURVIVORS)
    assert any("n3 received" in p and "while partitioned" in p for p in r.report.problems), r.report.problems
