"""The committed protocol/pb/ code must equal a fresh `python proto/generate.py` run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "protocol" / "pb"


def _load_generator():
    spec = importlib.util.spec_from_file_location("_swarm_node_proto_generate", REPO / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_in_sync(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools (grpcio-tools, a test extra) is not installed: cannot regenerate protos")
    generated = {p.name: p.read_text() for p in _load_generator().generate(tmp_path)}
    committed = {p.name: p.read_text() for p in COMMITTED.glob("swarm_node_*_pb2*.py")}
    assert generated, "proto/generate.py produced nothing"
    hint = "run `python proto/generate.py` and commit protocol/pb/"
    assert sorted(committed) == sorted(generated), f"generated file set differs: {hint}"
    stale = [name for name in sorted(generated) if committed[name] != generated[name]]
    assert not stale, f"stale generated code {stale}: {hint}"
