#!/usr/bin/env bash
# The GPU check, for the day a GPU machine is lent: one command, about 6 minutes on one GPU, no network. Its first run
# (2026-11-27, H200) is in examples/bench/gpu-h200/, with what it took per step.
#
#   bash launch/gpu_check.sh OUT_DIR            # results (logs, weights, bench JSON/table, summary) under OUT_DIR
#   DRY_RUN=1 bash launch/gpu_check.sh OUT_DIR  # print the steps, run nothing
#
# The machine is expected to have python3 with a CUDA torch, pytest, pytest-timeout and psutil; DeepSpeed may be
# missing (its bench methods are then left out by the bench harness itself). Steps, each logged to OUT_DIR/NAME.log;
# a failing step does not stop the others, and the script exits 1 if any failed:
#   install        pip install --no-deps --no-build-isolation -e .   (nothing is downloaded)
#   env            nvidia-smi, torch/CUDA versions, `distaccum env`
#   cuda-tests     the CUDA-marked tests (fp16 + GradScaler, bf16 autocast, the virtual = real batch test, host
#                  syncs per step, SyncBatchNorm's exact running statistics on 2 ranks sharing the GPU over gloo)
#   one-process    examples/train.py on the GPU, one process
#   two-ranks      the same under torchrun x2 sharing the GPU (DISTACCUM_BACKEND=gloo: NCCL refuses 2 ranks on 1 GPU)
#   nccl-one-rank  a DDP model over a real one-rank NCCL process group, accumulating 4 micro-batches per step
#   compare        one process vs two ranks on the GPU, and the NCCL run vs the CPU real batch (max relative error)
#   overhead       python -m examples.bench.harness --overhead --device cuda: distaccum's own host cost per
#                  micro-step on the GPU
#   bench          python -m examples.bench.harness (the bench harness, not in the wheel), 2 ranks sharing the GPU
#                  (gloo), the 16.8M MLP at micro-batch BENCH_MICRO so that compute, not launches, dominates: step
#                  time and torch.cuda.max_memory_allocated at k = 1, 8, 64 (the bench's methods need a process
#                  group), with the clipping pair, each method's peak in fresh processes (no separate sweep: it would
#                  not fit); PNG next to the JSON
# Knobs: PYTHON (default python3), STEPS (training steps, default 20), BENCH_ROUNDS (default 5), BENCH_MICRO (1024).
# The repo root is put on PYTHONPATH, so that the steps run from this checkout even if the install step fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: bash launch/gpu_check.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-20}
BENCH_ROUNDS=${BENCH_ROUNDS:-5}
BENCH_MICRO=${BENCH_MICRO:-1024}
SIZES=(--global-batch-size 32 --micro-batch-size 8 --steps "$STEPS")
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
failed=()

step() {
  local name=$1
  shift
  printf '== %s: %s\n' "$name" "$*"
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  if (env "$@") > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; failed+=("$name"); fi
}

step install "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
step env bash -c "nvidia-smi; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; $PYTHON -m distaccum env --global-batch-size 64 --micro-batch-size 8"
step cuda-tests "$PYTHON" -m pytest -p no:cacheprovider -q -rP -m cuda tests/unit/test_hardware.py tests/unit/test_batchnorm.py
step one-process "$PYTHON" examples/train.py "${SIZES[@]}" --save "$OUT/one-process.pt"
step two-ranks DISTACCUM_BACKEND=gloo "${TORCHRUN[@]}" --nproc_per_node 2 examples/train.py "${SIZES[@]}" --save "$OUT/two-ranks.pt"
port=$("$PYTHON" -c 'from distaccum.dist import free_port; print(free_port())')
step nccl-one-rank RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" "$PYTHON" -c "
import torch, torch.distributed as td
from torch import nn
from distaccum import Accumulator, BatchPlan, checkpoint
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer
td.init_process_group('nccl')  # DDP's reducer over NCCL; one rank, the one GPU
torch.cuda.set_device(0)
model = nn.parallel.DistributedDataParallel(make_model().cuda(), device_ids=[0])
acc = Accumulator(model, make_optimizer('sgd', model.parameters()), BatchPlan(accum_steps=4, micro_batch_size=8, world_size=1))
inputs, targets = make_data($STEPS, 32)
for step in range($STEPS):
    for x, y in zip(inputs[step].split(8), targets[step].split(8)):
        with acc.micro_step():
            acc.backward(loss_fn(model(x.cuda()), y.cuda()))
torch.save({k: v.cpu() for k, v in checkpoint.unwrap(model).state_dict().items()}, '$OUT/nccl-one-rank-mlp.pt')
print('backend', acc.backend, 'steps', acc.optimizer_steps)
del model, acc
td.destroy_process_group()"
step compare "$PYTHON" -c "
import sys, torch
from tests.helpers.common import max_relative_error
from tests.helpers.common import reference_run
runs = {name: torch.load(f'$OUT/{name}.pt', weights_only=True) for name in ('one-process', 'two-ranks')}
errors = {name: max_relative_error(weights, runs['one-process']) for name, weights in runs.items()}
expected, _ = reference_run('sgd', $STEPS, 32)  # one process on the real batch, on the CPU, not distaccum
errors['nccl-one-rank vs CPU real batch'] = max_relative_error(torch.load('$OUT/nccl-one-rank-mlp.pt'), expected)
print(errors)
sys.exit(0 if max(errors.values()) <= 1e-5 else 1)"
step overhead "$PYTHON" -m examples.bench.harness --overhead --device cuda --accum-steps 1 8 --rounds 5 --micro-steps 500 \
  --json "$OUT/overhead-cuda.json" --table "$OUT/overhead-cuda.txt"
step bench DISTACCUM_BACKEND=gloo "$PYTHON" -m examples.bench.harness --nproc 2 --models mlp --accum-steps 1 8 64 \
  --micro-batch-size "$BENCH_MICRO" --methods no_sync distaccum no_sync_clip distaccum_clip real_batch --memory-sweep \
  --rounds "$BENCH_ROUNDS" --json "$OUT/bench.json" --table "$OUT/bench.txt"

if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
{ date; echo "failed: ${failed[*]:-none}"; } > "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
