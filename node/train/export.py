"""`swarm-node export`: the model a node trained, as files other tools load.

  * a Hugging Face model: `save_pretrained` of the network and its tokenizer, so
    `AutoModelForCausalLM.from_pretrained(OUT)` gives the node's logits;
  * the built-in GPT or a factory's module: `model.safetensors` plus `config.json`.
The weights are the ones the swarm agreed on when the strategy keeps such a copy (the DiLoCo
family's φ, saved with the checkpoint as `agreed_weights`), else the local θ; `--weights theta`
takes θ anyway. The node writes `run.json` (the settings that rebuild its model) into its
state dir at start, so an export needs no flag repeated; paths in it are absolute.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from swarm_node.train.models import WrappedLM, load_model, parse_model_setting
from swarm_node.train.model import GPT

RUN_RECORD = "run.json"
CHECKPOINT = "checkpoint.pt"
MODEL_FIELDS = ("model", "seed", "seq_len", "n_layer", "n_head", "d_model", "strategy")


class ExportError(ValueError):
    """The state dir cannot be exported; the message is one line in plain words."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: Literal["hf", "safetensors"]
    weights: Literal["agreed", "local"]
    step: int


def write_run_record(state_dir: Path, config: Any) -> None:
    """What rebuilds this node's model, for a later export (written at every start)."""
    record = {name: getattr(config, name) for name in MODEL_FIELDS}
    if parse_model_setting(record["model"]).kind == "hf":
        record["model"] = str(Path(record["model"]).expanduser().resolve())
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def export_model(state_dir: Path, out: Path, weights: Literal["auto", "theta"] = "auto") -> ExportResult:
    state_dir, out = Path(state_dir), Path(out)
    try:
        record = json.loads((state_dir / RUN_RECORD).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{state_dir / RUN_RECORD} is missing or unreadable ({e.__class__.__name__}): "
                          "start the node once with this state dir") from None
    if not (state_dir / CHECKPOINT).is_file():
        raise ExportError(f"{state_dir} holds no {CHECKPOINT} yet: nothing was trained there")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty")
    loaded = load_model(record["model"], seed=record["seed"], seq_len=record["seq_len"], n_layer=record["n_layer"],
                        n_head=record["n_head"], d_model=record["d_model"])
    ckpt = torch.load(state_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    module = loaded.module
    try:
        module.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise ExportError(f"the checkpoint does not fit the model in {RUN_RECORD}: {str(e).splitlines()[0]}") from None
    agreed = ((ckpt.get("strategy") or {}).get("state") or {}).get("agreed_weights")
    used: Literal["agreed", "local"] = "local"
    if agreed is not None and weights == "auto":
        params = list(module.parameters())
        if len(agreed) != len(params) or any(a.shape != p.shape for a, p in zip(agreed, params)):
            raise ExportError("the checkpoint's agreed weights do not fit the model")
        with torch.no_grad():
            for p, a in zip(params, agreed):
                p.copy_(a)
        used = "agreed"
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(module, WrappedLM) and loaded.tokenizer is not None and hasattr(module.inner, "save_pretrained"):
        module.inner.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        kind: Literal["hf", "safetensors"] = "hf"
    else:
        _save_safetensors(module, out, record)
        kind = "safetensors"
    return ExportResult(out=out, kind=kind, weights=used, step=int(ckpt.get("step", 0)))


def _save_safetensors(module: torch.nn.Module, out: Path, record: dict) -> None:
    from safetensors.torch import save_model

    save_model(module, str(out / "model.safetensors"))  # shared (tied) tensors are stored once
    config: dict[str, Any] = {"format": "swarm-node", "model": record["model"], "seed": record["seed"]}
    if isinstance(module, GPT):
        config["architecture"] = "swarm-node-builtin-gpt"
        config["gpt_config"] = asdict(module.cfg)
    else:
        config["architecture"] = f"factory:{record['model']}"
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
