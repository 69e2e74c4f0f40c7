"""The operations files stay honest: Prometheus config, rules and alerts, the Grafana dashboard,
ops/Dockerfile, docker-compose.yml and the chaos script.

What is checked, and against what real part:
- promtool (Debian package `prometheus`) checks the scrape configs and rules and runs the alert
  unit tests in ops/prometheus/rules_test.yml;
- every metric name in the rules and the dashboard is one a node exports (its registry, and a
  live node's /metrics), a recording rule of rules.yml, or an entry of an explicit allow-list;
- docker-compose 1.29 (Debian package) validates the compose file, and rejects a broken copy;
- every `swarm-node` command, flag and SWARM_NODE_* variable in compose and the Dockerfile goes
  through the node's own argument parser and config loader, so a typo fails here, without Docker;
- chaos.sh runs against a stand-in `docker` that records its calls (no engine on our machines);
- a real Prometheus server scrapes two real nodes on loopback, with the real rules loaded.
Tools that are missing make their tests skip with a reason (ops/test.sh installs them as root).
"""
from __future__ import annotations

import importlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm_node.cli import build_parser
from swarm_node.config import ConfigError, NodeConfig, load_config
from swarm_node.metrics import NodeMetrics

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "ops" / "prometheus"
RULES = PROM_DIR / "rules.yml"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "ops" / "Dockerfile"
CHAOS = REPO / "ops" / "chaos" / "chaos.sh"
GRAFANA = REPO / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "swarm-node.json"

# Metrics the dashboard shows before anything exports them. Each line says what will export it;
# delete the entry when it lands. Alerts may never use these (an alert on a missing series is
# silently never firing).
NOT_YET_EXPORTED: set[str] = set()
# Series that other programs produce: Prometheus itself (up, ALERTS) and dcgm-exporter.
FROM_OTHER_EXPORTERS = {"up", "ALERTS", "DCGM_FI_DEV_GPU_UTIL"}
# Strategies that register series of their own in the node's registry: "module:Class", where
# Class(registry) registers them. The test instantiates each, so the names come from the code.
STRATEGY_METRIC_CLASSES = {"gradcode": "swarm_node.strategies.gradcode.strategy:GradcodeMetrics",
                           "swarm": "swarm_node.strategies.swarm.metrics:SwarmMetrics"}
STRATEGY_METRIC_ARGS = {"swarm": (3,)}  # after the registry: a 3-stage pipeline
# Dashboard names of a strategy whose module is not there yet (allowed only until it lands; once
# importable, its class above must really export them).
PENDING_STRATEGY_METRICS = {"gradcode": {"swarm_stragglers", "swarm_straggler_events_total",
                                          "swarm_gradcode_decodes_total", "swarm_gradcode_redundancy_ratio"}}

DASHBOARD_ROWS = ["Overview", "Throughput", "Sync", "Network", "Pipeline", "Reliability", "Resources"]
SAMPLE_MADDR = "/ip4/172.28.0.10/tcp/31337/p2p/12D3KooWQvRmyBoPmg3vNDCFJwTaYTxvCV2AxLaX3RAFKzBA2vVA"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (ops/test.sh installs the Debian packages prometheus and "
                    "docker-compose as root)")
    return path


