"""Counting communication while a method steps, split into gradient reductions and other collectives.

DDP's gradient reductions are counted through a comm hook (one call per bucket); every Python-level collective
(``torch.distributed.all_reduce`` and friends, which DeepSpeed's and distaccum's own reductions go through) by
wrapping those functions. FSDP2 reduce-scatters through ``torch.distributed.reduce_scatter_single`` (a wrapped
``reduce_scatter_tensor`` sees none of its calls), DeepSpeed ZeRO 3 through ``reduce_scatter_tensor``; both are
wrapped. Gradient reductions are kept apart by kind: reduce-scatters and all-reduces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.distributed as torch_dist

if TYPE_CHECKING:
    from examples.bench.harness.records import MethodTimings

_COUNTED_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce_scatter_tensor",
    "reduce_scatter_single",  # torch >= 2.13: FSDP2's and FSDP1's reduce-scatter
    "all_gather_into_tensor",
    "all_gather_single",  # torch >= 2.13: FSDP2's parameter all-gather
)
# DeepSpeed reduces gradients through torch.distributed.all_reduce on flat buffers; calls on tensors at least
# this large are counted as gradient reductions, smaller ones (scalars, flags) as other collectives. An all-reduce
# over a sub-group (HSDP's replica all-reduce) is a gradient reduction whatever its size.
_GRADIENT_BUFFER_MIN_NUMEL = 1024


@dataclass
class CommCounter:
    """Collectives seen since the last :meth:`reset`, split into gradient reductions and the rest."""

    gradient_reductions: int = 0
    """Reduce-scatters plus gradient all-reduces."""
    other_collectives: int = 0
    reduce_scatters: int = 0
    gradient_all_reduces: int = 0
    all_gathers: int = 0
    """Parameter all-gathers (FSDP, ZeRO 3), counted among the other collectives too."""
    by_micro_step: list[int] = field(default_factory=list)
    """Gradient reductions of each micro-step, for methods that call :meth:`end_micro_step` (empty otherwise)."""
    calls: dict[str, int] = field(default_factory=dict)
    _marked: int = 0

    def reset(self) -> None:
        self.gradient_reductions = self.other_collectives = 0
        self.reduce_scatters = self.gradient_all_reduces = self.all_gathers = 0
        self.by_micro_step = []
        self._marked = 0
        self.calls = {}

    def end_micro_step(self) -> None:
        """Close a micro-step: append the gradient reductions since the previous one to :attr:`by_micro_step`."""
        self.by_micro_step.append(self.gradient_reductions - self._marked)
        self._marked = self.gradient_reductions

    def count_gradient_all_reduce(self) -> None:
        self.gradient_reductions += 1
        self.gradient_all_reduces += 1


def _tensor_and_group(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The tensor a collective reduces (its input for a reduce-scatter) and its group, positional or by keyword."""
    if name.startswith("reduce_scatter"):  # (output, input, op, group, ...)
        tensor = args[1] if len(args) > 1 else kwargs.get("input")
        group = args[3] if len(args) > 3 else kwargs.get("group")
    else:  # (tensor, op, group, ...) or (output, input, group, ...)
        tensor = args[0] if args else kwargs.get("tensor", kwargs.get("output_tensor"))
        group = args[2] if len(args) > 2 else kwargs.get("group")
    return tensor, group


def _sub_group(group: Any) -> bool:
    return group is not None and torch_dist.get_world_size(group) < torch_dist.get_world_size()


@contextlib.contextmanager
def counting_collectives(counter: CommCounter, *, gradient_buffers: Callable[[], bool]) -> Iterator[None]:
    """Wrap the Python-level collectives so that every call is counted in ``counter``.

    Args:
        counter: where counts go.
        gradient_buffers: whether reduce-scatters, large all-reduces and sub-group all-reduces count as gradient
            reductions right now (True while a method that reduces gradients in Python, DeepSpeed or FSDP2, steps).
    """
    originals = {name: getattr(torch_dist, name) for name in _COUNTED_COLLECTIVES if hasattr(torch_dist, name)}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counter.calls[name] = counter.calls.get(name, 0) + 1
            tensor, group = _tensor_and_group(name, args, kwargs)
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else 0
            if name.startswith("reduce_scatter") and gradient_buffers():
                counter.gradient_reductions += 1
                counter.reduce_scatters += 1
            elif (
                name == "all_reduce"
                and gradient_buffers()
                and (numel >= _GRADIENT_BUFFER_MIN_NUMEL or _sub_group(group))
            ):
                counter.count_gradient_all_reduce()
            else:
                counter.other_collectives += 1
                counter.all_gathers += name.startswith("all_gather")
            return original(*args, **kwargs)

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
        counter.count_gradient_all_reduce()
        tensor = bucket.buffer().div_(world_size)
        # The unwrapped all_reduce: this call is already counted as a gradient reduction above.
        future = all_reduce(tensor, async_op=True).get_future()
        return future.then(lambda done: done.value()[0])

    return hook


def one_or_all(values: set[Any]) -> Any:
    """The one value of ``values``, or all of them sorted."""
    ordered = sorted(values)
    return ordered[0] if len(ordered) == 1 else ordered


class StepCounts(TypedDict):
    """What :func:`summarize_counts` returns: a method's counts per step, keys of its JSON entry."""

    gradient_reductions_per_step: int | list[int]
    other_collectives_per_step: int | list[int]
    reduce_scatters_per_step: int | list[int]
    gradient_all_reduces_per_step: int | list[int]
    all_gathers_per_step: int | list[int]
    gradient_reductions_by_micro_step: list[int] | list[list[int]] | None


def summarize_counts(records: Sequence[MethodTimings]) -> StepCounts:
    """Per-step counts of one method over its ranks' records (an int where all steps agree, else the sorted values).

    Keys: ``gradient_reductions_per_step`` (reduce-scatters + gradient all-reduces), ``other_collectives_per_step``,
    ``reduce_scatters_per_step``, ``gradient_all_reduces_per_step``, ``all_gathers_per_step``, and
    ``gradient_reductions_by_micro_step`` (one list per step, as an int list where all agree; None where the method
    does not mark its micro-steps).
    """

    def per_step(counts: Callable[[MethodTimings], list[int]]) -> int | list[int]:
        return one_or_all({c for r in records for c in counts(r)} or {0})

    steps = {tuple(step) for r in records for step in r.by_micro_step if step}
    by_step = [list(step) for step in sorted(steps)]
    return {
        "gradient_reductions_per_step": per_step(lambda r: r.gradient_reductions),
        "other_collectives_per_step": per_step(lambda r: r.other_collectives),
        "reduce_scatters_per_step": per_step(lambda r: r.reduce_scatters),
        "gradient_all_reduces_per_step": per_step(lambda r: r.gradient_all_reduces),
        "all_gathers_per_step": per_step(lambda r: r.all_gathers),
        "gradient_reductions_by_micro_step": (by_step[0] if len(by_step) == 1 else by_step) or None,
    }
