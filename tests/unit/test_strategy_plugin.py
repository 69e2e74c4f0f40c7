"""A strategy from another distribution brings its own settings: a throwaway distribution with
an entry point in the `swarm_node.strategies` group (a dist-info folder on PYTHONPATH, as pip
would install it) declares a strategy whose options model has one field. Nothing in node/
names it, yet `swarm-node join` parses, validates and documents its flag, the environment and
TOML set it too, and its value is hashed into the run spec."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarm_node.strategies import registry
from swarm_node.strategies.options import StrategyOptions

TOY = '''
from typing import ClassVar

from pydantic import Field

from swarm_node.strategies.base import Strategy
from swarm_node.strategies.options import StrategyOptions


class ToyOptions(StrategyOptions):
    SPEC_FIELDS: ClassVar[tuple[str, ...]] = ("toy_alpha",)

    toy_alpha: float = Field(0.5, gt=0, le=1, description="toy: how much alpha every peer uses.")
    toy_note: str = Field("hi", description="toy: a per-peer setting, not in the spec.")


class ToyStrategy(Strategy):
    name = "toy"
    options = ToyOptions

    async def run(self) -> None:
        pass
'''


@pytest.fixture
def toy_path(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "toy_strategy").mkdir(parents=True)
    (site / "toy_strategy" / "__init__.py").write_text(TOY)
    dist = site / "toy_strategy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-strategy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[swarm_node.strategies]\ntoy = toy_strategy:ToyStrategy\n")
    return site


def _run(site: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(site), **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=e)


SPEC = ("import json, sys; from swarm_node.config import load_config; "
        "c = load_config(json.loads(sys.argv[1])); s = c.run_spec(); "
        "print(json.dumps({'canonical': s.canonical(), 'digest': s.digest(), 'note': c.toy_note}))")


def test_an_installed_strategy_adds_its_own_flag_env_and_spec_field(toy_path: Path, tmp_path: Path):
    help_text = _run(toy_path, "-m", "swarm_node", "join", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--toy-alpha" in help_text.stdout and "how much alpha every peer uses" in help_text.stdout

    def spec(values: dict, env: dict | None = None) -> dict:
        r = _run(toy_path, "-c", SPEC, json.dumps({"strategy": "toy", "state_dir": str(tmp_path), **values}), env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    base, other = spec({}), spec({"toy_alpha": 0.25})
    assert base["canonical"]["toy_alpha"] == 0.5 and other["canonical"]["toy_alpha"] == 0.25
    assert base["digest"] != other["digest"]  # a peer with another alpha is refused
    assert "toy_note" not in base["canonical"]  # per-peer settings stay out of the spec
    assert spec({}, env={"SWARM_NODE_TOY_ALPHA": "0.75"})["canonical"]["toy_alpha"] == 0.75
    toml = tmp_path / "toy.toml"
    toml.write_text('toy_note = "from toml"\n')
    r = _run(toy_path, "-c", "import sys; from pathlib import Path; from swarm_node.config import load_config; "
             "print(load_config({'strategy': 'toy', 'state_dir': sys.argv[2]}, Path(sys.argv[1])).toy_note)",
             str(toml), str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "from toml", r.stderr


def test_an_installed_strategys_flag_is_validated_like_any_other(toy_path: Path, tmp_path: Path):
    r = _run(toy_path, "-m", "swarm_node", "join", "--strategy", "toy", "--toy-alpha", "2", "--new-swarm",
             "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--toy-alpha" in r.stderr and "less than or equal to 1" in r.stderr and "Traceback" not in r.stderr


def test_builtin_option_models_match_their_strategies():
    """The CLI reads built-in option models without importing the strategies (torch, hivemind);
    the map it uses must name the model each strategy class declares."""
    models = registry.option_models()
    for name in registry.BUILTIN:
        assert models[name] is registry.load(name).options, name
        assert issubclass(models[name], StrategyOptions)
