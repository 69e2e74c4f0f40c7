"""swarm strategy over real `swarm-node join` processes on loopback: a 3-stage pipeline
(1 trainer + 2 + 2 stage servers) trains and its loss falls, and the router sends more
work to the faster of two replicas; a stage-1 server SIGKILLed
while it sits inside a backward loses no micro-batch (the call is re-sent to the other
replica); when stage 1 then loses its last peer, a stage-2 peer rebuilds it by CheckFree
and training continues."""
from __future__ import annotations

import re
import time

import pytest

from swarm_node.lab.launcher import Swarm

from tests.conftest import FAST_NODE_ARGS
from tests.page_states import wait_page_panel

pytestmark = pytest.mark.timeout(300)

ARGS = [a for a in FAST_NODE_ARGS]
ARGS[ARGS.index("--n-layer") + 1] = "3"
ARGS[ARGS.index("--d-model") + 1] = "32"
ARGS += ["--strategy", "swarm", "--stages", "3", "--micro-batches", "2", "--eval-every", "1000",
         "--checkpoint-every", "1000", "--stage-average-interval-s", "3", "--rebalance-interval-s", "0",
         "--lr", "0.003"]


def metric(node, name: str, **labels) -> float:
    code, body = node.http("/metrics")
    assert code == 200
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def strategy_status(node) -> dict:
    return node.status().get("last_round", {}) or {}


def test_pipeline_trains_survives_kill_mid_backward_and_rebuilds_a_lost_stage(tmp_path):
    with Swarm(tmp_path, ARGS) as sw:
        trainer = sw.add("trainer", ["--stage", "0"])
        _wait_join(trainer)
        boot = trainer.join_maddr()
        s1a = sw.add("s1a", ["--stage", "1", "--swarm-backward-delay-s", "0.3"], initial=boot)
        s1b = sw.add("s1b", ["--stage", "1", "--swarm-backward-delay-s", "0.3"], initial=boot)
        s2a = sw.add("s2a", ["--stage", "2"], initial=boot)
        s2b = sw.add("s2b", ["--stage", "2", "--swarm-backward-delay-s", "0.4"], initial=boot)  # the slow replica
        for n in sw.nodes:
            n.wait_info(90)
        first_loss = float(trainer.wait_for(lambda s: s.get("step", 0) >= 1, 120, "a first pipeline step")["train_loss"])
        # stochastic wiring: once the trainer sees both stage-2 replicas, the fast one gets
        # clearly more of the work (counted from then on: start-up order is not routing)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                metric(trainer, "swarm_stage_peers", stage=str(k)) == 2 for k in (1, 2)):
            time.sleep(0.5)
        served = lambda n: metric(n, "swarm_stage_requests_served_total", op="backward", outcome="ok")  # noqa: E731
        fast0, slow0 = served(s2a), served(s2b)
        step0 = trainer.status()["step"]
        st = trainer.wait_for(lambda s: s.get("step", 0) >= max(12, step0 + 10), 120, "pipeline steps")
        fast, slow = served(s2a) - fast0, served(s2b) - slow0
        assert fast > 1.5 * slow, (fast, slow)
        # the two stage-2 replicas average through the shared butterfly all-reduce (not only the
        # one-replica gossip fallback) every --stage-average-interval-s
        averaged = lambda: min(metric(n, "swarm_stage_averaging_total", outcome="ok") for n in (s2a, s2b))  # noqa: E731
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and averaged() < 1:
            time.sleep(0.5)
        assert averaged() >= 1, [(n.name, metric(n, "swarm_stage_averaging_total", outcome="gossip")) for n in (s2a, s2b)]
        # the trainer's page: one row per stage, with who serves it (sampled every 2 s)
        rows = wait_page_panel(trainer, lambda p: p["kind"] == "pipeline" and [r[1] for r in p["rows"]] == [1, 2, 2])["rows"]
        assert rows[0][2].endswith("*") and s2b.info["peer_id"][-8:] in rows[2][2]

        # --- a stage-1 server dies while inside a backward (each backward sleeps 0.3 s there)
        # counted from the kill, not from `st`: the averaging wait above may already have run
        # the trainer many steps past it (then no step after the kill was waited for)
        _wait_in_backward(s1a)
        before = metric(trainer, "swarm_pipeline_microbatches_total", outcome="ok")
        step_at_kill = trainer.status()["step"]
        s1a.kill()
        trainer.wait_for(lambda s: s.get("step", 0) >= step_at_kill + 6, 90, "steps after the kill")
        retries = metric(trainer, "swarm_pipeline_rpc_retries_total", stage="1")
        assert retries >= 1, "the call that was inside the killed server was not re-sent"
        assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="lost") == 0
        assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="ok") > before

        # --- stage 1 loses its last peer: a stage-2 peer must rebuild it by CheckFree
        step_before = trainer.status()["step"]
        s1b.kill()
        deadline = time.monotonic() + 90
        rebuilt = None
        while time.monotonic() < deadline and rebuilt is None:
            for n in (s2a, s2b):
                if metric(n, "swarm_recoveries_total", kind="checkfree_stage", outcome="ok") >= 1:
                    rebuilt = n
            time.sleep(1)
        assert rebuilt is not None, "stage 1 was not rebuilt:\n" + s2a.log_text()[-1500:] + s2b.log_text()[-1500:]
        assert metric(rebuilt, "swarm_pipeline_stage") == 1
        assert metric(rebuilt, "swarm_checkfree_recoveries_total", stage="1", method="wavg") == 1
        trainer.wait_for(lambda s: s.get("step", 0) >= step_before + 8, 120, "training after the rebuild")
        assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="lost") == 0
        last_loss = _recent_loss(trainer)
        assert last_loss < first_loss - 0.3, (first_loss, last_loss)
        # the other stage-2 peer still serves stage 2 (the mover never strands its stage)
        other = s2b if rebuilt is s2a else s2a
        assert metric(other, "swarm_pipeline_stage") == 2
        assert metric(trainer, "swarm_stage_peers", stage="1") >= 1


