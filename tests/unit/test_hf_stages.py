"""Hugging Face GPT-2 / Llama split into pipeline stages (node/train/hf_stages.py): the chained
stages give the full model's logits and gradients, own their weights, and stay causal."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from swarm_node.strategies.sapo.hf_fixture import build_tokenizer, make_tiny_hf_model  # noqa: E402
from swarm_node.train.hf_stages import (  # noqa: E402
    HFPipelineStage,
    HFStageConfig,
    build_hf_stage,
    split_hf_stages,
    supports_staging,
)
from tests.byom_models import make_tiny_llama  # noqa: E402

ATOL = 1e-5
B, T = 2, 8


def _make_llama4_tied(out_dir: Path) -> Path:
    """A 4-layer Llama whose head is tied to its embedding (the byom fixture has 2 layers, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


MAKERS = {
    "gpt2-2L": lambda d: make_tiny_hf_model(d, seed=0),
    "gpt2-4L": lambda d: make_tiny_hf_model(d, seed=1, n_layer=4, n_embd=32),
    "llama-2L": lambda d: make_tiny_llama(d, seed=0),
    "llama-4L-tied": _make_llama4_tied,
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("hf_stages")
    return {name: make(root / name) for name, make in MAKERS.items()}


def _load(model_dirs: dict[str, Path], name: str, attn: str = "sdpa") -> nn.Module:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dirs[name], local_files_only=True, dtype=torch.float32,
                                             attn_implementation=attn)
    return m.train()  # every fixture has dropout 0, so train mode is deterministic too


def _ids(m: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.config.vocab_size, (B, T), generator=g)


def _chain(stages: list[HFPipelineStage], ids: torch.Tensor) -> torch.Tensor:
    x = ids
    for st in stages:
        x = st(x)
    return x


def _tied(m: nn.Module) -> bool:
    return m.get_output_embeddings().weight is m.get_input_embeddings().weight


CASES = [("gpt2-2L", 1), ("gpt2-2L", 2), ("gpt2-4L", 2), ("gpt2-4L", 4),
         ("llama-2L", 1), ("llama-2L", 2), ("llama-4L-tied", 2), ("llama-4L-tied", 4)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name,num_stages", CASES)
def test_staged_logits_and_gradients_match_the_full_model(model_dirs, name: str, num_stages: int, attn: str):
    """Chaining the S stages reproduces `inner(input_ids, use_cache=False).logits`, and after the
    same cross-entropy backward every stage parameter's gradient equals the gradient of the model
    parameter it was copied from; an untied head copy's gradient plus the stage-0 embedding's sums
    to the full model's tied-weight gradient. Run under SDPA and eager attention (explicit mask)."""
    m = _load(model_dirs, name, attn)
    ids = _ids(m)
    targets = torch.roll(ids, -1, dims=1)
    stages = split_hf_stages(m, num_stages)
    assert [st.index for st in stages] == list(range(num_stages))
    assert stages[0].has_embed and stages[-1].has_head
    assert not any(st.has_embed for st in stages[1:]) and not any(st.has_head for st in stages[:-1])

    ref = m(input_ids=ids, use_cache=False).logits
    out = _chain(stages, ids)
    assert out.shape == ref.shape == (B, T, stages[-1].cfg.vocab_size)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)

    F.cross_entropy(ref.reshape(-1, ref.shape[-1]), targets.reshape(-1)).backward()
    F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)).backward()

    # Sum the staged grads per source tensor (a tied weight is reached from two stage keys).
    summed: dict[int, torch.Tensor] = {}
    full_params = dict(m.named_parameters())
    covered: set[int] = set()
    for st in stages:
        seen: set[int] = set()  # S == 1 keeps a tied pair as one parameter: count it once
        for key, src in st.source_names().items():
            p, q = st.get_parameter(key), m.get_parameter(src)
            assert p is not q and p.shape == q.shape
            covered.add(id(q))
            if id(p) in seen:
                continue
            seen.add(id(p))
            assert p.grad is not None, f"stage {st.index} {key} got no gradient"
            summed[id(q)] = summed[id(q)] + p.grad if id(q) in summed else p.grad.clone()
    assert covered == {id(q) for q in full_params.values()}, "some model parameter is in no stage"
    for pname, q in full_params.items():
        torch.testing.assert_close(summed[id(q)], q.grad, atol=ATOL, rtol=1e-4, msg=lambda s: f"{pname}: {s}")

    if _tied(m):
        first, last = stages[0], stages[-1]
        emb_name = "wte" if first.cfg.arch == "gpt2" else "embed_tokens"
        emb, head = getattr(first, emb_name).weight, last.lm_head.weight
        tied_grad = m.get_input_embeddings().weight.grad
        if num_stages == 1:
            assert head is emb  # one stage: still tied
        else:
            assert head is not emb  # a staged model unties them
            torch.testing.assert_close(emb.grad + head.grad, tied_grad, atol=ATOL, rtol=1e-4)
            assert not torch.allclose(head.grad, tied_grad, atol=ATOL)  # the head alone is not the whole