# --- PromQL metric names ------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL (or Grafana-templated PromQL) expression.

    Drops strings, label matchers, range selectors, grouping clauses and Grafana variables;
    what is left and is not a function call, keyword or number is a metric name.
    """
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", s):
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, instance) (rate(swarm_step_duration_seconds_bucket'
            '{job=~"$job", instance=~"$instance"}[5m]))) > bool 1e3 and on (job) up{x="a b"} offset 5m '
            'unless count without (strategy) (instance:swarm_local_samples:rate1m[$__rate_interval]) / time()')
    assert metric_names(expr) == {"swarm_step_duration_seconds_bucket", "up", "instance:swarm_local_samples:rate1m"}
    assert metric_names('sum(rate(swarm_x_total[1m]))') == {"swarm_x_total"}


def load_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
    for var in dash["templating"]["list"]:
        exprs.append(var["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0])
    return exprs


def exported_names(exposition: str) -> set[str]:
    """Sample names on a /metrics page (histograms appear as _bucket, _sum and _count)."""
    return {re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group()
            for line in exposition.splitlines() if line and not line.startswith("#")}


def registry_names() -> set[str]:
    """What a node's registry exports, for every installed strategy, as the daemon builds it."""
    from swarm_node.daemon import NODE_REJECT_REASONS
    from swarm_node.strategies.registry import available

    names: set[str] = set()
    for strategy in available():
        m = NodeMetrics(strategy, NODE_REJECT_REASONS)
        m.info.info({"version": "0", "strategy": strategy, "role": "trainer", "device_type": "cpu"})
        names |= exported_names(m.exposition().decode())
    return names | strategy_metric_names()


def strategy_metric_names() -> set[str]:
    """Series the strategies in STRATEGY_METRIC_CLASSES add; a strategy not there yet adds its
    PENDING_STRATEGY_METRICS instead (see above)."""
    names: set[str] = set()
    for strategy, target in STRATEGY_METRIC_CLASSES.items():
        module_name, _, cls_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            names |= PENDING_STRATEGY_METRICS.get(strategy, set())
            continue
        cls = getattr(module, cls_name, None)
        assert cls is not None, f"{target} is gone: update STRATEGY_METRIC_CLASSES"
        m = NodeMetrics(strategy)
        cls(m.registry, *STRATEGY_METRIC_ARGS.get(strategy, ()))
        names |= exported_names(m.exposition().decode())
    return names


def assert_names_exist(known: set[str]) -> None:
    recorded = {r["record"] for r in load_rules() if "record" in r}
    rule_names = set().union(*(metric_names(r["expr"]) for r in load_rules()))
    missing_in_rules = rule_names - known - recorded - (FROM_OTHER_EXPORTERS - {"ALERTS"})
    assert not missing_in_rules, f"rules.yml uses metrics no node exports: {sorted(missing_in_rules)}"
    dash_names = set().union(*(metric_names(e) for e in dashboard_exprs()))
    missing = dash_names - known - recorded - FROM_OTHER_EXPORTERS - NOT_YET_EXPORTED
    assert not missing, f"the dashboard uses metrics no node exports: {sorted(missing)}"
    stale = NOT_YET_EXPORTED & known
    assert not stale, f"now exported, remove from NOT_YET_EXPORTED: {sorted(stale)}"
    assert NOT_YET_EXPORTED <= dash_names, "an allow-listed name is no longer used: drop it from the list"


def test_rules_and_dashboard_use_exported_metric_names():
    assert_names_exist(registry_names())


