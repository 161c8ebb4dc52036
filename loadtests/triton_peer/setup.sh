#!/usr/bin/env bash
# Builds the Triton peer for the gRPC benchmark (loadtests/bench_grpc.py), reproducibly:
#   1. a separate venv (default .venv-triton/, git-ignored) with nvidia-pytriton 0.7.0
#      (its bundled tritonserver 2.51 binary), numpy 1.x and tensorflow-cpu;
#   2. a Triton model repository (default .venv-triton/repository/) holding `lstm256`, a
#      Python-backend model with sequence batching that runs the reference LSTM(256)+Dense
#      step (XLA-compiled TF) on weights exported from the same Keras model rnnserve serves;
#   3. backends/python/ with pytriton's Python-backend stub for Python 3.11.
#
#   bash loadtests/triton_peer/setup.sh            # needs python3.11 and the main .venv
#   bash loadtests/triton_peer/start.sh 8101       # runs tritonserver (gRPC on that port)
#
# Env: TRITON_VENV (venv folder), PYTHON (interpreter for the venv; the Python-backend stub
# embeds the system libpython3.11, so use a 3.11), MAIN_PYTHON (the rnnserve venv's python,
# which exports the weights).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${TRITON_VENV:-$root/.venv-triton}"
python="${PYTHON:-python3.11}"
main_python="${MAIN_PYTHON:-$root/.venv/bin/python}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# numpy must be 1.x inside the stub: with numpy 2.x the outputs come back empty.
"$venv/bin/pip" install --quiet "nvidia-pytriton==0.7.0" "numpy>=1.26,<2" "tensorflow-cpu>=2.16,<2.22"

pkg="$("$venv/bin/python" -c 'import pytriton, os; print(os.path.dirname(pytriton.__file__))')"
libs="$(cd "$pkg/.." && pwd)/nvidia_pytriton.libs"
tritonserver_dir="$pkg/tritonserver"
backends="$venv/backends"
mkdir -p "$backends/python"
cp -r "$tritonserver_dir/backends/python/." "$backends/python/"
cp "$tritonserver_dir/python_backend_stubs/3.11/triton_python_backend_stub" "$backends/python/"

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
repo="$venv/repository"
rm -rf "$repo"
mkdir -p "$repo/lstm256/1"
sed -e "s|@SITE_PACKAGES@|$site|" "$here/model.py" > "$repo/lstm256/1/model.py"
cp "$here/config.pbtxt" "$repo/lstm256/config.pbtxt"
# The same weights rnnserve's benchmark model gets (seeded), as numpy arrays.
"$main_python" "$here/export_weights.py" "$repo/lstm256/1/weights.npz"

cat > "$venv/env.sh" <<ENV
export TRITON_BIN="$tritonserver_dir/bin/tritonserver"
export TRITON_BACKENDS="$backends"
export TRITON_REPOSITORY="$repo"
export LD_LIBRARY_PATH="$libs:$tritonserver_dir/external_libs:\${LD_LIBRARY_PATH:-}"
ENV
echo "Triton peer ready: $venv (source $venv/env.sh; bash $here/start.sh PORT)"
