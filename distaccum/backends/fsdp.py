"""FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``): sharded gradients in private buffers.

Both skip the reduction inside the window and reduce-scatter in the boundary backward. Their unsynced
gradients are not in ``param.grad``, so a window cut short by the end of data must end in a backward
(``micro_step(last=True)``), and checkpoints are written by every rank through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import collectives
from distaccum.backends.base import Backend, Params, grads_of


class _ShardedBackend(Backend):
    grads_in_params: ClassVar[bool] = False
    checkpoint_layout: ClassVar[Literal["replicated", "sharded"]] = "sharded"
    replicated: ClassVar[bool] = False

    def reduce_pending(self, params: Params) -> None:
        raise ValueError(
            f"{self.name}: the data ended mid-window, but this wrapper keeps gradients accumulated without sync in "
            "private buffers that only a backward pass can reduce. Mark the final micro-batch instead: "
            "`with acc.micro_step(last=True):` makes it the boundary of a short window."
        )


class FSDP1Backend(_ShardedBackend):
    """``FullyShardedDataParallel``: ``no_sync()``; the norm is summed over the ranks' disjoint shards."""

    name = "fsdp1"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return isinstance(model, FullyShardedDataParallel)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.model.no_sync()  # type: ignore[operator]

    def grad_norm(self, params: Params) -> torch.Tensor:
        # FSDP1's own clip_grad_norm_ forces float32 norms and fails on float64 parameters; the sharded norm is
        # simple enough: every rank holds a disjoint shard, so squared norms add up over ranks.
        from torch.distributed.fsdp import ShardingStrategy

        grads = grads_of(params)
        if grads:
            local = torch.nn.utils.get_total_norm(grads)
        else:  # this rank's shard holds no gradient; it still joins the all-reduce, on the right device
            local = torch.zeros((), device=next(self.model.parameters()).device)
        # On the communication device: a CPU-offloaded shard's norm cannot go through NCCL from the CPU.
        squared = local.to(collectives.comm_device(), torch.float64).square().reshape(1)
        if self.model.sharding_strategy != ShardingStrategy.NO_SHARD:
            # Over one replica's shard group: with HYBRID_SHARD the shards repeat across replicas, and summing
            # over the whole world would count each of them once per replica (norm too large by sqrt(replicas)).
            torch_dist.all_reduce(squared, group=self.model.process_group)
        return squared.sqrt()[0]


class FSDP2Backend(_ShardedBackend):
    """``fully_shard``: ``set_requires_gradient_sync(False)`` inside the window, restored in ``finally``."""

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

    def accumulation_dtype(self) -> torch.dtype | None:
        # MixedPrecisionPolicy(reduce_dtype=...) keeps the unsharded gradients, summed over the window, in that dtype.
        policy = getattr(self.model._get_fsdp_state(), "_mp_policy", None)  # type: ignore[operator]
        return getattr(policy, "reduce_dtype", None)

    def _requires_sync(self) -> bool:
        # FSDP2 has a setter but no getter; read the flag the setter writes so that we restore what we found.
        state = self.model._get_fsdp_state()  # type: ignore[operator]
        groups = getattr(state, "_fsdp_param_groups", None) or []
        return all(group.reduce_grads for group in groups) if groups else True
