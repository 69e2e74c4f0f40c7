"""A rogue peer against real daemons on loopback: it overwrites a victim's record as `leaving`,
invents ten `online` peers and replaces the run's spec under the owner's id (rogue_records.py).
Every such store is refused by the honest DHT nodes and counted (forged_record); the victim stays
in the others' view, no invented peer appears, the honest pair keeps training, and a joiner
arriving after the attack joins (the forged spec turns nobody away)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import scrape_metrics

pytestmark = pytest.mark.multiprocess
ROGUE = Path(__file__).with_name("rogue_records.py")
SYNC = ["--run-id", "rogue", "--strategy", "sync", "--min-peers", "2"]  # trains until drained


def _view(node) -> set[str]:
    return {p["peer_id"] for p in node.status()["peers"]}


def _forged(node) -> float:
    return scrape_metrics(node).get(("swarm_rejected_messages_total", (("reason", "forged_record"),)), 0.0)


def run_rogue(join: str, victim: str, owner: str) -> dict:
    proc = subprocess.Popen([sys.executable, str(ROGUE), join, "rogue", victim, owner], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its p2pd too, whatever happened
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_forged_records_are_refused_and_the_swarm_trains_on(swarm):
    a = swarm.add("a", SYNC)
    a_id = a.wait_info()["peer_id"]
    b = swarm.add("b", SYNC, initial=a.join_maddr())
    b_id = b.wait_info()["peer_id"]
    for n in (a, b):
        n.wait_for(lambda s: len(s["peers"]) >= 2 and s["step"] >= 5, 90, "both peers training")

    result = run_rogue(a.join_maddr(), victim=b_id, owner=a_id)
    print("rogue:", result)
    assert result["read_victim"], result  # reading is open to anyone; writing is not
    refused = ("victim_leaving_unsigned", "victim_leaving_bad_signature", "spec_under_owner", "spec_under_self")
    assert not any(result[k] for k in refused) and result["fake_peers_stored"] == 0, result
    step_after_attack = a.status()["step"]

    c = swarm.add("c", SYNC, initial=a.join_maddr())
    c.wait_for(lambda s: s["step"] > 0, 90, "a joiner after the attack training")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the victim never drops out, nothing invented ever shows up
        for n in (a, c):
            view = _view(n)
            assert b_id in view, (n.name, view)
            assert view <= {a_id, b_id, c.wait_info()["peer_id"]}, (n.name, view)
        time.sleep(1)
    assert a.status()["step"] > step_after_attack
    assert _forged(a) + _forged(b) >= 3  # the leaving record (twice) and the invented peers, at least
    for n in (a, b, c):  # the owner of the state dir (the control token) may stop them
        drained = subprocess.run([sys.executable, "-m", "swarm_node", "drain", "--state-dir", str(n.state_dir)],
                                 capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stdout + drained.stderr
    for n in (a, b, c):
        assert n.proc.wait(120) == 0, n.log_text()[-2000:]
