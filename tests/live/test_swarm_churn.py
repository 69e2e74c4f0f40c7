"""swarm strategy under churn with as few peers as stages allow, over real `swarm-node join`
processes on loopback, and the end of a run with --max-steps.

1. 4 peers for 3 stages (the churn lab's stall case): two trainers, one server per server
   stage. A drained (SIGTERM) stage-2 server leaves no server stage able to spare a peer, so
   the spare trainer (fewer steps) moves and rebuilds stage 2 by CheckFree; then a SIGKILLed
   stage-1 server restarted with --stage auto takes the empty stage 1 (CheckFree from its
   trained neighbours) instead of becoming a trainer, and training goes on.
2. --max-steps: the trainer stops at N, and the stage servers given the same flag see it
   leave with step N and drain too (exit 0, summary.json written) instead of idling forever.
"""
from __future__ import annotations

import json
import time

import pytest

from swarm_node.lab.launcher import Swarm

from tests.live.test_swarm_live import ARGS, _wait_join, _wait_metric, metric

pytestmark = pytest.mark.timeout(300)



def test_four_peers_three_stages_drain_kill_restart_never_stalls(tmp_path):
    with Swarm(tmp_path, ARGS) as sw:
        t1 = sw.add("t1", ["--stage", "0"])
        _wait_join(t1)
        boot = t1.join_maddr()
        s1 = sw.add("s1", ["--stage", "1"], initial=boot)
        s2 = sw.add("s2", ["--stage", "2"], initial=boot)
        for n in (s1, s2):
            n.wait_info(90)
        t1.wait_for(lambda s: s.get("step", 0) >= 5, 120, "pipeline steps")
        t2 = sw.add("t2", ["--stage", "0"], initial=boot)  # the spare: a second trainer, fewer steps
        t2.wait_info(90)
        t2.wait_for(lambda s: s.get("step", 0) >= 2, 90, "the second trainer's steps")
        time.sleep(5)  # > --stage-average-interval-s: s1 now holds the copy of stage 2's head

        # --- drain the only stage-2 server: no server stage can spare a peer, a trainer must
        assert s2.terminate(40) == 0
        mover = _wait_metric([t1, t2], "swarm_checkfree_recoveries_total", 1, 60, stage="2", method="copy")
        assert mover is t2, "stage 2 was not rebuilt by the spare trainer:\n" + t2.log_text()[-2000:]
        assert metric(t2, "swarm_pipeline_stage") == 2
        assert metric(t1, "swarm_pipeline_stage") == 0  # the most-trained trainer keeps training
        step = t1.status()["step"]
        t1.wait_for(lambda s: s.get("step", 0) >= step + 5, 90, "training after the drained stage was rebuilt")

        # --- SIGKILL the only stage-1 server and restart it with --stage auto (same identity)
        s1.kill()
        time.sleep(6)  # its record (4 s lifetime) expires: stage 1 is empty, nobody can spare a peer
        s1b = sw.add("s1", [], initial=boot)
        s1b.wait_info(90)
        rebuilt = _wait_metric([s1b], "swarm_checkfree_recoveries_total", 1, 60, stage="1", method="wavg")
        assert rebuilt is s1b, "the restarted peer did not rebuild stage 1:\n" + s1b.log_text()[-2000:]
        assert metric(s1b, "swarm_pipeline_stage") == 1
        step = t1.status()["step"]
        t1.wait_for(lambda s: s.get("step", 0) >= step + 5, 90, "training after the restart")
        assert metric(t1, "swarm_pipeline_microbatches_total", outcome="lost") == 0
        assert float(t1.status()["train_loss"]) < 5.0

        # --- t2 is a trainer on loan to stage 2: a new --stage auto peer takes stage 2 (not the
        #     least-capacity stage), and t2 goes back to training instead of staying a server
        s3 = sw.add("s3", [], initial=boot)
        s3.wait_info(90)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "back to training (stage 0)" not in t2.log_text():
            time.sleep(1)
        assert "back to training (stage 0)" in t2.log_text(), t2.log_text()[-2000:]
        assert metric(s3, "swarm_pipeline_stage") == 2 and metric(t2, "swarm_pipeline_stage") == 0
        step = t2.status()["step"]
        t2.wait_for(lambda s: s.get("step", 0) >= step + 3, 90, "the returned trainer's steps")
        assert metric(t1, "swarm_pipeline_microbatches_total", outcome="lost") == 0


def test_stage_servers_stop_when_the_trainer_reaches_max_steps(tmp_path):
    args = [*ARGS, "--max-steps", "15"]
    with Swarm(tmp_path, args) as sw:
        t = sw.add("t", ["--stage", "0"])
        _wait_join(t)
        boot = t.join_maddr()
        servers = [sw.add("s1", ["--stage", "1"], initial=boot), sw.add("s2", ["--stage", "2"], initial=boot)]
        nodes = [t, *servers]
        codes = {}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(codes) < len(nodes):
            for n in nodes:
                if n.name not in codes and n.proc.poll() is not None:
                    codes[n.name] = n.proc.returncode
            time.sleep(0.5)
        assert codes == {"t": 0, "s1": 0, "s2": 0}, (codes, [n.log_text()[-800:] for n in nodes if n.name not in codes])
        summary = json.loads((t.state_dir / "summary.json").read_text())
        assert summary["strategy_stats"]["stage"] == 0
        for n in servers:
            assert (n.state_dir / "summary.json").exists(), n.name
            assert "every trainer finished (--max-steps 15)" in n.log_text()
        assert "reached --max-steps 15" in t.log_text()
