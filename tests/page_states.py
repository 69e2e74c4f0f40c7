"""Page states for the page tests: a NodeStatus, inputs with history, and each family's panel;
and `wait_page_panel`, which reads a live node's panel from its /page.json."""
from __future__ import annotations

import json
import math
import time

from swarm_node.page.book import PageBook, PageInputs
from swarm_node.status import NodeStatus, PeerView, Phase
from swarm_node.strategies.lowcomm.panel import outer_rounds_panel
from swarm_node.strategies.page_panel import PagePanel

HOSTILE = '<img src=x onerror=__pwned=2><script>__pwned=1</script>'
ME = "12D3KooWMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMeMe0000aaaa"


def peer(pid: str, *, device: str = "cpu", step: int = 10, sps: float = 100.0, is_self: bool = False,
         state: str = "online", role: str = "trainer") -> PeerView:
    return PeerView(peer_id=pid, state=state, strategy="diloco", role=role, device=device, step=step,
                    samples_per_s=sps, version="0.1.0", expires_in_s=3.0, is_self=is_self)


def status(*, phase: Phase = Phase.READY, peers: list[PeerView] | None = None, uptime_s: float = 30.0,
           step: int = 40) -> NodeStatus:
    peers = peers if peers is not None else [peer(ME, is_self=True, step=step),
                                             peer("12D3KooWOtherOtherOther000bbbbbbbb", step=38, sps=80.0),
                                             peer("12D3KooWHostileHostile000cccccccc", device=HOSTILE, step=5, sps=5.0)]
    return NodeStatus(peer_id=ME, run_id="demo", version="0.1.0", phase=phase, strategy="diloco", role="trainer",
                      device="cpu", join_maddrs=["/ip4/127.0.0.1/tcp/4001/p2p/" + ME], step=step, train_loss=2.5,
                      val_loss=2.7, samples_per_s=120.0, peers=peers, uptime_s=uptime_s)


def rounds(n: int, start_unix: float, outcomes: tuple[str, ...] = ("ok",)) -> list[dict]:
    return [{"round": i, "outcome": outcomes[i % len(outcomes)], "group_size": 3, "duration_s": 0.2 + 0.01 * i,
             "at": start_unix + 2 * i + 1, "phi_hash": f"{i:016x}", "peer": "12D3KooWLeader000dddddddd"}
            for i in range(n)]


PANELS = {
    "outer_rounds": outer_rounds_panel(rounds(6, time.time(), ("ok", "ok", "resync")), title="diloco outer rounds",
                                       inner_steps=5, round_no=6, phi_hash="ab" * 16),
    "pipeline": PagePanel(kind="pipeline", title="pipeline of 3 stages", facts=[("this peer", "stage 0")],
                          columns=["stage", "servers", "peers (* = this one)", "samples/s", "queue", "step"],
                          rows=[[0, 1, "0000aaaa*", 12.5, 0, 40], [1, 2, HOSTILE, 30.1, 1, 40], [2, 1, "cccccccc", 15.0, 0, 39]]),
    "rollouts": PagePanel(kind="rollouts", title="SAPO rollout sharing", facts=[("cumulative reward", "12.0")],
                          columns=["round", "reward/rollout", "external used"], rows=[[1, 0.25, 4], [2, 0.375, 6]]),
    "coded": PagePanel(kind="coded", title="gradient coding", facts=[("stragglers seen", "3")],
                       columns=["step", "scheme", "s", "members", "stragglers", "wait s"],
                       rows=[[10, "cyclic", 1, 4, "cccccccc", 0.05]]),
}


def filled_book(tmp_path, panel: str = "outer_rounds", *, phase: Phase = Phase.READY, samples: int = 6) -> PageBook:
    """A book with `samples` samples of a run that trains (loss falls, bytes flow, rounds commit)."""
    start = time.time() - 60
    book = PageBook(started_unix=start, state_dir=tmp_path, ttl_s=4.0, sample_interval_s=2.0)
    steps = [[s, 3.0 * math.exp(-s / 40) + 1.0, (2.9 * math.exp(-s / 40) + 1.1) if s % 10 == 0 else None, s * 0.5]
             for s in range(1, 81)]
    for i in range(samples):
        book.observe(status(phase=phase, uptime_s=10.0 + 2 * i, step=40 + i),
                     PageInputs(memory_bytes=300 << 20, tx_total=1e5 * i, rx_total=2e5 * i, stragglers_total=i // 2,
                                rejections={"spec_mismatch": 0}, round_history=rounds(6, start),
                                step_history=steps, panel=PANELS[panel].to_json(),
                                join_line="swarm-node join --initial-peers /ip4/127.0.0.1/tcp/4001/p2p/" + ME),
                     now_mono=100.0 + 2 * i)
    return book


def wait_page_panel(node, ready, timeout_s: float = 20.0) -> dict:
    """The strategy panel of a live node's /page.json once `ready(panel)` holds (sampled every 2 s)."""
    deadline = time.monotonic() + timeout_s
    panel = None
    while time.monotonic() < deadline:
        code, body = node.http("/page.json")
        panel = json.loads(body).get("panel") if code == 200 else None
        if panel and ready(panel):
            return panel
        time.sleep(0.5)
    raise AssertionError(f"page panel not ready: {panel}")
