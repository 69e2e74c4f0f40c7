#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite.
#   unit tests (codec, records, config, trainer, metrics, control, ...) and
#   multi-process tests that start real swarm-node daemons on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install.sh
# promtool lints our /metrics page and tests the alert rules, and the prometheus server scrapes live nodes
# in the tests; install the package when we can (root + apt), else those checks skip.
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing promtool (Debian package prometheus)"
  (timeout 300 apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
    || (timeout 120 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1)) \
    || echo "[test] promtool unavailable: its checks will be skipped"
fi
# docker-compose 1.29 validates docker-compose.yml (`config -q`) without a Docker engine; without
# --no-install-recommends apt would pull docker.io and containerd too.
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing docker-compose (Debian package docker-compose)"
  (timeout 300 apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 \
    || (timeout 120 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1)) \
    || echo "[test] docker-compose unavailable: the compose validation will be skipped"
fi
# The churn lab (tests/churn) builds network namespaces with ip, nft and tc, and pings across them;
# without root those tests skip with the reason.
if { ! command -v nft >/dev/null || ! command -v ping >/dev/null; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing the churn lab's tools (nftables iproute2 iputils-ping)"
  (timeout 300 apt-get install -y -q --no-install-recommends nftables iproute2 iputils-ping >/dev/null 2>&1 \
    || (timeout 120 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends nftables iproute2 iputils-ping >/dev/null 2>&1)) \
    || echo "[test] nftables/iproute2 unavailable: the churn lab tests will be skipped"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
