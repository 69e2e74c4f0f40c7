"""SAPO over real peers: 3 `swarm-node join --strategy sapo` processes on loopback (real DHT,
real rollout sidecars running gossipsub, real pulls). Checked, in one bounded run:
1. every peer receives external rollouts before its deadline and trains on them;
2. a rogue gossip peer (its own sidecar, dialled into a's) publishes bad rollouts and a
   counts each one under its rejection reason, training on;
3. SIGKILLing c's process group leaves a and b training with each other; killing b too
   leaves a training on local data only, never stalling past a round;
4. the metrics count published / received / used / dropped / rejected.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time

from swarm_node.identity import ensure_identity
from swarm_node.protocol.signing import Context, Signer
from swarm_node.strategies.sapo import tasks as tasks
from swarm_node.strategies.sapo.gossip import GossipClient
from swarm_node.strategies.sapo.records import MAX_ROLLOUT_BYTES, RolloutGroup, encode_rollout, round_of

from tests.conftest import scrape_metrics
from tests.page_states import wait_page_panel

pytestmark = pytest.mark.multiprocess

ROUND_S = 4.0
G = 4
SAPO_ARGS = ["--strategy", "sapo", "--sapo-round-s", str(ROUND_S), "--sapo-group-size", str(G),
             "--sapo-questions", "3", "--sapo-local-groups", "3", "--sapo-external-groups", "3",
             "--sapo-warmstart-steps", "20",
             "--sapo-format-reward", "0.1", "--sapo-ppo-epochs", "1"]
SIDECAR_LINE = re.compile(r"rollout gossip: sidecar up at (\S+)")


metrics = scrape_metrics


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metrics(node, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    m: dict = {}
    while time.monotonic() < deadline:
        assert node.proc.poll() is None, f"{node.name} exited:\n{node.log_text()[-3000:]}"
        try:
            m = metrics(node)
            if predicate(m):
                return m
        except OSError:
            pass
        time.sleep(0.5)
    sapo = {k: v for k, v in m.items() if "sapo" in k[0]}
    raise AssertionError(f"{node.name}: timed out waiting for {what}; sapo metrics: {sapo}\n{node.log_text()[-2500:]}")


def rogue_publish(tmp_path: Path, target_maddr: str, victim_id: str) -> None:
    """A peer with its own identity and sidecar publishes one rollout per rejection reason."""
    signer = Signer.from_identity_file(ensure_identity(tmp_path / "rogue.key").path)

    def group(rnd: int, completions=("1",) * G, sender: str | None = None) -> RolloutGroup:
        item = tasks.make_item("add4", 0, 1)
        return RolloutGroup("default", rnd, sender or signer.peer_id, item.task, item.seed, item.index,
                            item.question, tuple(completions), {})

    async def main() -> None:
        client = GossipClient(identity_path=tmp_path / "rogue.key", run_id="default", on_message=lambda f, d: None)
        client.start()
        try:
            assert await client.wait_ready(45), "rogue sidecar did not start"
            client.connect([target_maddr])
            await asyncio.sleep(3)  # let gossipsub exchange subscriptions
            for _ in range(2):  # twice: the second copy survives a mesh that formed late
                now = round_of(get_dht_time(), ROUND_S)
                forged = group(now, sender=victim_id)
                body = forged.body()
                import msgpack
                blobs = [
                    b"\x93not a rollout",  # bad_types
                    encode_rollout(group(now, completions=("1",) * (G - 1)), signer).wire,  # wrong_group_size
                    encode_rollout(group(now - 5), signer).wire,  # stale_round
                    # forged_signature: the victim's body under the rogue's key
                    msgpack.packb([1, body, signer.public_key.proto, signer.sign(Context.SAPO_ROLLOUT, body)]),
                    b"\x00" * (MAX_ROLLOUT_BYTES + 10),  # oversize
                ]
                for b in blobs:
                    client.publish(b)
                await asyncio.sleep(2)
        finally:
            await client.stop()

    asyncio.run(main())


def test_three_peers_share_reject_and_survive_dead_peers(swarm, tmp_path: Path):
    t0 = time.monotonic()
    a = swarm.add("a", SAPO_ARGS)
    a.wait_info()
    b = swarm.add("b", SAPO_ARGS, initial=a.join_maddr())
    c = swarm.add("c", SAPO_ARGS, initial=a.join_maddr())
    nodes = (a, b, c)
    for n in nodes:
        n.wait_info()

    # 1. everyone receives external rollouts in time and trains on them
    for n in nodes:
        m = wait_metrics(n, lambda m: value(m, "swarm_sapo_external_used_total") > 0, 120, "external rollouts used")
        got = sum(value(m, "swarm_sapo_rollouts_received_total", path=p) for p in ("gossip", "pull"))
        assert got > 0 and value(m, "swarm_sapo_rollouts_published_total") > 0
    gossip_total = sum(value(metrics(n), "swarm_sapo_rollouts_received_total", path="gossip") for n in nodes)
    assert gossip_total > 0, "no rollout arrived by gossip at all"
    fractions = [value(metrics(n), "swarm_sapo_gossip_delivery_fraction") for n in nodes]
    assert all(0.0 <= f <= 1.0 for f in fractions) and max(fractions) > 0, fractions
    # the page's SAPO panel: its rounds, with the external rollouts each used (sampled every 2 s)
    panel = wait_page_panel(a, lambda p: p["rows"] and any(row[5] > 0 for row in p["rows"]))
    assert panel["kind"] == "rollouts" and panel["columns"][5] == "external used"

    # 2. a rogue gossip peer: every bad rollout is rejected by reason
    maddr = SIDECAR_LINE.search(a.log_text()).group(1)
    rogue_publish(tmp_path, maddr, victim_id=b.info["peer_id"])
    reasons = ("bad_types", "wrong_group_size", "stale_round", "forged_signature", "oversize")
    wait_metrics(a, lambda m: all(value(m, "swarm_sapo_payloads_rejected_total", reason=r) >= 1 for r in reasons),
                 20, "every rejection reason counted")

    # 3. kill c: a and b keep training (rounds advance, no stall)
    r0 = value(metrics(a), "swarm_sapo_round")
    c.kill()
    for n in (a, b):
        wait_metrics(n, lambda m: value(m, "swarm_sapo_round") >= r0 + 2, 8 * ROUND_S, "rounds after c died")
    # then b: a trains alone on local data
    b.kill()
    alone0 = value(metrics(a), "swarm_sapo_rounds_without_external_total")
    r1 = value(metrics(a), "swarm_sapo_round")
    m = wait_metrics(a, lambda m: value(m, "swarm_sapo_rounds_without_external_total") >= alone0 + 2
                     and value(m, "swarm_sapo_round") >= r1 + 2, 8 * ROUND_S, "local-only rounds after b died")

    # 4. metrics: the counters add up
    received = sum(value(m, "swarm_sapo_rollouts_received_total", path=p) for p in ("gossip", "pull"))
    used = value(m, "swarm_sapo_external_used_total")
    dropped_zv = value(m, "swarm_sapo_external_dropped_total", reason="zero_variance")
    assert 0 < used <= received - dropped_zv
    assert value(m, "swarm_sapo_external_dropped_total", reason="shortfall") > 0  # alone: J groups missing
    assert value(m, "swarm_network_transmit_bytes_total", channel="rollouts") > 0
    assert value(m, "swarm_sapo_external_negative_advantage_scale") == 0.0

    assert a.terminate(30) == 0
    stats = json.loads((a.state_dir / "summary.json").read_text())["strategy_stats"]
    last = stats["history"][-2:]
    assert all(row["used"] == 0 and row["senders"] == 0 for row in last), last
    # a dead peer never stalls a round: each round ends within its own period
    assert max(row["duration_s"] for row in stats["history"][3:]) < ROUND_S * 1.5
    assert time.monotonic() - t0 < 170

