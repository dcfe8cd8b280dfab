"""Gradient accumulation in plain PyTorch on the shared task: the twin of examples/with_distaccum.py.

`diff examples/plain_torch.py examples/with_distaccum.py` shows exactly what distaccum changes. This twin is
correct for full windows of equal micro-batches only: no check of the batch arithmetic across ranks, no exact
weighting of ragged batches, no short last window, no clipping/scaler/scheduler placement to get wrong.

    python examples/plain_torch.py --save plain.pt
    torchrun --standalone --nproc_per_node 2 examples/plain_torch.py --save plain.pt
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
from pathlib import Path

import task  # examples/task.py: the script's own directory is on sys.path under every launcher
import torch
import torch.distributed as torch_dist
from torch import nn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=32, help="samples per optimizer step, all ranks")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per forward/backward per rank")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="model init and data seed")
    parser.add_argument("--save", type=Path, help="write the final state_dict here (rank 0)")
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    accum_steps = args.global_batch_size // (args.micro_batch_size * world_size)
    if accum_steps * args.micro_batch_size * world_size != args.global_batch_size:
        raise ValueError("--global-batch-size must be a multiple of --micro-batch-size x world size")
    model: nn.Module = task.make_model(args.seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    for step in range(args.steps):
        batches = task.micro_batches(step, args.global_batch_size, args.micro_batch_size, rank, world_size, args.seed)
        for index, (inputs, targets) in enumerate(batches):
            boundary = (index + 1) % accum_steps == 0
            # All-reduce only on the window's last micro-batch.
            with contextlib.nullcontext() if boundary or world_size == 1 else model.no_sync():
                loss = task.loss_fn(model(inputs.to(device)), targets.to(device))
                # Gradients add up over micro-batches, but the objective is their MEAN.
                (loss / accum_steps).backward()
            if boundary:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step + 1:4d}/{args.steps}  loss {loss.item():.6f} (last micro-batch, rank 0)", flush=True)

    if args.save is not None and rank == 0:
        torch.save((model.module if world_size > 1 else model).state_dict(), args.save)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main(parse_args())
    # main's model is gone now: destroying the group while a DDP model lives aborts gloo at exit (1 run in 7).
    gc.collect()
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
