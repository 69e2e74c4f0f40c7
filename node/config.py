"""Node configuration: one validated record built from CLI flags, env vars and a TOML file.

Precedence: CLI flag > environment (`SWARM_NODE_<FIELD>`) > TOML file (`--config`) > default.
`NodeConfig` is the node's own settings (`NodeSettings`) plus every installed strategy's
options (strategies/options.py), merged when this module loads; every field is a `join` flag
(`--field-name`), so the three sources never drift apart. Validation errors are rendered in
plain words by `explain_validation_error` and the CLI exits with code 2.

The *run spec* (model, data, the strategy and the fields it declares) is the part of the
config that must be identical on every peer of a run; `RunSpec` carries it and its hash is
published in the DHT (see protocol/records.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from swarm_node.strategies.options import NoOptions, StrategyOptions
from swarm_node.strategies.registry import DEFAULT_STRATEGY, option_models

log = logging.getLogger(__name__)

ENV_PREFIX = "SWARM_NODE_"
BUILTIN_MODEL = "builtin"  # equal to train/models.py BUILTIN, which this module must not import (torch)
DEFAULT_STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "swarm-node"


class NodeSettings(BaseSettings):
    """The node's own settings; `NodeConfig` below adds every installed strategy's options.
    Field descriptions double as `--help` text."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- swarm membership -------------------------------------------------------------
    run_id: str = Field("default", description="Name of the training run; peers of one run train one model.",
                        pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # NoDecode: an env var holds a plain "maddr maddr" or "maddr,maddr" string (split below),
    # not the JSON list pydantic-settings would otherwise insist on.
    initial_peers: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                     description="Multiaddrs of running peers to join (e.g. the join line of another node).")
    new_swarm: bool = Field(False, description="Start a new swarm (required when no --initial-peers are given).")
    host: str = Field("0.0.0.0", description="IP address to listen on (0.0.0.0 = all interfaces).")
    port: int = Field(0, ge=0, le=65535, description="TCP port for peer traffic (0 = any free port).")
    announce_host: str | None = Field(None, description="Public IP to announce to peers, when behind NAT or in a container.")
    allreduce_transport: Literal["auto", "p2p", "tcp"] = Field(
        "auto", description="diloco family: data path of the all-reduce. tcp = shard bytes on direct TCP sockets "
        "(authenticated by a one-time token from the libp2p stream, not encrypted); p2p = libp2p streams; auto = "
        "tcp, with a counted fallback to p2p for a peer whose TCP address is unreachable. Not part of the run spec.")
    allreduce_tcp_port: int = Field(0, ge=0, le=65535, description="TCP port of the all-reduce data path "
                                    "(0 = any free port; forward it behind NAT, or let auto fall back to p2p).")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Directory for the identity key, checkpoints and address files.")
    announce_interval_s: float = Field(15.0, gt=0.2, le=600, description="How often this peer re-publishes its DHT record.")
    record_ttl_s: float | None = Field(None, gt=0.5, description="Record lifetime in the DHT (default 2.5 x announce interval).")
    join_timeout_s: float = Field(0.0, ge=0, description="Exit with code 4 if no initial peer answers within this time (0 = keep retrying).")
    watchdog_interval_s: float = Field(5.0, gt=0.1, description="How often the isolation watchdog checks the routing table.")
    watchdog: bool = Field(True, description="Reconnect to initial and known peers when isolated (hivemind never does).")
    min_peers: int = Field(1, ge=1, description="Peers (including this one) needed before training starts.")
    quorum: int = Field(0, ge=0, le=10_000, description="sync, gradcode: peers (this one included) a peer must see "
                        "to keep stepping, for the whole run; below it the peer waits (phase 'waiting') instead of "
                        "training alone on a fork, and rejoins as a joiner. 0 = a majority of the last committed "
                        "round's group, less the peers that left it gracefully since; 1 = never wait.")
    discover: bool = Field(False, description="Find peers of this run on the local network by mDNS and advertise "
                           "this node there. Without --initial-peers it joins what it finds, or starts a new "
                           "swarm if nothing answers within --discover-timeout-s; with --new-swarm it only advertises.")
    discover_timeout_s: float = Field(10.0, gt=0, le=600, description="With --discover: how long to look for LAN "
                                      "peers before starting a new swarm.")

    # --- run spec (must match across the swarm) ---------------------------------------
    strategy: str = Field(DEFAULT_STRATEGY, description="Synchronization strategy (see `swarm-node strategies`).")
    model: str = Field(BUILTIN_MODEL, min_length=1, description="Network to train: 'builtin' (the byte-level GPT "
                       "sized by --n-layer/--n-head/--d-model), a local Hugging Face causal-LM directory (config.json, "
                       "safetensors weights, tokenizer; never downloaded), or a Python factory package.module:function "
                       "(README: Bring your own model). Not supported by swarm and sapo.")
    data: str = Field("stdlib", description="Training data: 'stdlib' (Python's own sources), a text file, a .jsonl "
                      "file, a .parquet/.arrow file (needs the parquet extra), pre-tokenized .bin/.npy token shards "
                      "(memory-mapped), or a directory of them (README: Bring your own data).")
    data_max_bytes: int = Field(4 << 20, gt=1024, description="Read at most this many bytes of training text "
                                "(token shards are mapped whole).")
    text_field: str = Field("text", min_length=1, description="Field (jsonl) or column (parquet/arrow) holding "
                            "each record's text.")
    token_dtype: Literal["auto", "uint8", "uint16", "uint32", "int32"] = Field(
        "auto", description="Id type of .bin token shards (auto = from a sidecar <name>.json like "
                            '{"dtype": "uint16"}; .npy files carry their own).')
    data_shards: int = Field(64, ge=1, le=1 << 20, description="Each step's training windows are split into this "
                             "many disjoint data shards; a peer trains on shard hash(peer id) mod N, or --data-rank.")
    data_rank: int | None = Field(None, ge=0, description="Pin this peer's data shard (0..--data-shards - 1) "
                                  "instead of hashing its peer id: give a fixed fleet distinct ranks.")
    seq_len: int = Field(64, ge=8, le=4096, description="Tokens (bytes) per training sequence.")
    n_layer: int = Field(2, ge=1, le=48, description="Transformer layers.")
    n_head: int = Field(4, ge=1, le=64, description="Attention heads.")
    d_model: int = Field(128, ge=8, le=8192, description="Model width.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per micro-batch (per local step unless "
                            "--grad-accum > 1).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches of --batch-size per local step, "
                            "averaged (effective batch = their product; part of the run spec).")
    lr: float = Field(3e-3, gt=0, le=10, description="Learning rate of the local optimizer (AdamW).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Local learning-rate schedule: constant, or cosine (linear warmup over "
                                "--lr-warmup-steps, then cosine decay to 0 at --max-steps, which it requires).")
    lr_warmup_steps: int = Field(0, ge=0, description="Warmup steps of the cosine schedule.")
    seed: int = Field(0, ge=0, description="Seed for model init and data order.")
    round_timeout_s: float = Field(20.0, gt=0, description="Longest wait for the other peers in one synchronization round.")
    compute_slowdown: float = Field(1.0, ge=1.0, le=100.0, description="Simulate a slower device: after each local "
                                    "step sleep (F-1) x that step's compute time, so this peer computes F times "
                                    "slower without loading the CPU (benchmarks and labs; 1 = off).")
    compression: Literal["none", "fp16", "int8", "e3m0"] = Field(
        "none", description="Wire compression of averaged tensors (accumulation is always fp32).")
    aggregation: Literal["mean", "clipped", "trimmed"] = Field(
        "mean", description="How averaged contributions combine: mean; clipped = a contribution with a non-finite "
        "value is dropped and each is scaled down to at most --aggregation-clip x the median norm; trimmed = "
        "clipped, then a coordinate-wise trimmed mean (--aggregation-trim per side). One scaled, sign-flipped or "
        "NaN contribution cannot take the run over with clipped or trimmed. Part of the run spec.")
    aggregation_clip: float = Field(1.0, gt=0, le=1e6, description="clipped/trimmed: the norm bound, as a multiple "
                                    "of the median norm of the contributions.")
    aggregation_trim: float = Field(0.2, ge=0, lt=0.5, description="trimmed: the fraction of contributions dropped "
                                    "per side and coordinate (at least one).")
    lab_contribution_scale: float = Field(1.0, ge=-1e6, le=1e6, description="Labs and benches only: multiply what "
                                          "this peer contributes to averaging by F, a byzantine peer (1 = honest; "
                                          "negative = sign-flipped). Not part of the run spec.")

    # --- local execution ----------------------------------------------------------------
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Forward-pass dtype (autocast); weights, optimizer state and exchanged gradients "
                            "stay fp32, so peers may differ. fp16 adds a dynamic loss scale.")
    memory_fraction: float | None = Field(None, gt=0, le=1, description="Cap on the fraction of GPU memory used.")
    spare_gpu: bool = Field(False, description="Pause training while other processes use the GPU.")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch default).")
    max_steps: int = Field(0, ge=0, description="Stop (drain and exit 0) after this many local steps (0 = run forever).")
    eval_every: int = Field(25, ge=1, description="Evaluate held-out loss every N steps.")
    checkpoint_every: int = Field(50, ge=1, description="Save a local checkpoint every N steps.")
    resume: Literal["auto", "never"] = Field("auto", description="Resume from the checkpoint in --state-dir if present.")

    # --- operations ---------------------------------------------------------------------
    metrics_addr: str = Field("127.0.0.1:9108", description="host:port for /metrics, /livez, /readyz, /status ('off' disables).")
    control_addr: str = Field("127.0.0.1:0", description="host:port of the local gRPC control API used by `swarm-node status`.")
    log_format: Literal["auto", "console", "json"] = Field("auto", description="Console on a TTY, JSON lines otherwise.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log verbosity.")
    status_interval_s: float = Field(10.0, gt=0, description="How often a progress line is printed.")
    startup_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the p2p daemon to start.")
    shutdown_grace_s: float = Field(25.0, ge=0, description="Time allowed to finish the current step on SIGTERM/SIGINT.")
    stall_limit_s: float = Field(120.0, gt=1, description="/livez fails when the loop or training has not beaten for this long.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @field_validator("initial_peers", mode="before")
    @classmethod
    def _split_peers(cls, v: Any) -> Any:
        # Env vars and TOML may give one comma- or space-separated string.
        if isinstance(v, str) and v.strip().startswith("["):
            try:
                return json.loads(v)
            except ValueError:
                raise ValueError("is not a valid JSON list of multiaddrs") from None
        if isinstance(v, str):
            return [p for p in v.replace(",", " ").split() if p]
        return v

    @field_validator("initial_peers")
    @classmethod
    def _check_maddrs(cls, v: list[str]) -> list[str]:
        for addr in v:
            if not addr.startswith("/") or "/p2p/" not in addr:
                raise ValueError(f"{addr!r} is not a peer multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...")
        return v

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, v: str) -> str:
        # Checked here, not when the daemon loads it, so CLI, env and TOML give the same plain error
        # (and `swarm-node check` catches it). available() includes the `swarm_node.strategies`
        # entry points, so a strategy installed by another package is accepted.
        from swarm_node.strategies.registry import available

        installed = available()
        if v not in installed:
            raise ValueError(f"unknown strategy {v!r} (installed: {', '.join(installed)})")
        return v

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        if v == BUILTIN_MODEL:  # the default stays free of torch and transformers imports
            return v
        from swarm_node.train.models import ModelError, check_model_setting

        try:
            check_model_setting(v)
        except ModelError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("metrics_addr", "control_addr")
    @classmethod
    def _check_hostport(cls, v: str) -> str:
        if v == "off":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{v!r} is not host:port (e.g. 127.0.0.1:9108) or 'off'")
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> "NodeSettings":
        if self.model != BUILTIN_MODEL:
            options = option_models().get(self.strategy, NoOptions)
            kind = _model_kind(self.model)
            if kind not in options.MODEL_KINDS:
                kinds = " or ".join({"builtin": "--model builtin", "hf": "a Hugging Face model directory",
                                     "factory": "a factory"}[k] for k in options.MODEL_KINDS)
                raise ValueError(f"{self.strategy} trains {kinds}, not this --model ({options.MODEL_KINDS_REASON})")
        # a strategy with its own forward and backward would silently ignore these two: refused
        reason = option_models().get(self.strategy, NoOptions).OWN_TRAINING_STEP
        if reason and (self.precision != "fp32" or self.grad_accum > 1):
            raise ValueError(f"--precision and --grad-accum do not apply to {self.strategy}: {reason}")
        if self.precision != "fp32":
            _check_precision(self.precision, self.device)
        if self.data_rank is not None and self.data_rank >= self.data_shards:
            raise ValueError(f"--data-rank {self.data_rank} must be below --data-shards ({self.data_shards})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.lr_schedule == "cosine" and self.max_steps <= self.lr_warmup_steps:
            raise ValueError(f"--lr-schedule cosine decays to 0 at --max-steps, which must be set and exceed "
                             f"--lr-warmup-steps ({self.lr_warmup_steps}); got --max-steps {self.max_steps}")
        self.strategy_options().check(self)
        return self

    def strategy_options(self) -> StrategyOptions:
        """The chosen strategy's own settings, as its options model (validated again there)."""
        model = option_models().get(self.strategy, NoOptions)
        return model(**{name: getattr(self, name) for name in model.model_fields})

    @property
    def ttl_s(self) -> float:
        return self.record_ttl_s if self.record_ttl_s is not None else 2.5 * self.announce_interval_s

    def run_spec(self) -> "RunSpec":
        fields = dict(run_id=self.run_id, strategy=self.strategy, data=self.data, data_max_bytes=self.data_max_bytes,
                      seq_len=self.seq_len, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                      batch_size=self.batch_size, lr=self.lr, seed=self.seed, compression=self.compression,
                      data_shards=self.data_shards, grad_accum=self.grad_accum)
        if self.aggregation != "mean":  # the reducer's rule decides everyone's mean
            fields.update(aggregation=self.aggregation, aggregation_clip=self.aggregation_clip,
                          aggregation_trim=self.aggregation_trim)
        if self.model != BUILTIN_MODEL:  # the shape flags size only the built-in GPT (0 = not used); the
            # daemon adds the loaded model's identity (ModelIdentity) once it has built it
            fields.update(n_layer=0, n_head=0, d_model=0)
        if self.lr_schedule != "constant":  # the horizon is part of the schedule every peer must share
            fields.update(lr_schedule=self.lr_schedule, lr_warmup_steps=self.lr_warmup_steps,
                          lr_total_steps=self.max_steps)
        fields.update(self.strategy_options().spec_fields(self))
        return RunSpec(**fields)


class RunSpec(BaseModel):
    """What every peer of a run must agree on. Its hash is the run's identity in the DHT. Beyond
    these fields, the strategy adds its own (its options' `spec_fields`), kept as extra fields."""

    model_config = ConfigDict(frozen=True, extra="allow")

    run_id: str
    strategy: str
    data: str
    data_max_bytes: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    batch_size: int
    lr: float
    seed: int
    compression: str = "none"
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_total_steps: int = 0
    data_fingerprint: str = ""  # sha256 prefix of the loaded corpus: 'stdlib' differs across Pythons
    data_shards: int = 64  # how each step's windows are split (train/sampler.py): peers must agree
    # micro-batches per step: with batch_size it sets the windows each shard draws and the effective
    # batch. (--precision is per peer and not here: exchanged gradients are fp32 whatever it is.)
    grad_accum: int = 1
    aggregation: str = "mean"
    aggregation_clip: float = 1.0
    aggregation_trim: float = 0.2
    # A model brought with --model (train/models.py ModelIdentity); empty for the built-in GPT, whose
    # weights follow from the shape fields and the seed. Never a path: paths differ across machines.
    arch: str = ""  # class of the network
    arch_config: str = ""  # digest of its configuration
    init_weights: str = ""  # hash of its weights before the first step

    def canonical(self) -> dict[str, Any]:
        """The spec without fields at their defaults: a field added in a later version leaves
        the digest of every run that does not use it unchanged, so peers of both versions agree."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def digest(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Human-readable list of fields where `other` (a peer's canonical spec) differs; a field
        missing on either side stands for its default (the strategy's own fields: its options')."""
        fields = {**option_models().get(self.strategy, NoOptions).model_fields, **type(self).model_fields}
        defaults = {k: f.get_default(call_default_factory=True) for k, f in fields.items() if not f.is_required()}
        mine, theirs = {**defaults, **self.canonical()}, {**defaults, **other}
        keys = sorted(set(mine) | set(theirs))
        return [f"{k}: ours={mine.get(k)!r} theirs={theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]


def _check_precision(precision: str, device: str) -> None:
    """Refuse a precision the CPU's torch cannot autocast. Imports torch, so only called off fp32;
    a GPU is probed by the trainer instead, so that loading a config never initialises CUDA."""
    spec = device.strip().lower()
    if spec == "auto":
        import torch

        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec != "cpu":
        return
    from swarm_node.train.precision import PrecisionError, check_precision

    try:
        check_precision(precision, "cpu")
    except PrecisionError as e:
        raise ValueError(str(e)) from None


def _model_kind(setting: str) -> str:
    """"builtin", "hf" or "factory" (the setting was checked by the field validator)."""
    from swarm_node.train.models import parse_model_setting

    return parse_model_setting(setting).kind


def _strategy_fields() -> dict[str, tuple[Any, Any]]:
    """Every installed strategy's option fields, for the merged `NodeConfig`. A field two
    strategies share must be declared alike; one that clashes with a node setting or with
    another strategy's declaration is left out, with a warning (a broken plugin must not
    break the CLI)."""
    fields: dict[str, tuple[Any, Any]] = {}
    shapes: dict[str, tuple[Any, ...]] = {}
    owners: dict[str, str] = {}
    for name, model in option_models().items():
        for field_name, info in model.model_fields.items():
            shape = (info.annotation, info.default, info.description, repr(info.metadata))
            if field_name in NodeSettings.model_fields:
                log.warning("strategy %s: option %r clashes with a node setting; ignored", name, field_name)
            elif field_name in shapes:
                if shapes[field_name] != shape:
                    log.warning("strategy %s declares option %r unlike %s; ignored", name, field_name,
                                owners[field_name])
            else:
                fields[field_name], shapes[field_name], owners[field_name] = (info.annotation, info), shape, name
    return fields


# Everything `swarm-node join` can be told: the node's settings plus every installed strategy's options
# (flags, SWARM_NODE_* variables, TOML keys and --help are all generated from it).
NodeConfig = create_model("NodeConfig", __base__=NodeSettings, __module__=__name__, **_strategy_fields())

# The TOML path is chosen at runtime (--config); pydantic-settings reads it via this slot.
_TOML_FILE: dict[str, Path | None] = {"path": None}


class ConfigError(Exception):
    """A configuration problem explained in plain words (exit code 2)."""


def load_config(cli_values: dict[str, Any], config_file: Path | None = None) -> NodeConfig:
    """Merge CLI values (only those the user actually gave) with env, TOML and defaults."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    _TOML_FILE["path"] = config_file
    try:
        return NodeConfig(**cli_values)
    except ValidationError as e:
        raise ConfigError(explain_validation_error(e)) from None
    except ValueError as e:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"could not read {config_file}: {e}") from None
    finally:
        _TOML_FILE["path"] = None


def explain_validation_error(e: ValidationError) -> str:
    """Plain words, one line per error; a single error is one line in all (what the CLI prints)."""
    lines = ["invalid configuration:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        flag = "--" + field.replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `swarm-node join --help` lists them all)"
        given = err.get("input")
        shown = (f" (got {given!r})" if given is not None and not isinstance(given, dict)
                 and repr(given) not in msg else "")
        if not err["loc"]:  # a rule across several settings
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {flag} / {ENV_PREFIX}{field.upper()}: {msg}{shown}")
    if len(lines) == 2:
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)
