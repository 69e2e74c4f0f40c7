"""Tiny Hugging Face causal LMs for `--model` tests, built offline and seeded.

GPT-2 comes from strategies/sapo/hf_fixture.py; `make_tiny_llama` writes a Llama with the same
character-level tokenizer, so both load with `from_pretrained(dir, local_files_only=True)`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from swarm_node.strategies.sapo.hf_fixture import build_tokenizer


def make_tiny_llama(out_dir: Path, *, seed: int = 0, n_layer: int = 2) -> Path:
    """Write an `n_layer`-layer, width-32 Llama (random weights drawn from `seed`) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG where it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)
