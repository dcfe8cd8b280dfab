"""bf16 models under accumulation: the task, the float64 and bf16 real-batch references, and the 2-rank DDP worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan

WIDTH, MICRO = 128, 4
DDP_ACCUM = 16  # per rank: 2 ranks x 16 x 4 = a real batch of 128
DDP_WINDOWS = (DDP_ACCUM, DDP_ACCUM, 5)  # micro-steps per window and rank; the last is short, ended by flush()
GRADIENT_SIZED = 1000  # elements: the window's scalars are far fewer, the model's 16,641 gradients far more


def make_model(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)).to(dtype)


def make_batch(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, WIDTH, generator=generator), torch.randn(samples, 1, generator=generator)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target.to(output.dtype)).square().mean()


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def reference_grad(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real batch's gradient in one process, from ``model``'s weights, computed in ``dtype`` (flat, float64)."""
    copy = make_model(dtype)
    copy.load_state_dict({name: value.to(dtype) for name, value in model.state_dict().items()})
    loss_fn(copy(inputs.to(dtype)), targets).backward()
    return flat([p.grad for p in copy.parameters()])


def recording_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients each optimizer step receives (flat, float64), appended as it steps."""
    seen: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(flat([p.grad for p in params])))
    return seen


def window_batch(window: int, micro_steps: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real batch of one window of the DDP run (every rank draws all of it, then takes its share)."""
    return make_batch(MICRO * micro_steps * world_size, seed=100 + window)


@contextlib.contextmanager
def recording_all_reduces() -> Iterator[list[tuple[int, torch.dtype]]]:
    """(elements, dtype) of every ``torch.distributed.all_reduce`` inside the block: DDP's comm hook, distaccum's
    hand reduction and its scalars alike."""
    calls: list[tuple[int, torch.dtype]] = []
    original = torch_dist.all_reduce

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append((tensor.numel(), tensor.dtype))
        return original(tensor, *args, **kwargs)

    torch_dist.all_reduce = recording
    try:
        yield calls
    finally:
        torch_dist.all_reduce = original


def ddp_windows(rank: int, world_size: int, accumulate_dtype: torch.dtype | None) -> dict[str, Any]:
    """A bf16 DDP model, SGD at lr 0 (every window starts from the same weights): the windows of
    :data:`DDP_WINDOWS`. Returns the gradient each step received, and per micro-step (and the flush) the
    gradient-sized all-reduces this rank made and the bucket reductions DDP's own comm hook made."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    module = make_model()
    model = nn.parallel.DistributedDataParallel(module)
    by_ddp = [0]

    def counting_hook(state, bucket):  # unannotated: DDP checks a hook's annotations against its classes
        by_ddp[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = recording_step(optimizer, list(module.parameters()))
    plan = BatchPlan(accum_steps=DDP_ACCUM, micro_batch_size=MICRO)
    acc = Accumulator(model, optimizer, plan, accumulate_dtype=accumulate_dtype)
    reductions: list[list[tuple[int, str]]] = []
    ddp_reductions: list[int] = []
    with recording_all_reduces() as calls:
        for window, micro_steps in enumerate(DDP_WINDOWS):
            inputs, targets = window_batch(window, micro_steps, world_size)
            share = slice(rank * MICRO * micro_steps, (rank + 1) * MICRO * micro_steps)
            for x, y in zip(inputs[share].split(MICRO), targets[share].split(MICRO), strict=True):
                before, before_ddp = len(calls), by_ddp[0]
                with acc.micro_step():
                    acc.backward(loss_fn(model(x.bfloat16()), y))
                reductions.append([(n, str(d)) for n, d in calls[before:] if n >= GRADIENT_SIZED])
                ddp_reductions.append(by_ddp[0] - before_ddp)
            if micro_steps < DDP_ACCUM:
                before, before_ddp = len(calls), by_ddp[0]
                acc.flush()
                reductions.append([(n, str(d)) for n, d in calls[before:] if n >= GRADIENT_SIZED])
                ddp_reductions.append(by_ddp[0] - before_ddp)
    result = {
        "grads": seen,
        "reductions": reductions,
        "ddp_reductions": ddp_reductions,
        "steps": acc.optimizer_steps,
        "weights": {name: value.clone() for name, value in module.state_dict().items()},
    }
    del model, module, optimizer, acc
    return result


def ddp_buffers(rank: int, world_size: int, accumulate_dtype: torch.dtype | None) -> torch.Tensor:
    """A bf16 DDP model with BatchNorm (default ``broadcast_buffers``), one window of 4 on rank-own data: the
    running mean after the step."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).to(torch.bfloat16)
    model = nn.parallel.DistributedDataParallel(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = BatchPlan(accum_steps=4, micro_batch_size=MICRO)
    acc = Accumulator(model, optimizer, plan, accumulate_dtype=accumulate_dtype, batch_norm="per_micro_batch")
    generator = torch.Generator().manual_seed(rank)
    for _ in range(4):
        with acc.micro_step():
            acc.backward(model(torch.randn(MICRO, 8, generator=generator).bfloat16()).square().mean())
    assert acc.optimizer_steps == 1
    mean = module[1].running_mean.clone()
    del model, module, optimizer, acc
    return mean
