"""`swarm-node check` findings; only loopback sockets are touched."""
from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import pytest
import torch

from swarm_node import preflight
from swarm_node.preflight import (
    Finding,
    check_disk,
    check_memory,
    check_nofile,
    check_peers,
    check_port,
    exit_code,
    format_findings,
    parse_multiaddr,
    run_preflight,
)

PEER_ID = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"


def closed_loopback_port() -> int:
    # Bind then close without listening: nothing accepts on this port afterwards.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_multiaddr_accepts_common_forms() -> None:
    a = parse_multiaddr(f"/ip4/10.0.0.2/tcp/31337/p2p/{PEER_ID}")
    assert (a.proto, a.host, a.transport, a.port, a.peer_id) == ("ip4", "10.0.0.2", "tcp", 31337, PEER_ID)
    assert parse_multiaddr(f"/dns4/node.example.org/tcp/443/p2p/{PEER_ID}").host == "node.example.org"
    assert parse_multiaddr(f"/ip6/::1/tcp/1/p2p/{PEER_ID}").proto == "ip6"
    assert parse_multiaddr(f"/ip4/1.2.3.4/udp/9/quic-v1/p2p/{PEER_ID}").transport == "udp"
    assert parse_multiaddr(f"/ip4/1.2.3.4/tcp/9/p2p/{PEER_ID}/p2p-circuit/p2p/{PEER_ID}").port == 9


@pytest.mark.parametrize(
    "bad, why",
    [
        ("ip4/1.2.3.4/tcp/1/p2p/" + PEER_ID, "starts with '/'"),
        ("/ip4/1.2.3.999/tcp/1/p2p/" + PEER_ID, "IPv4"),
        ("/ip4/1.2.3.4/tcp/70000/p2p/" + PEER_ID, "port"),
        ("/ip4/1.2.3.4/tcp/1/x/" + PEER_ID, "p2p"),
        ("/ip4/1.2.3.4/tcp/1", "expected"),
        ("/ip4/1.2.3.4/sctp/1/p2p/" + PEER_ID, "transport"),
        ("/ip4/1.2.3.4/tcp/1/p2p/not-base58!", "peer id"),
        ("/onion3/abc/tcp/1/p2p/" + PEER_ID, "protocol"),
    ],
)
def test_parse_multiaddr_rejects(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_multiaddr(bad)


@pytest.mark.parametrize("listen", [True, False])
def test_busy_port_is_an_error(listen: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        if listen:
            s.listen()
        port = s.getsockname()[1]
        f = check_port("127.0.0.1", port)
    assert f.level == "error" and str(port) in f.detail and "EADDRINUSE" in f.detail


def test_free_port_and_port_zero_are_ok() -> None:
    assert check_port("127.0.0.1", closed_loopback_port()).level == "ok"
    assert check_port("0.0.0.0", 0).level == "ok"


def test_unreachable_peer_is_a_warning_naming_it() -> None:
    port = closed_loopback_port()
    maddr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER_ID}"
    t0 = time.monotonic()
    [f] = check_peers([maddr], connect_timeout_s=3.0)
    assert time.monotonic() - t0 < 3.0
    assert f.level == "warn" and maddr in f.detail and "ECONNREFUSED" in f.detail


def test_reachable_peer_bad_peer_and_order() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        good = f"/ip4/127.0.0.1/tcp/{srv.getsockname()[1]}/p2p/{PEER_ID}"
        findings = check_peers(["/garbage", good], connect_timeout_s=3.0)
    assert [f.level for f in findings] == ["error", "ok"]
    assert "'/garbage'" in findings[0].detail
    assert check_peers([])[0].level == "ok"


def test_peer_probes_are_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(addr: object, timeout_s: float) -> None:
        time.sleep(3)

    monkeypatch.setattr(preflight, "_probe_tcp", hang)
    t0 = time.monotonic()
    [f] = check_peers([f"/dns4/slow.example/tcp/1/p2p/{PEER_ID}"], connect_timeout_s=0.2)
    assert time.monotonic() - t0 < 5.0
    assert f.level == "warn" and "timed out" in f.detail


def test_memory_and_disk_thresholds(tmp_path: Path) -> None:
    assert check_memory(available=4 * 2**30).level == "ok"
    assert check_memory(available=1 * 2**30).level == "warn"
    assert check_memory(available=100 * 2**20).level == "error"
    assert check_disk(tmp_path / "not" / "yet").level == "ok"  # measured at nearest parent
    assert check_disk(tmp_path, warn_below=2**62).level == "warn"


def test_nofile_warns_with_a_hint_when_it_cannot_be_raised() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    f = check_nofile(target=2**40, raise_limit=False)  # far above any real limit
    assert f.level == "warn" and "ulimit -n" in f.detail
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    assert check_nofile(target=16).level == "ok"


def test_run_preflight_end_to_end(tmp_path: Path) -> None:
    port = closed_loopback_port()
    findings = run_preflight(
        device="cpu",
        initial_peers=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER_ID}"],
        host="127.0.0.1",
        port=0,
        state_dir=tmp_path,
    )
    names = [f.name for f in findings]
    assert names[:3] == ["torch", "device", "gpu"]
    assert {"memory", "disk", "port", "open-files", "peer[0]"} <= set(names)
    gpu = next(f for f in findings if f.name == "gpu")
    assert gpu.level == ("ok" if torch.cuda.is_available() else "warn")
    table = format_findings(findings)
    assert table.splitlines()[0].split() == ["LEVEL", "CHECK", "DETAIL"]
    assert len(table.splitlines()) == len(findings) + 1


def test_cuda_requested_without_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    findings = run_preflight(device="cuda", initial_peers=[], host="127.0.0.1", port=0, state_dir=tmp_path)
    device = next(f for f in findings if f.name == "device")
    assert device.level == "error" and "no CUDA GPU" in device.detail
    assert exit_code(findings) == 3


def test_exit_code_mapping() -> None:
    ok, warn, err = Finding("a", "ok", ""), Finding("b", "warn", ""), Finding("c", "error", "")
    assert exit_code([]) == 0
    assert exit_code([ok, warn]) == 0
    assert exit_code([ok, warn, err]) == 3
