#!/usr/bin/env bash
# Create .venv (if missing) and install swarm-node with its test tools into it.
# TORCH_SPEC picks the torch build (default: the version the project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[install] installing $TORCH_SPEC and swarm-node (editable) with the test, hf and parquet extras (hf: transformers, for --model DIR and the SAPO HF-policy tests; parquet: pyarrow)"
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" -e ".[test,hf,parquet]" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import swarm_node, torch, hivemind; print('[install] ok: swarm-node', swarm_node.__version__, '| torch', torch.__version__, '| hivemind', hivemind.__version__)"
