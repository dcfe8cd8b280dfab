"""Gradient accumulation with distaccum on the shared task: the twin of examples/plain_torch.py.

`diff examples/plain_torch.py examples/with_distaccum.py` shows exactly what distaccum changes. Same weights
as the twin, plus: the batch arithmetic checked on every rank, exact weighting with num_items, short last
windows (acc.flush), clipping/scaler/scheduler once per step, and the same loop on DDP, FSDP and DeepSpeed.

    python examples/with_distaccum.py --save distaccum.pt
    torchrun --standalone --nproc_per_node 2 examples/with_distaccum.py --save distaccum.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import task  # examples/task.py: the script's own directory is on sys.path under every launcher
import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, dist


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
    rank, world_size = dist.rank(), dist.world_size()
    device = dist.device()
    plan = BatchPlan(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size)
    model: nn.Module = task.make_model(args.seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    acc = Accumulator(model, optimizer, plan)
    for step in range(args.steps):
        batches = task.micro_batches(step, args.global_batch_size, args.micro_batch_size, rank, world_size, args.seed)
        for inputs, targets in batches:
            with acc.micro_step():
                loss = task.loss_fn(model(inputs.to(device)), targets.to(device))
                acc.backward(loss)
        if rank == 0:
            print(f"step {step + 1:4d}/{args.steps}  loss {acc.last_step.loss:.6f} (window, all ranks)", flush=True)

    if args.save is not None and rank == 0:
        torch.save((model.module if world_size > 1 else model).state_dict(), args.save)


if __name__ == "__main__":
    dist.run(main, parse_args())  # joins the launcher's process group, and leaves it without the exit abort
