"""The benchmark's contenders: ways to run one optimizer step of ``accum_steps`` micro-batches.

(a) to (h) are the ways to accumulate; (i) and (j) are the hand-written loop and distaccum, both clipping the
global gradient norm to :data:`MAX_NORM`, so that both compute that norm (an equal-work pair); (k) is a second,
identical copy of the hand-written loop (b): its ratio to (b) is the benchmark's measured noise floor. Opt-in
(``--methods``): (l) to (p), distaccum over FSDP2 and HSDP in each ``grad_sync`` mode (:mod:`.methods_sharded`), and
(q) to (t), DeepSpeed ZeRO 2 and 3, through DeepSpeed's own accumulation and driven by distaccum; (u), the loop (b)
all-reducing its window loss as a loop that logs it does (distaccum's boundary makes that one collective too).

Each method builds its own copy of the model from the same seed, takes the same micro-batches and does one
optimizer step per :meth:`Method.step`. Communication is counted while it runs (:mod:`.counting`): gradient
reductions of DDP through a comm hook (one call per bucket), and every Python-level collective
(``torch.distributed.all_reduce`` and friends, which DeepSpeed's and distaccum's own reductions go through) by
wrapping those functions.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import dist
from examples.bench.harness.methods_base import LEARNING_RATE, MAX_NORM, Context, Method
from examples.bench.harness.methods_sharded import SHARDED_METHODS
from examples.bench.harness.models import Batch

__all__ = ["LEARNING_RATE", "MAX_NORM", "METHODS", "Context", "Method", "check_methods", "method_labels"]


class SyncEveryMicroBatch(Method):
    key, letter, title = "sync_every", "a", "DDP, all-reduce on every micro-batch"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.model = self._ddp(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)

    def step(self, batches: Any) -> None:
        for batch in batches:
            (self._loss(batch) / len(batches)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class HandWrittenNoSync(SyncEveryMicroBatch):
    key, letter, title = "no_sync", "b", "DDP, hand-written no_sync loop"

    def step(self, batches: Any) -> None:
        last = len(batches) - 1
        for index, batch in enumerate(batches):
            with self.model.no_sync() if index < last else contextlib.nullcontext():  # type: ignore[operator]
                (self._loss(batch) / len(batches)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class HandWrittenNoSyncTwin(HandWrittenNoSync):
    # The same code as (b) on its own model and optimizer: (k)/(b) can only differ by measurement noise.
    key, letter, title = "no_sync_twin", "k", "DDP, no_sync loop again (A/A twin of (b))"


class HandWrittenNoSyncClip(SyncEveryMicroBatch):
    key, letter, title = "no_sync_clip", "i", "DDP, hand-written no_sync loop, clipping"
    reference = "no_sync_clip"

    def step(self, batches: Any) -> None:
        last = len(batches) - 1
        for index, batch in enumerate(batches):
            with self.model.no_sync() if index < last else contextlib.nullcontext():  # type: ignore[operator]
                (self._loss(batch) / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class HandWrittenNoSyncLogged(SyncEveryMicroBatch):
    # (b) plus what a loop that logs its global window loss adds: one scalar all-reduce and one read per step, as
    # distaccum's boundary makes (window loss, items, checks). (c)/(u) is distaccum's cost beyond that collective.
    key, letter, title = "no_sync_logged", "u", "DDP, no_sync loop, all-reducing its window loss"
    opt_in = True

    def step(self, batches: Any) -> None:
        last = len(batches) - 1
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for index, batch in enumerate(batches):
            with self.model.no_sync() if index < last else contextlib.nullcontext():  # type: ignore[operator]
                loss = self._loss(batch) / len(batches)
                loss.backward()
            total += loss.detach()
        torch_dist.all_reduce(total)  # looked up now: the bench's counting wrapper sees it
        self.logged = float(total) / self.ctx.world_size
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class RealBatch(SyncEveryMicroBatch):
    key, letter, title = "real_batch", "f", "DDP, real batch micro x k in one pass"

    def prepare(self, batches: list[Batch]) -> Any:
        inputs, targets = zip(*batches, strict=True)
        return torch.cat(inputs).to(self.ctx.device), torch.cat(targets).to(self.ctx.device)

    def step(self, batches: Any) -> None:
        self._loss(batches).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Distaccum(Method):
    key, letter, title = "distaccum", "c", "distaccum Accumulator over DDP"
    with_items: ClassVar[bool] = False
    max_grad_norm: ClassVar[float | None] = None
    mark_micro_steps: ClassVar[bool] = False
    """Count the reductions of each micro-step apart (``CommCounter.by_micro_step``; DeepSpeed's)."""

    def __init__(self, ctx: Context) -> None:
        from distaccum import Accumulator, BatchPlan

        super().__init__(ctx)
        # No counting hook: distaccum registers its own (the average with the non-finite check folded in), as it
        # would on a user's model; its bucket all-reduces are Python-level calls, counted while it steps.
        self.model = self._ddp(self.model, counting_hook=False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        plan = BatchPlan(micro_batch_size=ctx.micro_batch_size, accum_steps=ctx.accum_steps)
        self.acc = Accumulator(self.model, self.optimizer, plan, max_grad_norm=self.max_grad_norm)

    def step(self, batches: Any) -> None:
        acc = self.acc
        self.ctx.python_gradient_reductions = True
        try:
            for batch in batches:
                with acc.micro_step():
                    if self.with_items:
                        acc.backward(self._loss(batch), num_items=self.ctx.spec.num_items(batch[1]))
                    else:
                        acc.backward(self._loss(batch))
                if self.mark_micro_steps:
                    self.ctx.counter.end_micro_step()
        finally:
            self.ctx.python_gradient_reductions = False
        assert acc.stepped, "the window did not end with the round"


class DistaccumItems(Distaccum):
    key, letter, title = "distaccum_items", "g", "distaccum with num_items (exact weighting)"
    with_items = True


class DistaccumClip(Distaccum):
    key, letter, title = "distaccum_clip", "j", "distaccum, clipping (max_grad_norm)"
    reference = "no_sync_clip"
    max_grad_norm = MAX_NORM


class AccelerateAccumulate(Method):
    key, letter, title = "accelerate", "d", "Accelerate accumulate()"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        if ctx.accelerator is None:
            from accelerate import Accelerator

            ctx.accelerator = Accelerator(cpu=ctx.device.type == "cpu")
        accelerator = ctx.accelerator
        accelerator.gradient_accumulation_steps = ctx.accum_steps
        accelerator.step = 0
        optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        if ctx.world_size > 1 and not isinstance(self.model, nn.parallel.DistributedDataParallel):
            raise RuntimeError(
                f"Accelerate did not wrap the model (distributed_type {accelerator.distributed_type}) on "
                f"{ctx.world_size} ranks: its gradients would never be averaged. On CPU set ACCELERATE_USE_CPU=1."
            )
        if ctx.world_size > 1:
            self._hook(self.model)

    def step(self, batches: Any) -> None:
        accelerator = self.ctx.accelerator
        for batch in batches:
            with accelerator.accumulate(self.model):
                accelerator.backward(self._loss(batch))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        assert accelerator.sync_gradients, "Accelerate's window did not end with the round"

    def close(self) -> None:
        self.ctx.accelerator.free_memory()
        super().close()


def _zero_config(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # else the bench's small parameters stay whole on every rank
    # DeepSpeed 0.19 clips at 1.0 unless told otherwise; only (i) and (j) clip (at MAX_NORM).
    return {
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class _ZeroParameters(Method):
    stage: ClassVar[int] = 0

    def parameters(self) -> list[torch.Tensor]:
        if self.stage < 3:
            return super().parameters()
        import deepspeed

        # ZeRO 3 holds a partition per rank: every rank gathers the whole weights (a collective) to compare them.
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.model.destroy()  # type: ignore[operator]
        super().close()


class DeepSpeedZero0(_ZeroParameters):
    key, letter, title = "deepspeed", "e", "DeepSpeed ZeRO 0 gradient accumulation"

    def __init__(self, ctx: Context) -> None:
        import deepspeed

        super().__init__(ctx)
        deepspeed.init_distributed(dist_backend=dist.default_backend())
        config = {
            "train_micro_batch_size_per_gpu": ctx.micro_batch_size,
            "gradient_accumulation_steps": ctx.accum_steps,
            "train_batch_size": ctx.micro_batch_size * ctx.accum_steps * ctx.world_size,
            **_zero_config(self.stage),
        }
        optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.model, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)

    def step(self, batches: Any) -> None:
        engine, counter = self.model, self.ctx.counter
        self.ctx.python_gradient_reductions = True
        try:
            for batch in batches:
                engine.backward(self._loss(batch))  # type: ignore[operator]
                engine.step()  # type: ignore[operator]
                counter.end_micro_step()
        finally:
            self.ctx.python_gradient_reductions = False


class DeepSpeedZero2(DeepSpeedZero0):
    key, letter, title = "deepspeed_zero2", "q", "DeepSpeed ZeRO 2 gradient accumulation"
    stage, opt_in = 2, True


class DeepSpeedZero3(DeepSpeedZero0):
    key, letter, title = "deepspeed_zero3", "s", "DeepSpeed ZeRO 3 gradient accumulation"
    stage, opt_in = 3, True


class DistaccumDeepSpeed(_ZeroParameters, Distaccum):
    key, letter, title = "distaccum_deepspeed", "h", "distaccum over DeepSpeed ZeRO 0"
    mark_micro_steps = True

    def __init__(self, ctx: Context) -> None:
        from distaccum import Accumulator, BatchPlan
        from distaccum.integrations.deepspeed import initialize

        Method.__init__(self, ctx)
        plan = BatchPlan(micro_batch_size=ctx.micro_batch_size, accum_steps=ctx.accum_steps)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.model = initialize(self.model, optimizer, plan, _zero_config(self.stage))
        self.acc = Accumulator(self.model, self.model.optimizer, plan)  # type: ignore[arg-type]

    def step(self, batches: Any) -> None:
        self.ctx.python_gradient_reductions = True
        try:
            super().step(batches)
        finally:
            self.ctx.python_gradient_reductions = False


class DistaccumZero2(DistaccumDeepSpeed):
    key, letter, title = "distaccum_zero2", "r", "distaccum over DeepSpeed ZeRO 2"
    stage, opt_in = 2, True


class DistaccumZero3(DistaccumDeepSpeed):
    key, letter, title = "distaccum_zero3", "t", "distaccum over DeepSpeed ZeRO 3"
    stage, opt_in = 3, True


_ORDER: tuple[type[Method], ...] = (
    SyncEveryMicroBatch,
    HandWrittenNoSync,
    HandWrittenNoSyncTwin,
    Distaccum,
    DistaccumItems,
    HandWrittenNoSyncClip,
    DistaccumClip,
    AccelerateAccumulate,
    DeepSpeedZero0,
    DistaccumDeepSpeed,
    RealBatch,
    HandWrittenNoSyncLogged,
    *SHARDED_METHODS,
    DeepSpeedZero2,
    DistaccumZero2,
    DeepSpeedZero3,
    DistaccumZero3,
)
METHODS: dict[str, type[Method]] = {method.key: method for method in _ORDER}
"""All methods: the issue's (a) to (g), (h) distaccum driving a DeepSpeed engine, the clipping pair (i) and (j),
(k) the A/A twin of (b); opt-in: (l) to (p) FSDP2 and HSDP per ``grad_sync`` mode, (q) to (t) ZeRO 2 and 3, (u) the
loop (b) all-reducing its window loss."""


def method_labels() -> dict[str, str]:
    """``key -> "(letter) title"`` for tables."""
    return {key: f"({cls.letter}) {cls.title}" for key, cls in METHODS.items()}


def check_methods(names: list[str]) -> list[str]:
    """Validate method names.

    Raises:
        ValueError: an unknown name.
    """
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return names
