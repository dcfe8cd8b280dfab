"""``DistributedDataParallel``: ``no_sync()`` inside the window; the end of data all-reduces by hand."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum.backends.base import Backend, Params, grads_of


class DDPBackend(Backend):
    """DDP (also what ``accelerator.prepare`` returns on several processes): one reduction, in the boundary
    backward; gradients stay in ``param.grad``."""

    name = "ddp"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.parallel.DistributedDataParallel)

    @classmethod
    def inner(cls, model: nn.Module) -> nn.Module | None:
        return model.module if isinstance(model.module, nn.Module) else None

    def __init__(self, model: nn.Module, world_size: int) -> None:
        super().__init__(model, world_size)
        self._graph_recorded = not getattr(model, "static_graph", False)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        if not self._graph_recorded:
            # DDP(static_graph=True) records its graph in the first backward, which fails under no_sync (torch issue
            # 143580). That one micro-step syncs instead, which stays exact: the boundary's average of an already
            # averaged, rank-constant gradient is itself. One extra reduction per run.
            self._graph_recorded = True
            return contextlib.nullcontext()
        return self.model.no_sync()  # type: ignore[operator]

    def reduce_pending(self, params: Params) -> None:
        """All-reduce gradients accumulated under ``no_sync`` by hand (a short window at the end of data, or every
        window under ``auto_micro_batch``), in buckets of DDP's ``bucket_cap_mb``: a flat copy of the whole
        gradient would double its memory at the boundary."""
        # A rank that ran no micro-step in the short window still joins the all-reduce, with zeros.
        for param in params:
            if param.grad is None and param.requires_grad:
                param.grad = torch.zeros_like(param)
        group = getattr(self.model, "process_group", None)
        for bucket in buckets(grads_of(params), int(getattr(self.model, "bucket_bytes_cap", 25 * 2**20))):
            flat = torch._utils._flatten_dense_tensors(bucket)
            torch_dist.all_reduce(flat, group=group)
            flat.div_(self.world_size)
            for grad, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(reduced)


def buckets(grads: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """``grads`` in order, cut into runs of one dtype and device of at most ``cap_bytes`` (a larger tensor alone)."""
    runs: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        last = runs[-1][-1] if runs else None
        if last is None or (last.dtype, last.device) != (grad.dtype, grad.device) or size + nbytes > cap_bytes:
            runs.append([])
            size = 0
        runs[-1].append(grad)
        size += nbytes
    return runs
