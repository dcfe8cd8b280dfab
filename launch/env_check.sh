#!/usr/bin/env bash
# Check a launch before the real job: `distaccum env` on every rank of a torchrun job, one report from rank 0
# (launcher, world size, ranks, backend, device, CUDA, the batch plan) and exit status 1 when anything is
# inconsistent. Same knobs as launch/torchrun.sh; pass the job's batch sizes:
#
#   bash launch/env_check.sh --global-batch-size 1024 --micro-batch-size 16
#   NPROC_PER_NODE=4 bash launch/env_check.sh --global-batch-size 1024 --micro-batch-size 16
#
# On several nodes run the same check through the multi-node script on every node:
#   MODULE=distaccum NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_multinode.sh env --global-batch-size 1024
# Without torchrun:  python -m distaccum env --global-batch-size 1024 --micro-batch-size 16
set -euo pipefail
MODULE=distaccum exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" env "$@"
