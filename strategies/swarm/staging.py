"""What a swarm stage is cut from: the built-in GPT, or a Hugging Face GPT-2 / Llama model.

`Staging` gives the stage workers their input checks (`cfg`: seq_len, vocab_size, d_model), a
builder of stage k at its initial weights (identical on every peer: the seeded GPT, or the
model every peer loaded from the same directory, whose weight hash is in the run spec), and a
bound on the values one stage message may carry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from swarm_node.train.model import GPT, GPTConfig, build_stage, check_stage_split


@dataclass(frozen=True)
class Staging:
    cfg: Any  # GPTConfig or HFStageConfig
    make_stage: Callable[[int], nn.Module]
    max_numel: int  # values one stage message (activations, or a stage's whole state) may carry


def why_not_staged(module: nn.Module, num_stages: int) -> str:
    """Why `module` cannot be split into `num_stages` stages ("" = it can)."""
    hf = getattr(module, "hf_model", None)
    try:
        if isinstance(module, GPT):
            check_stage_split(module.cfg, num_stages)
            return ""
        if hf is None:
            return "only the built-in GPT or a Hugging Face GPT-2 / Llama directory can be split into stages"
        from swarm_node.train.hf_stages import check_hf_stage_split, stage_config, supports_staging

        reason = supports_staging(hf)
        if reason:
            return reason
        check_hf_stage_split(stage_config(hf).n_layer, num_stages)
    except ValueError as e:
        return str(e)
    return ""


def staging_of(module: nn.Module, spec: Any, num_stages: int) -> Staging:
    """The stages of `module` (the trainer's model, at its initial weights) for this run."""
    B, T = spec.batch_size, spec.seq_len
    hf = getattr(module, "hf_model", None)
    if hf is None:
        cfg = GPTConfig(seq_len=T, n_layer=spec.n_layer, n_head=spec.n_head, d_model=spec.d_model)
        params = 12 * cfg.d_model ** 2 * max(cfg.n_layer, 1) + cfg.vocab_size * cfg.d_model + T * cfg.d_model
        return Staging(cfg, lambda k: build_stage(cfg, spec.seed, k, num_stages),
                       4 * B * T * max(cfg.d_model, cfg.vocab_size) + 4 * params)
    from swarm_node.train.hf_stages import build_hf_stage, stage_config

    cfg = stage_config(hf, seq_len=T)
    params = sum(p.numel() for p in hf.parameters())
    return Staging(cfg, lambda k: build_hf_stage(hf, k, num_stages, seq_len=T),
                   4 * B * T * max(cfg.d_model, cfg.vocab_size) + 2 * params)
