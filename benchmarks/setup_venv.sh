#!/usr/bin/env bash
# The benchmark environment: transformers 4.57 (AdapterHub adapters 1.3 pins ~=4.57), adapters, peft,
# and spartan installed editable with its test extra, in .venv-bench (or $VENV). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-bench}"
CONSTRAINTS=benchmarks/constraints-transformers-457.txt   # torch==2.13.0, transformers~=4.57.0

python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0             # first, pinned: a looser spec pulls a CUDA build of several GB
"$VENV/bin/pip" install -c "$CONSTRAINTS" "transformers~=4.57.0" adapters peft psutil matplotlib
"$VENV/bin/pip" install -c "$CONSTRAINTS" -e ".[test]"   # spartan, with what its tests need
"$VENV/bin/python" - <<'PY'
import torch, transformers, adapters, peft
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert transformers.__version__.startswith("4.57."), transformers.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {adapters.__version__}, peft {peft.__version__}")
PY
