#!/usr/bin/env bash
# Issue 6's GPU run as one command for the device tool (H100/H200; Keras on JAX, no
# TensorFlow there). Prepare here, once: `bash loadtests/gpu/fetch_wheels.sh` (.whl/,
# ~14 MB). Then: device run, carry [".whl"], command `bash loadtests/gpu/device.sh`,
# timeout_s 540. Writes at most 8 files into $OUT (the tool's limit):
#   gpu.txt, bench_gpu.json, bench_gpu.log   StepFunction vs the bare jitted step vs the
#                                            states' host<->device round trip, LSTM(1024)
#   bench_grpc.log, grpc/bench_grpc.{json,md} the full server (memory store, batches up to
#                                            4096) with the load generator on the same
#                                            machine: stream, unary and RunSequence
# Knobs for a dry run on a CPU box: PY, SKIP_WHEELS=1, BATCHES, SESSIONS, WORKERS.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
if [ -z "${SKIP_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-build/gpu}
mkdir -p "$OUT/grpc"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true;
 nproc; $PY -c 'import jax, keras; print(jax.devices(), keras.__version__)') | tee "$OUT/gpu.txt"

# shellcheck disable=SC2086
timeout 200 $PY loadtests/gpu/bench_gpu.py --json "$OUT/bench_gpu.json" \
  ${BATCHES:+--batches $BATCHES} > "$OUT/bench_gpu.log" 2>&1
echo "bench_gpu exit $?" | tee -a "$OUT/bench_gpu.log"
grep '^|' "$OUT/bench_gpu.log"

# shellcheck disable=SC2086
timeout 300 $PY loadtests/bench_grpc.py --peers memory --modes stream step runseq \
  --model lstm1024 --sessions ${SESSIONS:-256 1024 4096} --workers "${WORKERS:-8}" \
  --duration 4 --warmup 2 --out "$OUT/grpc" \
  --rnnserve-args "--max-batch-size 4096 --max-queue-size 65536" 2>&1 \
  | tr '\r' '\n' | grep -v ' left ' > "$OUT/bench_grpc.log"
echo "bench_grpc exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_grpc.log"
grep 'steps/s' "$OUT/bench_grpc.log"
rm -f "$OUT"/grpc/*.png  # the tool brings back 8 files at most