def test_stages_own_their_weights(model_dirs, tmp_path: Path):
    """An optimizer step on stage 1 changes neither stage 0 nor the source model (GPT-2, whose head
    is tied to wte), no tensor is shared between stages or with the model, and a stage's state dict
    saved to disk loads into a freshly built stage that then computes the same outputs."""
    m = _load(model_dirs, "gpt2-2L")
    stages = split_hf_stages(m, 2)
    ids = _ids(m, seed=3)
    model_ptrs = {p.data_ptr() for p in m.parameters()}
    for st in stages:
        assert not model_ptrs & {p.data_ptr() for p in st.parameters()}
    assert not {p.data_ptr() for p in stages[0].parameters()} & {p.data_ptr() for p in stages[1].parameters()}

    before0 = {k: v.clone() for k, v in stages[0].state_dict().items()}
    before_model = {k: v.clone() for k, v in m.state_dict().items()}
    before1 = {k: v.clone() for k, v in stages[1].state_dict().items()}
    out = _chain(stages, ids)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), torch.roll(ids, -1, 1).reshape(-1)).backward()
    torch.optim.SGD(stages[1].parameters(), lr=0.5).step()

    for k, v in stages[0].state_dict().items():
        assert torch.equal(v, before0[k]), k
    for k, v in m.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    assert not torch.equal(stages[1].lm_head.weight, before1["lm_head.weight"])

    path = tmp_path / "stage1.pt"
    torch.save(stages[1].state_dict(), path)
    fresh = build_hf_stage(m, 1, 2)
    fresh.load_state_dict(torch.load(path), strict=True)
    h = stages[0](ids).detach()
    torch.testing.assert_close(fresh(h), stages[1](h), atol=0, rtol=0)


def test_bad_splits_and_unsupported_models_are_refused(model_dirs):
    """n_layer % S != 0 raises ValueError naming both numbers (split and single-stage build); a
    model of another architecture gets a one-line reason from `supports_staging` and is refused."""
    m = _load(model_dirs, "llama-2L")
    assert supports_staging(m) == ""
    for fn in (lambda: split_hf_stages(m, 3), lambda: build_hf_stage(m, 0, 3)):
        with pytest.raises(ValueError, match=r"n_layer \(2\).*\(3\)"):
            fn()
    with pytest.raises(ValueError, match="out of range"):
        build_hf_stage(m, 2, 2)

    other = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    reason = supports_staging(other)
    assert reason and "\n" not in reason and "Sequential" in reason
    with pytest.raises(ValueError, match="Sequential"):
        split_hf_stages(other, 1)


def test_stage_config_reports_what_stage_inputs_are_checked_against(model_dirs):
    """`cfg` carries arch, d_model, vocab_size (the head's rows), seq_len (the model's positions by
    default, or the given one) and n_layer; stage 0 refuses sequences longer than seq_len."""
    m = _load(model_dirs, "gpt2-4L")
    st = build_hf_stage(m, 0, 2)
    assert st.cfg == HFStageConfig(arch="gpt2", d_model=32, vocab_size=m.config.vocab_size, seq_len=64, n_layer=4)
    short = split_hf_stages(m, 2, seq_len=4)
    assert all(s.cfg.seq_len == 4 for s in short)
    with pytest.raises(ValueError, match="seq_len 4"):
        short[0](_ids(m))
    with pytest.raises(ValueError, match="outside"):
        split_hf_stages(m, 2, seq_len=65)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["gpt2-2L", "llama-2L"])
def test_staged_pipeline_is_causal(model_dirs, name: str, attn: str):
    """Changing tokens t+1.. leaves the staged logits at positions <= t bit-identical (and changes
    the later ones), for every t, under SDPA and under eager attention."""
    m = _load(model_dirs, name, attn)
    stages = split_hf_stages(m, 2)
    ids = _ids(m, seed=5)
    with torch.no_grad():
        base = _chain(stages, ids)
        for t in range(T - 1):
            changed = ids.clone()
            changed[:, t + 1:] = (ids[:, t + 1:] + 1) % m.config.vocab_size
            out = _chain(stages, changed)
            assert torch.equal(out[:, :t + 1], base[:, :t + 1]), f"position <= {t} saw a later token"
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])
