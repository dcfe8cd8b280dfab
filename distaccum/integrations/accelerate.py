"""Accelerate: an :class:`~distaccum.Accumulator` on the model, optimizer and scheduler of ``accelerator.prepare``.

``accelerator.prepare(model)`` returns a ``DistributedDataParallel`` (``MULTI_GPU``, ``MULTI_CPU``) or the
model itself (one process), which the DDP and plain sync backends already handle. What needs care is the
optimizer and the scheduler, which Accelerate wraps with its own accumulation and scaling logic:

* ``AcceleratedOptimizer.step`` only steps when Accelerate's shared ``GradientState`` says so, and under fp16
  runs its own ``GradScaler``. The Accumulator steps the wrapped torch optimizer directly and drives that same
  scaler itself, so gradients are unscaled exactly once.
* ``AcceleratedScheduler.step`` steps ``num_processes`` times per call (Accelerate counts schedules in
  single-process steps). distaccum steps the wrapped scheduler once per optimizer step, so the schedule is
  the same on any number of processes at the same global batch.
* ``Accelerator(gradient_accumulation_steps=k)`` with ``k > 1`` would accumulate a second time
  (``accelerator.accumulate`` and ``accelerator.backward`` divide by ``k``): refused, with the fix.
* With Accelerate's DeepSpeed plugin the engine owns the step, the scheduler and the accumulation count (from
  the DeepSpeed config, checked against the plan by :mod:`distaccum.integrations.deepspeed`): the optimizer
  wrapper is resolved to the engine's optimizer, and the scheduler wrapper (whose ``step`` is a no-op because
  ``engine.step()`` steps the scheduler) is kept, so the schedule still advances once per optimizer step.

Usage::

    accelerator = Accelerator()                       # no gradient_accumulation_steps: the plan has it
    model, optimizer = accelerator.prepare(model, optimizer)
    acc = Accumulator(model, optimizer, BatchPlan(global_batch_size=64, micro_batch_size=8))
    with acc.micro_step():
        acc.backward(loss)                            # not accelerator.backward(loss)
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper, DeepSpeedSchedulerWrapper


def adapt(
    optimizer: torch.optim.Optimizer, scheduler: Any | None, grad_scaler: torch.amp.GradScaler | None
) -> tuple[torch.optim.Optimizer, Any | None, torch.amp.GradScaler | None]:
    """Unwrap Accelerate's optimizer and scheduler so that accumulation, scaling and scheduling happen once.

    Args:
        optimizer: an ``AcceleratedOptimizer`` (from ``accelerator.prepare``) or any torch optimizer.
        scheduler: an ``AcceleratedScheduler``, any scheduler, or None. Under the DeepSpeed plugin both are
            left to the engine (see the module docstring).
        grad_scaler: the user's ``GradScaler`` or None; under fp16 Accelerate's own scaler is adopted.

    Returns:
        (torch optimizer, scheduler, scaler) for the Accumulator to drive.

    Raises:
        ValueError: ``Accelerator(gradient_accumulation_steps>1)`` was set, or a second GradScaler was given
            next to Accelerate's fp16 scaler.
    """
    _check_process_count()
    if isinstance(optimizer, DeepSpeedOptimizerWrapper):
        optimizer = optimizer.optimizer
    elif isinstance(optimizer, AcceleratedOptimizer):
        steps = int(optimizer.gradient_state.num_steps)
        if steps > 1:
            raise ValueError(
                f"Accelerator(gradient_accumulation_steps={steps}) is set, and the Accumulator accumulates as "
                "well: gradients would be divided and synchronized on two schedules. Let the BatchPlan hold "
                "the accumulation: build Accelerator() without gradient_accumulation_steps (or with 1), and "
                "use BatchPlan(global_batch_size=..., micro_batch_size=...) or BatchPlan(accum_steps="
                f"{steps}, micro_batch_size=...)."
            )
        accelerate_scaler = optimizer.scaler
        if accelerate_scaler is not None:
            if grad_scaler is not None and grad_scaler is not accelerate_scaler:
                raise ValueError(
                    "grad_scaler is set, but Accelerate (mixed_precision='fp16') already has its own GradScaler: "
                    "two scalers would scale the loss twice. Drop grad_scaler; the Accumulator uses "
                    "accelerator.scaler."
                )
            grad_scaler = accelerate_scaler
        optimizer = optimizer.optimizer
    # Under DeepSpeed too: a torch scheduler that is not one of DeepSpeed's own is left out of the engine and wrapped
    # in a plain AcceleratedScheduler, which would step num_processes times per call.
    if isinstance(scheduler, AcceleratedScheduler) and not isinstance(scheduler, DeepSpeedSchedulerWrapper):
        scheduler = scheduler.scheduler
    return optimizer, scheduler, grad_scaler


def _check_process_count() -> None:
    """Under the DeepSpeed plugin: refuse an Accelerator that miscounts the processes; warn when DeepSpeed is dropped.

    Reads Accelerate's shared state only if an Accelerator (or PartialState) was built: never creates one.

    Raises:
        ValueError: ``accelerator.num_processes`` differs from the process group's world size.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState._shared_state
    if not state or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    world = torch.distributed.get_world_size()
    requested = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Without DeepSpeed, Accelerate counts 1 process only when it leaves the model unwrapped: the backend's check
    # refuses that with its own fix (ACCELERATE_USE_CPU=1). Under DeepSpeed the engine wraps it all the same.
    if requested and state.get("num_processes", world) != world:
        raise ValueError(
            f"Accelerate counts {state['num_processes']} process(es) (accelerator.num_processes; process_index "
            f"{state.get('process_index')}) but the process group has {world} ranks: a loop that shards data by "
            "accelerator.process_index would train every rank on process 0's samples. Accelerate's DeepSpeed plugin "
            "does this on a machine without GPU, where it finds no backend of its own. Build the Accelerator with "
            "kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')] (from accelerate.utils)."
        )
    running = AcceleratorState._shared_state.get("distributed_type")
    if requested and running is not None and running != DistributedType.DEEPSPEED:
        warnings.warn(
            f"accelerate launch asked for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), but Accelerate runs {running} "
            "without it: ACCELERATE_USE_CPU=1 (or Accelerator(cpu=True)) drops the DeepSpeed plugin silently. "
            "distaccum trains the prepared model exactly, but without ZeRO's sharding. For DeepSpeed without a GPU, "
            "unset ACCELERATE_USE_CPU and build Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')]).",
            stacklevel=4,
        )
