"""Pipeline stages cut from a Hugging Face causal LM (GPT-2 or Llama), like `model.PipelineStage`.

`split_hf_stages(inner, S)` slices a loaded `GPT2LMHeadModel` / `LlamaForCausalLM` into S stages:
stage 0 holds the token (and GPT-2 position) embeddings and the first n_layer/S blocks, middle
stages hold blocks, the last stage the last blocks, the final norm and the LM head.

Invariants:
  * Every stage holds its own deep copies of its submodules: the source model is never changed
    and each stage trains and saves/loads its state dict on its own.
  * A staged model unties tied input/output embeddings when S > 1 (the head starts as a copy of
    the embedding); with S == 1 the one stage keeps them tied, like the source.
  * Chaining the stages' forwards gives the source's `inner(input_ids=ids, use_cache=False)`
    logits: every stage builds the causal mask with transformers' own helper for the model's
    attention implementation, and Llama stages recompute the rotary cos/sin for arange(T).
  * transformers is imported only when a stage is built or run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Arch = Literal["gpt2", "llama"]

# Where each piece lives in the source model, per architecture (paths for `get_submodule`).
_LAYOUT: dict[str, dict[str, Any]] = {
    "gpt2": {"embed": ("transformer.wte", "transformer.wpe", "transformer.drop"),
             "blocks": "transformer.h", "norm": "transformer.ln_f", "rotary": None},
    "llama": {"embed": ("model.embed_tokens",), "blocks": "model.layers", "norm": "model.norm",
              "rotary": "model.rotary_emb"},
}
_CLASSES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}


@dataclass(frozen=True)
class HFStageConfig:
    """What a stage's callers check inputs against (StageWorker reads seq_len, vocab_size, d_model)."""

    arch: Arch
    d_model: int
    vocab_size: int  # rows of the LM head: the width of the logits
    seq_len: int  # longest sequence a stage accepts
    n_layer: int  # blocks in the whole model, not in one stage


def _arch_of(inner: nn.Module) -> str | None:
    """The layout key for exactly the supported classes: a subclass may change forward()."""
    try:
        import transformers
    except ImportError:
        return None
    for name, arch in _CLASSES.items():
        if type(inner) is getattr(transformers, name, None):
            return arch
    return None


def supports_staging(inner: nn.Module) -> str:
    """"" when `inner` can be split into stages, otherwise a one-line reason why not."""
    arch = _arch_of(inner)
    if arch is None:
        return (f"{type(inner).__name__} cannot be split into pipeline stages "
                f"(supported: {', '.join(_CLASSES)})")
    config = inner.config
    if arch == "gpt2" and getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention needs encoder states, which pipeline stages do not carry"
    if not getattr(config, "is_causal", True):
        return f"{type(inner).__name__} is configured as bidirectional, not as a causal LM"
    n_blocks = len(inner.get_submodule(_LAYOUT[arch]["blocks"]))
    if n_blocks != config.num_hidden_layers:  # the model would run only the first num_hidden_layers
        return f"the model holds {n_blocks} blocks but its config says {config.num_hidden_layers}"
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "the LM head is not a bias-free linear layer"
    return ""


def check_hf_stage_split(n_layer: int, num_stages: int) -> None:
    """Same rule as `model.check_stage_split`: equal-shaped bodies (CheckFree averages them)."""
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if n_layer % num_stages:
        raise ValueError(f"n_layer ({n_layer}) must be divisible by the number of stages ({num_stages}) "
                         "so that every stage has the same body shape")


def stage_config(inner: nn.Module, seq_len: int | None = None) -> HFStageConfig:
    """The `HFStageConfig` of `inner`; `seq_len` defaults to the model's position limit."""
    reason = supports_staging(inner)
    if reason:
        raise ValueError(reason)
    arch = _arch_of(inner)
    assert arch is not None  # supports_staging checked it
    max_positions = int(inner.config.max_position_embeddings)
    if seq_len is None:
        seq_len = max_positions
    elif not 0 < seq_len <= max_positions:
        raise ValueError(f"seq_len {seq_len} outside 1..{max_positions} (the model's positions)")
    return HFStageConfig(arch=arch, d_model=int(inner.config.hidden_size),
                         vocab_size=int(inner.get_output_embeddings().weight.shape[0]), seq_len=seq_len,
                         n_layer=int(inner.config.num_hidden_layers))


def _hidden(out: Any) -> torch.Tensor:
    """A decoder layer's output hidden states (a tensor in transformers 5, a tuple before)."""
    return out[0] if isinstance(out, tuple) else out


