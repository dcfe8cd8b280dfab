"""The examples' shared task: an MLP learns a fixed random "teacher" network from synthetic data.

Everything is a pure function of the seed and the optimizer step, so any launcher and any world size see the
same global batch at the same step: rank ``r`` takes the ``r``-th contiguous slice of it, cut in
micro-batches. That is what lets every launch path end with the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

IN_FEATURES = 16
HIDDEN = 64
OUT_FEATURES = 4


def make_model(seed: int = 0) -> nn.Module:
    """The student model, initialized from ``seed`` (identical on every rank)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT_FEATURES)
    )


def global_batch(step: int, global_batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole global batch of optimizer step ``step``: inputs and noisy teacher targets."""
    teacher_generator = torch.Generator().manual_seed(10_000 + seed)
    teacher = torch.randn(IN_FEATURES, OUT_FEATURES, generator=teacher_generator)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    inputs = torch.randn(global_batch_size, IN_FEATURES, generator=generator)
    targets = torch.tanh(inputs @ teacher) + 0.1 * torch.randn(global_batch_size, OUT_FEATURES, generator=generator)
    return inputs, targets


def micro_batches(
    step: int, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of step ``step``'s global batch."""
    inputs, targets = global_batch(step, global_batch_size, seed)
    per_rank = global_batch_size // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    yield from zip(inputs[mine].split(micro_batch_size), targets[mine].split(micro_batch_size), strict=True)


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(outputs, targets)
