"""The node's page without a browser: history and rates, warnings, the book, the HTTP routes,
and the strategies' panels (each family's, from its own record of rounds)."""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import namedtuple

import pytest

from swarm_node.health import HealthServer
from swarm_node.metrics import NodeMetrics
from swarm_node.page.book import PageBook, PageInputs
from swarm_node.page.history import PageHistory, loss_series
from swarm_node.page.state import PageState
from swarm_node.page.warnings import RECENT_S, WarningInputs, find_warnings
from swarm_node.status import Phase
from swarm_node.strategies.lowcomm.panel import outer_rounds_panel, pair_rounds_panel
from swarm_node.strategies.page_panel import MAX_ROWS, PagePanel, outcome_counts

from tests.page_states import PANELS, filled_book, rounds, status

Disk = namedtuple("Disk", "total used free")


# ---------------------------------------------------------------- history
def test_rates_are_differences_of_counters_and_a_reset_counts_from_zero():
    h = PageHistory(max_points=3)
    h.add(0.0, samples_per_s=1, tx_total=0, rx_total=0, stragglers=0, peers=2)
    h.add(2.0, samples_per_s=1, tx_total=1000, rx_total=4000, stragglers=1, peers=2)
    h.add(4.0, samples_per_s=1, tx_total=500, rx_total=4000, stragglers=1, peers=3)  # a counter went back
    s = h.series()
    assert s.tx_bps == [0.0, 500.0, 0.0] and s.rx_bps == [0.0, 2000.0, 0.0]
    h.add(6.0, samples_per_s=2, tx_total=700, rx_total=4000, stragglers=2, peers=3)
    s = h.series()
    assert len(h) == 3 and s.t == [2.0, 4.0, 6.0] and s.tx_bps[-1] == 100.0  # bounded: the oldest went


def test_loss_series_is_thinned_keeps_both_ends_and_held_out_points_and_drops_nan():
    rows = [[s, 2.0 if s != 7 else math.nan, 1.5 if s % 100 == 0 else None, s / 10] for s in range(1, 5001)]
    out = loss_series(rows, max_points=50)
    assert out.step[0] == 1 and out.step[-1] == 5000
    assert len(out.step) <= 100
    held = [s for s, v in zip(out.step, out.val) if v is not None]
    assert len(held) == 50 and held[0] == 100 and held[-1] == 5000
    short = loss_series(rows[:10])
    assert short.train[6] is None and short.step == list(range(1, 11))


# ---------------------------------------------------------------- warnings
def codes(**kw) -> list[str]:
    return [w.code for w in find_warnings(WarningInputs(**{"phase": "ready", **kw}))]


def test_a_healthy_node_has_no_warning():
    assert codes(recent_outcomes=["ok", "error", "ok"], disk_free_bytes=50 << 30, disk_total_bytes=100 << 30) == []


@pytest.mark.parametrize("phase", ["isolated", "waiting", "draining"])
def test_the_phase_warns(phase):
    assert codes(phase=phase) == [phase]


def test_counted_rejections_warn_while_they_keep_happening():
    now = time.time()
    assert codes(rejections={"spec_mismatch": (3, now - 5)}, now=now) == ["spec_mismatch"]
    assert codes(rejections={"spec_mismatch": (3, now - RECENT_S - 1)}, now=now) == []
    assert codes(rejections={"forged_record": (1, now)}, now=now) == ["rejected"]
    assert codes(rejections={"bad_dtype": (9, now)}, now=now) == []  # routine: counted on /metrics only
    text = find_warnings(WarningInputs(phase="ready", rejections={"spec_mismatch": (3, now)}, now=now))[0].text
    assert "3 so far" in text


def test_three_aborted_rounds_in_a_row_warn_and_a_success_between_them_does_not():
    assert codes(recent_outcomes=["ok", "error", "timeout", "error"]) == ["repeated_aborts"]
    assert codes(recent_outcomes=["error", "ok", "error", "error"]) == []
    assert codes(recent_outcomes=["error", "error"]) == []


def test_a_recently_suspected_peer_warns_with_its_short_id():
    now = time.time()
    ws = find_warnings(WarningInputs(phase="ready", suspected={"12D3KooWxyzABCDEFGH": now - 1, "old": now - 2 * RECENT_S},
                                     now=now))
    assert [w.code for w in ws] == ["peer_suspected"] and "ABCDEFGH" in ws[0].text


def test_an_almost_full_disk_warns_by_bytes_or_by_fraction():
    assert codes(disk_free_bytes=512 << 20, disk_total_bytes=100 << 30) == ["disk_low"]
    assert codes(disk_free_bytes=4 << 30, disk_total_bytes=100 << 30) == ["disk_low"]  # 4 %
    assert codes(disk_free_bytes=6 << 30, disk_total_bytes=100 << 30) == []


# ---------------------------------------------------------------- the book
def test_the_book_builds_a_state_that_round_trips_through_its_schema(tmp_path):
    book = filled_book(tmp_path)
    st = book.state()
    again = PageState.model_validate(json.loads(st.model_dump_json()))
    assert again == st
    assert [p.short_id for p in st.peers] == ["0000aaaa", "bbbbbbbb", "cccccccc"]
    assert st.peers[1].last_seen_s == 1.0 and st.peers[0].last_seen_s == 0.0  # ttl 4 s, record expires in 3 s
    assert st.node.memory_bytes == 300 << 20 and st.node.join_line.startswith("swarm-node join --initial-peers ")
    assert len(st.rates.t) == 6 and st.rates.tx_bps[-1] == pytest.approx(1e5 / 2)
    assert len(st.rounds) == 6 and all(r.t > 0 for r in st.rounds)
    assert st.panel is not None and st.panel.kind == "outer_rounds"
    with pytest.raises(Exception):
        PageState.model_validate({**json.loads(st.model_dump_json()), "surprise": 1})  # the schema is closed


