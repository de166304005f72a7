#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels felix imports that the device machine's image lacks
# (pydantic and its own dependencies), built for its Python 3.12 on x86-64, at the versions installed
# here. scripts/gpu_checks.sh installs them there; see its header.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mapfile -t pins < <("$PY" - <<'PYEOF'
from importlib.metadata import version
for name in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection"):
    print(f"{name}=={version(name)}")
PYEOF
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls .whl
