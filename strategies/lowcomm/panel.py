"""The page panel of the DiLoCo family: outer rounds and whether the swarm agreed on φ.

A DiLoCo round only commits when every member joined it with the same hash of φ (the outer
weights) and the same round number; a member that differs is told to resync. So "agreement"
here is the protocol's own check, counted over this peer's recent rounds: committed rounds
(every member on one φ) against resyncs (this peer's φ differed and it downloaded the swarm's).
NoLoCo has no shared φ (pairs pull replicas together), so its panel shows partners and spreads.
"""
from __future__ import annotations

from typing import Any

from swarm_node.strategies.page_panel import PagePanel, outcome_counts, short_peer

RECENT = 12


def outer_rounds_panel(history: list[dict[str, Any]], *, title: str, inner_steps: int, round_no: int,
                       phi_hash: str) -> PagePanel:
    recent, window = history[-RECENT:], history[-200:]
    committed = sum(1 for h in window if h["outcome"] == "ok")
    resyncs = sum(1 for h in window if h["outcome"] == "resync")
    agreement = (f"{committed} of the last {len(window)} rounds committed with every member on one φ; "
                 f"{resyncs} resync{'s' if resyncs != 1 else ''}") if window else "no round yet"
    return PagePanel(
        kind="outer_rounds", title=title,
        facts=[("outer round", str(round_no)), ("inner steps per round", str(inner_steps)),
               ("φ hash", phi_hash[:16]), ("φ agreement", agreement), ("rounds", outcome_counts(window))],
        columns=["round", "outcome", "group", "duration s", "φ after", "leader"],
        rows=[[h.get("round"), h["outcome"], h["group_size"], h["duration_s"], str(h.get("phi_hash", ""))[:12],
               short_peer(h.get("peer"))] for h in recent])


def pair_rounds_panel(history: list[dict[str, Any]], *, inner_steps: int) -> PagePanel:
    recent, window = history[-RECENT:], history[-200:]
    partners = {h.get("peer") for h in window if h["outcome"] == "ok" and h.get("peer")}
    return PagePanel(
        kind="outer_rounds", title="noloco pair rounds",
        facts=[("inner steps per round", str(inner_steps)), ("rounds", outcome_counts(window)),
               ("distinct partners", str(len(partners)))],
        columns=["round", "outcome", "duration s", "partner"],
        rows=[[h.get("round"), h["outcome"], h["duration_s"], short_peer(h.get("peer"))] for h in recent])
