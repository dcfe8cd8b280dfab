"""FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``): sharded gradients in private buffers.

``grad_sync="boundary"`` (the default) skips the reduction inside the window and reduce-scatters in the boundary
backward: one reduction per step, but every rank holds a whole unsharded gradient until then, in private buffers,
so a window cut short by the end of data must end in a backward (``micro_step(last=True)``). ``"sharded"``
reduce-scatters in every backward and keeps only the shard's sum; on an HSDP mesh FSDP2 then all-reduces across
replicas at the boundary alone (``set_requires_all_reduce(False)`` inside the window: the replicas' all-reduce of
the window's summed shards). ``"every"`` reduces fully in every backward. Checkpoints are written by every rank
through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import collectives
from distaccum.backends.base import _NOTHING, Backend, GradSync, Params, grads_of


class _ShardedBackend(Backend):
    grads_in_params: ClassVar[bool] = False
    checkpoint_layout: ClassVar[Literal["replicated", "sharded"]] = "sharded"
    replicated: ClassVar[bool] = False

    def grad_sync_refusal(self, mode: GradSync) -> str | None:
        return None

    @property
    def syncs_in_window(self) -> bool:
        return self.grad_sync != "boundary"

    def _pending_in_buffers(self) -> bool:
        """Whether the window's gradients wait in private buffers for the boundary's backward (else: in .grad)."""
        return not self.syncs_in_window

    def reduce_pending(self, params: Params) -> None:
        if not self._pending_in_buffers():  # reduced in every backward: in the shards' .grad already
            return
        raise ValueError(
            f"{self.name}: the data ended mid-window, but under grad_sync={self.grad_sync!r} this wrapper keeps the "
            "window's gradients in private buffers that only a backward pass can reduce. Mark the final micro-batch "
            "instead: `with acc.micro_step(last=True):` makes it the boundary of a short window (or use "
            "grad_sync='every', which reduces in every backward)."
        )


class FSDP1Backend(_ShardedBackend):
    """``FullyShardedDataParallel``: ``no_sync()``; the norm is summed over the ranks' disjoint shards."""

    name = "fsdp1"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return isinstance(model, FullyShardedDataParallel)

    def grad_sync_refusal(self, mode: GradSync) -> str | None:
        from torch.distributed.fsdp import ShardingStrategy

        strategy: Any = self.model.sharding_strategy
        if mode != "sharded" or strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            return None  # without replicas, reduce-scattering every backward is all "sharded" asks
        if strategy == ShardingStrategy.NO_SHARD:
            what = "NO_SHARD keeps a whole gradient on every rank, so nothing is sharded"
        else:
            what = (
                f"{strategy.name} reduce-scatters and all-reduces across replicas in the same post-backward, and "
                "FSDP1 has no switch that skips the all-reduce alone (its no_sync skips both)"
            )
        return (
            f"{what}. Use 'boundary' (the default: one reduction per step) or 'every' (reduce every micro-step, "
            "gradients kept sharded), or FSDP2 (fully_shard on a (replicate, shard) mesh) for 'sharded'"
        )

    def window_sync(self) -> contextlib.AbstractContextManager[None]:
        # "every" / "sharded": FSDP1 reduces in each backward and adds the new shard to the one it holds.
        return self.model.no_sync() if self.grad_sync == "boundary" else _NOTHING  # type: ignore[operator]

    def float32_sums_refusal(self) -> tuple[str, str] | None:
        if self.syncs_in_window:
            return super().float32_sums_refusal()
        return (
            "FSDP1 keeps a window's unsynced gradients in its own flat buffers, in the parameters' dtype",
            "Use FSDP2 (fully_shard) with MixedPrecisionPolicy(reduce_dtype=torch.float32), which sums in float32",
        )

    def _grad_norm(self, params: Params) -> torch.Tensor:
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
    """``fully_shard``: inside the window ``set_requires_gradient_sync(False)`` (``"boundary"``) or
    ``set_requires_all_reduce(False)`` (``"sharded"``), each module's flags restored as found in ``finally``."""

    name = "fsdp2"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(model, FSDPModule)

    def __init__(self, model: nn.Module, world_size: int) -> None:
        super().__init__(model, world_size)
        self._modules: list[Any] | None = None  # the FSDP modules in the model, found at the first micro-step

    @contextlib.contextmanager
    def _window_flags(self, reduce_scatter: bool) -> Iterator[None]:
        # FSDP2 has setters but no getters: read what the setters write, per FSDP module, and put back exactly that
        # (a module the user set apart keeps its own flags), never a value derived from the mode.
        found = [(module, *self._flags(module)) for module in self._fsdp_modules()]
        for module, _, _ in found:
            if reduce_scatter:
                module.set_requires_all_reduce(False, recurse=False)
            else:
                module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module, reduce_grads, all_reduce_grads in found:
                module.set_requires_gradient_sync(reduce_grads, recurse=False)  # sets both flags
                module.set_requires_all_reduce(all_reduce_grads, recurse=False)

    def grad_sync_refusal(self, mode: GradSync) -> str | None:
        if mode == "sharded" and self._has_replicas() and not hasattr(self.model, "set_reduce_scatter_unused_params"):
            return (
                f"on an HSDP mesh it needs FSDPModule.set_reduce_scatter_unused_params, which torch "
                f"{torch.__version__} lacks (a unit without gradient at the boundary would lose its window's sum). "
                "Upgrade torch, or use 'boundary' (the default) or 'every'"
            )
        return None

    def window_sync(self) -> contextlib.AbstractContextManager[None]:
        if self.grad_sync == "every":
            return _NOTHING
        return self._window_flags(reduce_scatter=self.grad_sync == "sharded")

    def boundary_sync(self) -> contextlib.AbstractContextManager[None] | None:
        return self._all_reduce_partials() if self.grad_sync == "sharded" and self._has_replicas() else None

    @contextlib.contextmanager
    def _all_reduce_partials(self) -> Iterator[None]:
        # A unit that reduce-scattered in the window but gets no gradient in the boundary backward returns before
        # FSDP2's replica all-reduce: its partial sum would be lost, and added into the next window's (measured: 4e-2
        # off the real batch). Reduce-scattering zeros for it there carries the sum through the all-reduce. Only
        # units with a partial sum: a unit unused all window keeps grad None, as in the real batch.
        found = []
        for module in self._fsdp_modules():
            groups = module._get_fsdp_state()._fsdp_param_groups
            if any(group._partial_reduce_output is not None for group in groups):
                found.append((module, groups[0].reduce_scatter_unused_params))
        for module, _ in found:
            module.set_reduce_scatter_unused_params(True, recurse=False)
        try:
            yield
        finally:
            for module, unused in found:
                module.set_reduce_scatter_unused_params(unused, recurse=False)

    def _pending_in_buffers(self) -> bool:
        # "sharded" on an HSDP mesh: the window's reduce-scattered sum waits in FSDP2's buffer for the all-reduce.
        return self.grad_sync == "boundary" or (self.grad_sync == "sharded" and self._has_replicas())

    def _grad_norm(self, params: Params) -> torch.Tensor:
        # With tensor parallelism the gradients live on two meshes (a TP layer's on (dp, tp), the others' on dp), and
        # DTensor cannot stack norms across meshes: each mesh's norm is made whole on its own, then they add up.
        by_mesh: dict[Any, list[torch.Tensor]] = {}
        for grad in grads_of(params):
            by_mesh.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
        if len(by_mesh) <= 1:
            return super()._grad_norm(params)
        norms = [torch.nn.utils.get_total_norm(grads, norm_type=2.0) for grads in by_mesh.values()]
        whole = [norm.full_tensor() if hasattr(norm, "full_tensor") else norm for norm in norms]
        return torch.linalg.vector_norm(torch.stack([norm.to(whole[0].dtype) for norm in whole]))

    def float32_sums_refusal(self) -> tuple[str, str] | None:
        if self.syncs_in_window:
            return super().float32_sums_refusal()
        dtype = self.accumulation_dtype() or "None: the parameters' dtype"
        return (
            f"FSDP2 sums a window's unsharded gradients in its reduce_dtype ({dtype})",
            "Pass fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
            "reduce_dtype=torch.float32)), which sums in float32",
        )

    def accumulation_dtype(self) -> torch.dtype | None:
        # MixedPrecisionPolicy(reduce_dtype=...) keeps the unsharded gradients, summed over the window, in that dtype.
        policy = getattr(self.model._get_fsdp_state(), "_mp_policy", None)  # type: ignore[operator]
        return getattr(policy, "reduce_dtype", None)

    def _fsdp_modules(self) -> list[Any]:
        if self._modules is None:  # fixed once wrapped: found once, not at every micro-step
            from torch.distributed.fsdp import FSDPModule

            self._modules = [module for module in self.model.modules() if isinstance(module, FSDPModule)]
        return self._modules

    @staticmethod
    def _flags(module: Any) -> tuple[bool, bool]:
        groups = module._get_fsdp_state()._fsdp_param_groups  # set together by the public setters, per module
        if not groups:
            return True, True
        return groups[0].reduce_grads, groups[0].all_reduce_grads

    def _has_replicas(self) -> bool:
        groups = [g for m in self._fsdp_modules() for g in m._get_fsdp_state()._fsdp_param_groups]
        return any(getattr(g.mesh_info, "replicate_mesh_dim", None) is not None for g in groups)
