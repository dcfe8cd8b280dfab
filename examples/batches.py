"""Batches that change: a global batch that ramps up, an LR schedule keyed on samples, a micro-batch size found for you.

The global batch follows a Megatron-style ramp (``BatchSchedule.linear``: 32 -> 128 in steps of 32 over the first
768 samples); ``accum_steps`` changes at window boundaries only. The learning rate warms up and decays over
*samples*, read from ``acc.consumed_samples``: a schedule over optimizer steps that assumed the final batch from
the start (Megatron-Bridge's bug) would decay at the wrong time, as the last column shows. With
``--memory-limit N`` the model raises ``torch.OutOfMemoryError`` on a forward of more than N samples (simulated:
a CPU has no such limit), and ``auto_micro_batch=True`` makes every rank agree on the largest micro-batch that fits.
At the end rank 0 trains the same sequence of real batches in a plain PyTorch loop and prints the largest
relative difference of the weights.

    python examples/batches.py                                   # one process, micro-batch 8
    python examples/batches.py --memory-limit 6                  # the search: 8 fails, 4 fits
    torchrun --standalone --nproc_per_node 2 examples/batches.py --memory-limit 6
"""

from __future__ import annotations

import argparse
import math
import warnings

import task  # examples/task.py: the script's own directory is on sys.path under every launcher
import torch
from torch import nn

from distaccum import Accumulator, BatchSchedule, dist

WARMUP_SAMPLES, TOTAL_SAMPLES, BASE_LR = 256, 1024, 0.05


def lr_factor(consumed_samples: int) -> float:
    """Linear warm-up, then cosine decay, both over samples (never over steps: the batch changes)."""
    warmup = min(1.0, (consumed_samples + 1) / WARMUP_SAMPLES)
    return warmup * 0.5 * (1 + math.cos(math.pi * min(consumed_samples, TOTAL_SAMPLES) / TOTAL_SAMPLES))


class DeviceMemory(nn.Module):
    """The task's model, on a pretend device that fits ``limit`` samples per forward (0: no limit)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.model = task.make_model()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} > {self.limit} samples)")
        return self.model(x)


def reference(batches: list[int]) -> nn.Module:
    """One process, the real batches, the same LR over samples: a plain PyTorch loop."""
    model = task.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR * lr_factor(0), momentum=0.9)
    consumed = 0
    for step, size in enumerate(batches):
        inputs, targets = task.global_batch(step, size)
        optimizer.zero_grad()
        task.loss_fn(model(inputs), targets).backward()
        optimizer.step()
        consumed += size
        for group in optimizer.param_groups:
            group["lr"] = BASE_LR * lr_factor(consumed)
    return model


def main(args: argparse.Namespace) -> None:
    world, rank = dist.world_size(), dist.rank()
    module = DeviceMemory(args.memory_limit)
    model = nn.parallel.DistributedDataParallel(module) if world > 1 else module
    optimizer = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=0.9)
    schedule = BatchSchedule.linear(start=32, end=128, increment=32, ramp_samples=768, micro_batch_size=8)
    # The accumulator steps the scheduler after each optimizer step, with consumed_samples already counted.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(acc.consumed_samples if step else 0)
    )
    acc = Accumulator(model, optimizer, schedule, scheduler=scheduler, auto_micro_batch=True)
    dist.print0(
        f"{schedule}\n{'step':>4} {'global':>6} {'accum':>5} {'micro':>5} {'samples':>7} {'loss':>9} "
        f"{'next lr':>9} {'next lr if keyed on steps x final batch':>39}"
    )
    batches = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each retry warns; the table shows the size that was chosen
        while acc.optimizer_steps < args.steps:
            size = acc.plan.global_batch_size
            inputs, targets = task.global_batch(acc.optimizer_steps, size)
            share = size // world
            mine = slice(rank * share, (rank + 1) * share)
            for x, y in acc.split((inputs[mine], targets[mine])):
                with acc.micro_step():
                    acc.backward(task.loss_fn(model(x), y))
            batches.append(size)
            assert acc.last_step is not None
            naive = lr_factor(acc.optimizer_steps * schedule.stages[-1][1])  # steps x the final batch
            accum = acc.last_step.micro_steps // world
            dist.print0(
                f"{acc.optimizer_steps:>4} {size:>6} {accum:>5} {acc.plan.micro_batch_size:>5} "
                f"{acc.consumed_samples:>7} {acc.last_step.loss:>9.5f} {optimizer.param_groups[0]['lr']:>9.5f} "
                f"{BASE_LR * naive:>39.5f}"
            )
    dist.print0(f"micro-batch size in use: {acc.plan.micro_batch_size} ({acc.micro_batch_retries} window(s) retried)")
    if rank == 0:
        expected = reference(batches).state_dict()
        gap = max(
            float((value - expected[name]).norm() / expected[name].norm())
            for name, value in module.model.state_dict().items()
        )
        print(f"largest relative weight difference vs the real batches in one process: {gap:.2e}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps")
    parser.add_argument("--memory-limit", type=int, default=0, help="samples per forward that fit (0: any)")
    return parser.parse_args()


if __name__ == "__main__":
    dist.run(main, parse_args())
