"""The local gRPC control service and the status/peers tables.

Real gRPC on 127.0.0.1 port 0; the node is a pair of fake callbacks.
"""
from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from swarm_node.control import ControlClient, ControlError, ControlServer, ControlUnavailable
from swarm_node.protocol.pb import swarm_node_control_pb2 as pb
from swarm_node.status import NodeStatus, PeerView, Phase
from swarm_node.tables import format_peers, format_status, short_id

SELF = "12D3KooWSelfSelfSelfSelfSelfSelfSelfSelfSelfSelf000001"
OTHER = "12D3KooWOtherOtherOtherOtherOtherOtherOtherOthe999999"


def peer(pid: str, **kw) -> PeerView:
    base = dict(peer_id=pid, state="online", strategy="sync", role="trainer", device="cuda:0", step=40,
                samples_per_s=1234.5, version="0.1.0", expires_in_s=8.6)
    return PeerView(**{**base, **kw})


def full_status(**kw) -> NodeStatus:
    base = dict(
        peer_id=SELF, run_id="run-7", version="0.1.0", phase=Phase.READY, strategy="sync", role="trainer",
        device="cuda:0", join_maddrs=[f"/ip4/192.168.1.20/tcp/31337/p2p/{SELF}", f"/ip6/fd00::2/tcp/31337/p2p/{SELF}"],
        step=41, resumed_from_step=30, train_loss=2.31, val_loss=None, samples_per_s=2300.0, routing_table_size=4,
        peers=[peer(SELF, is_self=True, step=41), peer(OTHER, state="joining", device="cpu")],
        last_round={"id": 57, "outcome": "ok", "duration_s": 3.1, "group": [1, 2]},
        bytes_sent=5_000_000, bytes_received=123, uptime_s=3725.0, checks={"dht": True, "model_loaded": False},
        waiting_for=None,
    )
    return NodeStatus(**{**base, **kw})


class FakeNode:
    def __init__(self) -> None:
        self.status = full_status()
        self.drains: list[str] = []
        self.drain_steps: list[int] = []
        self.block = threading.Event()
        self.blocking = False

    def status_fn(self) -> NodeStatus:
        if self.blocking:
            self.block.wait(5.0)
        return self.status

    def drain_fn(self, reason: str, at_step: int = 0) -> tuple[bool, str]:
        if reason == "explode":
            raise RuntimeError("drain machinery broken")
        self.drains.append(reason)
        self.drain_steps.append(at_step)
        return True, f"draining: {reason}"


@pytest.fixture
def node():
    return FakeNode()