def test_dashboard_rows_datasource_and_panels():
    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == DASHBOARD_ROWS
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    current_row = None
    per_row: dict[str, int] = {}
    for p in dash["panels"]:
        if p["type"] == "row":
            current_row = p["title"]
            continue
        assert p["datasource"]["uid"] == ds["uid"], p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        per_row[current_row] = per_row.get(current_row, 0) + 1
    assert set(per_row) == set(DASHBOARD_ROWS), per_row
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "swarm-node.yml").read_text())["providers"][0]
    compose = load_compose()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert (REPO / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent


def test_alerts_are_the_documented_set():
    alerts = {r["alert"]: r for r in load_rules() if "alert" in r}
    assert set(alerts) == {"SwarmNodeDown", "SwarmNodeIsolated", "SwarmTrainingStalled", "SwarmNoSuccessfulAveraging",
                           "SwarmAveragingFailing", "SwarmFileDescriptorsNearLimit", "SwarmNodeRestarting"}
    assert alerts["SwarmNodeDown"]["for"] == "2m" and alerts["SwarmNodeIsolated"]["for"] == "2m"
    assert alerts["SwarmTrainingStalled"]["for"] == "10m"
    tested = set(re.findall(r"alertname: (\w+)\n", (PROM_DIR / "rules_test.yml").read_text()))
    assert tested == set(alerts), f"alerts without a promtool test: {set(alerts) - tested}"


# --- promtool ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-lab.yml"])
def test_promtool_check_config(config):
    r = subprocess.run([need("promtool"), "check", "config", config], cwd=PROM_DIR, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    r = subprocess.run([need("promtool"), "check", "rules", "rules.yml"], cwd=PROM_DIR, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_test_rules():
    r = subprocess.run([need("promtool"), "test", "rules", "rules_test.yml"], cwd=PROM_DIR, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_test_rules_catches_a_wrong_threshold(tmp_path):
    """The unit tests have teeth: isolation at `< 1` instead of `<= 1` must fail them."""
    rules = RULES.read_text()
    assert "swarm_dht_routing_table_peers{job=~\"swarm-node.*\"} <= 1" in rules
    (tmp_path / "rules.yml").write_text(rules.replace('routing_table_peers{job=~"swarm-node.*"} <= 1',
                                                      'routing_table_peers{job=~"swarm-node.*"} < 1'))
    shutil.copy(PROM_DIR / "rules_test.yml", tmp_path / "rules_test.yml")
    r = subprocess.run([need("promtool"), "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "SwarmNodeIsolated" in r.stdout + r.stderr, r.stdout + r.stderr


# --- docker-compose and the Dockerfile -----------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$ (enough for our file)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None:
            if op.endswith("?"):
                raise AssertionError(f"compose requires {name}: {arg}")
            return arg
        return value or ""
    return _VAR.sub(sub, text)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env or {}))


def dockerfile_env() -> dict[str, str]:
    """ENV key=value pairs of ops/Dockerfile (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m and duration, f"unsupported duration {duration!r}"
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def node_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == "swarm-node:local"}


def node_config_for(service: dict[str, Any], monkeypatch) -> NodeConfig:
    """Run a compose service's command through the real CLI parser and config loader, with the
    environment the container would have (Dockerfile ENV, then the service's environment)."""
    args = build_parser().parse_args(service["command"])
    assert args.command == "join"
    flags = {"--config"} | {"--" + f.replace("_", "-") for f in NodeConfig.model_fields}
    flags |= {"--no-" + f.replace("_", "-") for f, info in NodeConfig.model_fields.items() if info.annotation is bool}
    abbreviated = [a for a in service["command"] if a.startswith("--") and a.split("=")[0] not in flags]
    assert not abbreviated, f"not the full name of a join flag: {abbreviated}"
    env = {**dockerfile_env(), **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
    unknown = {k for k in env if k.startswith("SWARM_NODE_") and k.removeprefix("SWARM_NODE_").lower()
               not in NodeConfig.model_fields}
    assert not unknown, f"SWARM_NODE_* variables that are no NodeConfig field: {sorted(unknown)}"
    for key in [k for k in os.environ if k.startswith("SWARM_NODE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = {k: v for k, v in vars(args).items() if k in NodeConfig.model_fields}
    return load_config(values, args.config)


def test_compose_node_commands_go_through_the_real_parser(monkeypatch):
    compose = load_compose({"SWARM_INITIAL_PEERS": SAMPLE_MADDR})
    nodes = node_services(compose)
    assert set(nodes) == {"bootstrap", "peer"}
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "swarm-node")
    scrape_ports = {int(t.rpartition(":")[2]) for sc in job["static_configs"] for t in sc["targets"]}
    scrape_ports |= {d["port"] for d in job["dns_sd_configs"]}
    subnet = ipaddress.ip_network(compose["networks"]["swarm"]["ipam"]["config"][0]["subnet"])

    configs = {name: node_config_for(svc, monkeypatch) for name, svc in nodes.items()}
    for name, cfg in configs.items():
        svc = nodes[name]
        assert cfg.host == "0.0.0.0", name
        assert {int(cfg.metrics_addr.rpartition(":")[2])} == scrape_ports, (name, cfg.metrics_addr, scrape_ports)
        assert seconds(svc["stop_grace_period"]) > cfg.shutdown_grace_s + 5, (name, "docker stop must let it drain")
        assert svc["restart"] == "on-failure" and svc["init"] is True
        assert cfg.run_spec() == configs["bootstrap"].run_spec(), "every compose node must run the same spec"

    boot = configs["bootstrap"]
    assert boot.new_swarm and boot.port == 31337 and not boot.initial_peers
    ip = nodes["bootstrap"]["networks"]["swarm"]["ipv4_address"]
    assert boot.announce_host == ip and ipaddress.ip_address(ip) in subnet
    assert str(boot.state_dir) in {v.split(":")[1] for v in nodes["bootstrap"]["volumes"]}, "identity must persist"
    assert "bootstrap:9108" in {t for sc in job["static_configs"] for t in sc["targets"]}
    assert [d["names"] for d in job["dns_sd_configs"]] == [["peer"]]

    peer = configs["peer"]
    assert peer.initial_peers == [SAMPLE_MADDR] and not peer.new_swarm
    assert SAMPLE_MADDR.startswith(f"/ip4/{ip}/tcp/{boot.port}/p2p/"), "README's grep pattern matches this address"
    assert nodes["peer"]["deploy"]["replicas"] >= 1
    assert nodes["peer"]["depends_on"]["bootstrap"]["condition"] == "service_healthy"


def test_compose_peer_without_initial_peers_fails_clearly(monkeypatch):
    """Started before SWARM_INITIAL_PEERS is set, a peer exits 2 naming the flag it needs."""
    peer = load_compose({})["services"]["peer"]
    with pytest.raises(ConfigError, match="--initial-peers"):
        node_config_for(peer, monkeypatch)


def test_compose_discover_variant_parses(monkeypatch):
    """The --discover variant the compose file and README describe is a real configuration."""
    compose = load_compose({})
    boot = {**compose["services"]["bootstrap"], "command": [*compose["services"]["bootstrap"]["command"], "--discover"]}
    peer = {**compose["services"]["peer"], "command": ["join", "--discover"]}
    assert node_config_for(boot, monkeypatch).discover and node_config_for(boot, monkeypatch).new_swarm
    cfg = node_config_for(peer, monkeypatch)
    assert cfg.discover and not cfg.initial_peers and not cfg.new_swarm


def test_compose_typo_in_a_node_flag_would_fail(monkeypatch):
    peer = load_compose({"SWARM_INITIAL_PEERS": SAMPLE_MADDR})["services"]["peer"]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*peer["command"], "--shutdown-grase-s", "5"])
    # a prefix of a flag is not the flag: the join parser refuses abbreviations (allow_abbrev=False)
    command = peer["command"]
    peer["command"] = [*command, "--shutdown-grace", "5"]
    with pytest.raises(SystemExit):
        node_config_for(peer, monkeypatch)
    peer["command"] = command
    peer["environment"] = {**peer["environment"], "SWARM_NODE_ROUND_TIMEOUT": "5"}
    with pytest.raises(AssertionError, match="SWARM_NODE_ROUND_TIMEOUT"):
        node_config_for(peer, monkeypatch)


def test_dockerfile_cpu_torch_healthcheck_entrypoint():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.M)
    assert 'ENTRYPOINT ["swarm-node"]' in text
    assert "swarm-node" in (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n")[1]
    for key, value in dockerfile_env().items():
        if key.startswith("SWARM_NODE_"):
            assert key.removeprefix("SWARM_NODE_").lower() in NodeConfig.model_fields, key
    assert "/readyz" in healthcheck_command()


def healthcheck_command() -> str:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK .*?CMD (.+)$", text, re.M)
    assert m, "ops/Dockerfile has no HEALTHCHECK"
    return m.group(1)


def test_dockerfile_healthcheck_fails_without_a_node():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    r = subprocess.run(healthcheck_command(), shell=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                       f"{os.environ['PATH']}", "SWARM_NODE_METRICS_ADDR": f"0.0.0.0:{port}"},
                       capture_output=True, timeout=30)
    assert r.returncode != 0


def test_docker_compose_config_accepts_ours_and_rejects_a_broken_copy(tmp_path):
    dc = need("docker-compose")
    env = {**os.environ, "SWARM_INITIAL_PEERS": SAMPLE_MADDR}
    r = subprocess.run([dc, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # The copy lives elsewhere, so give a same-place control copy too: only the typo differs.
    good, bad = tmp_path / "good.yml", tmp_path / "broken.yml"
    good.write_text(COMPOSE.read_text())
    broken = COMPOSE.read_text().replace("    stop_grace_period: 5s", "    stop_grace_periode: 5s")
    assert broken != COMPOSE.read_text()
    bad.write_text(broken)
    for path, want in ((good, 0), (bad, 1)):
        r = subprocess.run([dc, "--project-directory", str(REPO), "-f", str(path), "config", "-q"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == want, (path.name, r.stderr)
    assert "stop_grace_periode" in r.stderr


# --- chaos.sh ------------------------------------------------------------------------------

FAKE_DOCKER = r"""#!/bin/sh
# Stand-in for the docker CLI: records each call, answers ps / inspect like an engine would.
echo "$*" >> "$DOCKER_LOG"
case "$1" in
  ps) case "$*" in
        *service=peer*) printf 'peer1\npeer2\n' ;;
        *service=bootstrap*) echo boot1 ;;
      esac ;;
  inspect) case "$*" in
        *Networks*) echo "demo_swarm " ;;
        *compose.project*) echo demo ;;
      esac ;;
esac
"""


def run_chaos(tmp_path: Path, timeout_s: float = 30, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    log = tmp_path / "docker.log"
    log.unlink(missing_ok=True)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_LOG": str(log), "CHAOS_INTERVAL_S": "0",
                "CHAOS_DOWN_S": "0", "CHAOS_START_DELAY_S": "0", **env}
    r = subprocess.run(["sh", str(CHAOS)], env=full_env, capture_output=True, text=True, timeout=timeout_s)
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls


def test_chaos_applies_each_action_and_undoes_it(tmp_path):
    r, calls = run_chaos(tmp_path, CHAOS_ITERATIONS="10", CHAOS_ACTIONS="kill,term,pause,disconnect,restart",
                         CHAOS_TARGET="peer,bootstrap", CHAOS_STOP_TIMEOUT_S="31")
    assert r.returncode == 0, r.stderr
    assert calls[0].startswith("inspect") and "compose.project" in calls[0], "project comes from its own container"
    faults = [c for c in calls if not c.startswith(("ps", "inspect"))]
    ps = [c for c in calls if c.startswith("ps")]
    assert all("label=com.docker.compose.project=demo" in c for c in ps)
    assert {c.split("service=")[1] for c in ps} == {"peer", "bootstrap"}
    undo = {"kill -s KILL": "start", "kill -s TERM": "start", "pause": "unpause",
            "network disconnect demo_swarm": "network connect demo_swarm"}
    seen = []
    it = iter(faults)
    for c in it:
        target = c.split()[-1]
        assert target in {"peer1", "peer2", "boot1"}, c
        if c.startswith("restart"):
            assert c == f"restart -t 31 {target}"
            seen.append("restart")
            continue
        action = c.rsplit(" ", 1)[0]
        assert action in undo, c
        assert next(it) == f"{undo[action]} {target}", f"{c} was not undone"
        seen.append(action)
    assert seen == ["kill -s KILL", "kill -s TERM", "pause", "network disconnect demo_swarm", "restart"] * 2


def test_chaos_rejects_bad_settings_before_touching_anything(tmp_path):
    for env in ({"CHAOS_ACTIONS": "kill,nuke"}, {"CHAOS_INTERVAL_S": "soon"}, {"CHAOS_TARGET": ","}, {"CHAOS_ACTIONS": ","}):
        r, calls = run_chaos(tmp_path, CHAOS_PROJECT="demo", CHAOS_ITERATIONS="1", **env)
        assert r.returncode == 2 and "chaos:" in r.stderr, (env, r.stderr)
        assert calls == [], env


def test_chaos_heals_a_pause_when_stopped(tmp_path):
    """SIGTERM during a fault (docker stop of the chaos container) unpauses the peer first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    log = tmp_path / "docker.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_LOG": str(log), "CHAOS_PROJECT": "demo",
           "CHAOS_ACTIONS": "pause", "CHAOS_DOWN_S": "60", "CHAOS_START_DELAY_S": "0", "CHAOS_INTERVAL_S": "0"}
    p = subprocess.Popen(["sh", str(CHAOS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (log.exists() and "pause" in log.read_text()):
            time.sleep(0.1)
        assert "pause" in log.read_text()
        start = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert time.monotonic() - start < 5, "a TERM must not wait for the fault to end"
        time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)  # nothing of chaos is left, not even its background sleep
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    paused = log.read_text().splitlines()[-2].split()[-1]
    assert log.read_text().splitlines()[-1] == f"unpause {paused}"


# --- a real Prometheus against real nodes --------------------------------------------------

def prom_query(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_query(base: str, query: str, want: int, timeout_s: float, what: str,
               prom_log: Path) -> list[dict[str, Any]]:
    """Poll until the query returns at least `want` series; bounded."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = prom_query(base, query)
            if len(last) >= want:
                return last
        except (OSError, ValueError) as e:
            last = e
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} ({query}); last: {last}\n"
                         f"prometheus log:\n{prom_log.read_text(errors='replace')[-2000:]}")


@pytest.mark.multiprocess
def test_live_prometheus_scrapes_real_nodes(swarm, tmp_path):
    prometheus = need("prometheus")
    promtool = shutil.which("promtool")
    a = swarm.add("a")
    # node.json is written before the join line is printed: read the address from it, no race.
    b = swarm.add("b", initial=a.wait_info()["join_maddrs"][0])
    targets = [a.wait_info()["http"], b.wait_info()["http"]]

    # Scrape as the compose config does (job swarm-node, so the real rules apply), but every 1 s.
    cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
           "rule_files": [str(RULES)],
           "scrape_configs": [{"job_name": "swarm-node", "static_configs": [{"targets": targets}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    prom_log = tmp_path / "prometheus.log"
    with open(prom_log, "wb") as out:
        proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        steps = wait_query(base, 'swarm_local_step{job="swarm-node"} > 0', 2, 150, "both nodes training", prom_log)
        assert {s["metric"]["instance"] for s in steps} == set(targets)
        up = prom_query(base, 'up{job="swarm-node"}')
        assert {s["metric"]["instance"]: s["value"][1] for s in up} == {t: "1" for t in targets}
        # The real recording rules produce data from the real series.
        rates = wait_query(base, "instance:swarm_local_samples:rate1m > 0", 2, 60, "recorded samples/s", prom_log)
        assert {s["metric"]["instance"] for s in rates} == set(targets)
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as r:
            groups = json.loads(r.read())["data"]["groups"]
        loaded = {rule["name"]: rule["health"] for g in groups for rule in g["rules"]}
        assert {"SwarmNodeDown", "SwarmNodeIsolated", "SwarmTrainingStalled"} <= set(loaded)
        assert all(h in ("ok", "unknown") for h in loaded.values()), loaded

        page = urllib.request.urlopen(f"http://{targets[0]}/metrics", timeout=5).read().decode()
        assert_names_exist(exported_names(page) | strategy_metric_names())
        if promtool:
            r = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr)
        # The image's HEALTHCHECK line, run against a ready node, passes.
        deadline = time.monotonic() + 60
        while a.http("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        hc = subprocess.run(healthcheck_command(), shell=True, capture_output=True, timeout=30,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                 "SWARM_NODE_METRICS_ADDR": f"0.0.0.0:{targets[0].rpartition(':')[2]}"})
        assert hc.returncode == 0, hc.stderr
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
