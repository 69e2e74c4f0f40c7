"""The scenario language: good lines parse to the right events, bad lines name their line. No network."""
from __future__ import annotations

import pytest

from swarm_node.lab.churn_scenarios import builtin_profiles, profile_for
from swarm_node.lab.scenario import Event, Scenario, ScenarioError, at, at_step

pytestmark = pytest.mark.churn


def test_every_action_parses_from_text_and_equals_the_python_form():
    text = """
    # a comment line, then events (inline comments too)
    at 5 kill n1          # crash
    at 6.5s term n2
    at step 40 pause n3
    at step 41 resume n3
    at 10 restart n1
    at 11 join n9
    at 12 partition n0
    at 30 heal n0
    at 31 loss n2 20%
    at 32 loss n2 0
    at 33 shape n3 10mbit
    at 34 shape n3 off
    at 35 delay n3 50ms
    """
    sc = Scenario.parse(text)
    assert [e.action for e in sc.events] == ["kill", "term", "pause", "resume", "restart", "join", "partition",
                                             "heal", "loss", "loss", "shape", "shape", "delay"]
    assert sc.events[0] == at(5, "kill", "n1")  # the line number is kept, but not compared
    assert sc.events[0].line == 3
    assert sc.events[2] == Event("pause", "n3", at_step=40, line=5)
    assert at_step(40, "pause", "n3").at_step == 40 and sc.events[8].arg == "20"
    assert sc.events[12].is_network and not sc.events[0].is_network
    sc.check_targets(["n0", "n1", "n2", "n3"])


@pytest.mark.parametrize("line, message", [
    ("kill n1", "expected `at"),
    ("at soon kill n1", "bad time"),
    ("at -3 kill n1", "bad time"),
    ("at step x kill n1", "whole step number"),
    ("at 5 explode n1", "unknown action 'explode'"),
    ("at 5 kill", "expected an action and a node"),
    ("at 5 kill n1 now", "kill takes no argument"),
    ("at 5 loss n1", "loss takes one argument"),
    ("at 5 loss n1 120%", "bad loss '120%'"),
    ("at 5 shape n1 fast", "bad rate 'fast'"),
    ("at 5 delay n1 50", "bad delay '50'"),
    ("at 5 kill N1", "bad node name 'N1'"),
])
def test_a_bad_line_names_its_line_number(line, message):
    with pytest.raises(ScenarioError) as e:
        Scenario.parse(f"# header\n\nat 1 kill n0\n{line}\n")
    assert str(e.value).startswith("line 4: ") and message in str(e.value), str(e.value)


def test_targets_are_checked_against_the_swarm_in_order():
    Scenario.parse("at 1 kill n1\nat 2 restart n1\nat 3 join n7\nat 4 kill n7").check_targets(["n0", "n1"])
    with pytest.raises(ScenarioError, match=r"line 1: unknown node 'n5' \(nodes: n0, n1\)"):
        Scenario.parse("at 1 kill n5").check_targets(["n0", "n1"])
    with pytest.raises(ScenarioError, match="line 1: join n1: that name is taken"):
        Scenario.parse("at 1 join n1").check_targets(["n0", "n1"])
    with pytest.raises(ScenarioError, match="line 2: resume n1: it is not paused"):
        Scenario.parse("at 1 pause n0\nat 2 resume n1").check_targets(["n0", "n1"])
    with pytest.raises(ScenarioError, match="unknown action"):
        at(1, "explode", "n1")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read scenario file"):
        Scenario.from_file(tmp_path / "nope.scn")
    bad = tmp_path / "bad.scn"
    bad.write_text("at 1 kill n1\nat x kill n2\n")
    with pytest.raises(ScenarioError, match=r"bad.scn: line 2: bad time 'x'"):
        Scenario.from_file(bad)


def test_every_builtin_scenario_parses_and_fits_four_peers():
    for profile in [*builtin_profiles().values(), profile_for("some-new-strategy")]:
        for name, text in profile.scenarios.items():
            Scenario.parse(text, name=name).check_targets(["n0", "n1", "n2", "n3"])
    # sync and gradcode are bounded by events (a common drain step), never by a step count
    for name in ("sync", "gradcode"):
        assert profile_for(name).consistency == "param_hash" and profile_for(name).stop_together
        assert profile_for(name).max_steps == 0
    assert profile_for("diloco").consistency == "phi_hash"
