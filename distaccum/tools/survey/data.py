"""The survey's data: one endless, seeded sample stream per dataset, and the built-in digits task."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distaccum.tools.survey.optional import require

Batch = tuple[torch.Tensor, torch.Tensor]
BatchFn = Callable[[int, int], Batch]
"""``batches(step, global_batch_size) -> (inputs, targets)``: the whole global batch of an optimizer step."""


def stream_batches(inputs: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> BatchFn:
    """Cut a dataset into one endless sample stream (a fresh seeded shuffle per epoch).

    Optimizer step ``s`` of a configuration with global batch ``G`` gets stream samples ``[s*G, (s+1)*G)``:
    configurations with the same global batch see exactly the same samples at every step.

    Args:
        inputs: all samples' inputs (first dimension: samples).
        targets: all samples' targets, in the same order.
        seed: seeds the shuffle of every epoch.

    Returns:
        ``batches(step, global_batch_size) -> (inputs, targets)``, a pure function of its arguments.

    Example:
        >>> batches = stream_batches(torch.arange(10.0), torch.arange(10))
        >>> torch.equal(batches(1, 4)[0], torch.cat([batches(2, 2)[0], batches(3, 2)[0]]))
        True
    """
    count = inputs.shape[0]

    def batches(step: int, global_batch_size: int) -> Batch:
        start = step * global_batch_size
        first_epoch, last_epoch = start // count, (start + global_batch_size - 1) // count
        orders = [
            torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            for epoch in range(first_epoch, last_epoch + 1)
        ]
        offset = start - first_epoch * count
        index = torch.cat(orders)[offset : offset + global_batch_size]
        return inputs[index], targets[index]

    return batches


def digits_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits (64 pixels, standardized per pixel over the whole set) and their labels.

    Raises:
        ImportError: scikit-learn is missing (the message names the pip command).
    """
    digits = require("sklearn.datasets", "survey").load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float64)
    std = inputs.std(dim=0)
    inputs = ((inputs - inputs.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))).to(dtype)
    return inputs, torch.tensor(digits.target, dtype=torch.int64)


def digits_task(
    seed: int = 0, hidden: int = 64, dtype: torch.dtype = torch.float32
) -> tuple[Callable[[], nn.Module], BatchFn]:
    """scikit-learn's handwritten digits (1797 x 64, 10 classes, standardized) and a small MLP factory.

    Returns:
        ``(make_model, batches)``: an MLP 64-hidden-hidden-10 factory seeded by ``seed`` and the digits as a
        :func:`stream_batches` stream.

    Raises:
        ImportError: scikit-learn is missing (the message names the pip command).
    """
    inputs, targets = digits_data(dtype)

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        ).to(dtype)

    return make_model, stream_batches(inputs, targets, seed=seed)
