"""`--model`: training a model the user brings (node/train/models.py, node/train/tokens.py).

Tiny GPT-2 and Llama models are built offline (random weights from a seed, the character-level
tokenizer of strategies/sapo/hf_fixture.py) and saved into tmp_path; factories are defined here
and named as `tests.unit.test_byom:<function>`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from swarm_node.config import ConfigError, load_config
from swarm_node.train import tokens
from swarm_node.train.data import DataError
from swarm_node.train.models import ModelBundle, ModelError, WrappedLM, load_model
from swarm_node.train.tokens import load_dataset
from swarm_node.train.trainer import LocalTrainer, TrainConfig

pytest.importorskip("transformers")

from swarm_node.strategies.sapo.hf_fixture import CHARS, build_tokenizer, make_tiny_hf_model  # noqa: E402
from tests.byom_models import make_tiny_llama  # noqa: E402

HERE = "tests.unit.test_byom"
SEQ_LEN = 16
# run-spec digests of two default builtin configs, computed before --model existed
BUILTIN_SYNC_DIGEST = "f46c7346d77f1806"
BUILTIN_DILOCO_DIGEST = "29f25217a43496ee"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byom")
    return {"gpt2": make_tiny_hf_model(root / "gpt2", n_layer=1, n_embd=32),
            "gpt2_seed1": make_tiny_hf_model(root / "gpt2_seed1", seed=1, n_layer=1, n_embd=32),
            "llama": make_tiny_llama(root / "llama")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("the cat sat on the mat.\n" * 400)  # repetitive: a few steps visibly lower the loss
    return path


# ---- factories named by --model -----------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx)))  # [B, T, V]


class CharTokenizer:
    fingerprint = "lowercase-chars-v1"

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") + 1 if "a" <= c <= "z" else 0 for c in text]


def tiny_factory() -> nn.Module:
    return TinyLM()


def bundle_factory() -> ModelBundle:
    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return ModelBundle(TinyLM(vocab=27), loss_fn=loss_fn, tokenizer=CharTokenizer())


def too_small_factory() -> tuple:
    return (TinyLM(vocab=10),)


def failing_factory() -> nn.Module:
    raise RuntimeError("no GPU here")


def not_a_model_factory() -> str:
    return "hello"


# ---- helpers ------------------------------------------------------------------------------
def trainer_for(setting: str, corpus: Path, tmp_path: Path, *, lr: float = 1e-2) -> LocalTrainer:
    model = load_model(setting, seed=0, seq_len=SEQ_LEN, n_layer=1, n_head=2, d_model=16)
    data = load_dataset(str(corpus), max_bytes=None, tokenizer=model.tokenizer,
                        tokenizer_fingerprint=model.tokenizer_fingerprint, vocab_size=model.vocab_size,
                        cache_dir=tmp_path / "cache")
    return LocalTrainer(model.module, data, TrainConfig(lr=lr, batch_size=4, seed=0))


def spec_of(setting: str, **flags) -> "object":
    """The run spec a daemon publishes: config fields plus the loaded model's identity."""
    cfg = load_config({"model": setting, "strategy": "diloco", **flags})
    model = load_model(setting, seed=cfg.seed, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       d_model=cfg.d_model)
    return cfg.run_spec().model_copy(update=model.identity.spec_fields())


# ---- training -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_model_trains_and_lowers_the_loss(arch, models, corpus, tmp_path):
    """1. Load a tiny saved model of `arch` through --model DIR; tokenize the corpus with its tokenizer.
    2. Evaluate, take 12 train steps, evaluate again.
    Result: int32 token ids below the vocabulary, and a lower held-out loss."""
    trainer = trainer_for(str(models[arch]), corpus, tmp_path)
    assert isinstance(trainer.model, WrappedLM)
    assert trainer.dataset.data.dtype == torch.int32
    assert int(trainer.dataset.data.max()) < trainer.model.cfg.vocab_size
    before = trainer.evaluate(max_batches=2)
    for _ in range(12):
        trainer.train_step()
    after = trainer.evaluate(max_batches=2)
    assert after < before - 0.2, (before, after)


def test_hf_checkpoint_round_trip_and_refuses_a_builtin_checkpoint(models, corpus, tmp_path):
    """1. Train an HF trainer 2 steps, save; load into a fresh one.  2. Load a builtin checkpoint into it.
    Result: identical param hash and step; the builtin checkpoint is a ValueError naming the config."""
    a = trainer_for(str(models["llama"]), corpus, tmp_path)
    a.train_step()
    a.train_step()
    a.save_checkpoint(tmp_path / "hf.pt")
    b = trainer_for(str(models["llama"]), corpus, tmp_path)
    assert b.load_checkpoint(tmp_path / "hf.pt") == 2 and b.param_hash() == a.param_hash()
    builtin = trainer_for("builtin", corpus, tmp_path)
    builtin.save_checkpoint(tmp_path / "builtin.pt")
    with pytest.raises(ValueError, match="model config"):
        b.load_checkpoint(tmp_path / "builtin.pt")


