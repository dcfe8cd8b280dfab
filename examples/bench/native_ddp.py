"""distaccum against hand loops on DDP's native (C++) reduction, which the bench harness cannot count.

The bench counts every gradient reduction while it times, so its hand-written loops carry a Python comm hook
that divides each bucket before its all-reduce. DDP without a hook divides while it copies gradients into the
buckets, for free; any comm hook, the bench's or distaccum's, pays that division as a pass of its own. This
script times, interleaved and paired per round (rank 0's process CPU time), three ways on the bench's models:
``native``, the hand ``no_sync`` loop on DDP's own reduction that all-reduces its window loss (as a loop that
logs it does); ``pyhook``, the same loop with a Python hook that divides and all-reduces each bucket (what the
bench's loops do); and ``distaccum``, an Accumulator on the same model.

Run, from the repository root (it imports the harness's models and counting hook as ``examples.bench.harness``):
``torchrun --nproc-per-node 2 -m examples.bench.native_ddp MODEL ACCUM_STEPS ROUNDS`` (CPU, gloo).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch
import torch.distributed as td
from torch import nn

from distaccum import Accumulator, BatchPlan
from examples.bench.harness.counting import CommCounter, counting_allreduce_hook
from examples.bench.harness.models import model_spec, round_batches


def main() -> None:
    name, accum_steps, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    td.init_process_group("gloo")
    rank, world = td.get_rank(), td.get_world_size()
    spec = model_spec(name, "full")

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(spec.build())
        return model, torch.optim.SGD(model.parameters(), lr=1e-3)

    def hand_loop(model: nn.Module, optimizer: torch.optim.Optimizer):  # type: ignore[no-untyped-def]
        def step(batches: list) -> None:
            total = torch.zeros((), dtype=torch.float64)
            for index, (x, y) in enumerate(batches):
                with model.no_sync() if index < len(batches) - 1 else contextlib.nullcontext():
                    loss = spec.loss(model(x), y) / len(batches)
                    loss.backward()
                total += loss.detach()
            td.all_reduce(total)
            float(total)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    (native, native_opt), (hooked, hooked_opt), (model, optimizer) = build(), build(), build()
    hooked.register_comm_hook(None, counting_allreduce_hook(CommCounter(), td.all_reduce, world))  # the bench's
    acc = Accumulator(model, optimizer, BatchPlan(micro_batch_size=8, accum_steps=accum_steps))

    def with_distaccum(batches: list) -> None:
        for x, y in batches:
            with acc.micro_step():
                acc.backward(spec.loss(model(x), y))

    ways = {
        "native": hand_loop(native, native_opt),
        "pyhook": hand_loop(hooked, hooked_opt),
        "distaccum": with_distaccum,
    }
    names = list(ways)
    seconds: dict[str, list[float]] = {way: [] for way in names}
    warmup = 2
    for index in range(warmup + rounds):
        batches = round_batches(spec, seed=0, step=index, rank=rank, micro_batch_size=8, accum_steps=accum_steps)
        order = names if index % 2 == 0 else names[::-1]  # 3 ways: rotations of both orders cover every neighbour
        for way in order[index % 3 :] + order[: index % 3]:
            td.barrier()
            start = time.process_time()
            ways[way](batches)
            if index >= warmup:
                seconds[way].append(time.process_time() - start)
    if rank == 0:
        base = statistics.median(seconds["native"]) * 1e3
        for way in names[1:]:
            ratio = statistics.median(a / b for a, b in zip(seconds[way], seconds["native"], strict=True))
            diff = statistics.median(a - b for a, b in zip(seconds[way], seconds["native"], strict=True)) * 1e3
            print(
                f"{name} k={accum_steps} {rounds} rounds: {way} / native {ratio:.3f} (+{diff:.2f} ms CPU per step; "
                f"native {base:.1f} ms)"
            )
    td.destroy_process_group()


if __name__ == "__main__":
    main()
