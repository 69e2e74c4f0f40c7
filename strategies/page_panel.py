"""PagePanel: what a strategy shows on the node's page (`GET /`), in words and one table.

A strategy builds its panel on the event loop from its own state (`Strategy.page_panel`); the
node only serializes it. Cells are numbers or short strings; the page escapes every string, so
a peer id or a detail copied from a peer's message is safe here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Cell = str | int | float | None
MAX_ROWS = 40  # the page shows recent history, not the whole run


@dataclass(frozen=True)
class PagePanel:
    kind: str  # the family: rounds | outer_rounds | pipeline | rollouts | coded
    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)  # (label, value in words)
    columns: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "facts": [[k, v] for k, v in self.facts],
                "columns": list(self.columns), "rows": [list(r) for r in self.rows[-MAX_ROWS:]]}


def short_peer(peer: Any) -> str:
    """The last 8 characters of a peer id (what logs and tables show), '' for none."""
    return str(peer)[-8:] if peer else ""


def outcome_counts(history: Sequence[dict[str, Any]]) -> str:
    """'ok 12 · error 1' from round-history entries, most common first."""
    counts: dict[str, int] = {}
    for h in history:
        counts[str(h.get("outcome"))] = counts.get(str(h.get("outcome")), 0) + 1
    return " · ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none yet"