def test_factory_module_trains_on_bytes(corpus, tmp_path):
    trainer = trainer_for(f"{HERE}:tiny_factory", corpus, tmp_path, lr=3e-2)
    assert trainer.dataset.data.dtype == torch.uint8 and trainer.model.cfg.vocab_size == 256
    before = trainer.evaluate(max_batches=2)
    for _ in range(10):
        trainer.train_step()
    assert trainer.evaluate(max_batches=2) < before - 0.2


def test_factory_bundle_uses_its_tokenizer_and_loss(corpus, tmp_path):
    """1. A factory returns ModelBundle(module, loss_fn, tokenizer) with a 27-id vocabulary.
    2. Gradient-coded gradients with its loss_fn vs with the built-in cross-entropy path.
    Result: its tokenizer's ids are the data; both coded paths agree (the loss_fn is the same CE)."""
    trainer = trainer_for(f"{HERE}:bundle_factory", corpus, tmp_path, lr=3e-2)
    assert trainer.dataset.data.dtype == torch.int32 and int(trainer.dataset.data.max()) <= 26
    own = trainer.compute_coded_gradients(0, [(0, 1.0), (1, 0.5)])
    trainer.model.loss_fn = None
    builtin_ce = trainer.compute_coded_gradients(0, [(0, 1.0), (1, 0.5)])
    for g, h in zip(own.grads, builtin_ce.grads):
        torch.testing.assert_close(g, h)
    before = trainer.evaluate(max_batches=2)
    for _ in range(10):
        trainer.train_step()
    assert trainer.evaluate(max_batches=2) < before - 0.2


