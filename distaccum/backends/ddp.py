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
        # A rank that ran no micro-step in the short window still joins the all-reduce, with zeros.
        for param in params:
            if param.grad is None and param.requires_grad:
                param.grad = torch.zeros_like(param)
        grads = grads_of(params)
        flat = torch._utils._flatten_dense_tensors(grads)
        torch_dist.all_reduce(flat)
        flat.div_(self.world_size)
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)
