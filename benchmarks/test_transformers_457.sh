#!/usr/bin/env bash
# spartan's whole test suite on transformers 4.57 (the benchmark environment; the main one has 5.x).
# Creates .venv-bench (or $VENV) with benchmarks/setup_venv.sh when it does not exist yet.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-bench}"
[ -x "$VENV/bin/python" ] || VENV="$VENV" benchmarks/setup_venv.sh
"$VENV/bin/python" -c "import transformers as t; assert t.__version__.startswith('4.57.'), t.__version__; print('transformers', t.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
