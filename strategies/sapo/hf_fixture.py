"""A tiny Hugging Face causal LM built fully offline, for tests and demos of `--sapo-hf-model`.

`make_tiny_hf_model(dir)` writes a directory that `from_pretrained(dir, local_files_only=True)`
loads: a character-level `PreTrainedTokenizerFast` built in code with the `tokenizers`
library, and a randomly initialised `GPT2LMHeadModel`.

Invariants:
- nothing is downloaded: the vocabulary is listed here and the weights are drawn from a
  seeded generator, so the same (seed, sizes) give byte-identical weights;
- one character is one token (BPE with no merges), so any text over the vocabulary
  round-trips exactly through encode/decode; a character outside it becomes <unk>;
- "\\n" is an ordinary token (SAPO's end of answer); <|endoftext|> is eos and pad;
- dropout is 0: log-probabilities do not depend on train/eval mode.

Run as a script to write one: `python -m swarm_node.strategies.sapo.hf_fixture DIR`.
"""
from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# digits and operators first: the arithmetic tasks use only these and "="
CHARS = string.digits + "+-*/=()., " + "\n" + string.ascii_letters + "?!:;'\"_"


def vocabulary() -> dict[str, int]:
    """Token -> id: the two special tokens, then one id per character."""
    tokens = [EOS_TOKEN, UNK_TOKEN, *CHARS]
    assert len(set(tokens)) == len(tokens), "duplicate character in CHARS"
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer():
    """A character-level fast tokenizer (no hub access)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab=vocabulary(), merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()  # concatenate characters; no spaces inserted between tokens
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False)


def make_tiny_hf_model(out_dir: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64,
                       n_head: int = 4, n_positions: int = 64) -> Path:
    """Write tokenizer + randomly initialised GPT-2 (seeded) into `out_dir`; returns it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # fork_rng: seeding must not move the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    args = ap.parse_args()
    print(make_tiny_hf_model(args.out_dir, seed=args.seed, n_layer=args.n_layer, n_embd=args.n_embd))


if __name__ == "__main__":
    main()
