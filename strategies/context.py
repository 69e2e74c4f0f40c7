"""What a strategy is given: a narrow context, not the node.

`StrategyContext` carries the transport, a typed record store, the clock, the compute thread,
a trainer API, the metrics, progress, this strategy's own options and the few node settings a
strategy may read (`NodeSettings`). It never carries the node's config, its membership table
or its trainer class: `PeerView` and `TrainerAPI` are the parts of them a strategy may use.
Progress has one owner: its step is read from the strategy (`Strategy.current_step`), whose
own step moves only inside the trainer (gradients or `align_step`).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from swarm_node.protocol.averaging.deadlines import Deadlines
from swarm_node.strategies.options import NoOptions, StrategyOptions

if TYPE_CHECKING:
    import torch

    from swarm_node.protocol.records import RecordStore
    from swarm_node.protocol.averaging.robust import AggregationRule
    from swarm_node.protocol.transport import Transport


def _dht_time() -> float:
    from swarm_node.protocol.clock import swarm_time  # hivemind: not loaded by the CLI's config parsing
    return swarm_time()


@dataclass(frozen=True)
class NodeSettings:
    """The node's settings a strategy may read; its own come as `StrategyContext.options`."""

    max_steps: int = 0  # 0: no limit
    seed: int = 0
    lr: float = 3e-3
    min_peers: int = 1  # peers (me included) before the first step
    quorum: int = 0  # run-long quorum of sync and gradcode (0: majority of the last committed round)
    joined: bool = False  # started with initial peers (not the first peer of a swarm)
    new_swarm: bool = False
    ttl_s: float = 37.5  # lifetime of a DHT record
    round_timeout_s: float = 20.0
    shutdown_grace_s: float = 25.0
    announce_interval_s: float = 15.0
    compute_slowdown: float = 1.0  # > 1: a simulated slower device
    compression: str = "none"  # of averaged tensors
    aggregation: str = "mean"  # mean | clipped | trimmed (protocol/averaging/robust.py)
    aggregation_clip: float = 1.0
    aggregation_trim: float = 0.2
    lab_contribution_scale: float = 1.0  # a byzantine peer in a lab: what it contributes, scaled
    allreduce_transport: str = "auto"  # auto | p2p | tcp (bulk TCP for large all-reduce parts)
    allreduce_tcp_port: int = 0
    host: str = "0.0.0.0"
    announce_host: str | None = None
    state_dir: Path = Path(".")
    identity_path: Path = Path("identity.key")  # this peer's key, for a sidecar that must speak as it

    @property
    def aggregation_rule(self) -> "AggregationRule":
        from swarm_node.protocol.averaging.robust import Aggregation, AggregationRule  # torch: not at config time
        return AggregationRule(Aggregation(self.aggregation), self.aggregation_clip, self.aggregation_trim)

    @classmethod
    def of(cls, config: Any) -> "NodeSettings":
        """Read by name from any config object (missing names keep their defaults)."""
        values = {f.name: getattr(config, f.name) for f in fields(cls)
                  if f.name not in ("joined", "identity_path") and hasattr(config, f.name)}
        values["joined"] = bool(getattr(config, "initial_peers", ()))
        if hasattr(config, "state_dir"):
            values["identity_path"] = Path(config.state_dir) / "identity.key"
        if values.get("max_steps") is None:
            values["max_steps"] = 0
        return cls(**values)


class MemberRecord(Protocol):
    peer_id: str
    strategy: str
    maddrs: list[str]


class Member(Protocol):
    @property
    def peer_id(self) -> str: ...
    record: MemberRecord  # and more (stage, throughput, ...) as the node announces


class PeerView(Protocol):
    """Who else is in the run, as this peer currently sees it."""

    def others(self) -> list[Member]: ...
    def now(self) -> float: ...  # DHT time
    def left_since(self, since: float, strategy: str | None = None) -> int: ...
    async def announce(self, state: str = "online", ttl_s: float | None = None) -> bool: ...
    def own_maddrs(self) -> list[str]: ...


class Batches(Protocol):
    def train_batch(self, batch_size: int, seq_len: int, gen: Any) -> tuple["torch.Tensor", "torch.Tensor"]: ...
    def val_batches(self, batch_size: int, seq_len: int, n: int) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]: ...


class TrainerAPI(Protocol):
    """The local trainer as a strategy uses it: batches, forward/backward, apply, parameters, state."""

    @property
    def step(self) -> int: ...  # read-only here: it moves by `apply_gradients` or `align_step`
    device: "torch.device"
    model: "torch.nn.Module"
    optimizer: "torch.optim.Optimizer"
    dataset: Batches

    def parameters_list(self) -> list["torch.nn.Parameter"]: ...
    def parameter_names(self) -> list[str]: ...
    def param_hash(self) -> str: ...
    def compute_gradients(self, step: int) -> Any: ...
    def compute_coded_gradients(self, step: int, parts: list[tuple[int, float]]) -> Any: ...
    def apply_gradients(self, grads: list["torch.Tensor"]) -> None: ...
    def align_step(self, step: int) -> None: ...
    def state_dict(self, strategy_state: dict[str, Any] | None = None) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Training progress the node reports in /status, metrics and the console. Its step is
    read, never written: from the strategy once it runs (`follow`)."""

    train_loss: float | None = None
    val_loss: float | None = None
    samples_per_s: float = 0.0
    last_round: dict[str, Any] = field(default_factory=dict)
    waiting_for: str | None = None
    state: str = "joining"  # joining until this peer's replica agrees with the swarm
    below_quorum: bool = False  # waiting: it sees fewer peers than the run-long quorum (sync, gradcode)
    # peer id -> unix time robust aggregation last flagged it (clipped or dropped repeatedly)
    suspected: dict[str, float] = field(default_factory=dict)
    _step_of: Callable[[], int] = field(default=lambda: 0, repr=False)

    @property
    def step(self) -> int:
        return self._step_of()

    def follow(self, step_of: Callable[[], int]) -> None:
        self._step_of = step_of


@dataclass
class StrategyContext:
    node: NodeSettings
    spec: Any  # the run spec (RunSpec): every peer's equal settings, model size, batch shape
    peer_id: str
    transport: "Transport"
    peers: PeerView
    metrics: Any  # NodeMetrics: the node's Prometheus registry and its shared counters
    trainer: TrainerAPI
    compute: Callable[..., "asyncio.Future[Any]"]  # run a blocking fn on the compute thread
    progress: Progress
    should_stop: Callable[[], bool]
    on_step: Callable[[], "asyncio.Future[None] | Any"]  # node hook: eval, checkpoint, heartbeat
    log: logging.Logger
    options: StrategyOptions = field(default_factory=NoOptions)  # this strategy's own settings
    records: "RecordStore | None" = None  # per-peer DHT records (None where a test runs without a DHT)
    clock: Callable[[], float] = _dht_time  # DHT time, the same on every peer

    @property
    def deadlines(self) -> Deadlines:
        """Every wait of an exchange, derived from `round_timeout_s`."""
        return Deadlines(self.node.round_timeout_s)
