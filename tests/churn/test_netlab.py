"""Lab self-test: hosts reach each other, `shape` caps bandwidth, `partition` cuts a host off
and `heal` restores it, and teardown leaves no lab namespace. Root + `ip netns` only."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from swarm_node.lab.netlab import NetLab, lab_namespaces

pytestmark = [pytest.mark.churn, pytest.mark.usefixtures("lab_capable")]

PREFIX = "swlt"  # tests use their own prefix and subnet: a user's running lab is never touched
SUBNET = "10.78.0.0/24"

RECEIVER = r"""
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 5001)); srv.listen(1); print("listening", flush=True)
conn, _ = srv.accept(); conn.settimeout(10)
first = None; counted = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    now = time.monotonic()
    first = first or now
    if 1.0 <= now - first <= 4.0:  # skip the token-bucket burst and the tail
        counted += len(data)
print(f"mbit {counted * 8 / 3.0 / 1e6:.3f}", flush=True)
"""
SENDER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5001), timeout=10)
end = time.monotonic() + 5.0
buf = b"x" * 65536
while time.monotonic() < end:
    s.sendall(buf)
s.close()
"""


def _loss(lab: NetLab, src: str, dst_ip: str) -> int:
    out = lab.exec(src, ["ping", "-c", "5", "-i", "0.2", "-W", "1", dst_ip], timeout_s=20).stdout
    m = re.search(r"(\d+)% packet loss", out)
    assert m, out
    return int(m.group(1))


def test_lab_hosts_ping_shape_partition_heal_and_teardown():
    """1. Two hosts on the bridge ping each other (0 % loss).
    2. shape 10mbit on a's egress: a python TCP sender a -> b measures 8.5-10.5 Mbit/s.
    3. partition b: 100 % loss; heal b: 0 % loss again.
    4. A lab left behind (no down()) is removed by the next lab's up(); down() leaves no namespace.
    Result: the lab's mechanisms do what the scenarios rely on, and clean up after themselves."""
    lab = NetLab(PREFIX, SUBNET)
    try:
        lab.up()
        a, b = lab.add_host("a"), lab.add_host("b")
        assert _loss(lab, "a", b.ip) == 0 and _loss(lab, "b", a.ip) == 0

        lab.shape("a", "10mbit")
        recv = subprocess.Popen([*b.prefix(), sys.executable, "-c", RECEIVER, b.ip], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert recv.stdout.readline().strip() == "listening"
            send = subprocess.run([*a.prefix(), sys.executable, "-c", SENDER, b.ip], timeout=30)
            assert send.returncode == 0
            out, _ = recv.communicate(timeout=20)
        finally:
            recv.kill()
        mbit = float(re.search(r"mbit (\S+)", out).group(1))
        print(f"shape 10mbit measured {mbit:.2f} Mbit/s")
        assert 8.5 <= mbit <= 10.5, mbit
        lab.shape("a", "off")

        lab.partition("b")
        assert _loss(lab, "a", b.ip) == 100
        assert _loss(lab, "b", a.ip) == 100
        lab.heal("b")
        assert _loss(lab, "a", b.ip) == 0

        lab.loss("b", 100)  # loss is input-side on b: a's pings never arrive
        assert _loss(lab, "a", b.ip) == 100
        lab.loss("b", 0)
        assert _loss(lab, "a", b.ip) == 0
        ok, why = lab.netem_available()
        assert ok or "netem" in why
    finally:
        pass  # deliberately no down(): the next lab must clean up a crashed one

    again = NetLab(PREFIX, SUBNET)
    try:
        again.up()
        assert lab_namespaces(PREFIX) == [f"{PREFIX}-hub"]  # the stale hosts are gone
    finally:
        again.down()
    assert lab_namespaces(PREFIX) == []
    assert subprocess.run(["ip", "link", "show", f"{PREFIX}-obs"], capture_output=True).returncode != 0
