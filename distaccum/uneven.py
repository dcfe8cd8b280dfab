"""Uneven data across ranks: windows cut to what every rank still has, so that no rank hangs in a reduction.

At each window's start every rank takes the micro-batches the window still needs from its iterator (one window
of look-ahead) and one scalar all-reduce tells all ranks the smallest count. While every rank has a full
window, nothing changes. In the window where the first rank runs out, every rank trains on that smallest
number ``m`` of micro-batches, the ``m``-th ends the window (as ``micro_step(last=True)``) and the step is the
exact mean over the ``m x world_size`` micro-batches, as a real batch of those samples. Longer ranks' surplus
micro-batches of that window are not trained on (counted in ``acc.dropped_micro_batches``) and their iterators
are not read further. With ``drop_last=True`` a short last window is not stepped at all (its micro-batches are
counted as dropped), so every optimizer step sees exactly ``global_batch_size`` samples. Uneven ranks are a
data problem to fix upstream (e.g. ``DistributedSampler``); this makes its cost a few dropped micro-batches
instead of a hang.

Example:
    >>> import torch
    >>> from distaccum import Accumulator, BatchPlan
    >>> model = torch.nn.Linear(4, 1)
    >>> acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                   BatchPlan(global_batch_size=8, micro_batch_size=4))
    >>> for x in acc.iterate(torch.randn(3, 4, 4)):  # 3 micro-batches: one full window and one short
    ...     with acc.micro_step():
    ...         acc.backward(model(x).square().mean())
    >>> acc.optimizer_steps, acc.last_step.micro_steps
    (2, 1)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TypeVar

from distaccum import collectives

T = TypeVar("T")


def take_window(source: Iterator[T], need: int) -> tuple[list[T], int]:
    """The next ``need`` micro-batches of this rank's ``source`` (fewer where it ends), and how many every rank has:
    the smallest count over ranks (one scalar all-reduce, made by every rank at every window's start)."""
    window = list(itertools.islice(source, need))
    return window, int(collectives.min_over_ranks(len(window)))
