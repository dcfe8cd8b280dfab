"""One training script, unchanged under every launcher: virtual batches with distaccum on the shared task.

Every launch path with the same --global-batch-size and --seed ends with the same weights as one process
training on the real global batch; only accum_steps = global / (micro x world size) changes.

    # one process (accum_steps = 32 / 8 = 4)
    python examples/train.py --global-batch-size 32 --micro-batch-size 8 --save weights.pt

    # torchrun, one node, 2 processes (accum_steps 2); launch/torchrun.sh wraps this
    torchrun --standalone --nproc_per_node 2 examples/train.py --global-batch-size 32 --micro-batch-size 8

    # torchrun, two nodes x 1 process: run on each node, NODE_RANK=0 on the head node, 1 on the other
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank $NODE_RANK --rdzv_backend c10d \
        --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id job1 examples/train.py --global-batch-size 32

    # Slurm (several nodes): sbatch launch/slurm.sbatch --global-batch-size 32

    # accelerate launch, 2 processes on CPU (without ACCELERATE_USE_CPU=1 it would expect GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train.py --global-batch-size 32
    # accelerate launch with a config file (GPUs): launch/accelerate.sh or
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml examples/train.py --global-batch-size 32

    # DeepSpeed (ZeRO 0/1/2 configs whose batch fields match --global-batch-size 32 --micro-batch-size 8)
    deepspeed --num_gpus 2 examples/train.py --deepspeed launch/deepspeed/zero1.json --global-batch-size 32
    torchrun --standalone --nproc_per_node 2 examples/train.py --deepspeed launch/deepspeed/zero2.json

    # checkpoints: every 5 optimizer steps; run the same command again and it resumes where it stopped
    python examples/train.py --steps 20 --checkpoint-dir ckpt --checkpoint-every 5
    torchrun --standalone --nproc_per_node 2 examples/train.py --deepspeed launch/deepspeed/zero2.json \
        --steps 20 --checkpoint-dir ckpt-ds --checkpoint-every 5   # the engine's shards in the same checkpoint

The script wraps the model in DistributedDataParallel itself when the launcher started several processes,
so `accelerate launch` works through its torchrun environment alone (examples/accelerate_train.py shows the
Accelerator API instead).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import task  # examples/task.py: the script's own directory is on sys.path under every launcher
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, checkpoint, dist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=32, help="samples per optimizer step, all ranks")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per forward/backward per rank")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps to train for (in total, resumes too)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="model init and data seed")
    parser.add_argument("--save", type=Path, help="write the final state_dict here (rank 0, plain tensor names)")
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoint here at the end, resume from the latest")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N optimizer steps")
    parser.add_argument("--deepspeed", metavar="CONFIG_JSON", help="train through a DeepSpeed engine")
    # The deepspeed launcher passes --local_rank; the rank comes from the environment, so it is ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.checkpoint_every < 0 or (args.checkpoint_every and args.checkpoint_dir is None):
        parser.error("--checkpoint-every N needs N >= 0 and --checkpoint-dir")
    return args


def main(args: argparse.Namespace) -> None:
    device = dist.device()
    plan = BatchPlan(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size)
    model: nn.Module = task.make_model(args.seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if args.deepspeed:
        from distaccum.integrations.deepspeed import initialize

        model = initialize(model, optimizer, plan, args.deepspeed)
        optimizer = model.optimizer  # type: ignore[assignment]
    elif plan.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    acc = Accumulator(model, optimizer, plan)

    start = 0
    if args.checkpoint_dir is not None:
        resumed = checkpoint.load(args.checkpoint_dir, model=model, optimizer=optimizer, accumulator=acc)
        if resumed is not None:
            start = resumed["step"]
            dist.print0(f"resumed from {checkpoint.latest(args.checkpoint_dir)} at step {start}")
    dist.print0(f"{plan}  launcher={dist.launcher()} device={device} backend={acc.backend}")

    for step in range(start, args.steps):
        batches = task.micro_batches(
            step, plan.global_batch_size, plan.micro_batch_size, dist.rank(), plan.world_size, args.seed
        )
        for inputs, targets in batches:
            with acc.micro_step():
                acc.backward(task.loss_fn(model(inputs.to(device)), targets.to(device)))
        assert acc.last_step is not None and acc.micro_step_in_window == 0
        dist.print0(f"step {step + 1:4d}/{args.steps}  loss {acc.last_step.loss:.6f}")
        done = step + 1
        due = done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0)
        if args.checkpoint_dir is not None and due:
            checkpoint.save(
                args.checkpoint_dir, model=model, optimizer=optimizer, accumulator=acc, data_state={"step": done}
            )

    if args.save is not None:
        with gathered(model, acc.backend):  # ZeRO 3 holds a shard of each parameter per rank: gathered on every rank
            weights = {name: value.detach().cpu() for name, value in checkpoint.unwrap(model).state_dict().items()}
        if dist.rank() == 0:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save(weights, args.save)
            dist.print0(f"saved weights to {args.save}")


def gathered(model: nn.Module, backend: str) -> contextlib.AbstractContextManager[object]:
    """Whole parameters inside, for a DeepSpeed engine (collective); nothing to do for other models."""
    if backend != "deepspeed":
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


if __name__ == "__main__":
    dist.run(main, parse_args())
