"""NodeMetrics hygiene, the health HTTP server, and log formatting.

Everything runs on real sockets on 127.0.0.1 port 0; no daemon, no hivemind DHT.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm_node.health import HealthServer, Heartbeat, make_live_fn
from swarm_node.logs import configure_logging
from swarm_node.metrics import NodeMetrics, ROUND_OUTCOMES
from swarm_node.status import NodeStatus, PeerView, Phase

REJECT_REASONS = ["bad_dtype", "bad_shape", "too_large", "non_finite", "malformed", "spec_mismatch", "bad_record", "stale_step"]
FORBIDDEN_LABELS = {"peer", "peer_id", "maddr", "step", "hash"}
PEER_A = "12D3KooWAbCdEfGhIjKlMnOpQrStUvWxYz1234567890abcdefgh"

# urllib honours http_proxy; a probe of 127.0.0.1 must never go through one.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with _opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sample_status(**kw) -> NodeStatus:
    base = dict(
        peer_id=PEER_A, run_id="run-1", version="0.1.0", phase=Phase.READY, strategy="sync", role="trainer",
        device="cpu", join_maddrs=[f"/ip4/10.0.0.2/tcp/31337/p2p/{PEER_A}"], step=42,
        peers=[PeerView(peer_id=PEER_A, state="online", strategy="sync", role="trainer", device="cpu", step=42,
                        samples_per_s=12.5, version="0.1.0", expires_in_s=9.0, is_self=True)],
    )
    return NodeStatus(**{**base, **kw})


class Node:
    """Mutable fake daemon state behind the health callbacks."""

    def __init__(self) -> None:
        self.ready = False
        self.checks = {"dht": True, "model_loaded": False}
        self.status: NodeStatus | Exception = sample_status()
        self.beat = Heartbeat()
        self.limit_s = 0.3

    def status_fn(self) -> NodeStatus:
        if isinstance(self.status, Exception):
            raise self.status
        return self.status

    def ready_fn(self) -> tuple[bool, dict[str, bool]]:
        return self.ready, dict(self.checks)


@pytest.fixture
def node():
    return Node()


@pytest.fixture
def server(node):
    metrics = NodeMetrics("sync", REJECT_REASONS)
    hs = HealthServer(
        "127.0.0.1", 0, metrics=metrics, status_fn=node.status_fn,
        live_fn=make_live_fn({"loop": node.beat}, node.limit_s), ready_fn=node.ready_fn,
    )
    host, port = hs.start()
    assert host == "127.0.0.1" and port > 0
    hs.base = f"http://{host}:{port}"
    hs.metrics = metrics
    yield hs
    hs.stop()


# --- /metrics -----------------------------------------------------------------------------


def scrape(server) -> str:
    code, body = http_get(server.base + "/metrics")
    assert code == 200
    return body.decode()


def test_metrics_page_hygiene(server):
    families = {f.name: f for f in text_string_to_metric_families(scrape(server))}
    for f in families.values():
        for s in f.samples:
            assert not FORBIDDEN_LABELS & set(s.labels), f"unbounded label on {s.name}: {s.labels}"
        if f.type == "counter":
            assert f.samples, f.name
            assert all(s.name.endswith("_total") for s in f.samples), [s.name for s in f.samples]
    expected = {
        "swarm_node_info", "swarm_ready", "swarm_dht_routing_table_peers", "swarm_peers_seen", "swarm_peer_joins",
        "swarm_peer_leaves", "swarm_bootstrap_attempts", "swarm_dht_requests", "swarm_dht_request_duration_seconds",
        "swarm_network_transmit_bytes", "swarm_network_receive_bytes", "swarm_averaging_rounds",
        "swarm_averaging_round_duration_seconds", "swarm_averaging_group_size",
        "swarm_last_successful_round_timestamp_seconds", "swarm_local_samples", "swarm_local_tokens",
        "swarm_local_step", "swarm_step_duration_seconds", "swarm_train_loss", "swarm_validation_loss",
        "swarm_local_samples_per_second", "swarm_rejected_messages", "swarm_recoveries", "swarm_spare_gpu_paused",
        "process_start_time_seconds", "python_info", "python_gc_objects_collected",
    }
    assert expected <= set(families), expected - set(families)
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)

    def values(name: str) -> dict[tuple, float]:
        return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}

    # Every known outcome exists at 0 before the first event.
    rounds = values("swarm_averaging_rounds")
    assert rounds == {(("outcome", o), ("strategy", "sync")): 0.0 for o in ROUND_OUTCOMES}
    assert {"resync", "no_peers", "cancelled"} <= set(ROUND_OUTCOMES)
    assert values("swarm_bootstrap_attempts") == {(("outcome", "ok"),): 0.0, (("outcome", "failed"),): 0.0}
    assert len(values("swarm_dht_requests")) == 6 and set(values("swarm_dht_requests").values()) == {0.0}
    assert len(values("swarm_recoveries")) == 6
    assert {dict(k)["reason"] for k in values("swarm_rejected_messages")} == set(REJECT_REASONS)
    assert {dict(k)["channel"] for k in values("swarm_network_transmit_bytes")} == {"dht", "averaging", "state", "rollouts"}
    assert {s.labels.get("op") for s in families["swarm_dht_request_duration_seconds"].samples} == {"get", "store"}


def test_metrics_update_and_info(server):
    m = server.metrics
    m.info.info({"version": "0.1.0", "strategy": "sync", "role": "trainer", "device_type": "cpu"})
    m.rounds.labels(strategy="sync", outcome="ok").inc()
    m.net_tx_bytes.labels(channel="averaging").inc(1024)
    m.dht_request_duration.labels(op="get").observe(0.02)
    text = m.exposition().decode()
    assert 'swarm_node_info{device_type="cpu",role="trainer",strategy="sync",version="0.1.0"} 1.0' in text
    assert 'swarm_averaging_rounds_total{outcome="ok",strategy="sync"} 1.0' in text
    assert 'swarm_network_transmit_bytes_total{channel="averaging"} 1024.0' in text
    assert 'swarm_dht_request_duration_seconds_bucket{le="0.025",op="get"} 1.0' in text
    assert scrape(server) == m.exposition().decode() or "swarm_averaging_rounds_total" in scrape(server)


def test_two_nodes_have_independent_registries():
    a, b = NodeMetrics("sync"), NodeMetrics("solo")  # same names, no "Duplicated timeseries"
    a.peer_joins.inc(3)
    assert b"swarm_peer_joins_total 0.0" in b.exposition()
    assert b"swarm_peer_joins_total 3.0" in a.exposition()


def test_promtool_check_metrics(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus` provides it)")
    server.metrics.info.info({"version": "0.1.0", "strategy": "sync", "role": "trainer", "device_type": "cpu"})
    page = scrape(server)
    r = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", (r.returncode, r.stdout, r.stderr)


# --- /readyz, /livez, /status ------------------------------------------------------------


def test_readyz_flips_and_mirrors_gauge(server, node):
    def ready_gauge() -> float:
        return server.metrics.registry.get_sample_value("swarm_ready")

    code, body = http_get(server.base + "/readyz")
    assert code == 503
    assert json.loads(body) == {"status": "fail", "checks": {"dht": True, "model_loaded": False}}
    assert ready_gauge() == 0

    node.ready, node.checks = True, {"dht": True, "model_loaded": True}
    code, body = http_get(server.base + "/readyz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert ready_gauge() == 1

    node.ready = False  # draining
    assert http_get(server.base + "/readyz")[0] == 503
    assert ready_gauge() == 0


def test_readyz_fails_closed_when_check_raises(server, node):
    node.ready = True
    server._ready_fn = lambda: 1 / 0
    code, body = http_get(server.base + "/readyz")
    assert code == 503 and json.loads(body)["status"] == "fail"


def test_livez_goes_stale(server, node):
    node.beat.beat()
    for path in ("/livez", "/healthz"):
        code, body = http_get(server.base + path)
        assert code == 200 and json.loads(body)["status"] == "ok"
    time.sleep(node.limit_s + 0.2)
    code, body = http_get(server.base + "/livez")
    assert code == 503
    assert json.loads(body)["status"] == "fail" and "loop:" in json.loads(body)["detail"]
    node.beat.beat()
    assert http_get(server.base + "/healthz")[0] == 200


def test_status_json(server, node):
    code, body = http_get(server.base + "/status")
    assert code == 200
    d = json.loads(body)
    assert d["peer_id"] == PEER_A and d["step"] == 42 and d["phase"] == "ready"
    assert d["join_maddrs"] == [f"/ip4/10.0.0.2/tcp/31337/p2p/{PEER_A}"]
    assert d["peers"][0]["peer_id"] == PEER_A and d["peers"][0]["is_self"] is True
    assert NodeStatus.model_validate(d) == node.status


def test_status_nan_loss_is_strict_json(server, node):
    node.status = sample_status(train_loss=math.nan)
    code, body = http_get(server.base + "/status")
    assert code == 200 and json.loads(body)["train_loss"] is None  # json.loads would accept NaN; check the text
    assert b"NaN" not in body


def test_status_error_is_500_json(server, node):
    node.status = RuntimeError("loop not started")
    code, body = http_get(server.base + "/status")
    assert code == 500 and "loop not started" in json.loads(body)["error"]


def test_unknown_path_404_and_method_405(server):
    code, body = http_get(server.base + "/nope")
    assert code == 404 and "error" in json.loads(body)
    req = urllib.request.Request(server.base + "/readyz", data=b"x", method="POST")
    try:
        _opener.open(req, timeout=3)
        code = 200
    except urllib.error.HTTPError as e:
        code = e.code
    assert code == 405


def test_livez_answers_while_event_loop_is_blocked(server, node):
    """1. an asyncio loop in a thread beats every 20 ms; 2. a callback blocks that loop;
    3. /livez keeps answering promptly and turns 503; 4. unblocking restores 200."""
    loop = asyncio.new_event_loop()
    release = threading.Event()

    async def beater():
        while True:
            node.beat.beat()
            await asyncio.sleep(0.02)

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        asyncio.run_coroutine_threadsafe(beater(), loop)
        time.sleep(0.1)
        assert http_get(server.base + "/livez")[0] == 200

        loop.call_soon_threadsafe(release.wait, 10.0)  # a hung CUDA call or a deadlock
        deadline = time.monotonic() + 3.0
        code = 200
        while code == 200 and time.monotonic() < deadline:
            t0 = time.monotonic()
            code, _ = http_get(server.base + "/livez", timeout=1.0)
            assert time.monotonic() - t0 < 1.0, "health server blocked by the stuck loop"
            time.sleep(0.05)
        assert code == 503
        assert http_get(server.base + "/metrics")[0] == 200  # scrapes keep working too

        release.set()
        deadline = time.monotonic() + 3.0
        while http_get(server.base + "/livez")[0] != 200:
            assert time.monotonic() < deadline, "liveness did not recover after the loop resumed"
            time.sleep(0.05)
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.close()


def test_stop_is_prompt_and_idempotent(node):
    hs = HealthServer("127.0.0.1", 0, metrics=NodeMetrics("sync"), status_fn=node.status_fn,
                      live_fn=lambda: (True, "ok"), ready_fn=node.ready_fn)
    hs.stop()  # never started: no-op
    host, port = hs.start()
    with pytest.raises(RuntimeError):
        hs.start()
    t0 = time.monotonic()
    hs.stop()
    hs.stop()
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(urllib.error.URLError):
        _opener.open(f"http://{host}:{port}/livez", timeout=1)


def test_heartbeat_age():
    hb = Heartbeat()
    time.sleep(0.05)
    assert hb.age_s() >= 0.05
    hb.beat()
    assert hb.age_s() < 0.05
    ok, detail = make_live_fn({"train": hb}, 10.0)()
    assert ok and detail == "ok"
    ok, detail = make_live_fn({"train": hb}, 0.0)()
    assert not ok and detail.startswith("train: ")


# --- logging ------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root, hm = logging.getLogger(), logging.getLogger("hivemind")
    saved = (list(root.handlers), root.level, list(hm.handlers), hm.level, hm.propagate)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    hm.handlers[:], hm.level, hm.propagate = saved[2], saved[3], saved[4]


def test_json_logs_one_object_per_line(capsys, restore_logging):
    configure_logging("json", "INFO", adopt_hivemind=False)
    configure_logging("json", "INFO", adopt_hivemind=False)  # idempotent: still one handler
    log = logging.getLogger("swarm_node.test")
    log.info("joined %s", "swarm", extra={"peers": 3, "run_id": "r1"})
    log.debug("hidden")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    first, second = map(json.loads, lines)
    assert first["msg"] == "joined swarm" and first["level"] == "INFO" and first["logger"] == "swarm_node.test"
    assert first["peers"] == 3 and first["run_id"] == "r1" and first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exc"]


def test_console_logs(capsys, restore_logging):
    configure_logging("console", "DEBUG", adopt_hivemind=False)
    logging.getLogger("swarm_node.x").debug("hello", extra={"step": 5})
    err = capsys.readouterr().err
    assert "DEBUG swarm_node.x: hello step=5" in err and "\x1b[" not in err
    with pytest.raises(ValueError):
        configure_logging("xml", "INFO", adopt_hivemind=False)
    with pytest.raises(ValueError):
        configure_logging("json", "LOUD", adopt_hivemind=False)


def test_hivemind_records_flow_through_ours_once(capsys, restore_logging):
    hm_logging = pytest.importorskip("hivemind.utils.logging")
    try:
        configure_logging("json", "INFO")
        hm = logging.getLogger("hivemind")
        assert hm.level == logging.WARNING and hm.propagate
        hm_logger = hm_logging.get_logger("hivemind.dht.node")  # what hivemind modules call
        hm_logger.info("routine")  # re-levelled away
        hm_logger.warning("partitioned")
        lines = [json.loads(x) for x in capsys.readouterr().err.strip().splitlines()]
        assert [x["msg"] for x in lines] == ["partitioned"]
        assert lines[0]["logger"] == "hivemind.dht.node"

        configure_logging("json", "DEBUG")
        assert hm.level == logging.DEBUG
    finally:
        hm_logging.use_hivemind_log_handler("in_hivemind")  # leave hivemind as other tests expect
