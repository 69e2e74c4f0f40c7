"""SAPO policies: the byte-level GPT the node already trains (default), or a local HF causal LM.

A policy turns prompts into completions (temperature sampling) and scores completions
(per-token log-probabilities), whoever wrote them: text is model-agnostic, so a foreign
completion is simply re-tokenized with this policy's own tokenizer.

Byte policy invariants:
- tokens are bytes; a completion ends at the first "\n" (EOS) or after `max_new_tokens`;
  for training its target is its bytes followed by EOS, truncated to `max_new_tokens + 1`;
- prompts are generated in batches of equal length (learned positions, no padding mask),
  scoring right-pads, which a causal model never looks at;
- sampling draws only from the caller's `torch.Generator` (reproducible per round).
`HFPolicy` is used only when transformers is installed AND a local path is given; it is
loaded with `local_files_only=True` (never downloads).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F

EOS = ord("\n")


class BytePolicy:
    def __init__(self, model: torch.nn.Module, device: torch.device, max_new_tokens: int):
        self.model, self.device, self.max_new_tokens = model, device, max_new_tokens
        self.seq_len = model.cfg.seq_len

    def describe(self) -> str:
        c = self.model.cfg
        return f"byte-gpt-{c.n_layer}x{c.d_model}"

    def check_prompt(self, prompt: str) -> None:
        if len(prompt.encode()) + self.max_new_tokens + 1 > self.seq_len:
            raise ValueError(f"prompt {prompt[:40]!r} + {self.max_new_tokens} new tokens exceed --seq-len "
                             f"{self.seq_len}")

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], group_size: int, *, temperature: float,
                 generator: torch.Generator) -> list[list[str]]:
        """G completions per prompt."""
        self.model.eval()
        out: list[list[str]] = [[] for _ in prompts]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_len[len(p.encode())].append(i)
        for _, idxs in sorted(by_len.items()):
            rows = [list(prompts[i].encode()) for i in idxs for _ in range(group_size)]
            x = torch.tensor(rows, dtype=torch.long)  # [B, P]
            done = torch.zeros(len(rows), dtype=torch.bool)
            new: list[torch.Tensor] = []
            for _ in range(self.max_new_tokens):
                logits, _ = self.model(x.to(self.device))
                probs = F.softmax(logits[:, -1, :].float().cpu() / temperature, dim=-1)  # [B, V]
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]
                tok = torch.where(done, torch.full_like(tok, EOS), tok)
                new.append(tok)
                done |= tok == EOS
                x = torch.cat([x, tok[:, None]], dim=1)
                if bool(done.all()):
                    break
            gen = torch.stack(new, dim=1).tolist()  # [B, <=max_new]
            for r, seq in enumerate(gen):
                cut = seq.index(EOS) if EOS in seq else len(seq)
                out[idxs[r // group_size]].append(bytes(seq[:cut]).decode("utf-8", errors="replace"))
        self.model.train()
        return out

    def token_logprobs(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [B, T], mask [B, T]) of each completion's tokens (+EOS) given its prompt."""
        seqs, starts = [], []
        for p, c in zip(prompts, completions):
            pb = list(p.encode())
            cb = (list(c.encode("utf-8", errors="replace"))[: self.max_new_tokens] + [EOS])
            seqs.append(pb + cb)
            starts.append(len(pb))
        T = max(len(s) for s in seqs) - 1
        inp = torch.zeros(len(seqs), T, dtype=torch.long)
        tgt = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            n = len(s) - 1
            inp[i, :n] = torch.tensor(s[:-1])
            tgt[i, :n] = torch.tensor(s[1:])
            mask[i, starts[i] - 1:n] = True  # positions predicting completion tokens
        logits, _ = self.model(inp.to(self.device))
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.to(self.device)[..., None]).squeeze(-1)
        return logp, mask.to(self.device)

    def format_batch(self, prompts: Sequence[str], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Warm-start batch: prompt + random digits + EOS, loss on the answer part only.
        Teaches the answer *format*, not arithmetic (the digits are random)."""
        texts = [(p, str(rng.randint(-9 if "-" in p else 0, 99))) for p in prompts]
        return self.token_logprobs([p for p, _ in texts], [a for _, a in texts])


class HFPolicy:  # pragma: no cover - exercised only where transformers and a local model exist
    def __init__(self, path: str, device: torch.device, max_new_tokens: int, lr: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)
        self.device, self.max_new_tokens = device, max_new_tokens
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.path = path

    def describe(self) -> str:
        return f"hf:{self.path.rstrip('/').rsplit('/', 1)[-1][:40]}"

    def check_prompt(self, prompt: str) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], group_size: int, *, temperature: float,
                 generator: torch.Generator) -> list[list[str]]:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        out = []
        for p in prompts:
            enc = self.tok(p, return_tensors="pt").to(self.device)
            gen = self.model.generate(**enc, do_sample=True, temperature=temperature, max_new_tokens=self.max_new_tokens,
                                      num_return_sequences=group_size, pad_token_id=self.tok.pad_token_id)
            out.append([self.tok.decode(g[enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]
                        for g in gen])
        return out

    def token_logprobs(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, starts = [], []
        for p, c in zip(prompts, completions):
            pi = self.tok(p)["input_ids"]
            ci = self.tok(c + "\n")["input_ids"][: self.max_new_tokens + 1]
            ids.append(pi + ci)
            starts.append(len(pi))
        T = max(len(s) for s in ids) - 1
        inp = torch.full((len(ids), T), self.tok.pad_token_id, dtype=torch.long)
        tgt = torch.zeros_like(inp)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        for i, s in enumerate(ids):
            n = len(s) - 1
            inp[i, :n], tgt[i, :n] = torch.tensor(s[:-1]), torch.tensor(s[1:])
            mask[i, starts[i] - 1:n] = True
        logits = self.model(inp.to(self.device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.to(self.device)[..., None]).squeeze(-1)
        return logp, mask.to(self.device)


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
