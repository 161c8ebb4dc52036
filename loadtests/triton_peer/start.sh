#!/usr/bin/env bash
# Starts the Triton peer built by setup.sh: tritonserver 2.51 (from nvidia-pytriton 0.7.0),
# gRPC only, on the given port. Ctrl-C stops it.
#   bash loadtests/triton_peer/start.sh 8101
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${TRITON_VENV:-$root/.venv-triton}"
# shellcheck disable=SC1091
source "$venv/env.sh"
exec "$TRITON_BIN" --model-repository "$TRITON_REPOSITORY" \
    --backend-directory "$TRITON_BACKENDS" \
    --grpc-port "${1:-8001}" --allow-http false --allow-metrics false \
    --model-control-mode none --exit-on-error true --log-verbose 0