def _wait_metric(nodes, name: str, value: float, timeout_s: float, **labels):
    """The first of `nodes` whose metric reaches `value` within the timeout, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for n in nodes:
            try:
                if metric(n, name, **labels) >= value:
                    return n
            except Exception:  # a node between restarts answers nothing for a moment
                pass
        time.sleep(1)
    return None


def start_one_two_one(sw):
    """A 3-stage swarm: a trainer, two stage-1 servers and one stage-2 server, all started."""
    trainer = sw.add("trainer", ["--stage", "0"])
    _wait_join(trainer)
    boot = trainer.join_maddr()
    s1 = [sw.add(f"s1{c}", ["--stage", "1"], initial=boot) for c in "ab"]
    s2 = sw.add("s2a", ["--stage", "2"], initial=boot)
    for n in sw.nodes:
        n.wait_info(90)
    return trainer, s1, s2


def _wait_join(node, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(r"--initial-peers (\S+)", node.log_text()):
            return True
        time.sleep(0.2)
    raise AssertionError("no join line:\n" + node.log_text()[-2000:])


def _wait_in_backward(node, timeout_s: float = 30) -> None:
    """Until the server has a request in flight (queue depth > 0: with the 0.3 s sleep,
    almost always a backward)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(node, "swarm_stage_queue_depth") > 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server never had a request in flight")


def _recent_loss(node) -> float:
    return float(node.status()["train_loss"])


def test_rebalancing_moves_a_peer_to_the_weak_stage_and_settles(tmp_path):
    """1 trainer, 3 peers on stage 1, 1 on stage 2, int8 activations: the lowest peer id of
    stage 1 moves to stage 2 (downloading its weights) and the assignment then stays put."""
    args = [*ARGS, "--rebalance-interval-s", "1.5", "--act-compression", "int8"]
    with Swarm(tmp_path, args) as sw:
        trainer = sw.add("trainer", ["--stage", "0"])
        _wait_join(trainer)
        boot = trainer.join_maddr()
        servers = [sw.add(f"s1{c}", ["--stage", "1"], initial=boot) for c in "abc"]
        servers.append(sw.add("s2a", ["--stage", "2"], initial=boot))
        for n in sw.nodes:
            n.wait_info(90)
        trainer.wait_for(lambda s: s.get("step", 0) >= 3, 120, "pipeline steps")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(metric(n, "swarm_stage_rebalances_total") for n in servers) < 1:
            time.sleep(1)
        moved = [n for n in servers if metric(n, "swarm_stage_rebalances_total") >= 1]
        assert moved, "no peer moved:\n" + "\n".join(n.log_text()[-800:] for n in servers)
        assert metric(moved[0], "swarm_pipeline_stage") == 2
        assert metric(moved[0], "swarm_recoveries_total", kind="state_download", outcome="ok") >= 1
        time.sleep(6)  # settle; then no further moves over several checks (each ~every 1.5 s)
        settled = sum(metric(n, "swarm_stage_rebalances_total") for n in servers)
        time.sleep(8)
        assert sum(metric(n, "swarm_stage_rebalances_total") for n in servers) == settled <= 2
        stages = [metric(n, "swarm_pipeline_stage") for n in servers]
        assert stages.count(1) >= 1 and stages.count(2) >= 2, stages
        step = trainer.status()["step"]
        trainer.wait_for(lambda s: s.get("step", 0) >= step + 3, 60, "training after the moves")
        assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="lost") == 0


def test_last_stage_lost_is_rebuilt_from_its_neighbour_and_the_head_copy(tmp_path):
    """Stage 2 (blocks + head) loses its only peer: a stage-1 peer copies stage 1's body and
    the head copy stage-1 peers keep, takes stage 2, and training goes on."""
    with Swarm(tmp_path, ARGS) as sw:
        trainer, s1, s2 = start_one_two_one(sw)
        trainer.wait_for(lambda s: s.get("step", 0) >= 8, 120, "pipeline steps")
        time.sleep(5)  # > --stage-average-interval-s: stage-1 peers now hold a head copy
        step = trainer.status()["step"]
        s2.kill()
        rebuilt = _wait_metric(s1, "swarm_checkfree_recoveries_total", 1, 90, stage="2", method="copy")
        assert rebuilt is not None, "\n".join(n.log_text()[-1500:] for n in s1)
        assert metric(rebuilt, "swarm_pipeline_stage") == 2
        trainer.wait_for(lambda s: s.get("step", 0) >= step + 5, 120, "training after the rebuild")
        assert metric(trainer, "swarm_pipeline_microbatches_total", outcome="lost") == 0
        assert float(trainer.status()["train_loss"]) < 5.0