def test_the_book_warns_once_rejections_increase_and_reads_the_disk_of_the_state_dir(tmp_path):
    seen = []
    book = PageBook(started_unix=time.time(), state_dir=tmp_path, ttl_s=4,
                    disk_usage=lambda p: seen.append(p) or Disk(100 << 30, 0, 200 << 20))
    base = PageInputs(rejections={"spec_mismatch": 0})
    st = book.observe(status(), base, now_mono=0)
    assert [w.code for w in st.warnings] == ["disk_low"] and seen == [tmp_path]
    assert not book.due(1.0) and book.due(2.0)
    st = book.observe(status(phase=Phase.ISOLATED), PageInputs(rejections={"spec_mismatch": 2}), now_mono=2)
    assert [w.code for w in st.warnings] == ["isolated", "spec_mismatch", "disk_low"]


def test_a_disk_that_cannot_be_read_is_no_warning(tmp_path):
    def broken(_):
        raise OSError("gone")
    book = PageBook(started_unix=time.time(), state_dir=tmp_path, ttl_s=4, disk_usage=broken)
    assert book.observe(status(), PageInputs()).warnings == []


# ---------------------------------------------------------------- HTTP
@pytest.fixture
def server(tmp_path):
    book = PageBook(started_unix=time.time(), state_dir=tmp_path, ttl_s=4)
    srv = HealthServer("127.0.0.1", 0, metrics=NodeMetrics("diloco"), status_fn=status,
                       live_fn=lambda: (True, "ok"), ready_fn=lambda: (True, {}), page_fn=book.state)
    host, port = srv.start()
    yield f"http://{host}:{port}", book
    srv.stop()


def fetch(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, data=b"x" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_page_and_its_assets_are_served_with_a_policy_that_forbids_inline_script(server):
    base, _ = server
    code, headers, body = fetch(base + "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html") and b'src="/page.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in body  # nothing inline: the policy would block it anyway
    for path, kind in (("/page.js", "text/javascript"), ("/page.css", "text/css")):
        code, headers, body = fetch(base + path)
        assert code == 200 and headers["Content-Type"].startswith(kind) and body


def test_the_script_never_writes_markup():
    from swarm_node.health import STATIC_DIR
    js = (STATIC_DIR / "page.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink


def test_page_json_is_503_until_the_first_sample_then_the_state(server, tmp_path):
    base, book = server
    code, _, body = fetch(base + "/page.json")
    assert code == 503 and "starting" in json.loads(body)["error"]
    book.observe(status(), PageInputs(panel=PANELS["coded"].to_json()))
    code, _, body = fetch(base + "/page.json")
    st = PageState.model_validate(json.loads(body))
    assert code == 200 and st.panel.kind == "coded" and st.node.step == 40


@pytest.mark.parametrize("path", ["/", "/page.json", "/page.js", "/status", "/metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_every_route_is_read_only(server, path, method):
    base, _ = server
    code, headers, _ = fetch(base + path, method)
    assert code == 405 and headers.get("Allow") == "GET, HEAD"


def test_without_a_page_the_root_is_404():
    srv = HealthServer("127.0.0.1", 0, metrics=NodeMetrics("sync"), status_fn=status, live_fn=lambda: (True, "ok"),
                       ready_fn=lambda: (True, {}))
    host, port = srv.start()
    try:
        assert fetch(f"http://{host}:{port}/")[0] == 404
    finally:
        srv.stop()


# ---------------------------------------------------------------- panels
def test_the_outer_rounds_panel_counts_agreement_from_committed_rounds_and_resyncs():
    p = outer_rounds_panel(rounds(30, 0.0, ("ok", "ok", "resync")), title="t", inner_steps=5, round_no=30,
                           phi_hash="f" * 64)
    facts = dict(p.facts)
    assert facts["φ agreement"] == "20 of the last 30 rounds committed with every member on one φ; 10 resyncs"
    assert facts["φ hash"] == "f" * 16 and len(p.rows) == 12 and p.rows[-1][0] == 29
    assert dict(outer_rounds_panel([], title="t", inner_steps=5, round_no=0, phi_hash="")
                .facts)["φ agreement"] == "no round yet"


def test_the_pair_panel_counts_distinct_partners():
    hist = [{"round": i, "outcome": "ok", "group_size": 2, "duration_s": 0.1, "peer": f"p{i % 3}"} for i in range(9)]
    hist.append({"round": 9, "outcome": "no_peers", "group_size": 1, "duration_s": 0.0, "peer": ""})
    facts = dict(pair_rounds_panel(hist, inner_steps=10).facts)
    assert facts["distinct partners"] == "3" and facts["rounds"] == "ok 9 · no_peers 1"


def test_a_panel_serializes_its_recent_rows_only():
    p = PagePanel(kind="rounds", title="t", rows=[[i] for i in range(MAX_ROWS + 10)])
    assert len(p.to_json()["rows"]) == MAX_ROWS and p.to_json()["rows"][0] == [10]
    assert outcome_counts([]) == "none yet"
