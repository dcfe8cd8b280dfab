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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from distaccum import collectives

if TYPE_CHECKING:
    from distaccum.accumulator import Accumulator

T = TypeVar("T")


def iterate(acc: Accumulator, micro_batches: Iterable[T], *, drop_last: bool) -> Iterator[T]:
    """The generator behind :meth:`distaccum.Accumulator.iterate` (see the module docstring)."""
    if acc.check_ranks and not acc._agreed:
        acc._check_agreement()  # before the first count all-reduce: a plan mismatch names itself
    source = iter(micro_batches)
    while True:
        need = acc.plan.accum_steps - acc.micro_step_in_window
        window = list(itertools.islice(source, need))
        common = int(collectives.min_over_ranks(len(window)))
        acc.dropped_micro_batches += len(window) - common
        if common < need and (drop_last or common == 0):
            if drop_last:
                acc.dropped_micro_batches += common
                acc._discard_window()
            elif acc.micro_step_in_window:  # resumed mid-window and the data ends right there
                acc.flush()
            return
        for index, batch in enumerate(window[:common]):
            expected = acc._micro_steps_run + 1
            acc._end_of_data = common < need and index == common - 1
            try:
                yield batch
            except GeneratorExit:  # the loop was left early: the flag must not end some later window
                acc._end_of_data = False
                raise
            if acc._micro_steps_run != expected or acc._in_micro_step:
                raise RuntimeError(
                    "acc.iterate() yields one micro-batch per acc.micro_step(): run each one inside "
                    f"`with acc.micro_step():` (this one ran {acc._micro_steps_run - expected + 1})"
                )
        if common < need:
            return
