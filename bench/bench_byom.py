"""Your own model on real text: Llama-style models built offline, trained by real peer processes.

The model directories are written here, never downloaded: a byte-level BPE tokenizer trained
with `tokenizers` on the Python standard library's sources (the nodes' default corpus), and a
Llama with random weights from a seed, saved with `save_pretrained`. Every peer is a
`swarm-node join --model DIR` process on 127.0.0.1.

  loss        a 2-5M parameter Llama: 4 diloco peers (H=10) against 4 solo peers and 4 sync
              peers, the same steps per peer (so the same total tokens); mean held-out loss
              and g = (L_solo - L_x) / (L_solo - L_sync), the share of the solo-to-sync gap closed
  throughput  a 20-50M parameter Llama, 2 diloco peers, a few rounds: tokens/s per peer,
              utilization (share of wall time in local steps), averaging bytes per peer per step

  .venv/bin/python bench/bench_byom.py [--part loss|throughput|both] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_strategies import _utilization, run_peers  # noqa: E402

from swarm_node.train.data import load_corpus  # noqa: E402

CORPUS_BYTES = 2_000_000
BASE = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1:0", "--threads", "1", "--announce-interval-s", "1",
        "--status-interval-s", "60", "--log-level", "WARNING", "--round-timeout-s", "60",
        "--data", "stdlib", "--data-max-bytes", str(CORPUS_BYTES)]


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq_len: int


LOSS_CONFIGS: dict[str, list[str]] = {
    "solo": ["--strategy", "solo"],
    "sync": ["--strategy", "sync"],
    "diloco-h10": ["--strategy", "diloco", "--inner-steps", "10"],
    # plain averaging every 10 steps (outer lr 1, no momentum): the control for the outer optimizer
    "diloco-h10-avg": ["--strategy", "diloco", "--inner-steps", "10", "--outer-lr", "1.0", "--outer-momentum", "0"],
}
LOSS_MODEL = LlamaShape(vocab=4096, hidden=160, layers=4, heads=4, intermediate=432, seq_len=128)
THROUGHPUT_MODEL = LlamaShape(vocab=4096, hidden=512, layers=6, heads=8, intermediate=1376, seq_len=128)


def train_tokenizer(vocab: int, out_dir: Path):
    """A byte-level BPE trained on the corpus the peers read (every byte encodable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = bytes(load_corpus("stdlib", CORPUS_BYTES).numpy()).decode("utf-8", errors="replace")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text[i:i + 100_000] for i in range(0, len(text), 100_000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_llama(shape: LlamaShape, out_dir: Path, seed: int = 0) -> int:
    """Write a Llama of `shape` with its tokenizer to out_dir; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(shape.vocab, out_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, max_position_embeddings=shape.seq_len,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def tokens_per_s(summary: dict, tokens_per_step: int) -> float:
    """Tokens/s over the run: first to last recorded step, rounds and evaluations included."""
    t = [h[3] for h in summary["history"]]
    return tokens_per_step * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 2 else float("nan")


def part_loss(tmp: Path, args) -> dict:
    model_dir = tmp / "llama-loss"
    numel = build_llama(LOSS_MODEL, model_dir)
    common = [*BASE, "--model", str(model_dir), "--seq-len", str(LOSS_MODEL.seq_len), "--batch-size", "8",
              "--lr", str(args.lr), "--max-steps", str(args.steps), "--eval-every", str(args.steps)]
    print(f"loss: Llama {numel / 1e6:.2f}M parameters (vocab {LOSS_MODEL.vocab}, {LOSS_MODEL.layers} layers, "
          f"width {LOSS_MODEL.hidden}), {args.peers} peers x {args.steps} steps, batch 8 x {LOSS_MODEL.seq_len} "
          "tokens", flush=True)
    results = {}
    for name in args.configs:
        extra = LOSS_CONFIGS[name]
        t0 = time.monotonic()
        sums = run_peers(tmp / name, name, [*common, *extra], args.peers, solo=name == "solo")
        vals = [s["val_loss"] for s in sums]
        results[name] = {"val": sum(vals) / len(vals), "vals": vals, "wall_s": time.monotonic() - t0,
                         "sent_per_step": sum(s["bytes_sent_by_channel"].get("averaging", 0) for s in sums)
                         / len(sums) / args.steps}
        print(f"  {name:11s} val {results[name]['val']:.4f}  ({results[name]['wall_s']:.0f}s)", flush=True)
    solo, sync = (results[k]["val"] if k in results else float("nan") for k in ("solo", "sync"))
    print(f"\n{'config':11s} {'val loss':>9s} {'g (gap)':>8s} {'sent B/peer/step':>17s}")
    for name, r in results.items():
        r["g"] = (solo - r["val"]) / (solo - sync) if solo != sync else float("nan")
        print(f"{name:11s} {r['val']:9.4f} {r['g']:8.2f} {r['sent_per_step']:17.0f}")
    return {"params": numel, "steps": args.steps, "peers": args.peers, "results": results}


def part_throughput(tmp: Path, args) -> dict:
    model_dir = tmp / "llama-throughput"
    numel = build_llama(THROUGHPUT_MODEL, model_dir)
    batch, h, steps = 4, 5, args.throughput_steps
    common = [*BASE, "--model", str(model_dir), "--seq-len", str(THROUGHPUT_MODEL.seq_len), "--batch-size",
              str(batch), "--strategy", "diloco", "--inner-steps", str(h), "--max-steps", str(steps),
              "--eval-every", str(steps)]
    print(f"\nthroughput: Llama {numel / 1e6:.1f}M parameters, 2 diloco peers (H={h}) x {steps} steps, batch "
          f"{batch} x {THROUGHPUT_MODEL.seq_len} tokens", flush=True)
    sums = run_peers(tmp / "throughput", "throughput", common, 2, solo=False)
    tokens = batch * THROUGHPUT_MODEL.seq_len
    rows = [{"tokens_per_s": tokens_per_s(s, tokens), "utilization": _utilization(s),
             "sent_per_step": s["bytes_sent_by_channel"].get("averaging", 0) / steps,
             "rounds_ok": s["rounds"].get("ok", 0)} for s in sums]
    formula = 2 * (2 - 1) / 2 * numel * 4 / h  # all-reduce bytes a peer sends per inner step, fp32
    print(f"{'peer':5s} {'tokens/s':>9s} {'util':>5s} {'sent B/step':>12s} {'formula':>10s} {'ratio':>6s} {'rounds':>6s}")
    for i, r in enumerate(rows):
        print(f"p{i:<4d} {r['tokens_per_s']:9.0f} {r['utilization']:5.2f} {r['sent_per_step']:12.0f} "
              f"{formula:10.0f} {r['sent_per_step'] / formula:6.2f} {r['rounds_ok']:6d}")
    return {"params": numel, "steps": steps, "peers": rows, "formula_per_step": formula}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["loss", "throughput", "both"], default="both")
    ap.add_argument("--steps", type=int, default=300, help="steps per peer in the loss part")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--throughput-steps", type=int, default=30)
    ap.add_argument("--configs", nargs="+", choices=list(LOSS_CONFIGS), default=["solo", "sync", "diloco-h10"],
                    help="loss part: which configurations (solo and sync give the g column)")
    args = ap.parse_args()
    print(f"env: python {platform.python_version()} torch {torch.__version__} cpus {os.cpu_count()}", flush=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("loss", "both"):
            out["loss"] = part_loss(Path(tmp), args)
        if args.part in ("throughput", "both"):
            out["throughput"] = part_throughput(Path(tmp), args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
