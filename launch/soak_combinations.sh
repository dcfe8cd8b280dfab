#!/usr/bin/env bash
# Soak of the combinatorial equivalence harness (tests/helpers/combinations.py): thousands of sampled configurations
# (backend x dtype x optimizer x options), each against one process on the real batch, on 1 process and on 2 gloo
# ranks. CI runs the same tests with 1,000 and 300 configurations.
#
#   bash launch/soak_combinations.sh                                # 2,000 per world size, seed 1
#   DISTACCUM_COMBOS=5000 DISTACCUM_COMBO_SEED=7 bash launch/soak_combinations.sh
#   WORLD_SIZES=2 bash launch/soak_combinations.sh -x               # arguments go to pytest
#   DRY_RUN=1 bash launch/soak_combinations.sh                      # print the command, run nothing
#
# A failure prints each failing configuration with its verdict and its Config(...) to paste into REGRESSIONS
# (tests/helpers/combinations.py); a known one goes into KNOWN_FAILING with its issue-24 row.
# Time on a 2-core machine: ~12 ms per configuration on 1 process, ~0.1 s on 2 ranks (more with checkpoint files).
#
# Knobs (environment):
#   DISTACCUM_COMBOS      configurations per world size          default: 2000
#   DISTACCUM_COMBO_SEED  which configurations (same seed, same)  default: 1 (CI samples seed 0)
#   WORLD_SIZES           "1 2", "1" or "2"                       default: "1 2"
#   PYTHON                the interpreter                         default: .venv/bin/python, else python
#   DRY_RUN=1             print the command and exit
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export DISTACCUM_COMBOS="${DISTACCUM_COMBOS:-2000}"
export DISTACCUM_COMBO_SEED="${DISTACCUM_COMBO_SEED:-1}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
tests=()
for world_size in ${WORLD_SIZES:-1 2}; do
  case "$world_size" in
    1) tests+=("tests/unit/test_combinations.py::test_sampled_configurations_equal_the_real_batch_or_are_refused_at_construction") ;;
    2) tests+=("tests/distributed/test_combinations.py::test_sampled_configurations_equal_the_real_batch_or_are_refused_at_construction") ;;
    *) echo "WORLD_SIZES holds 1 and/or 2, got $world_size" >&2; exit 2 ;;
  esac
done

cmd=("$PYTHON" -m pytest -p no:cacheprovider -q "${tests[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "DISTACCUM_COMBOS=$DISTACCUM_COMBOS DISTACCUM_COMBO_SEED=$DISTACCUM_COMBO_SEED"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "+ DISTACCUM_COMBOS=$DISTACCUM_COMBOS DISTACCUM_COMBO_SEED=$DISTACCUM_COMBO_SEED ${cmd[*]}" >&2
exec "${cmd[@]}"
