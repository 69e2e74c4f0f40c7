"""The node side of rollout gossip re-dials known sidecars now and then, so a connection lost in
a partition comes back after the heal; new addresses are dialled at once. No sidecar runs."""
from __future__ import annotations

import json
from pathlib import Path

from swarm_node.strategies.sapo import gossip
from swarm_node.strategies.sapo.gossip import REDIAL_S, GossipClient


def test_known_addresses_are_dialled_again_after_redial_s(monkeypatch):
    client = GossipClient(identity_path=Path("/nonexistent"), run_id="t", on_message=lambda *_: None)
    sent: list[list[str]] = []
    monkeypatch.setattr(client.sidecar, "send_line", lambda line: sent.append(json.loads(line)["maddrs"]) or True)
    client._ready.set()
    client.listen = ["/ip4/127.0.0.1/tcp/1/p2p/me"]
    now = [100.0]
    monkeypatch.setattr(gossip.time, "monotonic", lambda: now[0])
    a, b = "/ip4/127.0.0.1/tcp/2/p2p/A", "/ip4/127.0.0.1/tcp/3/p2p/B"

    client.connect([a, *client.listen])
    assert sent == [[a]]  # our own address is never dialled
    now[0] += 1
    client.connect([a, b])
    assert sent[-1] == [b]  # a new address at once; a is not due yet
    now[0] += REDIAL_S
    client.connect([a, b])
    assert sorted(sent[-1]) == [a, b]  # both again: a lost connection comes back
    assert len(sent) == 3
