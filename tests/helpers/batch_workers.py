"""Rank functions for tests/distributed/test_batches.py: a global batch that ramps up, and a micro-batch size found
by out-of-memory retries, on real gloo ranks (under ``tests.helpers.spawn.run_ranks``).

Data: one stream of samples; a window of global batch ``G`` trains on the stream's next ``G`` samples. Rank ``r``
reads the stream interleaved (``r::W``, as ``DistributedSampler`` without shuffling), so a plain loop over
micro-batches that never looks at the plan hands every window exactly the next ``G`` samples.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, BatchSchedule, checkpoint
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer

MICRO = 2
STAGES = [(0, 8), (16, 16), (48, 32)]  # samples consumed -> global batch; on 2 ranks accum_steps 2, 4, 8
RAMP_STEPS = 6  # global batches 8, 8, 16, 16, 32, 32: 112 samples
STREAM = 160


def stream() -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = make_data(1, STREAM)
    return inputs[0], targets[0]


def item_weights() -> torch.Tensor:
    """Items per sample of the stream (0 to 3: ragged, some micro-batches with none), for ``num_items`` runs."""
    return torch.randint(0, 4, (STREAM,), generator=torch.Generator().manual_seed(7)).double()


def item_loss(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of per-sample losses weighted by their items over the items (a token-mean loss), and the item count."""
    per_sample = (output - target).square().mean(dim=1)
    count = int(weights.sum())
    return (per_sample * weights.to(per_sample.dtype)).sum() / max(count, 1), count


def reference(global_batches: list[int], optimizer_name: str = "sgd", items: bool = False) -> dict[str, torch.Tensor]:
    """One process, real batches: the stream cut into consecutive batches of the given sizes."""
    model = make_model()
    optimizer = make_optimizer(optimizer_name, model.parameters())
    inputs, targets = stream()
    weights = item_weights()
    offset = 0
    for size in global_batches:
        optimizer.zero_grad()
        window = slice(offset, offset + size)
        if items:
            item_loss(model(inputs[window]), targets[window], weights[window])[0].backward()
        else:
            loss_fn(model(inputs[window]), targets[window]).backward()
        optimizer.step()
        offset += size
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _ramp_job(world_size: int) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Accumulator]:
    inner = make_model()
    model = nn.parallel.DistributedDataParallel(inner) if world_size > 1 else inner
    optimizer = make_optimizer("sgd", model.parameters())
    schedule = BatchSchedule(STAGES, micro_batch_size=MICRO)
    return inner, model, optimizer, Accumulator(model, optimizer, schedule)


def _train_ramp(rank: int, world_size: int, model: nn.Module, acc: Accumulator, until: int) -> list[int]:
    """A plain loop over this rank's micro-batches from where ``acc`` stands; the global batch of each step."""
    inputs, targets = stream()
    start = acc.consumed_samples // world_size  # this rank's position in its interleaved stream
    mine_x, mine_y = inputs[rank::world_size][start:], targets[rank::world_size][start:]
    batches = []
    for x, y in zip(mine_x.split(MICRO), mine_y.split(MICRO), strict=True):
        if acc.optimizer_steps == until:
            break
        window_batch = acc.plan.global_batch_size
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
        if acc.stepped:
            batches.append(window_batch)
    return batches


def ramp(rank: int, world_size: int) -> dict[str, Any]:
    """Uninterrupted ramp; then the same ramp stopped after 3 steps, checkpointed and resumed in a new job."""
    inner, model, _, acc = _ramp_job(world_size)
    batches = _train_ramp(rank, world_size, model, acc, RAMP_STEPS)
    uninterrupted = {name: value.detach().clone() for name, value in inner.state_dict().items()}

    with tempfile.TemporaryDirectory() if rank == 0 else contextlib.nullcontext() as directory:
        shared = [directory]
        if world_size > 1:
            torch.distributed.broadcast_object_list(shared)
        inner, model, optimizer, acc = _ramp_job(world_size)
        first = _train_ramp(rank, world_size, model, acc, 3)
        checkpoint.save(shared[0], model=model, optimizer=optimizer, accumulator=acc)
        inner, model, optimizer, acc = _ramp_job(world_size)  # a new job: its schedule starts at stage 0
        checkpoint.load(shared[0], model=model, optimizer=optimizer, accumulator=acc)
        resumed_plan = acc.plan.as_dict()
        resumed_consumed = acc.consumed_samples
        rest = _train_ramp(rank, world_size, model, acc, RAMP_STEPS)
        if world_size > 1:
            torch.distributed.barrier()  # rank 0 removes the directory only after every rank has read it
    return {
        "batches": batches,
        "uninterrupted": uninterrupted,
        "resumed_batches": first + rest,
        "resumed": {name: value.detach().clone() for name, value in inner.state_dict().items()},
        "resumed_plan": resumed_plan,
        "resumed_consumed": resumed_consumed,
        "consumed": acc.consumed_samples,
        "state": acc.state_dict(),
    }


