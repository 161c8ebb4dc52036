#!/usr/bin/env bash
# The whole check, as CI runs it: lint, types, generated code up to date, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/typecheck.sh
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/python -m pytest "$@"
