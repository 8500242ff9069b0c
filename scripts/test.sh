#!/usr/bin/env bash
# The test suite (hermetic, CPU), after lint and type checks of src/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy src
exec .venv/bin/python -m pytest "$@"
