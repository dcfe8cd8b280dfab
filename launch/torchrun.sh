#!/usr/bin/env bash
# torchrun on ONE node: NPROC_PER_NODE processes (one per GPU; 2 on a machine without GPU, gloo on CPU).
#
#   bash launch/torchrun.sh --global-batch-size 64 --micro-batch-size 8     # arguments go to the script
#   NPROC_PER_NODE=4 bash launch/torchrun.sh --steps 50
#   DRY_RUN=1 bash launch/torchrun.sh                                       # print the command, run nothing
#
# Same as typing:  torchrun --standalone --nproc_per_node 2 examples/train.py ARGS...
# --standalone starts a local rendezvous on a free port: several jobs on one machine do not collide.
#
# Knobs (environment):
#   NPROC_PER_NODE  processes to start                   default: number of GPUs (nvidia-smi -L), else 2
#   SCRIPT          training script                      default: examples/train.py
#   MODULE          run `python -m MODULE` instead of SCRIPT (e.g. MODULE=distaccum with args `env ...`)
#   TORCHRUN        the torchrun command                 default: torchrun (e.g. "python -m torch.distributed.run")
#   DRY_RUN=1       print the command and exit
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [ "$gpus" -gt 0 ]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
fi
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"
if [ -n "${MODULE:-}" ]; then target=(-m "$MODULE"); else target=("${SCRIPT:-$ROOT/examples/train.py}"); fi

cmd=("${torchrun[@]}" --standalone --nproc_per_node "$NPROC_PER_NODE" "${target[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