def test_factory_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_model(f"{HERE}:tiny_factory", seed=3, seq_len=SEQ_LEN, n_layer=1, n_head=1, d_model=8)
    b = load_model(f"{HERE}:tiny_factory", seed=3, seq_len=SEQ_LEN, n_layer=1, n_head=1, d_model=8)
    c = load_model(f"{HERE}:tiny_factory", seed=4, seq_len=SEQ_LEN, n_layer=1, n_head=1, d_model=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.identity == b.identity and a.identity.init_weights != c.identity.init_weights
    assert a.identity.arch_config == c.identity.arch_config


# ---- data -------------------------------------------------------------------------------
def test_token_id_outside_the_vocabulary_is_a_data_error(corpus):
    model = load_model(f"{HERE}:too_small_factory", seed=0, seq_len=SEQ_LEN, n_layer=1, n_head=1, d_model=8)
    assert model.vocab_size == 10  # probed from the logits
    with pytest.raises(DataError, match=r"token id \d+ is outside the model's vocabulary of 10 ids"):
        load_dataset(str(corpus), max_bytes=None, vocab_size=model.vocab_size)


def test_token_cache_is_written_and_reused(models, corpus, tmp_path, monkeypatch):
    tok = build_tokenizer()
    from swarm_node.train.models import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok)
    assert fp
    monkeypatch.setattr(tokens, "_memory", {})  # earlier tests tokenized this corpus in this process
    first = tokens.load_tokens(str(corpus), max_bytes=None, tokenizer=tok, tokenizer_fingerprint=fp,
                               cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert tok.decode(first.tolist()) == corpus.read_text()  # one character, one token
    monkeypatch.setattr(tokens, "_memory", {})
    monkeypatch.setattr(tokens, "encode_text", lambda *a: pytest.fail("the disk cache was not used"))
    again = tokens.load_tokens(str(corpus), max_bytes=None, tokenizer=tok, tokenizer_fingerprint=fp,
                               cache_dir=tmp_path)
    assert torch.equal(first, again)


def test_chunked_encoding_keeps_every_character():
    tok = build_tokenizer()
    text = "".join(CHARS[i % len(CHARS)] for i in range(3 * tokens.CHUNK_CHARS + 17))
    assert tok.decode(tokens.encode_text(tok, text).tolist()) == text


# ---- run spec -----------------------------------------------------------------------------
def test_builtin_digest_is_unchanged():
    assert load_config({"strategy": "sync"}).run_spec().digest() == BUILTIN_SYNC_DIGEST
    diloco = load_config({"strategy": "diloco"}).run_spec()
    assert diloco.digest() == BUILTIN_DILOCO_DIGEST, diloco.canonical()
    assert "arch" not in load_config({"strategy": "diloco"}).run_spec().canonical()


def test_different_models_have_different_specs_that_name_the_model_fields(models, tmp_path):
    gpt2, gpt2_seed1, llama = (spec_of(str(models[k])) for k in ("gpt2", "gpt2_seed1", "llama"))
    assert len({gpt2.digest(), gpt2_seed1.digest(), llama.digest()}) == 3
    weights_only = gpt2.differences(gpt2_seed1.canonical())
    assert [d.split(":")[0] for d in weights_only] == ["init_weights"]
    names = {d.split(":")[0] for d in gpt2.differences(llama.canonical())}
    assert {"arch", "arch_config", "init_weights"} <= names
    assert "GPT2LMHeadModel" in " ".join(gpt2.differences(llama.canonical()))
    # against a builtin peer: the model fields and the unused shape fields differ
    builtin = load_config({"strategy": "diloco"}).run_spec()
    assert {"arch", "init_weights", "n_layer"} <= {d.split(":")[0] for d in builtin.differences(gpt2.canonical())}


def test_the_model_path_is_not_in_the_spec(models, tmp_path):
    copy = shutil.copytree(models["llama"], tmp_path / "elsewhere" / "llama")
    here, there = spec_of(str(models["llama"])), spec_of(str(copy))
    assert here.digest() == there.digest()
    assert str(tmp_path) not in str(there.canonical())
    # the shape flags size only the builtin model, so peers may leave them at anything
    assert spec_of(str(copy), d_model=64, n_head=2).digest() == here.digest()


# ---- configuration errors -------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("/no/such/model", "does not exist"),
    ("__FILE__", "is not a directory"),
    ("__DIR__", "has no config.json"),
    ("nosuchpkg.mod:build", "cannot import nosuchpkg.mod"),
    (f"{HERE}:no_such_function", "has no callable 'no_such_function'"),
])
def test_bad_model_settings_are_one_line_config_errors(setting, message, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    setting = setting.replace("__FILE__", str(tmp_path / "file.txt")).replace("__DIR__", str(tmp_path))
    with pytest.raises(ConfigError, match=message) as info:
        load_config({"model": setting})
    assert "\n" not in str(info.value) and str(info.value).startswith("invalid configuration: --model")


def test_strategies_refuse_the_model_kinds_they_cannot_train(models):
    """sapo's policy is the built-in GPT (or --sapo-hf-model); swarm stages the built-in GPT or an
    HF GPT-2/Llama directory, but not a factory's module (no known block structure)."""
    with pytest.raises(ConfigError, match="sapo trains --model builtin, not this --model"):
        load_config({"model": str(models["gpt2"]), "strategy": "sapo"})
    with pytest.raises(ConfigError, match="swarm trains --model builtin or a Hugging Face model directory, not"):
        load_config({"model": f"{HERE}:tiny_factory", "strategy": "swarm"})
    cfg = load_config({"model": str(models["llama"]), "strategy": "swarm", "stages": 2, "n_layer": 3})
    assert cfg.stages == 2  # --n-layer sizes only the built-in GPT: not checked against --stages here


@pytest.mark.parametrize("factory, message", [
    ("failing_factory", r"failing_factory\(\) failed: RuntimeError: no GPU here"),
    ("not_a_model_factory", "returned str"),
])
def test_broken_factories_are_model_errors(factory, message):
    with pytest.raises(ModelError, match=message):
        load_model(f"{HERE}:{factory}", seed=0, seq_len=SEQ_LEN, n_layer=1, n_head=1, d_model=8)


def test_cli_exit_2_for_a_bad_path_and_a_model_that_does_not_load(tmp_path):
    """1. `join --model /no/such/dir`: refused while the config is read.
    2. `join --model DIR` where DIR has a config.json that no architecture accepts: refused while
       the node starts, before the network (no p2pd is launched for it).
    Result: exit code 2 and one line on stderr, no traceback, for both."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    for setting in ("/no/such/dir", str(broken)):
        proc = subprocess.run([sys.executable, "-m", "swarm_node", "join", "--new-swarm", "--model", setting,
                               "--state-dir", str(tmp_path / "state"), "--metrics-addr", "off"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "swarm-node" in line]
        assert len(lines) == 1 and "model" in lines[0], proc.stderr
    assert "does not load as a causal LM" in proc.stderr


def test_builtin_startup_does_not_import_transformers():
    code = ("import sys; from swarm_node.config import load_config; load_config({'new_swarm': True}); "
            "import swarm_node.daemon; assert 'transformers' not in sys.modules, 'transformers imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_reading_the_config_does_not_import_torch_or_hivemind():
    """The CLI parses and checks flags (`--help`, a config error's one line) without loading
    the network stack or torch: the strategy context it names loads the clock lazily."""
    code = ("import sys; from swarm_node.config import load_config; load_config({'new_swarm': True}); "
            "bad = [m for m in ('hivemind', 'torch') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
