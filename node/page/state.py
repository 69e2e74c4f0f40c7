"""PageState: the JSON document behind the node's page (`GET /page.json`).

Built from the same snapshot as `/status` plus the page's own bounded history. Every string a
peer could have chosen (ids, device names, round details) reaches the browser only as data: the
page writes it with `textContent`, never as markup.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Cell = str | int | float | None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PageNode(_Frozen):
    peer_id: str
    short_id: str
    run_id: str
    version: str
    strategy: str
    role: str
    device: str
    memory_bytes: int  # held for training: CUDA bytes allocated, else the process's resident set
    phase: str  # starting | ready | isolated | waiting | draining | stopped
    step: int
    samples_per_s: float
    train_loss: float | None
    val_loss: float | None
    uptime_s: float
    join_line: str  # "" until the node has an address others can dial
    waiting_for: str | None


class PagePeer(_Frozen):
    peer_id: str
    short_id: str
    state: str
    role: str
    device: str
    samples_per_s: float
    step: int
    last_seen_s: float  # since its latest heartbeat record, from the record's expiry
    is_self: bool


class LossSeries(_Frozen):
    """Per local step (downsampled to at most a few hundred points)."""
    step: list[int]
    t: list[float]  # seconds since the node started
    train: list[float | None]
    val: list[float | None]


class RateSeries(_Frozen):
    """Per page sample (every few seconds), rates over the interval before it."""
    t: list[float]
    samples_per_s: list[float]
    tx_bps: list[float]
    rx_bps: list[float]
    stragglers: list[float]  # cumulative count
    peers: list[int]


class RoundPoint(_Frozen):
    t: float  # seconds since the node started
    duration_s: float
    outcome: str  # ok | error | timeout | resync | no_peers | ...


class PageWarning(_Frozen):
    code: str  # isolated | waiting | draining | spec_mismatch | repeated_aborts | peer_suspected | disk_low | rejected
    level: str  # warn | error
    text: str


class PagePanelJSON(_Frozen):
    kind: str
    title: str
    facts: list[tuple[str, str]]
    columns: list[str]
    rows: list[list[Cell]]


class PageState(_Frozen):
    generated_at: float  # unix time
    sample_interval_s: float
    node: PageNode
    peers: list[PagePeer]
    loss: LossSeries
    rates: RateSeries
    rounds: list[RoundPoint] = Field(default_factory=list)
    panel: PagePanelJSON | None = None
    warnings: list[PageWarning] = Field(default_factory=list)
