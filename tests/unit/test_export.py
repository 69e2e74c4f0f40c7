"""`swarm-node export`: a state dir becomes files other tools load, with the node's logits.

A Hugging Face model comes back through `AutoModelForCausalLM.from_pretrained`; the built-in GPT
through safetensors into `GPT(config)`. Where the checkpoint holds the weights the swarm agreed
on (the DiLoCo family's φ), those are exported, not θ. No daemon runs: the state dir is written
the way the node writes it (run.json at start, the checkpoint with the strategy's state)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from swarm_node.strategies.sapo.hf_fixture import make_tiny_hf_model  # noqa: E402
from swarm_node.train.data import ByteDataset  # noqa: E402
from swarm_node.train.export import ExportError, export_model, write_run_record  # noqa: E402
from swarm_node.train.model import GPT, GPTConfig  # noqa: E402
from swarm_node.train.models import load_model  # noqa: E402
from swarm_node.train.trainer import LocalTrainer, TrainConfig  # noqa: E402
from tests.byom_models import make_tiny_llama  # noqa: E402

SEQ = 16


def _node_state(tmp_path: Path, model: str, *, agreed: bool) -> tuple[Path, torch.nn.Module, list[torch.Tensor]]:
    """A state dir as a node leaves it: run.json, and a checkpoint after two steps (with φ =
    θ perturbed as the agreed weights when `agreed`). Returns (dir, trained module, φ or θ)."""
    cfg = SimpleNamespace(model=model, seed=0, seq_len=SEQ, n_layer=1, n_head=2, d_model=16, strategy="diloco")
    state = tmp_path / "state"
    write_run_record(state, cfg)
    loaded = load_model(model, seed=0, seq_len=SEQ, n_layer=1, n_head=2, d_model=16)
    ids = torch.randint(0, min(loaded.vocab_size, 60), (4096,), generator=torch.Generator().manual_seed(0))
    trainer = LocalTrainer(loaded.module, ByteDataset(ids), TrainConfig(batch_size=2, seed=0))
    trainer.train_step()
    trainer.train_step()
    params = trainer.parameters_list()
    phi = [p.detach().clone() + 0.01 * torch.randn_like(p) for p in params]
    extra = {"name": "diloco", "state": {"agreed_weights": phi}} if agreed else None
    trainer.save_checkpoint(state / "checkpoint.pt", extra)
    expected = phi if agreed else [p.detach().clone() for p in params]
    return state, loaded.module, expected


def _logits_with(module: torch.nn.Module, weights: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for p, w in zip(module.parameters(), weights):
            p.copy_(w)
        return module.eval()(idx)[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_hf_export_reloads_with_transformers_and_gives_the_agreed_weights_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = (make_tiny_hf_model(tmp_path / "m", n_layer=1, n_embd=32) if arch == "gpt2"
           else make_tiny_llama(tmp_path / "m"))
    state, module, phi = _node_state(tmp_path, str(src), agreed=True)
    res = export_model(state, tmp_path / "out")
    assert (res.kind, res.weights, res.step) == ("hf", "agreed", 2)
    idx = torch.randint(0, 40, (2, SEQ), generator=torch.Generator().manual_seed(1))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        got = reloaded(input_ids=idx).logits
    torch.testing.assert_close(got, _logits_with(module, phi, idx), rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True) is not None


def test_a_builtin_export_is_safetensors_plus_config_with_the_local_weights(tmp_path):
    from safetensors.torch import load_model as load_safetensors

    state, module, theta = _node_state(tmp_path, "builtin", agreed=False)
    res = export_model(state, tmp_path / "out")
    assert (res.kind, res.weights) == ("safetensors", "local")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "swarm-node-builtin-gpt"
    gpt = GPT(GPTConfig(**config["gpt_config"]))
    load_safetensors(gpt, str(tmp_path / "out" / "model.safetensors"))
    idx = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gpt.eval()(idx)[0], _logits_with(module, theta, idx))


def test_export_errors_are_one_line_and_the_cli_exits_2(tmp_path, capsys):
    with pytest.raises(ExportError, match="run.json"):
        export_model(tmp_path / "nothing", tmp_path / "out")
    state, _, _ = _node_state(tmp_path, "builtin", agreed=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = subprocess.run([sys.executable, "-m", "swarm_node", "export", "--state-dir", str(state), "--out",
                        str(tmp_path / "full")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not empty" in r.stderr
    from swarm_node.cli import main  # the same command in-process: a second interpreter start costs ~10 s

    assert main(["export", "--state-dir", str(state), "--out", str(tmp_path / "ok")]) == 0
    assert "local weights at step 2" in capsys.readouterr().out