def ramp_elastic(rank: int, world_size: int, saved: dict[str, Any]) -> dict[str, Any]:
    """Resume another world size's boundary state (weights, optimizer, accumulator) here, to the end of the ramp."""
    inner, model, optimizer, acc = _ramp_job(world_size)
    inner.load_state_dict({name: value.clone() for name, value in saved["model"].items()})
    # Arguments arrive in shared memory, the same tensors on every rank: private copies, or SGD's momentum buffers
    # would be one tensor updated by both ranks.
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    acc.load_state_dict(saved["accumulator"])
    plan = acc.plan.as_dict()
    batches = _train_ramp(rank, world_size, model, acc, RAMP_STEPS)
    return {"plan": plan, "batches": batches, "weights": {k: v.detach().clone() for k, v in inner.state_dict().items()}}


def ramp_state_after(rank: int, world_size: int, steps: int) -> dict[str, Any]:
    """Weights, optimizer and accumulator state at the boundary after ``steps`` steps of the ramp."""
    inner, model, optimizer, acc = _ramp_job(world_size)
    _train_ramp(rank, world_size, model, acc, steps)
    return {
        "model": {name: value.detach().clone() for name, value in inner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "accumulator": acc.state_dict(),
    }


# ----------------------------------------------------------------------------------------- automatic micro-batch
class FitsUpTo(nn.Module):
    """A model that raises ``torch.OutOfMemoryError`` when a forward sees more than ``limit`` samples, as a device
    would (on the ranks in ``ranks_short_of_memory`` only)."""

    def __init__(self, inner: nn.Module, limit: int, short: bool) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.short = short
        self.refused: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.short and x.shape[0] > self.limit:
            self.refused.append(x.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]} (test)")
        return self.inner(x)


OOM_GLOBAL = 48  # 24 samples per rank on 2 ranks
OOM_LARGEST = 12  # candidates dividing 24: 12, 8, 6, 4, 3, 2, 1
OOM_STEPS = 3


def oom(rank: int, world_size: int, short_ranks: tuple[int, ...], limit: int, items: bool = False) -> dict[str, Any]:
    """Three steps with ``auto_micro_batch`` where ranks in ``short_ranks`` fit at most ``limit`` samples per
    forward; then a fresh job resumed from the checkpoint (no search again)."""
    inner = make_model()
    fits = FitsUpTo(inner, limit, rank in short_ranks)
    # Tiny buckets: the gradients are reduced by hand at the boundary, bucket by bucket (several here).
    model = nn.parallel.DistributedDataParallel(fits, bucket_cap_mb=0.002) if world_size > 1 else fits
    optimizer = make_optimizer("sgd", model.parameters())
    plan = BatchPlan(global_batch_size=OOM_GLOBAL, micro_batch_size=OOM_LARGEST)
    acc = Accumulator(model, optimizer, plan, auto_micro_batch=True)
    inputs, targets = stream()
    weights = item_weights()
    share = OOM_GLOBAL // world_size
    sizes_per_step = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(OOM_STEPS):
            window = slice(step * OOM_GLOBAL, (step + 1) * OOM_GLOBAL)
            x, y, w = (t[window][rank::world_size] for t in (inputs, targets, weights))
            assert x.shape[0] == share
            for micro_x, micro_y, micro_w in acc.split((x, y, w)):
                with acc.micro_step():
                    if items:
                        loss, count = item_loss(model(micro_x), micro_y, micro_w)
                        acc.backward(loss, num_items=count)
                    else:
                        acc.backward(loss_fn(model(micro_x), micro_y))
            sizes_per_step.append(acc.plan.micro_batch_size)
    state = acc.state_dict()
    resumed = Accumulator(model, optimizer, plan, auto_micro_batch=True)
    resumed.load_state_dict(state)
    return {
        "weights": {name: value.detach().clone() for name, value in inner.state_dict().items()},
        "sizes": sizes_per_step,
        "refused": fits.refused,
        "retries": acc.micro_batch_retries,
        "steps": acc.optimizer_steps,
        "skipped": acc.skipped_steps,
        "warnings": [str(w.message) for w in caught if "auto_micro_batch" in str(w.message)],
        "resumed_micro": resumed.plan.micro_batch_size,
        "resumed_accum": resumed.plan.accum_steps,
    }
