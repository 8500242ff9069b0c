#!/usr/bin/env bash
# The main job on the offline default: LoRA-FA fine-tuning of all-MiniLM-L6-v2 on Rotten Tomatoes sentiment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/lorafa train "$@"
