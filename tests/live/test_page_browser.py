"""The node's page in a real headless Chromium (Debian's, through chromedriver).

1. Against the real HTTP server with prepared states: every part draws (six charts with points,
   the peer table, each family's panel), a peer's `<script>` device shows as text and runs
   nothing, the peer table sorts, every warning (induced) appears without a reload, no console error.
2. Against a live 3-peer diloco swarm: the page of the first node shows the three peers, a loss
   chart with points and the outer-round panel; a peer announcing another spec brings the
   spec-mismatch warning; one of its spec whose device field is markup shows as text; with the
   other peers stopped, the isolated warning. Screenshots go
   to the test's folder (and to $SWARM_PAGE_SHOTS when set).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from swarm_node.health import HealthServer
from swarm_node.lab.launcher import Swarm
from swarm_node.metrics import NodeMetrics
from swarm_node.page.book import PageBook, PageInputs
from swarm_node.status import Phase

from tests.browser import browser_or_skip
from tests.conftest import FAST_NODE_ARGS
from tests.page_states import HOSTILE, PANELS, filled_book, rounds, status

pytestmark = pytest.mark.timeout(240)
CHARTS = ("loss-step", "loss-time", "throughput", "network", "rounds", "stragglers")
STRANGER = Path(__file__).with_name("stranger_peer.py")
Disk = namedtuple("Disk", "total used free")
HOSTILE_DEVICE = '<img src=x onerror=__pwned=2><script>__pwned=1</script>'  # stranger_peer.py's

LOADED = "return document.body.dataset.loaded === '1'"
ROWS_JS = "document.querySelectorAll('#peers tbody tr').length"
WARN_JS = "[...document.querySelectorAll('#warnings li')].map(li => li.dataset.code)"
PEER_ROWS, WARNINGS = f"return {ROWS_JS}", f"return {WARN_JS}"


def severe(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("level") == "SEVERE"]


def save_shot(browser, tmp_path: Path, name: str) -> None:
    path = browser.screenshot(tmp_path / f"{name}.png")
    if os.environ.get("SWARM_PAGE_SHOTS"):
        Path(os.environ["SWARM_PAGE_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["SWARM_PAGE_SHOTS"]) / path.name)


def test_every_part_draws_hostile_strings_stay_text_and_the_table_sorts(tmp_path):
    books = {kind: filled_book(tmp_path, kind) for kind in PANELS}
    current = {"book": books["outer_rounds"]}
    srv = HealthServer("127.0.0.1", 0, metrics=NodeMetrics("diloco"), status_fn=status, live_fn=lambda: (True, "ok"),
                       ready_fn=lambda: (True, {}), page_fn=lambda: current["book"].state())
    host, port = srv.start()
    try:
        with browser_or_skip(tmp_path) as b:
            for kind, book in books.items():
                current["book"] = book
                b.get(f"http://{host}:{port}/")
                b.wait(LOADED, 20, "the first draw")
                assert b.js("return document.querySelector('#panel').dataset.kind") == kind
                expected = PANELS[kind].to_json()
                assert b.js("return document.querySelectorAll('#panel-table tbody tr').length") == len(expected["rows"])
                assert b.js("return document.querySelector('#panel-title').textContent") == expected["title"]
                points = b.js("return [...document.querySelectorAll('figure.chart')].map(f => [f.dataset.chart, +f.dataset.points])")
                assert {c for c, n in points if n > 0} == set(CHARTS), points
                assert b.js(PEER_ROWS) == 3
                # the hostile device (and, in the pipeline panel, a hostile cell) is text: no element, no run
                cells = b.js("return [...document.querySelectorAll('td')].map(td => td.textContent)")
                assert HOSTILE in cells
                assert b.js("return [window.__pwned, document.querySelectorAll('img, #peers script, #panel script').length]") == [None, 0]
                assert severe(b.console()) == []
            save_shot(b, tmp_path, "page-panels")
            # sorting by samples/s: ascending, then descending on a second click
            sps = "return [...document.querySelectorAll('#peers tbody tr td:nth-child(5)')].map(td => +td.textContent)"
            b.js("document.querySelector('th[data-key=samples_per_s]').click()")
            assert b.js(sps) == [5.0, 80.0, 100.0]
            b.js("document.querySelector('th[data-key=samples_per_s]').click()")
            assert b.js(sps) == [100.0, 80.0, 5.0]
            # every warning, induced, appears on the next poll without a reload
            assert b.js(WARNINGS) == [] and b.js("return !document.querySelector('#all-well').hidden")
            current["book"] = book = PageBook(started_unix=time.time() - 30, state_dir=tmp_path, ttl_s=4,
                                              disk_usage=lambda _: Disk(100 << 30, 0, 300 << 20))
            book.observe(status(phase=Phase.ISOLATED), PageInputs(
                rejections={"spec_mismatch": 4, "forged_record": 1}, suspected={"12D3KooWSuspect0eeeeeeee": time.time()},
                round_history=rounds(4, time.time() - 20, ("ok", "error", "timeout", "error"))))
            want = "isolated,rejected,spec_mismatch,repeated_aborts,peer_suspected,disk_low"
            b.wait(f"return {WARN_JS}.join(',') === {want!r}", 10, "every warning")
            assert b.js("return document.querySelector('#phase').textContent") == "isolated"
            assert "eeeeeeee" in b.js("return document.querySelector('#warnings').textContent")
            save_shot(b, tmp_path, "page-warnings")
            assert severe(b.console()) == []
    finally:
        srv.stop()


@pytest.mark.multiprocess
def test_the_page_of_a_live_swarm_shows_its_peers_loss_panel_and_warnings(tmp_path):
    args = [*FAST_NODE_ARGS, "--strategy", "diloco", "--inner-steps", "5", "--run-id", "page"]
    with Swarm(tmp_path, args) as sw, browser_or_skip(tmp_path) as b:
        a = sw.add("a")
        a.wait_info(90)
        boot = _join_maddr(a)
        others = [sw.add(n, initial=boot) for n in ("b", "c")]
        for n in others:
            n.wait_info(90)
        a.wait_for(lambda s: sum(p["state"] == "online" for p in s["peers"]) == 3 and s["step"] >= 10, 120,
                   "three online peers and 10 steps")
        url = f"http://{a.info['http']}/"
        t0 = time.monotonic()
        b.get(url)
        b.wait(LOADED, 30, "the first draw")
        load_s = time.monotonic() - t0
        b.wait(f"return {ROWS_JS} === 3", 20, "three peer rows")
        b.wait("return +document.querySelector('figure[data-chart=loss-step]').dataset.points >= 2", 30,
               "a loss chart with points")
        b.wait("return document.querySelectorAll('#panel-table tbody tr').length >= 1", 60, "an outer round in the panel")
        assert b.js("return document.querySelector('#panel').dataset.kind") == "outer_rounds"
        assert b.js("return document.querySelector('#phase').textContent") == "ready"
        ids = set(b.js("return [...document.querySelectorAll('#peers tbody tr')].map(tr => tr.dataset.peer)"))
        assert ids == {n.info["peer_id"] for n in (a, *others)}
        assert b.js("return document.querySelector('#join-line').textContent") == f"swarm-node join --initial-peers {boot}"
        assert severe(b.console()) == []
        save_shot(b, tmp_path, "page-live")
        print(f"page: first draw {load_s:.2f}s after navigation")

        # a peer announcing another spec for this run: counted, ignored, and said on the page
        with _stranger(tmp_path, "other-spec", boot):
            b.wait(f"return {WARN_JS}.includes('spec_mismatch')", 40, "the spec-mismatch warning")
            assert b.js(PEER_ROWS) == 3  # the stranger is not one of the swarm's peers
        # a peer of this spec whose record's device field is markup: a fourth row, as text
        with _stranger(tmp_path, "hostile-device", boot):
            b.wait(f"return [...document.querySelectorAll('#peers td')].some(td => td.textContent === {HOSTILE_DEVICE!r})",
                   40, "the hostile peer's row")
            assert b.js("return [window.__pwned, document.querySelectorAll('img, #peers script').length]") == [None, 0]
            save_shot(b, tmp_path, "page-hostile-peer")
        # the other peers stop: the node is isolated, and says so
        for n in others:
            n.kill()
        b.wait(f"return {WARN_JS}.includes('isolated')", 60, "the isolated warning")
        save_shot(b, tmp_path, "page-isolated")
        assert severe(b.console()) == []


def _join_maddr(node, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return node.join_maddr()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def _stranger(tmp_path: Path, mode: str, boot: str):
    with open(tmp_path / f"stranger-{mode}.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(STRANGER), mode, boot, "page", str(tmp_path / f"stranger-{mode}"),
                                 "90"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    except BaseException:
        print((tmp_path / f"stranger-{mode}.log").read_text(errors="replace")[-2000:])
        raise
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the script shuts its p2pd down), then SIGKILL to its whole group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
