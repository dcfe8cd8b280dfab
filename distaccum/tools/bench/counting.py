"""Counting communication while a method steps, split into gradient reductions and other collectives.

DDP's gradient reductions are counted through a comm hook (one call per bucket); every Python-level collective
(``torch.distributed.all_reduce`` and friends, which DeepSpeed's and distaccum's own reductions go through) by
wrapping those functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

_COUNTED_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce_scatter_tensor", "all_gather_into_tensor")
# DeepSpeed reduces gradients through torch.distributed.all_reduce on flat buffers; calls on tensors at least
# this large are counted as gradient reductions, smaller ones (scalars, flags) as other collectives.
_GRADIENT_BUFFER_MIN_NUMEL = 1024


@dataclass
class CommCounter:
    """Collectives seen since the last :meth:`reset`, split into gradient reductions and the rest."""

    gradient_reductions: int = 0
    other_collectives: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.gradient_reductions = 0
        self.other_collectives = 0
        self.calls = {}


@contextlib.contextmanager
def counting_collectives(counter: CommCounter, *, gradient_buffers: Callable[[], bool]) -> Iterator[None]:
    """Wrap the Python-level collectives so that every call is counted in ``counter``.

    Args:
        counter: where counts go.
        gradient_buffers: whether large all-reduces count as gradient reductions right now (True while a
            method that reduces gradients in Python, DeepSpeed, is stepping).
    """
    originals = {name: getattr(torch_dist, name) for name in _COUNTED_COLLECTIVES}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            counter.calls[name] = counter.calls.get(name, 0) + 1
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else 0
            if name == "all_reduce" and numel >= _GRADIENT_BUFFER_MIN_NUMEL and gradient_buffers():
                counter.gradient_reductions += 1
            else:
                counter.other_collectives += 1
            return original(tensor, *args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(torch_dist, name, counted(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch_dist, name, original)


def counting_allreduce_hook(counter: CommCounter, all_reduce: Callable[..., Any], world_size: int) -> Any:
    """A DDP comm hook equal to the default all-reduce (average), counting one reduction per bucket."""

    def hook(state, bucket):
        # No annotations on purpose: DDP checks them at runtime, and this module's are strings (__future__).
        counter.gradient_reductions += 1
        tensor = bucket.buffer().div_(world_size)
        # The unwrapped all_reduce: this call is already counted as a gradient reduction above.
        future = all_reduce(tensor, async_op=True).get_future()
        return future.then(lambda done: done.value()[0])

    return hook
