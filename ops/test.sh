#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite.
#   unit tests (codec, records, config, trainer, metrics, control, ...) and
#   multi-process tests that start real swarm-node daemons on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install.sh

# apt_tools "CMD..." "PACKAGE..." WHAT: install Debian packages when one of the commands is missing and we
# can (root + apt); otherwise the tests that need them skip with their reason.
apt_tools() {
  local missing=0 c
  for c in $1; do command -v "$c" >/dev/null || missing=1; done
  [ "$missing" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
  echo "[test] installing $2 ($3)"
  # --no-install-recommends: docker-compose would otherwise pull docker.io and containerd
  (timeout 300 apt-get install -y -q --no-install-recommends $2 >/dev/null 2>&1 \
    || (timeout 120 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q --no-install-recommends $2 >/dev/null 2>&1)) \
    || echo "[test] $2 unavailable: $3 will be skipped"
}
apt_tools "promtool prometheus" "prometheus" "metric lint, alert-rule tests and the live Prometheus scrape"
apt_tools "docker-compose" "docker-compose" "docker-compose.yml validation (config -q, no engine needed)"
apt_tools "nft ping ip" "nftables iproute2 iputils-ping" "the network-namespace churn lab"
apt_tools "chromium chromedriver" "chromium chromium-driver" "the node's page in a headless browser"
# No reruns: a test that needs one is a bug to fix at its cause.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
