#!/usr/bin/env bash
# torchrun on SEVERAL nodes: run this script once on every node, with the same knobs except NODE_RANK.
#
#   # on the head node (its address is MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh --global-batch-size 1024
#   # on the second node:
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh --global-batch-size 1024
#   DRY_RUN=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh    # print the command only
#
# Two "nodes" on one machine (a rehearsal, as the tests do): MASTER_ADDR=127.0.0.1 and a free MASTER_PORT.
# Global ranks: node NODE_RANK holds ranks NODE_RANK*NPROC_PER_NODE ... +NPROC_PER_NODE-1; rank 0 (which
# writes --save and checkpoints) is on NODE_RANK 0. Checkpoint directories must be on a shared filesystem.
#
# Knobs (environment):
#   NNODES          number of nodes                      default: 2
#   NODE_RANK       this node's index, 0..NNODES-1       required
#   MASTER_ADDR     address of NODE_RANK 0, reachable from every node   required
#   MASTER_PORT     free TCP port on MASTER_ADDR         default: 29500
#   NPROC_PER_NODE  processes per node                   default: number of GPUs, else 1
#   RDZV_BACKEND    static: fixed ranks via --master_addr/--master_port/--node_rank (default)
#                   c10d:   torchrun's elastic rendezvous at MASTER_ADDR:MASTER_PORT (RDZV_ID names the job)
#   RDZV_ID         rendezvous id for c10d               default: distaccum
#   SCRIPT, MODULE, TORCHRUN, DRY_RUN=1   as in launch/torchrun.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NNODES=${NNODES:-2}
: "${NODE_RANK:?set NODE_RANK to the index of this node (0 on the head node, 1..NNODES-1 on the others)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the head node (127.0.0.1 for two nodes on one machine)}"
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [ "$gpus" -gt 0 ]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=1; fi
fi
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"
if [ -n "${MODULE:-}" ]; then target=(-m "$MODULE"); else target=("${SCRIPT:-$ROOT/examples/train.py}"); fi

case "${RDZV_BACKEND:-static}" in
  static) rdzv=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --node_rank "$NODE_RANK") ;;
  c10d) rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-distaccum}"
              --node_rank "$NODE_RANK") ;;
  *) echo "RDZV_BACKEND must be static or c10d, got '${RDZV_BACKEND}'" >&2; exit 2 ;;
esac

cmd=("${torchrun[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" "${target[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
