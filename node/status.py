"""Snapshot records describing a running node.

These are the one shape shared by `/status` (HTTP JSON), the gRPC control service and the
`swarm-node status` / `swarm-node peers` tables. The daemon builds a fresh `NodeStatus` on
its event loop; readers in other threads only ever see complete, immutable snapshots.
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class Phase(str, Enum):
    """Lifecycle phase; `/readyz` is 200 only in READY."""

    STARTING = "starting"
    READY = "ready"
    ISOLATED = "isolated"  # had peers, now sees none: the watchdog is reconnecting
    WAITING = "waiting"  # sees fewer peers than the run-long quorum: holds still instead of forking
    DRAINING = "draining"
    STOPPED = "stopped"


class PeerView(BaseModel):
    """One peer as this node currently sees it (from its DHT record)."""

    model_config = ConfigDict(frozen=True)

    peer_id: str
    state: str  # online | joining | leaving
    strategy: str
    role: str
    device: str
    step: int
    samples_per_s: float
    version: str
    expires_in_s: float
    is_self: bool = False


class NodeStatus(BaseModel):
    """Everything a person or a test wants to know about one node, at one instant."""

    model_config = ConfigDict(frozen=True)

    peer_id: str
    run_id: str
    version: str
    phase: Phase
    strategy: str
    role: str
    device: str
    join_maddrs: list[str] = Field(default_factory=list)
    step: int = 0
    resumed_from_step: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    samples_per_s: float = 0.0
    routing_table_size: int = 0
    peers: list[PeerView] = Field(default_factory=list)
    last_round: dict = Field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    uptime_s: float = 0.0
    checks: dict[str, bool] = Field(default_factory=dict)
    waiting_for: str | None = None  # human-readable reason when stuck, e.g. "peers: 1/2"
