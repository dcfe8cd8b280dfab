#!/usr/bin/env bash
# accelerate launch with a config file from launch/accelerate/ (no interactive `accelerate config` needed).
#
#   bash launch/accelerate.sh                      # multi_gpu.yaml with GPUs, multi_cpu.yaml without
#   CONFIG=launch/accelerate/single_process.yaml bash launch/accelerate.sh
#   NUM_PROCESSES=4 SCRIPT=examples/train.py bash launch/accelerate.sh --global-batch-size 64
#   DRY_RUN=1 bash launch/accelerate.sh            # print the command only
#
# On a machine without a GPU this exports ACCELERATE_USE_CPU=1. Without it, `accelerate launch` with several
# processes starts them, but Accelerate reports DistributedType.NO, leaves the model unwrapped and never
# averages gradients, with no error (distaccum's Accumulator refuses such a model). A `use_cpu: true` line in
# the YAML does NOT do this; only the environment variable (or Accelerator(cpu=True)) does.
#
# Knobs (environment):
#   CONFIG             accelerate config YAML            default: see above
#   NUM_PROCESSES      total processes (all machines)    default: the YAML's num_processes
#   NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP          multi-node (launch/accelerate/multi_node.yaml)
#   MAIN_PROCESS_PORT  rendezvous port                   default: the YAML's, else Accelerate's 29500
#   SCRIPT             training script                   default: examples/accelerate_train.py
#   ACCELERATE         the accelerate command            default: accelerate
#   DRY_RUN=1          print the command and exit
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "$gpus" -gt 0 ]; then
  default_config=$ROOT/launch/accelerate/multi_gpu.yaml
else
  default_config=$ROOT/launch/accelerate/multi_cpu.yaml
  export ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-1}
fi
read -r -a accelerate <<< "${ACCELERATE:-accelerate}"

cmd=("${accelerate[@]}" launch --config_file "${CONFIG:-$default_config}")
[ -n "${NUM_PROCESSES:-}" ] && cmd+=(--num_processes "$NUM_PROCESSES")
[ -n "${NUM_MACHINES:-}" ] && cmd+=(--num_machines "$NUM_MACHINES")
[ -n "${MACHINE_RANK:-}" ] && cmd+=(--machine_rank "$MACHINE_RANK")
[ -n "${MAIN_PROCESS_IP:-}" ] && cmd+=(--main_process_ip "$MAIN_PROCESS_IP")
[ -n "${MAIN_PROCESS_PORT:-}" ] && cmd+=(--main_process_port "$MAIN_PROCESS_PORT")
cmd+=("${SCRIPT:-$ROOT/examples/accelerate_train.py}" "$@")
env_prefix=()
[ -n "${ACCELERATE_USE_CPU:-}" ] && env_prefix=(ACCELERATE_USE_CPU="$ACCELERATE_USE_CPU")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${env_prefix[@]}" "${cmd[@]}"; echo; exit 0; fi
echo "+ ${env_prefix[*]} ${cmd[*]}" >&2
exec "${cmd[@]}"
