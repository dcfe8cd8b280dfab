"""A ``DeepSpeedEngine`` as an accumulator backend: its boundary API inside the window, its own step at the boundary.

``import distaccum`` never imports DeepSpeed: this backend is considered by :func:`distaccum.backends.select`
only when the user has imported ``deepspeed`` already. Build the engine with
:func:`distaccum.integrations.deepspeed.initialize`, which checks its config against the plan.

How the Accumulator drives the engine (ZeRO stages 0 to 3; fp32, or fp16/bf16 at ZeRO 1 to 3, tested in fp32):

* **Window.** Before every backward the accumulator says whether this micro-step ends the window with
  ``engine.set_gradient_accumulation_boundary(...)``; DeepSpeed's own micro-step counter is never consulted, so
  short windows (``flush`` / ``last=True``) work. ZeRO 0 and 1 then reduce once, in the boundary backward;
  ZeRO 2 and 3 reduce every micro-batch into their partition buffers by design (that is what partitions their
  gradients; on CPU/gloo ZeRO 2 does it with an all-reduce of its bucket, ZeRO 3 with a reduce-scatter, counted by
  the benchmark harness, ``python -m examples.bench.harness``), so they pay one reduction per micro-batch.
  ``engine.no_sync()`` is not used: it refuses ZeRO 2 and 3.
* **ZeRO 3** all-gathers the parameters in every forward, so every rank must run the same number of micro-steps:
  :meth:`~distaccum.Accumulator.iterate` cuts the window where the first rank runs out to what every rank has; a
  hand-written loop must end its windows together (``last=True`` on every rank), as ZeRO 2 already requires.
* **One loss scaling.** The accumulator multiplies each micro-batch loss by ``1/accum_steps`` (or by its item
  weight), so the engine is called as ``engine.backward(loss, scale_wrt_gas=False)``: DeepSpeed's own division
  by ``gradient_accumulation_steps`` is off, and only its fp16 loss scale (if any) is applied on top (a loss
  divided twice would make every step ``accum_steps`` times too small: the tests pin the norm to the real batch).
* **Boundary correction** (short windows, and ``num_items`` exact weighting: the engine computes one factor
  ``f`` after the boundary backward, see :mod:`distaccum.weighting`). Where the reduced gradient lives decides
  how ``f`` is applied:

  - ZeRO 0 with a torch optimizer: the averaged gradients are in ``param.grad``; they are multiplied in place
    (in the pass that checks them for NaN/inf, unless a norm is computed) before ``engine.step()``.
  - ZeRO 1, 2 and 3: the reduced gradients live in the ZeRO optimizer's private partition buffers (flat, padded,
    and laid out differently with CPU offload or an fp32 accumulation buffer). Rather than reach into them,
    the factor goes through DeepSpeed's own unscale path: for the duration of ``engine.step()`` the optimizer's
    loss scale ``S`` is set to ``S / f``. ZeRO's step divides the gradients by the loss scale before clipping
    and reports ``norm / loss_scale`` as the gradient norm, so the gradients are multiplied by exactly ``f``,
    the clip threshold applies to the corrected norm, and the reported norm is the corrected one. Afterwards
    the loss scaler's whole state is restored and its update is replayed with the step's overflow result, so a
    dynamic fp16 scaler evolves exactly as without the correction.
  - What cannot be weighted exactly (ZeRO 0 with DeepSpeed's fp16/bf16 optimizer wrappers, bf16 with fp32
    gradient accumulation at ZeRO 1, pipeline engines) is refused when the backend is built
    (:func:`unsupported`), and by ``initialize()`` before the engine is.
* **Clipping.** DeepSpeed 0.19 clips at 1.0 when the config does not say otherwise. ``initialize()`` writes
  ``gradient_clipping: 0.0`` when the field is missing; the config is where DeepSpeed clips, and the
  accumulator's ``max_grad_norm`` must agree with it (None for 0.0), checked when the accumulator is built.
* **NaN/inf.** At ZeRO 0 the step's decision is :meth:`~distaccum.backends.base.Backend.decide_nonfinite`'s, as on
  every other wrapper; at ZeRO 1 to 3 the engine checks its own partitions inside ``engine.step()`` and skips by
  itself (the same on every rank), and its verdict is read back (``was_step_applied``). Either way
  ``on_nonfinite="raise"`` raises on every rank; an fp16 engine's overflow is skipped and backs off its loss scale,
  as with a GradScaler.
* **End of data mid-window** (``acc.flush()``): at ZeRO 0 to 2 every rank runs one boundary backward of a zero
  loss that touches every parameter, which sends the accumulated gradients through DeepSpeed's normal boundary
  reduction unchanged. ZeRO 3 reduce-scattered every backward already: its optimizer only finalizes the boundary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from distaccum.backends.base import Backend, Params, StepOptions, StepWindow, grads_of, nonfinite_error


def unsupported(*, stage: int, fp16: bool, bf16: bool, fp32_grad_accum: bool, offload: bool) -> str | None:
    """Why an engine with these settings cannot be driven exactly (None: it can); shared by the backend, which
    sees a built engine, and ``initialize()``, which refuses the config before building one."""
    if stage not in (0, 1, 2, 3):
        return (
            f"DeepSpeed zero_optimization.stage is {stage}, which is not a ZeRO stage; distaccum supports and tests "
            'stages 0 to 3. Set "zero_optimization": {"stage": 3} or lower.'
        )
    if stage == 0 and (fp16 or bf16):
        return (
            f"DeepSpeed ZeRO stage 0 with {'fp16' if fp16 else 'bf16'} wraps the optimizer in DeepSpeed's mixed-"
            "precision optimizer: its gradients cannot be weighted exactly (short windows, num_items) and an fp16 "
            "overflow would be dropped without its loss scaler backing off. Use ZeRO stage 1 or 2 for mixed "
            "precision, or fp32 at stage 0."
        )
    if stage == 1 and bf16 and fp32_grad_accum and not offload:
        return (
            "DeepSpeed bf16 at ZeRO stage 1 with data_types.grad_accum_dtype fp32 selects BF16_Optimizer, which has "
            "no loss scaler to apply distaccum's exact boundary correction through. Leave grad_accum_dtype unset "
            "(or bf16), or use ZeRO stage 2."
        )
    return None


class DeepSpeedBackend(Backend):
    """A ``DeepSpeedEngine``: its boundary API inside the window, ``engine.backward``/``engine.step`` to finish it.

    The engine owns the optimizer step (it overrides :meth:`step`): it clips (``gradient_clipping`` of its config),
    unscales fp16 gradients and steps its optimizer and its LR scheduler.

    Raises:
        ValueError: a pipeline engine, ``managed_gradient_accumulation: false``, or a data-parallel
            size different from the world size (tensor/pipeline parallelism).
    """

    name = "deepspeed"
    grads_in_params: ClassVar[bool] = False
    checkpoint_layout: ClassVar[Literal["replicated", "sharded", "engine"]] = "engine"
    engine_steps: ClassVar[bool] = True  # step() checks NaN/inf (ZeRO 0), or the engine does (1 to 3)

    def __init__(self, model: nn.Module, world_size: int) -> None:
        super().__init__(model, world_size)
        self.engine: Any = model
        engine: Any = model
        self._in_no_sync = False
        self._check_engine()
        self.stage = int(engine.zero_optimization_stage())  # the engine's ZeRO stage

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from deepspeed import DeepSpeedEngine

        return isinstance(model, DeepSpeedEngine)

    @classmethod
    def inner(cls, model: nn.Module) -> nn.Module | None:
        return model.module if isinstance(model.module, nn.Module) else None

    def check_options(self, options: StepOptions) -> None:
        if options.grad_scaler is not None:
            raise ValueError(
                "grad_scaler is set, but deepspeed scales fp16 losses by itself: scaling twice corrupts gradients. "
                "Remove grad_scaler and configure fp16 in the engine's config."
            )
        self.check_clipping(options.max_grad_norm)

    def float32_sums_refusal(self) -> tuple[str, str] | None:
        return (
            "DeepSpeed keeps a window's gradients in its own buffers",
            'Set "data_types": {"grad_accum_dtype": "fp32"} in the DeepSpeed config (ZeRO stage 2)',
        )

    def _check_engine(self) -> None:
        from deepspeed import PipelineEngine

        engine = self.engine
        if isinstance(engine, PipelineEngine):
            raise ValueError(
                "model is a DeepSpeed PipelineEngine, which runs its own micro-batch schedule in "
                "engine.train_batch(); distaccum cannot drive it. Use a data-parallel engine (no PipelineModule)."
            )
        refusal = unsupported(
            stage=int(engine.zero_optimization_stage()),
            fp16=bool(engine.fp16_enabled()),
            bf16=bool(engine.bfloat16_enabled()),
            fp32_grad_accum=engine.get_data_types()[1] == torch.float32,
            offload=bool(engine.zero_cpu_offload()),
        )
        if refusal is not None:
            raise ValueError(refusal)
        managed = getattr(engine, "managed_gradient_accumulation", None)
        if managed is not None and not managed():
            raise ValueError(
                "DeepSpeed config has managed_gradient_accumulation: false, which disables "
                "set_gradient_accumulation_boundary(); distaccum drives the boundary itself. Remove the field."
            )
        if engine.dp_world_size != self.world_size:
            raise ValueError(
                f"DeepSpeed data-parallel size {engine.dp_world_size} differs from world_size {self.world_size} "
                "(tensor, pipeline or sequence parallelism); distaccum's BatchPlan counts every rank as a data-"
                "parallel rank. Run DeepSpeed with data parallelism only."
            )

    @property
    def averaging_ranks(self) -> int:
        return int(self.engine.dp_world_size)

    @contextlib.contextmanager
    def _marked_window(self) -> Iterator[None]:
        previous = self._in_no_sync
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = previous

    def window_sync(self) -> contextlib.AbstractContextManager[None]:
        # Only marks the window: backward() tells the engine, with set_gradient_accumulation_boundary().
        return self._marked_window()

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        """``engine.backward`` of the window-weighted loss: DeepSpeed must not divide it again (nor be seeded)."""
        self.engine.set_gradient_accumulation_boundary(not self._in_no_sync)
        self.engine.backward(loss * weight if weight != 1.0 else loss, scale_wrt_gas=False)

    def _check_scalable(self, factor: float) -> None:
        # fp16/bf16 at stage 0 is refused at construction (unsupported()); another wrapper would land here.
        if factor != 1.0 and not isinstance(self.engine.optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"this window needs its gradient multiplied by {factor:g} (a short window or num_items "
                f"weighting), but DeepSpeed ZeRO stage 0 keeps it inside {type(self.engine.optimizer).__name__}, "
                "which distaccum cannot scale exactly. Use ZeRO stage 1 or 2 with fp16/bf16, or fp32 at stage 0."
            )

    def reduce_pending(self, params: Params) -> None:
        """Reduce what the ranks accumulated when the data ended mid-window: one boundary backward of zero (ZeRO 3:
        already reduced, the boundary is only finalized)."""
        engine = self.engine
        if self.stage == 3:
            self._finalize_partitions()
            return
        # engine.forward() does this before every backward; this backward has no forward of its own.
        clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        # Touching every parameter makes every gradient hook fire (ZeRO 2 reduce-scatters from them); the zero
        # product leaves the accumulated gradients unchanged.
        zero = torch.stack([p.sum() for p in trainable]).sum() * 0.0
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(zero, scale_wrt_gas=False)

    def _finalize_partitions(self) -> None:
        # Every ZeRO 3 backward reduce-scattered into the partitions already; only the copy into the offloaded fp32
        # gradients (optimizer offload) waits for a boundary backward, and this finalize does it instead.
        engine = self.engine
        finalize = getattr(engine.optimizer, "finalize_gradient_accumulation_boundary", None)
        if finalize is not None:
            finalize()
        elif engine.zero_cpu_offload():
            raise ValueError(
                "acc.flush() after a window that did not end on a boundary micro-step: this DeepSpeed's ZeRO 3 "
                "optimizer offload copies the gradients only in a boundary backward, and it has no "
                "finalize_gradient_accumulation_boundary() to do it afterwards. End the last window with "
                "acc.micro_step(last=True) or acc.iterate(loader), or upgrade deepspeed (0.19.8 has it)."
            )
        engine.set_gradient_accumulation_boundary(True)

    def check_clipping(self, max_grad_norm: float | None) -> None:
        """The accumulator's ``max_grad_norm`` must be the config's ``gradient_clipping`` (None for 0.0).

        Raises:
            ValueError: they differ; the message gives both values and both ways to fix it.
        """
        configured = float(self.engine.gradient_clipping())
        wanted = 0.0 if max_grad_norm is None else float(max_grad_norm)
        if not math.isclose(configured, wanted, rel_tol=1e-12, abs_tol=0.0):
            as_arg = "None" if configured == 0.0 else f"{configured:g}"
            raise ValueError(
                f"Accumulator(max_grad_norm={max_grad_norm}) disagrees with the DeepSpeed config's gradient_clipping "
                f"{configured:g}: DeepSpeed clips inside engine.step(), so the config decides. Pass "
                f'max_grad_norm={as_arg} to the Accumulator, or set "gradient_clipping": {wanted:g} in the config '
                "(0.0 = no clipping; DeepSpeed's silent default is 1.0)."
            )

    def step(
        self, optimizer: torch.optim.Optimizer, params: Params, options: StepOptions, window: StepWindow
    ) -> tuple[float | None, bool]:
        """``engine.step()`` at the boundary with the window's factor; returns (grad norm, skipped).

        The engine clips (its config's ``gradient_clipping``), unscales fp16 gradients and steps its optimizer
        and LR scheduler; ``optimizer`` and ``params`` are the engine's own.

        Raises:
            FloatingPointError: the gradient is not finite, ``options.on_nonfinite`` is ``"raise"``, and the
                engine does not scale an fp16 loss (whose overflows are skipped, as with a GradScaler).
        """
        self.engine.set_gradient_accumulation_boundary(True)
        if window.skip:
            self._drop_gradients()
            return None, True
        if self.stage == 0:
            return self._step_torch_optimizer(optimizer, options, window)
        # ZeRO 1 to 3: the engine checks its own partitions for NaN/inf (an overflow) and skips by itself.
        with self._loss_scale_divided_by(window.factor):
            self.engine.step()
        reported = self.engine.get_global_grad_norm()
        norm = None if reported is None else float(reported)
        skipped = not self.engine.was_step_applied()
        if skipped:
            self._nonfinite_policy(options, window, norm)
        return norm, skipped

    def _step_torch_optimizer(
        self, optimizer: torch.optim.Optimizer, options: StepOptions, window: StepWindow
    ) -> tuple[float | None, bool]:
        """ZeRO 0: the averaged gradients are in ``param.grad`` and a torch optimizer steps NaN/inf into the weights,
        so the step's decision is :meth:`~Backend.decide_nonfinite`'s, as on every other wrapper; the engine clips, so
        the decision applies no clip of its own."""
        params = list(self.engine.module.parameters())
        self._check_scalable(window.factor)
        unclipped = dataclasses.replace(options, max_grad_norm=None)
        verdict = self.decide_nonfinite(optimizer, params, unclipped, window)
        if verdict.found:
            self._drop_gradients()
            self._nonfinite_policy(options, window, verdict.norm)
            return verdict.norm, True
        grads = grads_of(params)
        if verdict.multiplier != 1.0 and grads:
            torch._foreach_mul_(grads, verdict.multiplier)
        self.engine.step()
        return verdict.norm, not self.engine.was_step_applied()

    def _nonfinite_policy(self, options: StepOptions, window: StepWindow, norm: float | None) -> None:
        """A step not taken for a NaN/inf gradient: an fp16 overflow (the engine backs off its loss scale), or else
        ``on_nonfinite`` decides."""
        if options.on_nonfinite == "raise" and not self.engine.fp16_enabled():
            raise nonfinite_error(norm, window.number)

    def discard_grads(self, optimizer: torch.optim.Optimizer) -> None:
        self._drop_gradients()

    def _drop_gradients(self) -> None:
        optimizer = self.engine.optimizer
        if self.stage == 0:
            self.engine.zero_grad()
            return
        # What ZeRO 1/2's own step does on overflow: drop the param grads and the reduced partitions. ZeRO 3's
        # zero_grad also rewinds its micro-step counter, so the next backward overwrites its partitions.
        optimizer.zero_grad(set_to_none=True)
        release = getattr(optimizer, "_release_preflattened_grad_buffers", None)
        if release is not None:
            release()
        for buffers in (getattr(optimizer, "averaged_gradients", None), getattr(optimizer, "all_grad_tensors", None)):
            if isinstance(buffers, dict):
                for key in buffers:
                    buffers[key] = None

    @contextlib.contextmanager
    def _loss_scale_divided_by(self, factor: float) -> Iterator[None]:
        if factor == 1.0:
            yield
            return
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"gradient correction factor must be positive and finite, got {factor!r}")
        optimizer = self.engine.optimizer
        if getattr(optimizer, "custom_loss_scaler", False):
            saved_scale = optimizer.external_loss_scale
            optimizer.external_loss_scale = saved_scale / factor
            try:
                yield
            finally:
                optimizer.external_loss_scale = saved_scale
            return
        scaler = getattr(optimizer, "loss_scaler", None)
        if scaler is None:
            raise ValueError(
                f"this window needs its gradient multiplied by {factor:g}, but {type(optimizer).__name__} has no "
                "loss scaler to apply it through; use ZeRO stage 1 or 2, or fp32 at stage 0."
            )
        saved_state = copy.copy(vars(scaler))
        scaler.cur_scale = saved_state["cur_scale"] / factor
        try:
            yield
        finally:
            # Replay the scaler's update from its true state: a dynamic fp16 scale evolves as without the factor.
            vars(scaler).clear()
            vars(scaler).update(saved_state)
            scaler.update_scale(bool(getattr(optimizer, "overflow", False)))
