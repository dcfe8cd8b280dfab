"""What every benchmark method shares: the :class:`Context` of a worker and the :class:`Method` interface.

Split from :mod:`.methods` so that the sharded methods (:mod:`.methods_sharded`) build on the same base without an
import circle; :mod:`.methods` holds the registry of all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from examples.bench.harness.counting import CommCounter, counting_allreduce_hook
from examples.bench.harness.models import Batch, ModelSpec

LEARNING_RATE = 1e-3
MAX_NORM = 0.005
"""Clipping threshold of (i) and (j). The full MLP's reduced gradient norm (micro 8, 2 ranks, unclipped) is
0.0048-0.0051 over the first 11 steps at k=8, so (i) and (j) clip on about half of them (6 of 11); they clip on
every step at k=1 (0.013-0.014), on the tiny MLP (~0.1) and on both transformers (0.57-0.96), and on none at
k=64 (0.0021-0.0022). Either way both do the same work: ``clip_grad_norm_`` computes the norm and multiplies by
the clamped factor whether it clips or not."""


@dataclass
class Context:
    """What all methods of one worker share: device, world, counters, and one Accelerator per process."""

    spec: ModelSpec
    micro_batch_size: int
    accum_steps: int
    seed: int
    device: torch.device
    world_size: int
    counter: CommCounter
    raw_all_reduce: Callable[..., Any]
    accelerator: Any = None
    python_gradient_reductions: bool = False
    """True while a DeepSpeed engine or FSDP2 steps: their gradient reductions are Python-level calls."""


class Method:
    """One way to accumulate; subclasses build the model in ``__init__`` and implement :meth:`step`."""

    key: ClassVar[str]
    """Name used on the command line and in JSON."""
    letter: ClassVar[str]
    """The letter of the issue's list, (a) to (g), then (h) to (k)."""
    title: ClassVar[str]
    reference: ClassVar[str] = "no_sync"
    """The method whose update this one must equal (the sanity check): (b), or (i) for the clipping ones."""
    opt_in: ClassVar[bool] = False
    """Not in the default set (``--methods`` names it): the sharded wrappers of :mod:`.methods_sharded`, ZeRO 2/3."""
    nproc: ClassVar[int | None] = None
    """The only rank count this method runs on (HSDP's 2 x 2 mesh: 4); None: any."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.model = self._fresh_model()

    def _fresh_model(self) -> nn.Module:
        torch.manual_seed(self.ctx.seed)
        return self.ctx.spec.build().to(self.ctx.device)

    def _ddp(self, model: nn.Module, *, counting_hook: bool = True) -> nn.Module:
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if counting_hook:
            self._hook(wrapped)
        return wrapped

    def _hook(self, wrapped: nn.Module) -> None:
        ctx = self.ctx
        wrapped.register_comm_hook(None, counting_allreduce_hook(ctx.counter, ctx.raw_all_reduce, ctx.world_size))  # type: ignore[operator]

    def _loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.ctx.spec.loss(self.model(inputs), targets)

    def prepare(self, batches: list[Batch]) -> Any:
        """Put this round's micro-batches on the device (outside the timed region)."""
        return [(x.to(self.ctx.device), y.to(self.ctx.device)) for x, y in batches]

    def step(self, batches: Any) -> None:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters()]

    def close(self) -> None:
        """Release references (models, optimizers) so that the next case starts from a clean slate."""
        self.__dict__.clear()
