"""Every option of an :class:`~distaccum.Accumulator`, checked in one place, at construction, before any work.

:func:`configure` reads top to bottom: first the options' own values (a type, a range, a known mode: each error
names the field, the value, the rule and the fix), then the plan against the live world and the optimizer's
library wrappers, then the model's wrapper (the backend, which answers for ``grad_sync``), then what each option
asks of that backend, and last what touches the model (BatchNorm hooks), so that a refused construction leaves it
as it was. Each rule lives with the module that owns its option (:mod:`distaccum.reduction` knows float32 sums,
:mod:`distaccum.resize` a rank that stops early); this module calls all of them, so no refusal waits for the first
micro-step and none is skipped on some path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from distaccum import backends, guards, integrations, precision, reduction, resize
from distaccum.backends import StepOptions
from distaccum.backends.base import Backend
from distaccum.batchnorm import BatchNormMode, BatchNormWindow, check_mode
from distaccum.noise import NoiseScale
from distaccum.plan import BatchPlan
from distaccum.schedule import BatchSchedule, PlanTracker

__all__ = ["Options", "Setup", "configure"]


@dataclass(frozen=True, kw_only=True)
class Options:
    """The Accumulator's keyword options, as the user gave them (documented on :class:`~distaccum.Accumulator`)."""

    scheduler: Any | None = None
    max_grad_norm: float | None = None
    grad_scaler: torch.amp.GradScaler | None = None
    on_nonfinite: Literal["skip", "raise"] = "skip"
    check_ranks: bool = True
    batch_norm: BatchNormMode = "warn"
    auto_micro_batch: bool = False
    noise_scale: float | None = None
    report_grad_norm: bool = False
    accumulate_dtype: precision.AccumulateDtype = "auto"
    grad_sync: backends.GradSync | None = None

    @property
    def computes_norm(self) -> bool:
        """Whether every step computes the global gradient norm (clipping, ``report_grad_norm``, the noise scale)."""
        return self.max_grad_norm is not None or self.report_grad_norm or self.noise_scale is not None


@dataclass(frozen=True)
class Setup:
    """What :func:`configure` built from checked options: everything the accumulator drives."""

    plans: PlanTracker
    """The plan, or a schedule's stages, and the samples consumed."""
    optimizer: torch.optim.Optimizer
    """The optimizer to step (a library's wrapper resolved: :func:`distaccum.integrations.adapt`)."""
    scheduler: Any | None
    grad_scaler: torch.amp.GradScaler | None
    step: StepOptions
    """How each optimizer step is taken (clipping, scaler, non-finite policy)."""
    backend: Backend
    """The model's wrapper."""
    reduction: reduction.InBackward
    """Where a window's gradients are reduced."""
    batch_norm: BatchNormWindow | None
    """``batch_norm="exact"``'s tracker (None: off, or no BatchNorm layer)."""
    noise: NoiseScale | None
    """The gradient noise scale's estimator (None: off)."""
    agreed: dict[str, Any]
    """What every rank must have alike, checked with the plan at the first micro-step."""


def configure(
    model: nn.Module, optimizer: torch.optim.Optimizer, plan: BatchPlan | BatchSchedule, options: Options
) -> Setup:
    """Check every option against ``model``'s wrapper and build what the accumulator drives.

    Raises:
        TypeError: ``plan`` is not a plan or schedule, or a flag is not a bool.
        ValueError: an option's value, or a combination that this wrapper cannot make exact (the message gives the
            way out).
    """
    _check_flags(options)
    plans = PlanTracker(plan, auto_micro_batch=options.auto_micro_batch)
    plans.plan.check_world_size()
    optimizer, scheduler, grad_scaler = integrations.adapt(optimizer, options.scheduler, options.grad_scaler)
    guards.check_scheduler(scheduler)
    step = StepOptions(max_grad_norm=options.max_grad_norm, grad_scaler=grad_scaler, on_nonfinite=options.on_nonfinite)
    check_mode(options.batch_norm)
    noise_decay = NoiseScale.check_decay(options.noise_scale)
    backend = backends.select(model, plans.plan.world_size, options.grad_sync)
    backend.check_options(step)
    guards.check_optimizer_over_model(model, optimizer, backend)
    window_reduction = reduction.choose(
        backend,
        optimizer,
        accumulate_dtype=options.accumulate_dtype,
        largest_accum_steps=plans.largest_accum_steps,
        auto_micro_batch=options.auto_micro_batch,
    )
    noise = NoiseScale.checked(noise_decay, backend.name, backend.grads_in_params)
    if options.auto_micro_batch:
        resize.check_model(model, backend, options.batch_norm)
    batch_norm = BatchNormWindow.attach(model, options.batch_norm, plans.largest_accum_steps)  # hooks: last
    return Setup(
        plans=plans,
        optimizer=optimizer,
        scheduler=scheduler,
        grad_scaler=grad_scaler,
        step=step,
        backend=backend,
        reduction=window_reduction,
        batch_norm=batch_norm,
        noise=noise,
        agreed=_agreed(options, backend, grad_scaler),
    )


def _check_flags(options: Options) -> None:
    """The on/off options are bools (a string such as ``"false"`` would switch them on)."""
    for name in ("check_ranks", "auto_micro_batch", "report_grad_norm"):
        value = getattr(options, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}); pass a bool")


def _agreed(options: Options, backend: Backend, grad_scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """The options every rank must have alike (checked with the plan, by :class:`distaccum.guards.LoopGuards`)."""
    return {
        "max_grad_norm": options.max_grad_norm,
        "on_nonfinite": options.on_nonfinite,
        "grad_sync": backend.grad_sync,
        "accumulate_dtype": options.accumulate_dtype,
        "report_grad_norm": options.report_grad_norm,
        "noise_scale": options.noise_scale,
        "batch_norm": options.batch_norm,
        "grad_scaler": None if grad_scaler is None else grad_scaler.is_enabled(),
    }
