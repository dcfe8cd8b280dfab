"""Automatic micro-batch size: the largest one that fits, found by out-of-memory retries every rank agrees on.

With ``Accumulator(..., auto_micro_batch=True)`` the plan's ``micro_batch_size`` is the largest to try. Each
loader batch is this rank's share of one global batch, and ``acc.split(batch)`` yields it in micro-batches, one
``acc.micro_step()`` each; the global batch never changes, ``accum_steps`` is re-derived from the size in use.

Why no rank can hang: in this mode every micro-step runs without gradient sync, the boundary's too. When a
forward or backward raises out of memory inside ``micro_step``, that rank stops its window and goes straight to
the boundary's scalar all-reduce (the one every window makes anyway), with one more number in it: "I ran out of
memory". The other ranks reach the same all-reduce at the end of their window; their micro-steps so far made
no collective. All ranks then see the same flag:

* nobody ran out: the window's gradients are all-reduced now, bucket by bucket at DDP's ``bucket_cap_mb``, with
  the window's factor folded in (after the last backward instead of overlapped with it: the price of never
  entering a gradient collective a peer may not join), and the step goes on as usual;
* some rank did: every rank drops the window's gradients, takes the next smaller size (the largest divisor of
  every per-rank batch below the one that failed), and ``acc.split`` starts the window again from its first
  sample. The chosen size is ``acc.plan.micro_batch_size``; it is saved in checkpoints, so a resume does not
  search again.

Out of memory means ``torch.OutOfMemoryError``, or a ``RuntimeError`` with one of the messages Composer matches
(:data:`OOM_MESSAGES`). Only wrappers with no collective inside forward or backward qualify (a plain module,
DDP): FSDP gathers parameters in every forward and ``SyncBatchNorm`` all-gathers statistics, so a rank that
stopped early would leave its peers in those collectives; they are refused with the alternative. An out of
memory error in the optimizer step itself is not retried (it raises; peers then wait in their next collective
until the process group's timeout).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distaccum.backends import Backend
from distaccum.plan import BatchPlan

OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "HIP out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says a device ran out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(message in str(error) for message in OOM_MESSAGES)


def check_model(model: nn.Module, backend: Backend, batch_norm: str = "exact") -> None:
    """Refuse setups where a rank that stops early would leave its peers in a collective; warn when a rerun window
    would update BatchNorm running statistics twice (``batch_norm`` other than ``"exact"``).

    Raises:
        ValueError: not a plain module or DDP, DDP ``static_graph``, or ``SyncBatchNorm`` layers.
    """
    if batch_norm != "exact" and any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in model.modules()):
        warnings.warn(
            "auto_micro_batch=True with BatchNorm layers: a window run again after out of memory runs its forwards "
            "again, and each updates the running statistics, so they would count those micro-batches twice. Pass "
            "batch_norm='exact' (statistics updated once per step, from the window that stepped).",
            stacklevel=3,
        )
    problem = backend.collective_free_refusal()
    if problem is None and any(isinstance(layer, nn.SyncBatchNorm) for layer in model.modules()):
        problem = "SyncBatchNorm all-gathers statistics in every forward"
    if problem:
        raise ValueError(
            f"auto_micro_batch=True needs a model whose forward and backward make no collective, so that a rank "
            f"that runs out of memory can stop without leaving its peers in one; here {problem}. Find the size "
            "once on a plain or DDP model (or one process) and set BatchPlan(micro_batch_size=...)."
        )


def check_share(size: int, plan: BatchPlan) -> None:
    """Refuse a loader batch of ``size`` samples that is not this rank's share of ``plan``'s global batch.

    Raises:
        ValueError: it is not.
    """
    share = plan.global_batch_size // plan.world_size
    if size != share:
        raise ValueError(
            f"acc.split(batch): the batch has {size} samples, but one rank's share of global_batch_size "
            f"{plan.global_batch_size} over world_size {plan.world_size} is {share}; make the loader's "
            f"batch_size {share} (acc.plan.global_batch_size // acc.plan.world_size, which a batch schedule changes)"
        )


def next_size(failed: int, smaller: int | None) -> int:
    """After some rank ran out of memory at micro-batch size ``failed``: ``smaller``, the next size (the same on
    every rank: all saw the same flag), with a warning.

    Raises:
        torch.OutOfMemoryError: even the smallest size ran out, on every rank (``smaller`` is None).
    """
    if smaller is None:
        raise torch.OutOfMemoryError(
            f"distaccum auto_micro_batch: micro_batch_size {failed} ran out of memory on some rank and there is no "
            "smaller size; the model does not fit one sample per micro-step (shard it: FSDP, DeepSpeed ZeRO)"
        )
    warnings.warn(
        f"distaccum auto_micro_batch: micro_batch_size {failed} ran out of memory on some rank; every rank starts "
        f"the window again with micro_batch_size {smaller} (the global batch is unchanged)",
        stacklevel=4,
    )
    return smaller


def release_memory() -> None:
    """Free what the failed (or the other ranks' failed) window held before it runs again."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_length(batch: Any) -> int:
    """Samples in ``batch`` (the first tensor's dim 0, inside tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, Mapping, list, tuple)):
            return batch_length(item)
    raise TypeError(
        "acc.split() cuts tensors (and tuples, lists and dicts holding tensors) along dim 0; got "
        f"{type(batch).__name__} without a tensor"
    )


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Tensors cut along dim 0; tuples, lists and dicts rebuilt around their cut items; other values kept."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({key: slice_batch(value, start, stop) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        items = [slice_batch(item, start, stop) for item in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch
