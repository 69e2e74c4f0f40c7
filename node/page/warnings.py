"""The page's warnings: what is wrong with this node, in words, from numbers it already has.

Each rule is a plain function of `WarningInputs`, so every warning can be induced in a test
without a network. Counted rejections warn while they keep happening (an increase within
`RECENT_S`), so one malformed record an hour ago does not colour the page forever.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from swarm_node.page.state import PageWarning

RECENT_S = 300.0
ABORT_OUTCOMES = ("error", "timeout")
ABORTS_IN_A_ROW = 3
DISK_LOW_BYTES = 1 << 30
DISK_LOW_FRACTION = 0.05

# counted rejection reason -> (level, what it means)
REJECTION_WARNINGS = {
    "spec_mismatch": ("warn", "peers announcing another run spec for this run id were ignored: someone joined "
                              "with different training flags"),
    "forged_record": ("error", "records with a bad signature (or claiming another peer's id) were refused"),
    "clipped_contribution": ("warn", "averaging contributions were clipped by robust aggregation"),
    "non_finite_contribution": ("warn", "averaging contributions with NaN or inf were dropped"),
}
_CODES = {"spec_mismatch": "spec_mismatch", "forged_record": "rejected", "clipped_contribution": "rejected",
          "non_finite_contribution": "rejected"}


@dataclass
class WarningInputs:
    phase: str
    waiting_for: str | None = None
    # reason -> (cumulative count, unix time of the last increase seen)
    rejections: dict[str, tuple[int, float]] = field(default_factory=dict)
    recent_outcomes: list[str] = field(default_factory=list)  # round outcomes, oldest first
    suspected: dict[str, float] = field(default_factory=dict)  # peer id -> unix time suspected
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    now: float = field(default_factory=time.time)


def find_warnings(x: WarningInputs) -> list[PageWarning]:
    out: list[PageWarning] = []
    if x.phase == "isolated":
        out.append(PageWarning(code="isolated", level="error", text="isolated: this node had peers and now reaches "
                               "none; it keeps re-dialling its initial peers (check the network or the swarm)"))
    elif x.phase == "waiting":
        out.append(PageWarning(code="waiting", level="warn", text=f"waiting, not training: {x.waiting_for or 'too few peers'}"))
    elif x.phase == "draining":
        out.append(PageWarning(code="draining", level="warn", text="draining: this node is leaving the swarm"))
    for reason, (count, last) in sorted(x.rejections.items()):
        if reason in REJECTION_WARNINGS and count > 0 and x.now - last <= RECENT_S:
            level, meaning = REJECTION_WARNINGS[reason]
            out.append(PageWarning(code=_CODES[reason], level=level, text=f"{meaning} ({count} so far)"))
    tail = x.recent_outcomes[-ABORTS_IN_A_ROW:]
    if len(tail) == ABORTS_IN_A_ROW and all(o in ABORT_OUTCOMES for o in tail):
        out.append(PageWarning(code="repeated_aborts", level="error", text=f"the last {ABORTS_IN_A_ROW} rounds "
                               f"aborted ({', '.join(tail)}): the swarm is not synchronizing"))
    for peer, at in sorted(x.suspected.items()):
        if x.now - at <= RECENT_S:
            out.append(PageWarning(code="peer_suspected", level="warn", text=f"peer …{peer[-8:]} suspected: its "
                                   "contributions were clipped or dropped again and again"))
    if x.disk_free_bytes is not None and x.disk_total_bytes:
        if x.disk_free_bytes < DISK_LOW_BYTES or x.disk_free_bytes < DISK_LOW_FRACTION * x.disk_total_bytes:
            out.append(PageWarning(code="disk_low", level="error", text=f"disk almost full: "
                                   f"{x.disk_free_bytes / 2**30:.2f} GiB free where checkpoints are written"))
    return out
