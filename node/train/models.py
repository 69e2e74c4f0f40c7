"""Which network a peer trains (`--model`): the built-in GPT, a local Hugging Face LM, or a factory.

`check_model_setting` validates the setting cheaply at config time (no weights are read);
`load_model` builds the network on the compute thread. Every model reaches the trainer with one
interface: `forward(idx [B,T], targets [B,T] | None) -> (logits [B,T,V], mean loss | None)`,
`parameters()` in construction order, and a frozen `cfg` that checkpoints record and compare.

Invariants:
  * Nothing is downloaded: Hugging Face models and tokenizers load with `local_files_only`,
    without remote code; transformers is imported only when such a model is loaded.
  * `ModelIdentity` (architecture, config digest, initial-weights hash) goes into the run spec;
    paths never do, since they differ between machines.
  * Loading is a function of (files, seed): missing weights and factory inits draw from torch's
    global RNG seeded with `--seed` inside `fork_rng`, so the caller's RNG is left untouched.
The factory contract is `load_factory`'s docstring.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from swarm_node.train.model import GPTConfig, build_model

log = logging.getLogger(__name__)

BUILTIN = "builtin"
FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# config.json keys that say where or with which library version a model was saved, not what it is
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"})

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B,T,V], targets [B,T]) -> mean loss


class ModelError(ValueError):
    """`--model` names something that cannot be trained; the message is one line in plain words."""


@dataclass(frozen=True)
class ModelSource:
    """What `--model` points at. `ref` is a path or `module:function`, never part of the run spec."""

    kind: Literal["builtin", "hf", "factory"]
    ref: str


@dataclass(frozen=True)
class ModelBundle:
    """What a factory may return instead of a bare module (every field but `module` optional)."""

    module: nn.Module
    loss_fn: LossFn | None = None  # default: mean cross-entropy of logits against the targets
    tokenizer: Any | None = None  # default: none, the data are bytes (ids 0..255)
    vocab_size: int | None = None  # default: the last dimension of the module's logits


@dataclass(frozen=True)
class ExternalModelConfig:
    """The `cfg` of a wrapped model: what a checkpoint must match to be loaded into it."""

    arch: str
    arch_config: str
    vocab_size: int
    seq_len: int


@dataclass(frozen=True)
class ModelIdentity:
    """What peers training a non-builtin model must share; empty for the built-in GPT, whose
    weights follow from the spec's shape fields and seed."""

    arch: str = ""  # class of the network, e.g. LlamaForCausalLM
    arch_config: str = ""  # sha256 prefix of its configuration
    init_weights: str = ""  # sha256 prefix of the weights before the first step

    def spec_fields(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class WrappedLM(nn.Module):
    """Gives any causal LM the built-in GPT's calling convention (see the module docstring)."""

    def __init__(self, inner: nn.Module, cfg: ExternalModelConfig, *, loss_fn: LossFn | None = None,
                 hf: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = cfg
        self.loss_fn = loss_fn  # None: the trainer may use its own cross-entropy (gradient coding)
        self._hf = hf

    @property
    def hf_model(self) -> nn.Module | None:
        """The transformers model inside, for a Hugging Face directory (None for a factory's)."""
        return self.inner if self._hf else None

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        if self._hf:  # no KV cache: training never reuses it
            return self.inner(input_ids=idx, use_cache=False).logits
        return _logits_of(self.inner(idx))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(idx)  # [B, T, V]
        if targets is None:
            return logits, None
        if self.loss_fn is not None:
            return logits, self.loss_fn(logits, targets)
        # targets are already the inputs shifted by one, so this is the shifted LM loss
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for `LocalTrainer`, plus what the data and the run spec need from it."""

    module: nn.Module  # GPT or WrappedLM
    vocab_size: int
    tokenizer: Any | None = None  # None: train on bytes
    tokenizer_fingerprint: str = ""  # "" when the tokenizer has no stable fingerprint (no disk cache)
    identity: ModelIdentity = ModelIdentity()


# ---------------------------------------------------------------------- the setting

def parse_model_setting(value: str) -> ModelSource:
    """Classify `--model` by its shape; an existing path always wins over the factory syntax."""
    if value == BUILTIN:
        return ModelSource("builtin", value)
    path = Path(value).expanduser()
    if FACTORY_PATTERN.match(value) and not path.exists():
        return ModelSource("factory", value)
    if not path.exists():
        raise ModelError(f"{value!r} does not exist (give 'builtin', a local Hugging Face model directory, "
                         "or package.module:function)")
    if not path.is_dir():
        raise ModelError(f"{value!r} is not a directory (a Hugging Face model directory holds config.json, "
                         "weights and tokenizer files)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{value!r} has no config.json: not a Hugging Face model directory")
    return ModelSource("hf", str(path))


def check_model_setting(value: str) -> ModelSource:
    """`parse_model_setting`, plus what can be checked without loading weights: transformers is
    installed for a directory; a factory's module imports and names a callable."""
    source = parse_model_setting(value)
    if source.kind == "hf":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ModelError("a Hugging Face model needs transformers installed (pip install transformers)")
    elif source.kind == "factory":
        resolve_factory(source.ref)
    return source


def resolve_factory(ref: str) -> Callable[[], Any]:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error while importing it is a setting problem
        raise ModelError(f"cannot import {module_name} for {ref!r}: {_first_line(e)}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ModelError(f"{module_name} has no callable {attr!r} (for {ref!r})")
    return fn


# ---------------------------------------------------------------------- loading

def load_model(setting: str, *, seed: int, seq_len: int, n_layer: int, n_head: int, d_model: int) -> LoadedModel:
    """Build the network `--model` names; raises `ModelError`. The shape arguments other than
    `seq_len` only size the built-in GPT."""
    source = check_model_setting(setting)
    if source.kind == "builtin":
        cfg = GPTConfig(seq_len=seq_len, n_layer=n_layer, n_head=n_head, d_model=d_model)
        return LoadedModel(module=build_model(cfg, seed), vocab_size=cfg.vocab_size)
    if source.kind == "hf":
        return load_hf(Path(source.ref), seed=seed, seq_len=seq_len)
    return load_factory(source.ref, seed=seed, seq_len=seq_len)


def load_hf(path: Path, *, seed: int, seq_len: int) -> LoadedModel:
    """A local Hugging Face causal LM (AutoModelForCausalLM) in fp32, with its tokenizer."""
    try:
        raw_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from None
    if not isinstance(raw_config, dict):
        raise ModelError(f"{path / 'config.json'} is not a JSON object")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # weights missing from the files are initialised alike on every peer
            # fp32 master weights whatever the saved dtype: AdamW on bf16 weights loses small updates
            inner = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        raise ModelError(f"{path} does not load as a causal LM: {_first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path} has no usable tokenizer: {_first_line(e)}") from None
    max_positions = getattr(inner.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ModelError(f"--seq-len {seq_len} exceeds the model's {max_positions} positions")
    vocab_size = _hf_vocab_size(inner)
    arch = type(inner).__name__
    arch_config = _digest({k: v for k, v in raw_config.items() if k not in VOLATILE_CONFIG_KEYS})
    cfg = ExternalModelConfig(arch=arch, arch_config=arch_config, vocab_size=vocab_size, seq_len=seq_len)
    return LoadedModel(module=WrappedLM(inner, cfg, hf=True), vocab_size=vocab_size, tokenizer=tokenizer,
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                       identity=ModelIdentity(arch, arch_config, weights_hash(inner)))


def load_factory(ref: str, *, seed: int, seq_len: int) -> LoadedModel:
    """Call the factory `package.module:function` named by `--model` and wrap what it returns.

    Contract:
      * It is called with no arguments, with torch's global RNG seeded from `--seed` (and
        restored afterwards): a module initialised by torch's default initialisers is
        identical on every peer. Peers whose initial weights differ are refused.
      * It returns an `nn.Module`, a `ModelBundle(module, loss_fn, tokenizer, vocab_size)`, or a
        tuple `(module, loss_fn, tokenizer)` (trailing items may be left out or None).
      * `module(idx)` takes int64 token ids [B, T] (T <= --seq-len) and returns logits
        [B, T, V]: a tensor, an object with `.logits`, or a tuple whose first item is logits.
      * `loss_fn(logits, targets)` returns the mean loss as a scalar; targets [B, T] are the
        inputs shifted by one. Default: cross-entropy.
      * `tokenizer.encode(text) -> list[int]` turns `--data` into ids (a Hugging Face tokenizer
        qualifies; its special tokens are not added). Without one, the data are bytes (0..255).
        A `fingerprint` string attribute (or a fast Hugging Face tokenizer) lets the token
        cache survive restarts. Every id must be below `vocab_size`.
    """
    fn = resolve_factory(ref)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = fn()
    except Exception as e:
        log.debug("factory %s failed", ref, exc_info=True)
        raise ModelError(f"{ref}() failed: {type(e).__name__}: {_first_line(e)}") from None
    bundle = _as_bundle(out, ref)
    module = bundle.module
    vocab_size = bundle.vocab_size if bundle.vocab_size is not None else _probe_vocab(module, ref)
    if vocab_size <= 0:
        raise ModelError(f"{ref}: vocab_size must be positive, got {vocab_size}")
    arch = f"{type(module).__module__}.{type(module).__qualname__}"
    shapes = [(name, list(t.shape), str(t.dtype)) for name, t in module.state_dict().items()
              if isinstance(t, torch.Tensor)]
    arch_config = _digest({"arch": arch, "tensors": shapes, "vocab_size": vocab_size})
    cfg = ExternalModelConfig(arch=arch, arch_config=arch_config, vocab_size=vocab_size, seq_len=seq_len)
    tok = bundle.tokenizer
    return LoadedModel(module=WrappedLM(module, cfg, loss_fn=bundle.loss_fn), vocab_size=vocab_size,
                       tokenizer=tok, tokenizer_fingerprint=tokenizer_fingerprint(tok) if tok is not None else "",
                       identity=ModelIdentity(arch, arch_config, weights_hash(module)))


# ---------------------------------------------------------------------- helpers

def weights_hash(module: nn.Module) -> str:
    """sha256 prefix over (name, dtype, shape, raw bits) of every state-dict tensor, in order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):  # extra state of a custom module: not weights
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable digest of a tokenizer's behaviour, or "" when it has none we can trust."""
    own = getattr(tokenizer, "fingerprint", None)
    if isinstance(own, str) and own:
        return own
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast HF tokenizers: the full definition
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    return ""


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hf_vocab_size(inner: nn.Module) -> int:
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])  # what the logits are sized by
    return int(inner.config.vocab_size)


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}, not logits (a tensor, .logits, or a tuple)")


def _as_bundle(out: Any, ref: str) -> ModelBundle:
    if isinstance(out, ModelBundle):
        bundle = out
    elif isinstance(out, nn.Module):
        bundle = ModelBundle(out)
    elif isinstance(out, (tuple, list)) and 1 <= len(out) <= 3:
        bundle = ModelBundle(*out)
    elif isinstance(getattr(out, "module", None), nn.Module):  # a dataclass of the user's own
        bundle = ModelBundle(out.module, getattr(out, "loss_fn", None), getattr(out, "tokenizer", None),
                             getattr(out, "vocab_size", None))
    else:
        raise ModelError(f"{ref}() returned {type(out).__name__}; expected an nn.Module, a ModelBundle "
                         "or a tuple (module, loss_fn, tokenizer)")
    if not isinstance(bundle.module, nn.Module):
        raise ModelError(f"{ref}() returned {type(bundle.module).__name__} as the model, not an nn.Module")
    if bundle.loss_fn is not None and not callable(bundle.loss_fn):
        raise ModelError(f"{ref}(): loss_fn is not callable")
    if bundle.tokenizer is not None and not callable(getattr(bundle.tokenizer, "encode", None)):
        raise ModelError(f"{ref}(): the tokenizer has no encode(text) method")
    return bundle


def _probe_vocab(module: nn.Module, ref: str) -> int:
    """The width of the logits for a two-token input: the vocabulary the module scores."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = _logits_of(module(torch.zeros(1, 2, dtype=torch.long)))
    except Exception as e:
        raise ModelError(f"{ref}: forward on token ids [1, 2] failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        module.train(was_training)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, 2):
        raise ModelError(f"{ref}: logits for ids [1, 2] have shape {tuple(logits.shape)}, expected [1, 2, V]")
    return int(logits.shape[-1])


__all__ = [
    "BUILTIN",
    "ExternalModelConfig",
    "LoadedModel",
    "ModelBundle",
    "ModelError",
    "ModelIdentity",
    "ModelSource",
    "WrappedLM",
    "check_model_setting",
    "load_model",
    "parse_model_setting",
    "tokenizer_fingerprint",
    "weights_hash",
]
