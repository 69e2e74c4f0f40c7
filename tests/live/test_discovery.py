"""LAN discovery (`swarm-node join --discover`): the advertisement record, the py-libp2p mDNS
sidecar against spoofed advertisements, and real nodes finding each other on loopback and
across network namespaces on one bridge.

py-libp2p is never imported here (its protobufs clash with hivemind's, which other tests of
the session import): every sidecar runs as its own process, as in the node.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import psutil
import pytest

from swarm_node.discovery_record import (MAX_ADVERT_BYTES, MAX_MADDRS, Advert, AdvertRejected, decode_advert,
                                         encode_advert, service_fingerprint)
from swarm_node.lab.launcher import LAUNCHED_PIDS, NodeProcess
from swarm_node.protocol.signing import KeyType, Signer, encode_key_proto
from swarm_node.sidecars.mdns import listen_plan
from swarm_node.processes import is_running_process

from tests.conftest import FAST_NODE_ARGS

SIGNER = Signer.from_private_key_proto(encode_key_proto(KeyType.ED25519, bytes(range(32))))
STRANGER = Signer.from_private_key_proto(encode_key_proto(KeyType.ED25519, bytes(range(1, 33))))
PEER = SIGNER.peer_id
OTHER = "QmXHm9AAjmjdvzHRsT5D7TzBcxX8No2GBjPYDGkEq6V2k1"


def _good(**over) -> Advert:
    fields = dict(run_id="run-a", peer_id=PEER, maddrs=(f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}",))
    fields.update(over)
    return Advert(**fields)


def _decode(blob: bytes, run_id: str = "run-a", remote: str = PEER) -> Advert:
    return decode_advert(blob, expected_run_id=run_id, remote_peer_id=remote, remote_key=SIGNER.public_key.proto)


def _reason(blob: bytes, **kw) -> str:
    with pytest.raises(AdvertRejected) as e:
        _decode(blob, **kw)
    return e.value.reason


# ---------------------------------------------------------------- record: unit tests
def test_advert_round_trip():
    ad = _good(maddrs=(f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}", f"/ip6/fd00::2/tcp/31337/p2p/{PEER}"))
    assert _decode(encode_advert(ad, SIGNER)) == ad


def test_advert_rejections_name_their_reason():
    """Each invalid record is rejected with its own bounded reason, never accepted."""
    good = encode_advert(_good(), SIGNER)
    version, run_id, peer_id, maddrs, sig = msgpack.unpackb(good, raw=False)
    pack = lambda *f: msgpack.packb(list(f), use_bin_type=True)  # noqa: E731

    assert _reason(good, run_id="run-b") == "wrong_run"
    assert _reason(good, remote=OTHER) == "peer_mismatch"
    assert _reason(b"\xc1garbage") == "malformed"
    assert _reason(b"") == "malformed"
    assert _reason(pack(version, run_id, peer_id, maddrs)) == "malformed"  # 4 fields
    assert _reason(msgpack.packb({"v": 1})) == "malformed"
    assert _reason(pack(True, run_id, peer_id, maddrs, sig)) == "malformed"  # a bool is not a version
    assert _reason(pack(1.0, run_id, peer_id, maddrs, sig)) == "malformed"  # nor is a float
    assert _reason(pack(version, run_id, peer_id, maddrs, "sig-as-str")) == "malformed"
    assert _reason(pack(2, run_id, peer_id, maddrs, sig)) == "bad_version"
    assert _reason(b"\x00" * (MAX_ADVERT_BYTES + 1)) == "too_large"
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert _reason(pack(version, run_id, peer_id, maddrs, flipped)) == "bad_signature"
    # the signature covers the addresses: swapping one in breaks it
    assert _reason(pack(version, run_id, peer_id, [f"/ip4/6.6.6.6/tcp/1/p2p/{PEER}"], sig)) == "bad_signature"
    # the channel's key must be the named peer's key, and must be a key at all
    for key in (STRANGER.public_key.proto, b"\x08\x07\x12\x01x", b"garbage"):
        with pytest.raises(AdvertRejected, match="bad_signature"):
            decode_advert(good, expected_run_id="run-a", remote_peer_id=PEER, remote_key=key)
    # no key from the channel: an Ed25519 peer id carries its own
    assert decode_advert(good, expected_run_id="run-a", remote_peer_id=PEER, remote_key=None).peer_id == PEER
    # signed by the stranger for our peer id: the signature is real, the signer is not PEER
    forged = encode_advert(_good(), Signer(PEER, STRANGER.public_key, STRANGER._sign_raw))
    assert _reason(forged) == "bad_signature"


@pytest.mark.parametrize("maddrs", [
    [], [f"/ip4/10.0.0.5/tcp/1/p2p/{PEER}"] * (MAX_MADDRS + 1),
    ["/ip4/10.0.0.5/tcp/31337"],                       # no peer id
    [f"/ip4/10.0.0.5/tcp/31337/p2p/{OTHER}"],          # someone else's
    [f"/ip4/10.0.0.5/udp/31337/p2p/{PEER}"],           # not tcp
    [f"/ip4/10.0.0.5/tcp/0/p2p/{PEER}"],               # port 0
    [f"/ip4/10.0.0.5/tcp/99999/p2p/{PEER}"],
    [f"/unix/x/tcp/1/p2p/{PEER}"],
    [f"/ip4/{'1' * 300}/tcp/1/p2p/{PEER}"],            # oversize address
    [7], "not-a-list",
])
def test_advert_bad_maddrs_rejected(maddrs):
    blob = msgpack.packb([1, "run-a", PEER, maddrs, b"sig"], use_bin_type=True)
    assert _reason(blob) == "bad_maddr"
    if isinstance(maddrs, list) and all(isinstance(m, str) for m in maddrs):
        with pytest.raises(AdvertRejected):
            encode_advert(_good(maddrs=tuple(maddrs)), SIGNER)


def test_advert_size_cap_enforced_at_encode():
    with pytest.raises(ValueError, match="more than"):
        encode_advert(_good(), Signer(PEER, SIGNER.public_key, lambda data: b"s" * (MAX_ADVERT_BYTES + 1)))


def test_service_fingerprint_and_listen_plan():
    fp = service_fingerprint("run-a")
    assert fp == service_fingerprint("run-a") != service_fingerprint("run-b")
    assert len(f"_p2p-{fp}") <= 15  # DNS-SD service label limit
    assert listen_plan([f"/ip4/127.0.0.1/tcp/5/p2p/{PEER}"]) == ("127.0.0.1", ["127.0.0.1"])
    assert listen_plan([f"/ip4/10.0.0.5/tcp/5/p2p/{PEER}", f"/ip4/127.0.0.1/tcp/5/p2p/{PEER}"]) == \
        ("0.0.0.0", ["10.0.0.5"])
    with pytest.raises(ValueError):
        listen_plan([f"/ip6/::1/tcp/5/p2p/{PEER}"])
    # the node imports swarm_node.discovery; py-libp2p (whose protobufs clash with hivemind's)
    # is imported only inside the sidecar process
    import swarm_node.discovery  # noqa: F401
    assert "libp2p" not in sys.modules


# ---------------------------------------------------------------- sidecar: live, real mDNS
def _identity(path: Path) -> str:
    from swarm_node.identity import ensure_identity

    return ensure_identity(path).peer_id


class _Sidecar:
    """One `python -m swarm_node.sidecars.mdns` process; events read from its stdout file."""

    def __init__(self, tmp: Path, name: str, run_id: str, *extra: str, port: int = 20000):
        key = tmp / f"{name}.key"
        self.peer_id = _identity(key)
        self.out = tmp / f"{name}.out"
        cmd = [sys.executable, "-m", "swarm_node.sidecars.mdns", "--identity", str(key), "--run-id", run_id,
               "--maddr", f"/ip4/127.0.0.1/tcp/{port}/p2p/{self.peer_id}", "--parent-pid", str(os.getpid()), *extra]
        with open(self.out, "wb") as out, open(tmp / f"{name}.err", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        LAUNCHED_PIDS.add(self.proc.pid)

    def events(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.mark.multiprocess
def test_sidecar_finds_its_run_and_rejects_spoofs(tmp_path):
    """1. Start an honest browsing sidecar H of run R, an honest advertiser G of R, three
       spoofers advertising under R's service type (a record for another run, a bad signature,
       an oversize record), and an honest advertiser O of another run.
    2. Wait (bounded) until H has reported G and rejected all three spoofers.
    Result: H reports exactly G as a peer, each spoof is rejected with its reason, and O is
    never seen at all (another run's service type)."""
    run = f"disc-{uuid.uuid4().hex[:8]}"
    cars = []
    try:
        h = _Sidecar(tmp_path, "h", run)
        g = _Sidecar(tmp_path, "g", run, "--no-browse", port=20001)
        spoofs = {f: _Sidecar(tmp_path, f"f-{f}", run, "--no-browse", "--fault", f)
                  for f in ("wrong_run", "bad_signature", "oversize")}
        o = _Sidecar(tmp_path, "other", run + "-x", "--no-browse")
        cars = [h, g, *spoofs.values(), o]
        expected_rejects = {spoofs["wrong_run"].peer_id: "wrong_run",
                            spoofs["bad_signature"].peer_id: "bad_signature",
                            spoofs["oversize"].peer_id: "too_large"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ev = h.events()
            peers = {e["peer_id"] for e in ev if e["event"] == "peer"}
            rejected = {e["peer_id"]: e["reason"] for e in ev if e["event"] == "rejected"}
            if g.peer_id in peers and rejected == expected_rejects:
                break
            assert h.proc.poll() is None, (tmp_path / "h.err").read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(2)  # give O every chance to be (wrongly) seen
        ev = h.events()
        assert [e for e in ev if e["event"] == "ready"], (tmp_path / "h.err").read_text()[-2000:]
        peers = [e for e in ev if e["event"] == "peer"]
        assert [p["peer_id"] for p in peers] == [g.peer_id], ev
        assert peers[0]["maddrs"] == [f"/ip4/127.0.0.1/tcp/20001/p2p/{g.peer_id}"]
        assert {e["peer_id"]: e["reason"] for e in ev if e["event"] == "rejected"} == expected_rejects, ev
        assert o.peer_id not in json.dumps(ev)
        print(f"\nsidecar H: ready at {ev[0]['t_s']:.1f}s, found G at {peers[0]['t_s']:.1f}s")
    finally:
        for c in cars:
            c.close()


# ---------------------------------------------------------------- nodes: live
FOUND = re.compile(r"found (\d+) peer\(s\) of run '[^']+' on the LAN in ([\d.]+)s \(sidecar up after ([\d.]+)s\)")


def _discover_node(workdir: Path, name: str, run: str, extra: list[str] = (), prefix: list[str] = ()) -> NodeProcess:
    args = [*FAST_NODE_ARGS, "--run-id", run, "--strategy", "solo", "--discover", "--discover-timeout-s", "60",
            *extra]
    node = NodeProcess(name, workdir / name, args)
    if prefix:
        node.cmd_prefix = list(prefix)
    return node.start()


def _sidecar_pids(node: NodeProcess) -> list[int]:
    try:
        kids = psutil.Process(node.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if "swarm_node.sidecars.mdns" in " ".join(k.cmdline()) and k.status() != psutil.STATUS_ZOMBIE:
                out.append(k.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def _wait(pred, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _see_each_other(nodes: list[NodeProcess], timeout_s: float) -> set[str]:
    ids = {n.wait_info(120)["peer_id"] for n in nodes}
    for n in nodes:
        n.wait_for(lambda s: {p["peer_id"] for p in s["peers"]} >= ids, timeout_s, "seeing the other node")
    return ids


def _time_to_find(node: NodeProcess) -> float | None:
    """Seconds from the sidecar advertising to the first peer found (the mDNS part)."""
    m = FOUND.search(node.log_text())
    return round(float(m.group(2)) - float(m.group(3)), 2) if m else None


def _sidecar_up_s(node: NodeProcess) -> float | None:
    """Seconds from spawning the sidecar to it advertising (mostly importing py-libp2p)."""
    m = FOUND.search(node.log_text())
    return float(m.group(3)) if m else None


@pytest.mark.multiprocess
def test_two_nodes_discover_each_other_and_sidecar_dies_with_node(tmp_path):
    """1. Start two nodes with --discover and neither --initial-peers nor --new-swarm.
    2. Both list each other in /status (bounded wait); record mDNS time-to-find.
    3. SIGKILL b's sidecar: the node restarts it (a new pid appears).
    4. SIGKILL a's main pid only (not its group): a's sidecar is gone within 5 s.
    Result: discovery replaces the join line; the sidecar is supervised and never outlives the node."""
    run = f"disc-{uuid.uuid4().hex[:8]}"
    a = _discover_node(tmp_path, "a", run)
    b = _discover_node(tmp_path, "b", run)
    nodes = [a, b]
    try:
        t0 = time.monotonic()
        _see_each_other(nodes, 120)
        both_s = time.monotonic() - t0
        ttf = [_time_to_find(n) for n in nodes]
        assert any(t is not None for t in ttf), a.log_text()[-2000:] + b.log_text()[-2000:]
        print(f"\nloopback: both in each other's /status {both_s:.1f}s after launch; "
              f"mDNS time-to-find after sidecar up: {ttf}")

        old = _wait(lambda: _sidecar_pids(b), 30, "b's sidecar")
        os.kill(old[0], signal.SIGKILL)
        new = _wait(lambda: [p for p in _sidecar_pids(b) if p not in old], 30, "b's sidecar to be restarted")
        LAUNCHED_PIDS.update(new)
        assert b.proc.poll() is None

        car = _wait(lambda: _sidecar_pids(a), 30, "a's sidecar")
        LAUNCHED_PIDS.update(car)
        a._remember_pids()
        a.kill(group=False)
        _wait(lambda: not any(is_running_process(p) for p in car), 5, "a's sidecar to die with a")
    finally:
        for n in nodes:
            n.close()


@pytest.mark.multiprocess
def test_first_node_alone_starts_swarm_and_new_swarm_only_advertises(tmp_path):
    """1. A --discover node alone, --discover-timeout-s 3: it starts a new swarm by itself.
    2. A --new-swarm --discover node of the same run: it only advertises (no waiting, no
       browsing) and still becomes ready, and the first node dials it when it appears.
    Result: the first node on a LAN needs no --new-swarm; --new-swarm nodes are found by others."""
    run = f"disc-{uuid.uuid4().hex[:8]}"
    a = _discover_node(tmp_path, "a", run, ["--discover-timeout-s", "3"])
    b = None
    try:
        a.wait_info(120)
        assert "starting a new swarm (still advertising)" in a.log_text()
        b = _discover_node(tmp_path, "b", run, ["--new-swarm"])
        _see_each_other([a, b], 120)
        assert "(advertise only)" in b.log_text() and "found" not in b.log_text().split("advertising on")[-1]
    finally:
        for n in (a, b):
            if n is not None:
                n.close()


# ---------------------------------------------------------------- nodes: network namespaces
def _lab_or_skip():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if "cmd_prefix" not in NodeProcess.__dataclass_fields__:
        pytest.skip("this launcher cannot run a node inside a namespace (no NodeProcess.cmd_prefix)")
    from swarm_node.lab.netlab import LabError, NetLab, capability

    ok, why = capability()
    if not ok:
        pytest.skip(why)
    return NetLab(prefix="smd", subnet="10.78.0.0/24"), LabError


@pytest.mark.multiprocess
def test_discovery_across_network_namespaces(tmp_path):
    """1. Two namespaces ("hosts") 10.78.0.1 and .2 with veths into one bridge (stale lab removed
       first, torn down always).
    2. In each, a node with --discover on its own IP and no initial peers; repeated 3 times.
    3. Both see each other in /status, and each dialled the other's 10.78.0.x join address.
    Result: mDNS discovery works between hosts on one L2 segment; median time-to-find reported."""
    lab, LabError = _lab_or_skip()
    figures = []
    with lab:
        hosts = [lab.add_host("a"), lab.add_host("b")]
        for attempt in range(3):
            run = f"disc-ns-{uuid.uuid4().hex[:6]}"
            nodes = []
            try:
                for h in hosts:
                    extra = ["--host", h.ip, "--metrics-addr", f"{h.ip}:0"]
                    nodes.append(_discover_node(tmp_path / f"r{attempt}", h.name, run, extra, prefix=h.prefix()))
                t0 = time.monotonic()
                _see_each_other(nodes, 120)
                both_s = time.monotonic() - t0
                for n, own, other in zip(nodes, hosts, reversed(hosts)):
                    assert n.info["join_maddrs"][0].startswith(f"/ip4/{own.ip}/tcp/")
                    assert f"/ip4/{other.ip}/tcp/" in n.log_text(), n.log_text()[-2000:]
                ttf = [t for t in (_time_to_find(n) for n in nodes) if t is not None]
                up = [t for t in (_sidecar_up_s(n) for n in nodes) if t is not None]
                figures.append((min(ttf) if ttf else None, max(up) if up else None, round(both_s, 1)))
            finally:
                for n in nodes:
                    n.close()
    found = [f[0] for f in figures if f[0] is not None]
    print(f"\nnetns: per run (mDNS time-to-find s, sidecar start s, launch-to-both-see-each-other s): {figures}; "
          f"median time-to-find {statistics.median(found) if found else None}s")
    assert found


# ---------------------------------------------------------------- node-side client: fake sidecars
class _FakeSidecarClient:
    """A DiscoveryClient whose 'sidecar' is a small Python script (broken, hung, or chatty)."""

    @staticmethod
    def make(script: str, **kw):
        from swarm_node.discovery import DiscoveryClient

        class Fake(DiscoveryClient):
            def command(self) -> list[str]:
                return [sys.executable, "-c", script]

        return Fake(identity_path=Path("/nonexistent"), run_id="r", maddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"], **kw)


def test_client_bounded_when_sidecar_crashes_or_hangs():
    """1. A sidecar that prints garbage and exits 3: the client restarts it, and the wait for
       peers returns [] within its bound.
    2. A sidecar that never says ready and ignores SIGTERM: the wait returns [] after the start
       bound; stop() kills it within the stop bound.
    Result: a broken or slow sidecar delays the node by a bounded time and is never left running."""
    import asyncio

    async def crashing() -> None:
        c = _FakeSidecarClient.make("print('not json', flush=True); import sys; sys.exit(3)",
                                    start_timeout_s=2.0, max_backoff_s=0.5)
        c.start()
        t0 = time.monotonic()
        assert await c.wait_for_peers(1.0) == []
        assert time.monotonic() - t0 < 3.5
        await asyncio.sleep(2.5)
        assert c.restarts >= 1
        await c.stop()

    async def hung() -> None:
        script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        c = _FakeSidecarClient.make(script, start_timeout_s=1.5, stop_timeout_s=1.0)
        c.start()
        t0 = time.monotonic()
        assert await c.wait_for_peers(30.0) == []  # bounded by start_timeout_s, not by the 30 s
        assert time.monotonic() - t0 < 3.0
        pid = c.pid
        t0 = time.monotonic()
        await c.stop()
        assert time.monotonic() - t0 < 4.0 and not is_running_process(pid)

    asyncio.run(crashing())
    asyncio.run(hung())


def test_client_collects_peers_then_hands_later_ones_over():
    """1. A fake sidecar reports ready, a rejection, an oversize garbage line, peer P, then
       (after the start window) peer Q.
    2. Result: the wait returns P's maddrs; Q goes to on_peer; the rejection reached on_reject."""
    import asyncio

    p_addr, q_addr = f"/ip4/10.0.0.5/tcp/1/p2p/{PEER}", f"/ip4/10.0.0.6/tcp/1/p2p/{OTHER}"
    lines = [{"event": "ready", "listen": ["/ip4/127.0.0.1/tcp/9"], "service": "_p2p-x._udp.local."},
             {"event": "rejected", "reason": "wrong_run", "peer_id": OTHER, "detail": "d"},
             "x" * 100_000,
             {"event": "peer", "peer_id": PEER, "maddrs": [p_addr]}]
    script = ("import json, sys, time\n"
              f"for l in {json.dumps(lines)!s}:\n"
              "    print(l if isinstance(l, str) else json.dumps(l), flush=True)\n"
              "time.sleep(1.5)\n"
              f"print(json.dumps({{'event': 'peer', 'peer_id': '{OTHER}', 'maddrs': ['{q_addr}']}}), flush=True)\n"
              "time.sleep(30)\n")
    later, rejects = [], []

    async def main() -> None:
        c = _FakeSidecarClient.make(script, on_peer=lambda pid, m: later.append((pid, m)),
                                    on_reject=rejects.append, start_timeout_s=10)
        c.start()
        assert await c.wait_for_peers(10.0) == [p_addr]
        await asyncio.sleep(3)
        await c.stop()
        assert c.rejected == {"wrong_run": 1}

    asyncio.run(main())
    assert later == [(OTHER, [q_addr])] and rejects == ["wrong_run"]
