"""Sharded contenders, opt-in (``--methods``): distaccum over FSDP2 and HSDP in each ``grad_sync`` mode.

(l) to (n) shard the model with ``fully_shard`` over a 1-D mesh of every rank, one FSDP unit per block (the MLP's
``Linear`` layers, the transformer's encoder layers) plus the root, and drive it with
``Accumulator(grad_sync="boundary" | "sharded" | "every")`` (:mod:`distaccum.backends.sync`); (o) and (p) do the
same on an HSDP mesh of 2 replicas x 2 shards (4 ranks only). Each counts its reductions per micro-step
(``CommCounter.by_micro_step``) and reads its weights gathered (``DTensor.full_tensor()``) for the sanity check.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from examples.bench.harness.methods_base import LEARNING_RATE, Context, Method

HSDP_MESH = (2, 2)
"""(replicate, shard) of the HSDP methods: they run on exactly 4 ranks."""


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own ``fully_shard`` before the root's: the MLP's Linears, the encoder layers."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.TransformerEncoderLayer)
        or (isinstance(module, nn.Linear) and isinstance(model, nn.Sequential))
    ]


class Fsdp2Boundary(Method):
    key, letter, title = "fsdp2_boundary", "l", "distaccum over FSDP2, grad_sync boundary"
    grad_sync: ClassVar[str] = "boundary"
    mesh_shape: ClassVar[tuple[int, ...] | None] = None
    """None: a 1-D mesh of every rank; else (replicate, shard)."""
    opt_in = True

    def __init__(self, ctx: Context) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from distaccum import Accumulator, BatchPlan

        super().__init__(ctx)
        shape = self.mesh_shape or (ctx.world_size,)
        names = ("replicate", "shard") if len(shape) == 2 else None
        mesh = init_device_mesh(ctx.device.type, shape, mesh_dim_names=names)
        for block in _blocks(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        plan = BatchPlan(micro_batch_size=ctx.micro_batch_size, accum_steps=ctx.accum_steps)
        self.acc = Accumulator(self.model, self.optimizer, plan, grad_sync=self.grad_sync)  # type: ignore[arg-type]

    def step(self, batches: Any) -> None:
        acc, counter = self.acc, self.ctx.counter
        # FSDP2 calls its reduce-scatters (and HSDP's replica all-reduces) from Python: counted while this runs.
        self.ctx.python_gradient_reductions = True
        try:
            for batch in batches:
                with acc.micro_step():
                    acc.backward(self._loss(batch))
                counter.end_micro_step()
        finally:
            self.ctx.python_gradient_reductions = False
        assert acc.stepped, "the window did not end with the round"

    def parameters(self) -> list[torch.Tensor]:
        # Each rank holds a shard: full_tensor() all-gathers it (every rank calls it, in the same order).
        return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in self.model.parameters()]


class Fsdp2Sharded(Fsdp2Boundary):
    key, letter, title = "fsdp2_sharded", "m", "distaccum over FSDP2, grad_sync sharded"
    grad_sync = "sharded"


class Fsdp2Every(Fsdp2Boundary):
    key, letter, title = "fsdp2_every", "n", "distaccum over FSDP2, grad_sync every"
    grad_sync = "every"


class HsdpBoundary(Fsdp2Boundary):
    key, letter, title = "hsdp_boundary", "o", "distaccum over HSDP 2x2, grad_sync boundary"
    mesh_shape, nproc = HSDP_MESH, HSDP_MESH[0] * HSDP_MESH[1]


class HsdpSharded(HsdpBoundary):
    key, letter, title = "hsdp_sharded", "p", "distaccum over HSDP 2x2, grad_sync sharded"
    grad_sync = "sharded"


SHARDED_METHODS: tuple[type[Method], ...] = (Fsdp2Boundary, Fsdp2Sharded, Fsdp2Every, HsdpBoundary, HsdpSharded)
"""(l) to (p), in the order of the registry (:data:`examples.bench.harness.methods.METHODS`)."""