@pytest.fixture
def control(node):
    srv = ControlServer("127.0.0.1:0", status_fn=node.status_fn, drain_fn=node.drain_fn)
    address = srv.start()
    yield address
    node.block.set()
    srv.stop(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- gRPC ---------------------------------------------------------------------------------


def test_status_round_trip(control, node):
    host, port = control.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with ControlClient(control) as c:
        assert c.status() == node.status
        node.status = full_status(phase=Phase.ISOLATED, resumed_from_step=None, train_loss=None, val_loss=0.0,
                                  waiting_for="peers: 1/2", peers=[], last_round={}, checks={})
        assert c.status() == node.status  # None stays None, 0.0 stays 0.0


def test_nan_loss_survives(control, node):
    node.status = full_status(train_loss=math.nan)
    with ControlClient(control) as c:
        assert math.isnan(c.status().train_loss)


def test_peers(control, node):
    with ControlClient(control) as c:
        assert c.peers() == node.status.peers


def test_drain_at_step_is_passed_on_and_a_negative_step_refused(control, node):
    """`swarm-node drain --at-step N` reaches the node's drain callback with N; a negative step
    (only possible by hand-built requests) is refused by the service without calling it."""
    with ControlClient(control) as c:
        assert c.drain("together", at_step=120)[0] is True
        assert node.drain_steps == [120]
        ok, detail, *_ = c.drain("bad", at_step=-5)
        assert ok is False and "at_step must be >= 0" in detail
        assert node.drains == ["together"]


def test_drain_passes_reason(control, node):
    with ControlClient(control) as c:
        assert c.drain("operator: maintenance")[:2] == (True, "draining: operator: maintenance")
        assert node.drains == ["operator: maintenance"]
        with pytest.raises(ControlError) as ei:
            c.drain("explode")
        assert not isinstance(ei.value, ControlUnavailable)
        assert "drain machinery broken" in str(ei.value)
        assert c.status() == node.status  # a failing callback does not take the server down


def test_unreachable_raises_within_timeout():
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with ControlClient(address, timeout_s=2.0, state_dir="/var/lib/swarm") as c:
        with pytest.raises(ControlUnavailable) as ei:
            c.status()
    assert time.monotonic() - t0 < 2.5
    assert str(ei.value) == f"no swarm-node is listening on {address} — is the node running? (state dir /var/lib/swarm)"
    assert ei.value.address == address


def test_hung_node_hits_the_deadline(control, node):
    node.blocking = True
    t0 = time.monotonic()
    with ControlClient(control, timeout_s=0.5) as c:
        with pytest.raises(ControlUnavailable, match="did not answer within 0.5s"):
            c.status()
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("address", ["0.0.0.0:0", "10.1.2.3:7000", "[::]:0", "example.com:0"])
def test_non_loopback_bind_refused(node, address):
    with pytest.raises(ValueError, match="loopback"):
        ControlServer(address, status_fn=node.status_fn, drain_fn=node.drain_fn)
    ControlServer(address, status_fn=node.status_fn, drain_fn=node.drain_fn, allow_remote=True)  # opt-in; not started


def test_bad_address_and_busy_port(node, control):
    with pytest.raises(ValueError, match="HOST:PORT"):
        ControlServer("127.0.0.1", status_fn=node.status_fn, drain_fn=node.drain_fn)
    # SO_REUSEPORT is off: a second node on the same port fails instead of sharing it.
    with pytest.raises(OSError):
        ControlServer(control, status_fn=node.status_fn, drain_fn=node.drain_fn).start()


def test_ipv6_loopback(node):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    srv = ControlServer("[::1]:0", status_fn=node.status_fn, drain_fn=node.drain_fn)
    address = srv.start()
    try:
        assert address.startswith("[::1]:")
        with ControlClient(address) as c:
            assert c.status().peer_id == SELF
    finally:
        srv.stop(0)


def test_proto_mirrors_models():
    """A NodeStatus/PeerView field without a proto field would silently vanish over gRPC."""
    status_fields = set(NodeStatus.model_fields) - {"last_round"} | {"last_round_json"}
    assert status_fields == set(pb.StatusReply.DESCRIPTOR.fields_by_name)
    assert set(PeerView.model_fields) == set(pb.Peer.DESCRIPTOR.fields_by_name)


# --- tables -------------------------------------------------------------------------------


def test_format_status():
    st = full_status()
    out = format_status(st)
    assert short_id(SELF) == "12D3Ko…000001"
    assert "12D3Ko…000001" in out and f"{SELF} " not in out.split("join address")[0]
    for text in ("run-7", "ready", "sync / trainer", "cuda:0", "41 (resumed from 30)", "train 2.31  val -",
                 "2,300.0", "2 seen (1 joining, 1 online)", "outcome=ok", "4.8 MiB", "1h02m05s",
                 "dht ok  model_loaded FAIL"):
        assert text in out, (text, out)
    for m in st.join_maddrs:  # whole, on one line, for copying
        assert f"join address: {m}\n" in out
    assert "\x1b[" not in out
    assert SELF in format_status(st, wide=True).split("join address")[0]
    waiting = format_status(full_status(phase=Phase.ISOLATED, waiting_for="peers: 1/2", join_maddrs=[], peers=[]))
    assert "isolated — waiting for peers: 1/2" in waiting and "join address: (none yet)" in waiting


def test_format_peers():
    peers = [peer(OTHER, state="joining", device="cpu"), peer(SELF, is_self=True, step=41)]
    out = format_peers(peers)
    lines = out.splitlines()
    header = next(line for line in lines if "peer" in line)
    for col in ("peer", "state", "strategy", "role", "device", "step", "samples/s", "version", "expires in"):
        assert col in header
    rows = [line for line in lines if "…" in line]
    assert len(rows) == 2 and rows[0].lstrip().startswith("* 12D3Ko…000001")  # self first
    assert "12D3Ko…999999" in rows[1] and "joining" in rows[1] and "1,234.5" in rows[1] and "9s" in rows[1]
    assert SELF not in out and "\x1b[" not in out
    wide = format_peers(peers, wide=True)
    assert SELF in wide and OTHER in wide and "…" not in wide
    assert all(len(line) <= 240 for line in wide.splitlines())
    assert format_peers([]) == "no peers seen\n"


def test_drain_needs_the_token_and_reading_does_not(node, tmp_path):
    """A node with a control token: status answers anyone local, drain only a caller with the token
    from the state dir (written 0600); no token or a wrong one is refused without draining."""
    import os
    import stat

    from swarm_node.control import ControlRefused, read_token, write_token

    token = write_token(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "control.token").st_mode) == 0o600
    assert read_token(tmp_path) == token and read_token(tmp_path / "nowhere") is None
    srv = ControlServer("127.0.0.1:0", status_fn=node.status_fn, drain_fn=node.drain_fn, token=token)
    address = srv.start()
    try:
        with ControlClient(address) as c:
            assert c.status() == node.status
            with pytest.raises(ControlRefused, match="control token"):
                c.drain("stranger")
        with ControlClient(address, token="0" * 64) as c, pytest.raises(ControlRefused):
            c.drain("guess")
        assert node.drains == []
        with ControlClient(address, token=read_token(tmp_path)) as c:
            assert c.drain("owner")[:2] == (True, "draining: owner")
        assert node.drains == ["owner"]
        assert write_token(tmp_path) != token  # a new one each start
    finally:
        node.block.set()
        srv.stop(0.5)


def test_a_node_already_past_the_drain_step_refuses_and_trains_on():
    """`drain --at-step N` to a node at step > N is refused with its step (the caller asks again
    for a later step) instead of stopping it where it is, which forked peers meant to stop together."""
    from types import SimpleNamespace

    from swarm_node.daemon import Node

    calls = []
    node = object.__new__(Node)
    node._loop = SimpleNamespace(call_soon_threadsafe=lambda fn, *a: calls.append((fn.__name__, a)))
    node.trainer = SimpleNamespace(step=120)
    out = node._drain_from_thread("together", at_step=100)
    assert (out.accepted, out.past_step, out.current_step) == (False, True, 120) and calls == []
    out = node._drain_from_thread("together", at_step=150)
    assert out.accepted and not out.past_step and calls == [("_drain_at", (150, "drain requested: together"))]
    # at the step itself: it stops there, as the peers asked for the same step do (step >= N)
    out = node._drain_from_thread("together", at_step=120)
    assert out.accepted and not out.past_step and calls[-1] == ("_drain_at", (120, "drain requested: together"))
