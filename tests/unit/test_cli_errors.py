"""Config errors reach the user as one plain line and exit code 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from swarm_node.config import ConfigError, load_config
from swarm_node.strategies import registry


def test_unknown_strategy_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "swarm_node", "join", "--strategy", "nosuch", "--new-swarm",
                           "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "'nosuch'" in lines[0]
    for name in registry.available():
        assert name in lines[0]


def test_unknown_strategy_from_env_is_a_config_error(monkeypatch):
    monkeypatch.setenv("SWARM_NODE_STRATEGY", "nosuch")
    with pytest.raises(ConfigError, match=r"unknown strategy 'nosuch' \(installed: .*sync"):
        load_config({})


def test_strategy_from_an_entry_point_is_accepted(tmp_path, monkeypatch):
    # a third-party package declaring a strategy in the `swarm_node.strategies` entry-point group
    dist = tmp_path / "swarm_node_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: swarm-node-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n"
                                           "plugged = swarm_node.strategies.solo:SoloStrategy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugged" in registry.available()
    assert load_config({"strategy": "plugged"}).strategy == "plugged"
