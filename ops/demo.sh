#!/usr/bin/env bash
# First command of the README: install, then run a local swarm of real daemons.
#   bash ops/demo.sh                      # 3 peers, sync, then a summary
#   bash ops/demo.sh --peers 4 --steps 200
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install.sh
exec .venv/bin/swarm-node demo "$@"
