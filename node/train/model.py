"""A small GPT-style, byte-level causal language model.

This module owns the network every peer trains: its configuration (`GPTConfig`), its
architecture (`GPT`) and its seeded construction (`build_model`).

Invariants:
  * Inputs are raw bytes, so the vocabulary is 256 and no tokenizer is needed anywhere.
  * `build_model(cfg, seed)` is a pure function of `(cfg, seed)`: two processes, on any
    machine, get bit-identical weights. Initialisation draws only from a private CPU
    `torch.Generator`; the global RNG is left exactly as it was found.
  * The output projection shares its weight with the token embedding (tied), so
    `parameters()` / `state_dict()` list that tensor once / under both names respectively;
    `named_parameters()` order is fixed by construction and is what strategies and
    `param_hash` rely on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # std of every weight matrix / embedding at init


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. Frozen so a config can be shared, hashed and compared."""

    vocab_size: int = 256  # one token per byte value
    seq_len: int = 64  # context length; also the size of the learned position table
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block; must divide d_model
    d_model: int = 128  # residual stream width
    dropout: float = 0.0  # on attention probs and residual branches; 0 keeps steps deterministic

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # residual-branch output
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # [B, T, D]
        H = self.n_head
        q, k, v = self.qkv(x).split(D, dim=2)  # each [B, T, D]
        # [B, T, D] -> [B, H, T, D/H]: heads become a batch dimension for SDPA.
        q = q.view(B, T, H, D // H).transpose(1, 2)
        k = k.view(B, T, H, D // H).transpose(1, 2)
        v = v.view(B, T, H, D // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, T, D/H]
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # [B, T, D]
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: D -> 4D -> D."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)  # residual-branch output
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # [B, T, D]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over bytes with learned positions and tied embeddings."""

    def __init__(self, cfg: GPTConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one tensor, two roles
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter, drawing only from `generator` (global RNG if None).

        Walks `named_modules()` in its fixed order, so the result depends only on the
        generator's state. Residual-branch projections are scaled down by sqrt(2 * n_layer)
        so the residual stream's variance does not grow with depth.
        """
        resid_std = INIT_STD / math.sqrt(2 * self.cfg.n_layer)
        seen: set[int] = set()  # the tied weight is reachable from two modules; init it once
        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) in seen:
                    continue
                seen.add(id(module.weight))
                std = resid_std if name.endswith(".proj") else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: LongTensor [B, T] of byte values, T <= seq_len; targets: same shape or None.

        Returns (logits [B, T, vocab_size], mean cross-entropy over all B*T positions or None).
        """
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model seq_len {self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)  # [T]
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, T, D] (+[T, D] broadcast)
        for block in self.blocks:
            x = block(x)  # [B, T, D]
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def num_parameters(self) -> int:
        """Number of distinct scalar parameters (the tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: GPTConfig, seed: int) -> GPT:
    """Build a `GPT` on CPU whose weights depend only on `(cfg, seed)`.

    Uses a private CPU generator for the initialisation and `fork_rng` around the
    construction, so nn.Module's own default init (overwritten anyway) does not advance the
    caller's global RNG either. Move the result to a device with `.to(device)` afterwards:
    building on CPU is what makes the weights identical on CPU-only and CUDA peers.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        return GPT(cfg, generator=gen)


# ---------------------------------------------------------------------------------------
# Pipeline stages (strategies/swarm*, strategies/swarm/checkfree.py). Additive: the GPT above is
# unchanged; a pipeline is a list of `PipelineStage`s sliced from one seeded GPT.
#
# Layout for S stages over n_layer blocks (n_layer divisible by S, so every stage's *body*
# has the same shape and CheckFree can average neighbours):
#   stage 0      tok_emb, pos_emb, blocks[0 : L/S]                 ("embed" edge part)
#   stage k      blocks[k*L/S : (k+1)*L/S]
#   stage S-1    blocks[...], ln_f, lm_head                         ("head" edge part)
# With S == 1 one stage holds everything. The head is UNTIED from the embedding in a
# pipeline (its stages live on different peers); it starts as a copy of tok_emb.
# Body keys are "blocks.{j}.*" with j local to the stage, so body state dicts of two stages
# have identical keys and shapes.


class PipelineStage(nn.Module):
    """One contiguous slice of the GPT; `forward` maps the stage's input to its output:
    stage 0 takes byte ids [B, T] (long), others activations [B, T, D]; the last stage
    returns logits [B, T, V], the others activations [B, T, D]."""

    def __init__(self, cfg: GPTConfig, index: int, num_stages: int) -> None:
        super().__init__()
        check_stage_split(cfg, num_stages)
        if not 0 <= index < num_stages:
            raise ValueError(f"stage {index} out of range for {num_stages} stages")
        self.cfg, self.index, self.num_stages = cfg, index, num_stages
        self.has_embed, self.has_head = index == 0, index == num_stages - 1
        if self.has_embed:
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer // num_stages))
        if self.has_head:
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model seq_len {self.cfg.seq_len}")
        return self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))  # [B, T, D]

    def body(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))  # [B, T, V]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_embed:
            x = self.embed(x)
        x = self.body(x)
        return self.head(x) if self.has_head else x


def check_stage_split(cfg: GPTConfig, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if cfg.n_layer % num_stages:
        raise ValueError(f"n_layer ({cfg.n_layer}) must be divisible by the number of stages ({num_stages}) "
                         "so that every stage has the same body shape")


def split_stages(model: GPT, num_stages: int) -> list[PipelineStage]:
    """Slice `model` into `num_stages` stages holding copies of its weights (the model is
    not modified). Composing the stages' forwards reproduces `model`'s logits exactly."""
    cfg = model.cfg
    check_stage_split(cfg, num_stages)
    per = cfg.n_layer // num_stages
    stages = []
    with torch.no_grad():
        for k in range(num_stages):
            st = PipelineStage(cfg, k, num_stages)
            for j in range(per):
                st.blocks[j].load_state_dict(model.blocks[k * per + j].state_dict())
            if st.has_embed:
                st.tok_emb.weight.copy_(model.tok_emb.weight)
                st.pos_emb.weight.copy_(model.pos_emb.weight)
            if st.has_head:
                st.ln_f.load_state_dict(model.ln_f.state_dict())
                st.lm_head.weight.copy_(model.lm_head.weight)
            stages.append(st)
    return stages


def build_stage(cfg: GPTConfig, seed: int, index: int, num_stages: int) -> PipelineStage:
    """Stage `index` of the seeded GPT: identical on every peer (a function of cfg, seed)."""
    return split_stages(build_model(cfg, seed), num_stages)[index]
