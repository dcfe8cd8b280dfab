#!/usr/bin/env bash
# One entry point for a fresh checkout: creates ./.venv, installs distaccum with its test extras, then
#   bash launch/dev.sh demo    # runs the virtual-batch demo (plan, steps, equivalence figure)
#   bash launch/dev.sh test    # runs the test suite (what CI runs)
#   bash launch/dev.sh lint    # ruff (lint and format) on distaccum/ tests/ examples/, mypy on distaccum/ and
#                              # examples/bench/harness/ (the benchmark harness, not in the wheel)
#   bash launch/dev.sh setup   # only installs
# Knobs (environment):
#   VENV=.venv            where the virtual environment lives
#   PYTHON=python3        interpreter that creates it
#   TORCH_SPEC=...        what to pip-install when the venv has no torch yet. Default: torch==2.13.0 on a
#                         machine without an NVIDIA GPU (a CPU build on this project's machines; pass e.g.
#                         TORCH_SPEC="torch --index-url <your CPU wheel index>" elsewhere), plain "torch"
#                         when nvidia-smi is present. An already installed torch is never touched.
#   PYTEST_ARGS=...       extra pytest arguments for `test`
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
cmd=${1:-test}
shift || true

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Caches inside the venv, so a run leaves nothing behind in $HOME and DeepSpeed's JIT op is compiled once.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
command -v nvidia-smi >/dev/null 2>&1 && unset DS_ACCELERATOR

stamp="$VENV/.distaccum-installed"
want=$(cat pyproject.toml launch/dev.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then default_torch="torch"; else default_torch="torch==2.13.0"; fi
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
    "$PY" -m pip install --quiet --disable-pip-version-check ${TORCH_SPEC:-$default_torch}
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi

case "$cmd" in
  setup) ;;
  demo) exec "$PY" examples/demo.py "$@" ;;
  test)
    # shellcheck disable=SC2086
    exec "$PY" -m pytest ${PYTEST_ARGS:-} "$@" ;;
  lint)
    "$VENV/bin/ruff" check distaccum tests examples
    "$VENV/bin/ruff" format --check distaccum tests examples
    "$VENV/bin/mypy" distaccum examples/bench/harness ;;
  *) echo "usage: bash launch/dev.sh {demo|test|lint|setup}" >&2; exit 2 ;;
esac
