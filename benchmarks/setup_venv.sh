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
# lucidrains' product-key-memory, the large-memory peer of benchmarks/memory_layer.py, and its small pure-Python
# imports, without letting pip touch torch
"$VENV/bin/pip" install --no-deps product-key-memory==0.3.0 colt5-attention==0.11.2 local-attention==1.11.2 \
    hyper-connections==0.4.11 torch-einops-utils==0.2.0 einops==0.8.2
"$VENV/bin/python" - <<'PY'
import torch, transformers, adapters, peft
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert transformers.__version__.startswith("4.57."), transformers.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {adapters.__version__}, peft {peft.__version__}")
PY