class HFPipelineStage(nn.Module):
    """Stage `index` of `num_stages` of a Hugging Face causal LM, with `PipelineStage`'s contract:
    stage 0 takes token ids [B, T] (long), others activations [B, T, D]; the last stage returns
    logits [B, T, V], the others activations [B, T, D].

    Attribute names: GPT-2 `wte`, `wpe`, `drop`, `blocks`, `ln_f`, `lm_head`; Llama `embed_tokens`,
    `blocks`, `norm`, `lm_head` (+ `rotary_emb`, no parameters). Body keys are "blocks.{j}.*" with
    j local to the stage, so the body state dicts of two stages have the same keys."""

    def __init__(self, inner: nn.Module, index: int, num_stages: int, *, seq_len: int | None = None) -> None:
        super().__init__()
        cfg = stage_config(inner, seq_len)
        check_hf_stage_split(cfg.n_layer, num_stages)
        if not 0 <= index < num_stages:
            raise ValueError(f"stage {index} out of range for {num_stages} stages")
        self.cfg, self.index, self.num_stages = cfg, index, num_stages
        self.has_embed, self.has_head = index == 0, index == num_stages - 1
        layout = _LAYOUT[cfg.arch]
        # One memo for the whole stage: modules sharing a tensor (tied embedding and head, S == 1)
        # or the config object keep sharing their copies; nothing is shared with other stages.
        memo: dict[int, Any] = {}
        self.hf_config = copy.deepcopy(inner.config, memo)  # attention implementation, for the mask
        self._sources: dict[str, str] = {}  # stage module name -> source module path (source_names)

        def take(name: str, path: str) -> None:
            setattr(self, name, copy.deepcopy(inner.get_submodule(path), memo))
            self._sources[name] = path

        if self.has_embed:
            for path in layout["embed"]:
                take(path.rsplit(".", 1)[-1], path)
        per = cfg.n_layer // num_stages
        source_blocks = inner.get_submodule(layout["blocks"])
        self.blocks = nn.ModuleList(copy.deepcopy(source_blocks[index * per + j], memo) for j in range(per))
        for j in range(per):
            self._sources[f"blocks.{j}"] = f"{layout['blocks']}.{index * per + j}"
        if layout["rotary"] is not None:  # cos/sin of the positions, needed by every block
            take("rotary_emb", layout["rotary"])
        if self.has_head:
            take(layout["norm"].rsplit(".", 1)[-1], layout["norm"])
            head_path = next(n for n, m in inner.named_modules() if m is inner.get_output_embeddings())
            take("lm_head", head_path)
        self.train(inner.training)  # copies kept their own modes; make the whole stage consistent

    # ------------------------------------------------------------------ compute
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the stage's seq_len {self.cfg.seq_len}")
        if self.cfg.arch == "gpt2":
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # [1, T], as GPT2Model builds it
            return self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, D]
        return self.embed_tokens(idx)  # [B, T, D]

    def body(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        T = x.shape[1]
        pos = torch.arange(T, device=x.device).unsqueeze(0)  # [1, T]: no cache, no padding
        # The same call the full model makes: None under SDPA (which then runs is_causal=True), an
        # explicit mask under eager attention, where None would mean "attend everywhere".
        mask = create_causal_mask(config=self.hf_config, inputs_embeds=x, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        if self.cfg.arch == "gpt2":
            for block in self.blocks:
                x = _hidden(block(x, past_key_values=None, attention_mask=mask, use_cache=False, position_ids=pos))
            return x
        rope = self.rotary_emb(x, position_ids=pos)  # (cos, sin), each [1, T, head_dim]
        for layer in self.blocks:
            x = _hidden(layer(x, attention_mask=mask, position_ids=pos, past_key_values=None, use_cache=False,
                              position_embeddings=rope))
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.ln_f if self.cfg.arch == "gpt2" else self.norm
        return self.lm_head(norm(x))  # [B, T, V]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_embed:
            x = self.embed(x)
        x = self.body(x)
        return self.head(x) if self.has_head else x

    # ------------------------------------------------------------------ bookkeeping
    def source_names(self) -> dict[str, str]:
        """Stage state-dict key -> the source model's key for the tensor it was copied from."""
        out = {}
        for key in self.state_dict():
            for name, path in self._sources.items():
                if key.startswith(name + "."):
                    out[key] = path + key[len(name):]
                    break
        return out


def split_hf_stages(inner: nn.Module, num_stages: int, *, seq_len: int | None = None) -> list[HFPipelineStage]:
    """Slice `inner` into `num_stages` stages holding copies of its weights (`inner` is not
    modified). Raises ValueError when the model is unsupported or n_layer % num_stages != 0."""
    cfg = stage_config(inner, seq_len)
    check_hf_stage_split(cfg.n_layer, num_stages)
    return [HFPipelineStage(inner, k, num_stages, seq_len=seq_len) for k in range(num_stages)]


def build_hf_stage(inner: nn.Module, index: int, num_stages: int, *, seq_len: int | None = None) -> HFPipelineStage:
    """Stage `index` alone: copies only the submodules that stage holds."""
    return HFPipelineStage(inner, index, num_stages, seq_len=seq_len)


__all__ = ["HFPipelineStage", "HFStageConfig", "build_hf_stage", "check_hf_stage_split", "split_hf_stages",
           "stage_config", "supports_staging"]
