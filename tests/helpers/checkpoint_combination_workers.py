"""Rank bodies for tests/distributed/test_checkpoint_combinations.py: a mid-window ``distaccum.checkpoint`` of 2 DDP
ranks whose windows differ per rank (item counts, loss sums, a window one rank discarded, the noise scale's
small-batch reading), resumed in fresh objects, next to the uninterrupted run; and the single-process real-batch
reference (which never imports distaccum) they are compared with.

Every micro-batch is ragged: ``n`` of its ``MICRO`` samples are real, rank 0 has more than rank 1, so a window's
item count and loss sum differ by rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.helpers.common import make_data, make_model, make_optimizer

MICRO = 4
ACCUM = 3
STEPS = 3
WORLD_SIZE = 2
SAVE_AT = (1, 2)
"""(window, micro-batches done in it): the checkpoint is taken mid-window, at micro-step 2 of 3 of step 2."""
ITEMS = ((4, 3, 4), (1, 2, 1))
"""Real samples per micro-batch by rank (rotated by window): rank 0 has 10-11 per window, rank 1 has 4-5."""
DISCARDED = (1, 1, 0)
"""(rank, window, micro-batch) whose window that rank alone discards (``acc.discard_window()``)."""
CASES = ("items", "mean", "discard")
NOISE_DECAY = 0.5


def micro_batch(step: int, rank: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real samples of one rank's micro-batch: the same for any run."""
    inputs, targets = make_data(STEPS * WORLD_SIZE * ACCUM, MICRO)
    flat = (step * WORLD_SIZE + rank) * ACCUM + index
    count = ITEMS[rank][(index + step) % ACCUM]
    # Targets offset from the model's start: a clear mean gradient, so the noise scale's |G|^2 is positive.
    return inputs[flat][:count], targets[flat][:count] + 1


def item_losses(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().mean(dim=1)


def _record(step: Any) -> dict[str, Any]:
    return {
        "loss": step.loss,
        "num_items": step.num_items,
        "micro_steps": step.micro_steps,
        "skipped": step.skipped,
        "noise_scale": step.noise_scale,
    }


def _build() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from distaccum import Accumulator, BatchPlan

    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = make_optimizer("adam", model.parameters())
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM)
    return model, optimizer, Accumulator(model, optimizer, plan, noise_scale=NOISE_DECAY)


def _train(
    rank: int, case: str, objects: tuple[nn.Module, torch.optim.Optimizer, Any], start=(0, 0), save_to=None
) -> list[dict[str, Any]]:
    """Train from ``start`` to the end of STEPS (or, with ``save_to``, until SAVE_AT, checkpointed there)."""
    from distaccum import checkpoint

    model, optimizer, acc = objects
    steps = []
    for step in range(start[0], STEPS):
        for index in range(start[1] if step == start[0] else 0, ACCUM):
            x, y = micro_batch(step, rank, index)
            with acc.micro_step():
                if case == "discard" and (rank, step, index) == DISCARDED:
                    acc.discard_window()
                loss = item_losses(model(x), y).mean()
                acc.backward(loss, num_items=None if case == "mean" else x.shape[0])
            if acc.stepped:
                steps.append(_record(acc.last_step))
            if save_to is not None and (step, index + 1) == SAVE_AT:
                data_state = {"step": step, "micro_batch": index + 1}
                parts = {"model": model, "optimizer": optimizer, "accumulator": acc}
                checkpoint.save(save_to, **parts, data_state=data_state, include_grads=True)
                return steps
    return steps


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {name: value.detach().clone() for name, value in inner.state_dict().items()}


def mid_window_resumes(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    """Per case: the uninterrupted run, and the run checkpointed at SAVE_AT and resumed in fresh objects."""
    from distaccum import checkpoint

    results: dict[str, Any] = {}
    for case in CASES:
        objects = _build()
        uninterrupted = _train(rank, case, objects)
        final = _weights(objects[0])
        target = Path(directory) / case
        _train(rank, case, _build(), save_to=target)
        objects = _build()
        data = checkpoint.load(target, model=objects[0], optimizer=objects[1], accumulator=objects[2])
        assert data is not None
        resumed = _train(rank, case, objects, start=(data["step"], data["micro_batch"]))
        results[case] = {
            "uninterrupted": {"steps": uninterrupted, "final": final},
            "resumed": {"steps": resumed, "final": _weights(objects[0])},
        }
    return results


def reference(case: str) -> dict[str, Any]:
    """One process, one backward per real window batch (all ranks' micro-batches), Adam: the weights and each
    step's loss and item count (``items``: the window's item mean; ``mean``: the mean of micro-batch means)."""
    model = make_model()
    optimizer = make_optimizer("adam", model.parameters())
    steps = []
    for step in range(STEPS):
        batches = [micro_batch(step, rank, index) for rank in range(WORLD_SIZE) for index in range(ACCUM)]
        optimizer.zero_grad()
        if case == "mean":
            loss = torch.stack([item_losses(model(x), y).mean() for x, y in batches]).mean()
        else:
            x = torch.cat([x for x, _ in batches])
            y = torch.cat([y for _, y in batches])
            loss = item_losses(model(x), y).mean()
        count = sum(x.shape[0] for x, _ in batches)
        skipped = case == "discard" and step == DISCARDED[1]
        if not skipped:
            loss.backward()
            optimizer.step()
        steps.append({"loss": math.nan if skipped else float(loss.detach()), "num_items": count, "skipped": skipped})
    return {"steps": steps, "final": {k: v.detach().clone() for k, v in model.state_dict().items()}}
