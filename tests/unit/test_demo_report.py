"""`swarm-node demo`'s verdict, computed from summary.json contents, and each strategy's demo
profile: valid join flags for the swarm and the baseline, and its own lines in words."""
from __future__ import annotations

import pytest

from swarm_node.cli import _config_from, build_parser
from swarm_node.lab.demo_report import NodeSummary, format_table, format_verdict, judge
from swarm_node.strategies import registry
from swarm_node.strategies.demo_profile import DemoProfile


def node(name: str, *, val=None, step=200, sent=1000, rounds=None, stats=None, params=1000, history=None):
    return NodeSummary(name, {"step": step, "val_loss": val, "bytes_sent": sent, "rounds": rounds or {"ok": 20},
                              "params": params, "strategy_stats": stats or {}, "history": history or [],
                              "peer_id": f"Qm{name:>8s}"})


def test_held_out_loss_verdict_follows_the_numbers_of_the_run():
    peers = [node("p1", val=2.5), node("p2", val=2.6), node("server", val=None, rounds={"ok": 3, "aborted": 2})]
    v = judge("x", DemoProfile(), peers, node("baseline", val=2.8, step=200))
    assert v.swarm == pytest.approx(2.55) and v.margin == pytest.approx(0.25) and v.beats_baseline
    assert v.rounds_ok == 43 and v.rounds_other == 2
    assert v.sync_bytes_per_peer == 1000 * 4 * 200 and v.bytes_sent_per_peer == 1000
    text = format_verdict(v)
    assert "swarm 2.550 vs solo 2.800 after 200 steps" in text and "better by 0.250" in text
    worse = judge("x", DemoProfile(), peers, node("baseline", val=2.4))
    assert worse.beats_baseline is False and "worse by 0.150" in format_verdict(worse)
    missing = judge("x", DemoProfile(), peers, None)
    assert missing.beats_baseline is None and "no comparison" in format_verdict(missing)


def test_reward_verdict_uses_the_second_half_of_the_rounds_and_higher_is_better():
    def rounds(*means):
        return {"history": [{"round": i, "reward_mean": m} for i, m in enumerate(means)]}

    peers = [node("p1", stats=rounds(0.0, 0.1, 0.3, 0.5)), node("p2", stats=rounds(0.1, 0.1, 0.2, 0.2))]
    base = node("baseline", stats=rounds(0.0, 0.0, 0.1, 0.1))
    v = judge("x", DemoProfile(measure="reward", baseline="sapo"), peers, base)
    assert v.measure == "reward per completion"
    assert v.swarm == pytest.approx((0.4 + 0.2) / 2) and v.baseline == pytest.approx(0.1) and v.beats_baseline
    v2 = judge("x", DemoProfile(measure="reward", baseline="sapo"), peers, node("b", stats=rounds(0.9, 0.9)))
    assert v2.beats_baseline is False


def test_the_compare_table_has_one_row_per_strategy_with_its_verdict():
    a = judge("sync", DemoProfile(), [node("p", val=2.0)], node("b", val=2.5))
    b = judge("noloco", DemoProfile(), [node("p", val=3.0)], node("b", val=2.5))
    table = format_table([a, b]).splitlines()
    assert len(table) == 4
    assert table[2].split()[0] == "sync" and "better" in table[2]
    assert table[3].split()[0] == "noloco" and "worse" in table[3]


@pytest.mark.parametrize("name", sorted(registry.BUILTIN))
def test_every_demo_profile_gives_valid_join_flags_for_the_swarm_and_the_baseline(name):
    """A demo that cannot start (the defaults contradicting each other) fails here, before any daemon."""
    profile = registry.load(name).demo_profile
    for strategy, args in ((name, profile.node_args), (profile.baseline, profile.baseline_args)):
        ns = build_parser().parse_args(["join", "--new-swarm", "--strategy", strategy, *args])
        cfg = _config_from(ns)
        assert cfg.strategy == strategy
    assert profile.steps > 0 and profile.measure in ("val_loss", "reward")


def test_strategies_describe_their_own_demo_results_in_words():
    swarm = registry.load("swarm").demo_lines(
        [{"peer_id": "QmTRAINER1", "strategy_stats": {"stage": 0, "microbatches_ok": 100}, "history": [[1, 3, None, 0.0],
                                                                                                       [50, 2, None, 10.0]]},
         {"peer_id": "QmSERVER01", "strategy_stats": {"stage": 1}, "history": []}], None)
    assert swarm[0] == "stage map at the end: stage 0 (trainers): TRAINER1 | stage 1: SERVER01"
    assert "10.0/s over 1 trainer" in swarm[1]
    stats = {"median_step_s_with_straggler": 0.2, "median_step_s_without_straggler": 0.05, "straggler_delay_s": 1.0}
    gradcode = registry.load("gradcode").demo_lines([{"strategy_stats": stats}], None)
    assert gradcode == ["median step time: 0.200 s on steps with a straggler held back 1 s, 0.050 s without "
                        "(waiting for every peer would add the whole delay)"]
    sapo = registry.load("sapo").demo_lines(
        [{"strategy_stats": {"rounds": 20, "cumulative_reward": 40.0, "totals": {"used": 60}}}],
        {"strategy_stats": {"rounds": 19, "cumulative_reward": 25.0}})
    assert sapo == ["per swarm peer: 20 rounds, cumulative reward 40.0, 60 external groups trained on; the baseline "
                    "(sharing nothing): 19 rounds, cumulative reward 25.0"]


def test_demo_compare_checks_the_names_and_runs_each_strategy(monkeypatch, capsys):
    import swarm_node.lab.demo as demo
    from swarm_node.cli import main as cli_main

    seen = {}
    monkeypatch.setattr(demo, "run_compare", lambda opts, names: seen.setdefault("names", names) and 0)
    assert cli_main(["demo", "--compare", "sync", "diloco", "--", "--lr", "0.001"]) == 0
    assert seen["names"] == ["sync", "diloco"]
    seen.clear()
    assert cli_main(["demo", "--compare"]) == 0
    assert "solo" not in seen["names"] and {"sync", "sapo", "swarm"} <= set(seen["names"])
    assert cli_main(["demo", "--compare", "nosuch"]) == 2
    assert "unknown strategy nosuch" in capsys.readouterr().err
