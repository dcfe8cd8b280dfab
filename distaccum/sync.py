"""Gradient-sync control: one small class per model wrapper, chosen from the model.

Each class answers the few questions the engine asks of a backend: how to skip gradient reduction inside
a window (:meth:`GradSync.no_sync`), how to compute (and clip to) the global gradient norm, and how to reduce
gradients that were accumulated without sync when the data ends mid-window (:meth:`GradSync.reduce_pending`).
Supporting a new wrapper is a new subclass in :data:`BACKENDS` (or one returned by
:func:`_lazy_backends`), never another branch in the engine.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
import torch.distributed as torch_dist
from torch import nn

Params = list[torch.Tensor]


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class GradSync:
    """Sync control for a plain module in a single process: nothing to skip, nothing to reduce."""

    name: ClassVar[str] = "plain"
    owns_step: ClassVar[bool] = False
    """True when the wrapped engine steps, clips and scales by itself (DeepSpeed)."""
    grads_in_params: ClassVar[bool] = True
    """True when gradients accumulated without sync live in ``param.grad`` (so a mid-window state can hold
    them); False for wrappers that accumulate in private buffers (FSDP, DeepSpeed)."""

    def __init__(self, model: nn.Module, world_size: int) -> None:
        self.model = model
        self.world_size = world_size

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    @property
    def averaging_ranks(self) -> int:
        """How many ranks' gradients a reduction averages over (1 when nothing is reduced)."""
        return self.world_size

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Context in which backward accumulates gradients locally without reducing them."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def scale_grads(self, params: Params, factor: float) -> None:
        """Multiply every gradient by ``factor`` in place (already reduced gradients)."""
        grads = _grads(params)
        if grads:
            torch._foreach_mul_(grads, factor)

    def grad_norm(self, params: Params, max_norm: float | None) -> torch.Tensor:
        """Global 2-norm of the gradients, clipping them to ``max_norm`` when given."""
        grads = _grads(params)
        if not grads:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        full = getattr(total, "full_tensor", None)  # DTensor (FSDP2): partial norms over shards
        if full is not None:
            total = full()
        if max_norm is not None and math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def reduce_pending(self, params: Params) -> None:
        """Average gradients that were accumulated under :meth:`no_sync` (end of data mid-window)."""

    def engine_step(self, max_grad_norm: float | None, *, skip: bool = False) -> tuple[float | None, bool]:
        """Step a backend that owns the step (:attr:`owns_step`): returns (grad norm, skipped).

        ``skip``: the accumulator decided not to step (a window without items); drop the gradients only.
        """
        raise NotImplementedError(f"{self.name} does not own the optimizer step")


class DDPSync(GradSync):
    """``DistributedDataParallel``: ``no_sync()`` inside the window; flush all-reduces manually."""

    name = "ddp"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.parallel.DistributedDataParallel)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.model.no_sync()  # type: ignore[operator]

    def reduce_pending(self, params: Params) -> None:
        # A rank that ran no micro-step in the short window still joins the all-reduce, with zeros.
        for param in params:
            if param.grad is None and param.requires_grad:
                param.grad = torch.zeros_like(param)
        grads = _grads(params)
        flat = torch._utils._flatten_dense_tensors(grads)
        torch_dist.all_reduce(flat)
        flat.div_(self.world_size)
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)


class _ShardedFlushMixin:
    name: ClassVar[str]
    grads_in_params: ClassVar[bool] = False

    def reduce_pending(self, params: Params) -> None:
        raise ValueError(
            f"{self.name}: the data ended mid-window, but this wrapper keeps gradients accumulated without sync in "
            "private buffers that only a backward pass can reduce. Mark the final micro-batch instead: "
            "`with acc.micro_step(last=True):` makes it the boundary of a short window."
        )


class FSDP1Sync(_ShardedFlushMixin, GradSync):
    """``FullyShardedDataParallel`` (FSDP1): ``no_sync()``; the norm comes from FSDP's own sharded clip."""

    name = "fsdp1"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return isinstance(model, FullyShardedDataParallel)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.model.no_sync()  # type: ignore[operator]

    def grad_norm(self, params: Params, max_norm: float | None) -> torch.Tensor:
        # FSDP1's own clip_grad_norm_ forces float32 norms and fails on float64 parameters; the sharded norm is
        # simple enough: every rank holds a disjoint shard, so squared norms add up over ranks.
        from torch.distributed.fsdp import ShardingStrategy

        grads = _grads(params)
        if grads:
            local = torch.nn.utils.get_total_norm(grads)
        else:  # this rank's shard holds no gradient; it still joins the all-reduce, on the right device
            local = torch.zeros((), device=next(self.model.parameters()).device)
        squared = local.to(torch.float64).square().reshape(1)
        if self.model.sharding_strategy != ShardingStrategy.NO_SHARD:
            torch_dist.all_reduce(squared)
        total = squared.sqrt()[0]
        if max_norm is not None and math.isfinite(max_norm) and grads:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total


class FSDP2Sync(_ShardedFlushMixin, GradSync):
    """``fully_shard`` (FSDP2): ``set_requires_gradient_sync(False)``, restored in ``finally``."""

    name = "fsdp2"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(model, FSDPModule)

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        previous = self._requires_sync()
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(previous)  # type: ignore[operator]

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self._no_sync()

    def _requires_sync(self) -> bool:
        # FSDP2 has a setter but no getter; read the flag the setter writes so that we restore what we found.
        state = self.model._get_fsdp_state()  # type: ignore[operator]
        groups = getattr(state, "_fsdp_param_groups", None) or []
        return all(group.reduce_grads for group in groups) if groups else True


BACKENDS: tuple[type[GradSync], ...] = (DDPSync, FSDP1Sync, FSDP2Sync)
"""Wrapper backends tried in order; the plain :class:`GradSync` is the fallback."""


def _lazy_backends() -> list[type[GradSync]]:
    # Integrations are considered only when their library is already imported by the user, so that
    # `import distaccum` never imports them.
    found: list[type[GradSync]] = []
    if "deepspeed" in sys.modules:
        from distaccum.integrations.deepspeed import DeepSpeedSync

        found.append(DeepSpeedSync)
    return found


def select_sync(model: nn.Module, world_size: int) -> GradSync:
    """The sync control for ``model``; refuses an unwrapped model when ``world_size > 1``.

    Raises:
        ValueError: ``model`` is a plain module while ``world_size > 1`` (its gradients would never be
            averaged across ranks).
    """
    for backend in (*_lazy_backends(), *BACKENDS):
        if backend.matches(model):
            return backend(model, world_size)
    if world_size > 1:
        raise ValueError(
            f"model is a plain {type(model).__name__} but world_size is {world_size}: its gradients would never "
            "be averaged across ranks and every rank would train its own model. Wrap it before building the "
            "Accumulator: DistributedDataParallel(model), FSDP / fully_shard(model), accelerator.prepare(model) "
            "or deepspeed.initialize(model=model, ...). (Under `accelerate launch` without a GPU, set "
            "ACCELERATE_USE_CPU=1 so that Accelerate wraps the model.)"
        )
    return GradSync(model, world_size)
