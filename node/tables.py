"""Plain-text tables for `swarm-node status` and `swarm-node peers`.

Rendered by rich into a string without colour or terminal codes, so the output reads the
same on a terminal, in a pipe and in a bug report. Peer ids are shortened unless `wide`;
join multiaddrs are never shortened or wrapped (people copy them), so they follow the
table as plain lines.
"""
from __future__ import annotations

from io import StringIO

from rich import box
from rich.console import Console
from rich.table import Table

from swarm_node.status import NodeStatus, PeerView

WIDTH = 120


def short_id(peer_id: str, wide: bool = False) -> str:
    """First 6 + "…" + last 6 characters; ids short enough already (or `wide`) stay whole."""
    return peer_id if wide or len(peer_id) <= 13 else f"{peer_id[:6]}…{peer_id[-6:]}"


def format_status(st: NodeStatus, *, wide: bool = False) -> str:
    t = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    resumed = f" (resumed from {st.resumed_from_step})" if st.resumed_from_step is not None else ""
    rows = [
        ("peer", short_id(st.peer_id, wide)),
        ("run", st.run_id),
        ("version", st.version),
        ("phase", st.phase.value + (f" — waiting for {st.waiting_for}" if st.waiting_for else "")),
        ("strategy / role", f"{st.strategy} / {st.role}"),
        ("device", st.device),
        ("step", f"{st.step}{resumed}"),
        ("loss", f"train {_num(st.train_loss)}  val {_num(st.val_loss)}"),
        ("samples/s", f"{st.samples_per_s:,.1f}"),
        ("routing table", str(st.routing_table_size)),
        ("peers", f"{len(st.peers)} seen ({_count_states(st.peers)})" if st.peers else "0 seen"),
        ("last round", _round(st.last_round)),
        ("traffic", f"sent {_bytes(st.bytes_sent)}  received {_bytes(st.bytes_received)}"),
        ("uptime", _duration(st.uptime_s)),
        ("checks", "  ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in st.checks.items()) or "-"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    out = _render(t, wide)
    joins = "\n".join(f"join address: {m}" for m in st.join_maddrs) or "join address: (none yet)"
    return f"{out}{joins}\n"


def format_peers(peers: list[PeerView], *, wide: bool = False) -> str:
    """One row per peer, this node first (marked `*`), then by peer id."""
    if not peers:
        return "no peers seen\n"
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in [
        ("peer", "left"), ("state", "left"), ("strategy", "left"), ("role", "left"), ("device", "left"),
        ("step", "right"), ("samples/s", "right"), ("version", "left"), ("expires in", "right"),
    ]:
        t.add_column(name, justify=justify, no_wrap=(name == "peer"))
    for p in sorted(peers, key=lambda p: (not p.is_self, p.peer_id)):
        t.add_row(
            ("* " if p.is_self else "  ") + short_id(p.peer_id, wide), p.state, p.strategy, p.role, p.device,
            str(p.step), f"{p.samples_per_s:,.1f}", p.version, f"{p.expires_in_s:.0f}s",
        )
    return _render(t, wide)


def _render(table: Table, wide: bool = False) -> str:
    # With full ids the table outgrows 120 columns; widen the page rather than cut or fold
    # an id people copy (rich tables take only the width they need, so nothing is padded).
    buf = StringIO()
    width = 2 * WIDTH if wide else WIDTH
    Console(file=buf, width=width, force_terminal=False, color_system=None, highlight=False).print(table)
    # rich pads every cell and frames SIMPLE boxes with blank rows; trim both for pipes and diffs.
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _count_states(peers: list[PeerView]) -> str:
    counts: dict[str, int] = {}
    for p in peers:
        counts[p.state] = counts.get(p.state, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _round(r: dict) -> str:
    if not r:
        return "-"
    return "  ".join(f"{k}={v}" for k, v in r.items())


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"
