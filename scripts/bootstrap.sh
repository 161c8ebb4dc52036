#!/usr/bin/env bash
# Create a virtual environment (if missing) and install rnnserve into it, pinned by
# constraints.txt.
#
#   bash scripts/bootstrap.sh        # the server: rnnserve[server] (the client comes with it)
#   bash scripts/bootstrap.sh dev    # + the test, lint and type-check tools, and tracing
#
# (`pip install rnnserve` alone is the client: the SDK and `rnnserve client`, no TensorFlow.)
#
# Env: PYTHON (default python3.11, else python3; 3.11 to 3.13 are supported), VENV (default
# .venv). The first install downloads TensorFlow (~600 MB): pip's progress is shown.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${VENV:-.venv}
target=".[server]"
if [ "${1:-}" = "dev" ]; then
    target=".[server,dev,tracing]"  # the tracing tests need OpenTelemetry
elif [ -n "${1:-}" ]; then
    echo "usage: bash scripts/bootstrap.sh [dev]" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing rnnserve${1:+ with its $1 tools} into $VENV (the first time takes a few minutes)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# Progress (one line per package) without pip's resolver chatter.
"$VENV/bin/python" -m pip install --progress-bar on -c constraints.txt -e "$target" \
    | grep --line-buffered -E '^(Collecting|Downloading|Installing|Successfully)' || true
"$VENV/bin/python" -c 'import rnnserve.service.cli' \
    || { echo "bootstrap: the install failed (see the pip output above)" >&2; exit 1; }
echo "bootstrap: ready ($VENV/bin/rnnserve)"
