#!/usr/bin/env bash
# The wheels the device machine lacks (Python 3.12, x86-64), into .whl/ (git-ignored via
# .git/info/exclude, carried by the device tool): Keras and its small needs, rnnserve's
# serving stack at the versions of constraints.txt, and rnnserve itself (no deps).
# The device image already has jax (CUDA), numpy, grpcio-free torch stack, typer, rich,
# pyyaml, prometheus-client, h5py, ml-dtypes, absl-py (see the device tool's KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
pin() { grep -i "^$1==" constraints.txt | head -1; }
wheels=(
  "$(pin keras)" namex optree "$(pin protobuf)" "$(pin grpcio)"
  "$(pin grpcio-health-checking)" "$(pin grpcio-reflection)" "$(pin redis)" "$(pin hiredis)"
  "$(pin pydantic)" pydantic-core pydantic-settings python-dotenv annotated-types
  typing-inspection
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
# pydantic pins its pydantic-core exactly: keep only the matching one.
core=$(unzip -p .whl/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
if [ -n "$core" ]; then
  find .whl -name 'pydantic_core-*' ! -name "pydantic_core-${core}-*" -delete
  ls .whl/pydantic_core-"${core}"-* >/dev/null 2>&1 || python3 -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pydantic-core==${core}"
fi
python3 -m pip wheel -q --no-deps -w .whl .  # rnnserve (pure Python; its own build env: PEP 639 license)
du -sh .whl && ls .whl
