#!/usr/bin/env bash
# mypy over every module of rnnserve.core/service/client (protocol: its stubs only) under its import name.
# The folders are mapped onto `rnnserve.*` by setuptools' editable finder, which
# mypy cannot follow, so a tree of symlinks gives it the same names.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/rnnserve
mkdir -p "$tree"
for folder in core service client protocol; do ln -sfn "../../../$folder" "$tree/$folder"; done
modules=()
while IFS= read -r path; do
    module=${path%.py}
    module=${module%/__init__}
    modules+=(-m "rnnserve.${module//\//.}")
done < <(find core service client -name '*.py' | sort)
MYPYPATH=build/typecheck .venv/bin/mypy "${modules[@]}" "$@"
