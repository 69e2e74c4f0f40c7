"""Node configuration: one validated record built from CLI flags, env vars and a TOML file.

Precedence: CLI flag > environment (`SWARM_NODE_<FIELD>`) > TOML file (`--config`) > default.
Every field here is a `swarm-node join` flag (`--field-name`), so the three sources never
drift apart. Validation errors are rendered in plain words by `explain_validation_error`
and the CLI exits with code 2.

The *run spec* (model, data, strategy and its hyperparameters) is the part of the config
that must be identical on every peer of a run; `RunSpec` carries it and its hash is
published in the DHT (see protocol/records.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

ENV_PREFIX = "SWARM_NODE_"
DEFAULT_STATE_DIR = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "swarm-node"


class NodeConfig(BaseSettings):
    """Everything `swarm-node join` can be told. Field descriptions double as `--help` text."""

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
    strategy: str = Field("sync", description="Synchronization strategy (see `swarm-node strategies`).")
    data: str = Field("stdlib", description="Training text: 'stdlib' (Python's own sources) or a file/directory path.")
    data_max_bytes: int = Field(4 << 20, gt=1024, description="Read at most this many bytes of training text.")
    seq_len: int = Field(64, ge=8, le=4096, description="Tokens (bytes) per training sequence.")
    n_layer: int = Field(2, ge=1, le=48, description="Transformer layers.")
    n_head: int = Field(4, ge=1, le=64, description="Attention heads.")
    d_model: int = Field(128, ge=8, le=8192, description="Model width.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per local step.")
    lr: float = Field(3e-3, gt=0, le=10, description="Learning rate of the local optimizer (AdamW).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Local learning-rate schedule: constant, or cosine (linear warmup over "
                                "--lr-warmup-steps, then cosine decay to 0 at --max-steps, which it requires).")
    lr_warmup_steps: int = Field(0, ge=0, description="Warmup steps of the cosine schedule.")
    seed: int = Field(0, ge=0, description="Seed for model init and data order.")
    round_timeout_s: float = Field(20.0, gt=0, description="Longest wait for the other peers in one synchronization round.")
    round_grace_s: float | None = Field(None, gt=0, le=3600, description="DiLoCo family: after the first peer joins "
                                        "a round, how long it waits for the other expected peers before it goes on "
                                        "with those that joined, the leader included only if it was ready (the "
                                        "deadline quorum; unset = wait for all up to --round-timeout-s after the "
                                        "leader is ready).")
    compute_slowdown: float = Field(1.0, ge=1.0, le=100.0, description="Simulate a slower device: after each local "
                                    "step sleep (F-1) x that step's compute time, so this peer computes F times "
                                    "slower without loading the CPU (benchmarks and labs; 1 = off).")
    inner_steps: int = Field(50, ge=1, le=100_000, description="DiLoCo family: local steps between outer rounds (H).")
    outer_lr: float = Field(0.7, gt=0, le=10, description="DiLoCo family: outer SGD learning rate.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="DiLoCo family: outer momentum (Nesterov for diloco).")
    fragments: int = Field(5, ge=1, le=1024, description="streaming-diloco: fragments synced in turn (P; must divide H).")
    overlap_steps: int = Field(1, ge=0, description="streaming-diloco: local steps a fragment's exchange overlaps (tau < H/P).")
    mix_alpha: float = Field(0.5, ge=0, le=1, description="streaming-diloco: merge weight of the local fragment (alpha).")
    compression: Literal["none", "fp16", "int8", "e3m0"] = Field(
        "none", description="Wire compression of averaged tensors (accumulation is always fp32).")
    gc_scheme: Literal["auto", "frc", "cyclic", "none"] = Field(
        "auto", description="gradcode: fractional repetition (frc, needs (s+1) | n), cyclic (any n), auto (frc "
        "when it fits, else cyclic) or none (wait for every peer).")
    gc_stragglers: int = Field(1, ge=0, le=64, description="gradcode: stragglers tolerated per step (s); each peer "
                               "computes (s+1)/n of the step's data.")
    stages: int = Field(3, ge=1, le=64, description="swarm: pipeline stages S (--n-layer must be divisible by S).")
    micro_batches: int = Field(2, ge=1, le=256, description="swarm: micro-batches per trainer step (each stage "
                               "replica applies one optimizer step per this many backwards).")
    act_compression: Literal["fp16", "int8", "none"] = Field(
        "fp16", description="swarm: wire encoding of activations and their gradients (int8 = blockwise absmax).")
    sapo_tasks: str = Field("add4", description="sapo: comma-separated tasks (add<K>, sub<K>, mul<K>; rg:<dataset> "
                            "with reasoning-gym installed).", pattern=r"^[A-Za-z0-9_:,.-]{1,256}$")
    sapo_group_size: int = Field(8, ge=2, le=64, description="sapo: completions per question (G).")
    sapo_round_s: float = Field(10.0, gt=0.5, le=3600, description="sapo: length of a swarm round (rounds are "
                                "wall-clock epochs, the same on every peer).")
    sapo_questions: int = Field(8, ge=1, le=64, description="sapo: questions this peer generates G completions "
                                "for and publishes each round (Q).")
    sapo_local_groups: int = Field(4, ge=1, le=64, description="sapo: local groups per update (I <= Q, chosen from "
                                   "this round's Q by --sapo-local-select).")
    sapo_local_select: Literal["informative", "first"] = Field(
        "informative", description="sapo: which I of the Q own groups to train on: drawn from those with non-zero "
                                   "reward variance (padded with the rest), or the first I.")
    sapo_external_groups: int = Field(4, ge=0, le=64, description="sapo: external groups per update (J; 0 = silo).")
    sapo_negative_scale: float = Field(0.0, ge=0, le=1, description="sapo: scale on negative advantages of external "
                                       "groups (0 = use only their positives; 1 = the paper).")
    sapo_deadline_frac: float = Field(0.6, gt=0, lt=1, description="sapo: fraction of the round after which this "
                                      "peer stops waiting for external rollouts and trains.")
    sapo_max_new_tokens: int = Field(6, ge=1, le=512, description="sapo: generated tokens per completion.")
    sapo_temperature: float = Field(1.0, gt=0, le=5, description="sapo: sampling temperature.")
    sapo_ppo_epochs: int = Field(4, ge=1, le=32, description="sapo: optimizer steps per round on the same batch.")
    sapo_warmstart_steps: int = Field(150, ge=0, le=100_000, description="sapo: supervised steps on the answer "
                                      "format (random digits) before the first round of a fresh model.")
    sapo_format_reward: float = Field(0.0, ge=0, le=1, description="sapo: reward for a well-formed wrong answer.")
    sapo_rounds: int = Field(0, ge=0, description="sapo: stop (drain, exit 0) after this many rounds (0 = forever).")
    sapo_peer_seed: int = Field(0, ge=0, description="sapo: seed of this peer's question and sampling draws (0 = "
                                "derived from the peer id). Not part of the run spec.")
    sapo_hf_model: str | None = Field(None, description="sapo: local path of a Hugging Face causal LM to use as the "
                                      "policy (needs transformers installed; default: the byte-level GPT).")

    # --- straggler injection (tests and benches; not part of the run spec) --------------
    straggler_delay_s: float = Field(0.0, ge=0, le=600, description="gradcode: seconds a chosen straggler waits "
                                     "before contributing (0 = no injection).")
    straggler_count: int = Field(1, ge=0, le=64, description="gradcode: peers chosen (seeded, the same on every "
                                 "peer) to straggle in a step.")
    straggler_prob: float = Field(1.0, ge=0, le=1, description="gradcode: probability that a step has stragglers.")
    stage: str = Field("auto", pattern=r"^(auto|[0-9]{1,2})$", description="swarm: stage this peer serves "
                       "(auto = an empty stage if any, else the one with the least capacity).")
    rebalance_interval_s: float = Field(300.0, ge=0, description="swarm: mean seconds between rebalancing checks "
                                        "(each at a random time in [0, 2T]; 0 = never move).")
    stage_average_interval_s: float = Field(5.0, gt=0, description="swarm: seconds between averaging rounds "
                                            "of a stage's replicas (all-reduce; a mix with one replica if it fails).")
    checkfree_lr_scale: float = Field(1.1, gt=0, le=10, description="swarm: learning-rate multiplier of a stage "
                                      "rebuilt by CheckFree.")
    checkfree_swaps: bool = Field(False, description="swarm: CheckFree+ swap schedule: odd micro-batches run the "
                                  "bodies of stages 0<->1 and S-2<->S-1 in swapped order (with 3 stages they "
                                  "alternate), so a lost last stage is rebuilt by copying stage S-2. Part of the "
                                  "run spec.")
    swarm_backward_delay_s: float = Field(0.0, ge=0, le=600, description="swarm: seconds a stage server sleeps "
                                          "inside each backward (fault injection for tests).")

    # --- local execution ----------------------------------------------------------------
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
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
    def _check_combination(self) -> "NodeConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.lr_schedule == "cosine" and self.max_steps <= self.lr_warmup_steps:
            raise ValueError(f"--lr-schedule cosine decays to 0 at --max-steps, which must be set and exceed "
                             f"--lr-warmup-steps ({self.lr_warmup_steps}); got --max-steps {self.max_steps}")
        if self.strategy == "sapo":
            self._check_sapo()
        if self.strategy == "streaming-diloco":
            H, P, tau = self.inner_steps, self.fragments, self.overlap_steps
            if H % P:
                raise ValueError(f"streaming-diloco needs --inner-steps ({H}) divisible by --fragments ({P})")
            if tau >= H // P:
                raise ValueError(f"streaming-diloco needs --overlap-steps ({tau}) < inner-steps/fragments ({H // P})")
        if self.strategy == "swarm":
            if self.n_layer % self.stages:
                raise ValueError(f"swarm needs --n-layer ({self.n_layer}) divisible by --stages ({self.stages})")
            if self.stage != "auto" and int(self.stage) >= self.stages:
                raise ValueError(f"--stage {self.stage} out of range for --stages {self.stages}")
        return self

    def _check_sapo(self) -> None:
        from swarm_node.strategies.sapo import tasks as sapo_tasks  # pure stdlib: cheap, and only for sapo

        if self.sapo_local_groups > self.sapo_questions:
            raise ValueError(f"sapo needs --sapo-local-groups ({self.sapo_local_groups}) <= --sapo-questions "
                             f"({self.sapo_questions})")
        try:
            names = sapo_tasks.parse_task_list(self.sapo_tasks)
        except sapo_tasks.TaskError as e:
            raise ValueError(f"--sapo-tasks: {e}") from None
        longest = max((sapo_tasks.max_prompt_chars(t) or 0) for t in names)
        if longest + self.sapo_max_new_tokens + 1 > self.seq_len and not self.sapo_hf_model:
            raise ValueError(f"sapo needs --seq-len >= {longest + self.sapo_max_new_tokens + 1} for these tasks "
                             f"(question up to {longest} bytes + --sapo-max-new-tokens + end of answer)")
        if self.sapo_hf_model:
            import importlib.util

            if importlib.util.find_spec("transformers") is None:
                raise ValueError("--sapo-hf-model needs transformers installed (pip install transformers); "
                                 "without it, leave the flag out to use the byte-level GPT")
            if not Path(self.sapo_hf_model).is_dir():
                raise ValueError(f"--sapo-hf-model {self.sapo_hf_model} is not a local model directory")

    @property
    def ttl_s(self) -> float:
        return self.record_ttl_s if self.record_ttl_s is not None else 2.5 * self.announce_interval_s

    def run_spec(self) -> "RunSpec":
        fields = dict(run_id=self.run_id, strategy=self.strategy, data=self.data, data_max_bytes=self.data_max_bytes,
                       seq_len=self.seq_len, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                       batch_size=self.batch_size, lr=self.lr, seed=self.seed, inner_steps=self.inner_steps,
                       outer_lr=self.outer_lr, outer_momentum=self.outer_momentum, compression=self.compression,
                       fragments=self.fragments, overlap_steps=self.overlap_steps, mix_alpha=self.mix_alpha,
                       gc_scheme=self.gc_scheme, gc_stragglers=self.gc_stragglers, stages=self.stages,
                       micro_batches=self.micro_batches, act_compression=self.act_compression)
        if self.lr_schedule != "constant":  # the horizon is part of the schedule every peer must share
            fields.update(lr_schedule=self.lr_schedule, lr_warmup_steps=self.lr_warmup_steps,
                          lr_total_steps=self.max_steps)
        if self.checkfree_swaps:  # only when on: runs without it keep their digest
            fields.update(checkfree_swaps=True)
        fields.update(self._sapo_spec_fields())
        return RunSpec(**fields)

    def _sapo_spec_fields(self) -> dict[str, Any]:
        """sapo peers own their policies and may differ in model size: the model-size fields
        are left out of the spec (0 = per peer), and the fields whose mismatch would break
        the exchange (G, tasks, the round clock) are put in. Other strategies: unchanged."""
        if self.strategy != "sapo":
            return {}
        return {"n_layer": 0, "n_head": 0, "d_model": 0, "sapo_group_size": self.sapo_group_size,
                "sapo_round_s": self.sapo_round_s, "sapo_tasks": self.sapo_tasks}


class RunSpec(BaseModel):
    """What every peer of a run must agree on. Its hash is the run's identity in the DHT."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "none"
    fragments: int = 5
    overlap_steps: int = 1
    mix_alpha: float = 0.5
    gc_scheme: str = "auto"
    gc_stragglers: int = 1
    stages: int = 3
    micro_batches: int = 2
    act_compression: str = "fp16"
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_total_steps: int = 0
    checkfree_swaps: bool = False  # swarm: every peer must run the same schedule
    sapo_group_size: int = 0  # 0 = not a sapo run
    sapo_round_s: float = 0.0
    sapo_tasks: str = ""
    data_fingerprint: str = ""  # sha256 prefix of the loaded corpus: 'stdlib' differs across Pythons

    def canonical(self) -> dict[str, Any]:
        """The spec without fields at their defaults: a field added in a later version leaves
        the digest of every run that does not use it unchanged, so peers of both versions agree."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def digest(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Human-readable list of fields where `other` (a peer's canonical spec) differs; a field
        missing on either side stands for its default."""
        defaults = {k: f.get_default(call_default_factory=True) for k, f in type(self).model_fields.items()
                    if not f.is_required()}
        mine, theirs = {**defaults, **self.canonical()}, {**defaults, **other}
        keys = sorted(set(mine) | set(theirs))
        return [f"{k}: ours={mine.get(k)!r} theirs={theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]


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
    lines = ["invalid configuration:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        flag = "--" + field.replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `swarm-node join --help` lists them all)"
        given = err.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        if not err["loc"]:  # a rule across several settings
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {flag} / {ENV_PREFIX}{field.upper()}: {msg}{shown}")
    return "\n".join(lines)
