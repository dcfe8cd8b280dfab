"""Loops that would be silently wrong: what the accumulator refuses at construction, and what it notices in use.

At construction (before any work): a scheduler that cannot be stepped once per optimizer step without an argument
(``ReduceLROnPlateau``), and an optimizer that is not over the model's parameters (the weights would never move,
or, on several ranks, parameters outside the wrapper would never be averaged).

At the ranks' start-up agreement: the options and the optimizer's hyperparameters (:func:`describe_setup`), as one
fingerprint in the same all-gather as the plan (:func:`distaccum.collectives.check_plan_agreement`); ranks built
differently would train replicas that drift apart.

In use: a loss that is not a scalar tensor with a gradient, a ``num_items`` that is not a count; a call of
``optimizer.step()`` inside a window (:class:`StepGuard`, an optimizer step pre-hook); gradients changed between
two micro-steps of a window (``optimizer.zero_grad()``, a hand-made clip: :class:`WindowGradients`); and a
scheduler stepped by the loop as well (:class:`SchedulerGuard`).
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from distaccum.backends import Backend, params_of
from distaccum.backends.tensors import drop_stale


def check_scheduler(scheduler: Any | None) -> None:
    """Refuse a scheduler the accumulator cannot step once per optimizer step.

    Raises:
        ValueError: ``scheduler`` is a ``ReduceLROnPlateau`` (its ``step`` needs the metric).
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "scheduler=ReduceLROnPlateau: its step() needs the metric it watches, which the accumulator does not "
            "have, so stepping it at the boundary would fail after the optimizer stepped. Leave scheduler=None and "
            "step it yourself after a real step: `if acc.stepped and not acc.last_step.skipped: "
            "plateau.step(metric)`."
        )


def check_optimizer_over_model(model: nn.Module, optimizer: torch.optim.Optimizer, backend: Backend) -> None:
    """Refuse an optimizer that does not hold the model's parameters.

    Raises:
        ValueError: no trainable parameter of ``model`` is in ``optimizer``; or, on several ranks, some of the
            optimizer's parameters are outside the wrapped model (their gradients would never be averaged).
    """
    if backend.engine_steps:  # DeepSpeed's optimizer holds the engine's own flat partitions
        return
    every = {id(p) for p in model.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = params_of(optimizer)
    if trainable and not any(id(p) in trainable for p in held):
        raise ValueError(
            f"optimizer holds {len(held)} parameter(s), none of them a trainable parameter of the model "
            f"({type(model).__name__}, {len(trainable)} trainable): its steps would never move the model's weights. "
            "Build the optimizer over this model's parameters (after wrapping it, for FSDP: "
            "torch.optim.AdamW(model.parameters()))."
        )
    outside = sum(1 for p in held if id(p) not in every and p.requires_grad)
    if outside and backend.world_size > 1:
        raise ValueError(
            f"optimizer holds {outside} parameter(s) that are not in the wrapped model ({type(model).__name__}): "
            f"{backend.name} never averages their gradients over the {backend.world_size} ranks, so the ranks' "
            "copies would drift apart. Make them part of the model before wrapping it (e.g. a learnable loss "
            "temperature as a submodule), or give them to a separate optimizer you reduce yourself."
        )


def check_loss(loss: Any) -> None:
    """Refuse what ``acc.backward`` cannot run a backward of, in distaccum's words rather than torch's.

    Raises:
        TypeError: ``loss`` is not a tensor.
        ValueError: ``loss`` is not a scalar, or does not require a gradient.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"acc.backward(loss) needs the loss as a tensor with a gradient, got {type(loss).__name__} {loss!r}: "
            "pass the tensor itself, not loss.item() or a Python number"
        )
    if loss.dim():
        raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}; reduce it (.mean())")
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require a gradient (computed under torch.no_grad() or inference_mode, detached, or from "
            "parameters that all have requires_grad=False): its backward would leave the model's gradients as they "
            "are. Compute it from the model's output outside no_grad."
        )


def item_count(num_items: int | torch.Tensor) -> int:
    """``num_items`` as a Python int.

    Raises:
        TypeError: not a number or a tensor (a bool too).
        ValueError: a tensor of other than one element, negative, or not a whole number.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real | torch.Tensor):
        raise TypeError(
            f"num_items must be an int or a one-element integer tensor (the items the loss averages over), got "
            f"{type(num_items).__name__} {num_items!r}; pass e.g. int((labels != -100).sum())"
        )
    if isinstance(num_items, torch.Tensor) and (num_items.numel() != 1 or num_items.dtype == torch.bool):
        raise ValueError(
            f"num_items must be a one-element integer tensor, got a {num_items.dtype} tensor of shape "
            f"{tuple(num_items.shape)}; pass the count itself, e.g. (labels != -100).sum()"
        )
    count = int(num_items.item()) if isinstance(num_items, torch.Tensor) else int(num_items)
    if count < 0 or count != num_items:
        raise ValueError(f"num_items must be a non-negative integer, got {num_items!r}")
    return count


def check_grads_reached(params: list[torch.Tensor]) -> None:
    """At the first step: some optimizer parameter must have a gradient, or the loss does not depend on them.

    Raises:
        ValueError: no parameter of the optimizer got a gradient in the whole window.
    """
    if any(p.grad is not None for p in params):
        return
    raise ValueError(
        f"no gradient reached any of the optimizer's {len(params)} parameters in the first window: the loss passed "
        "to acc.backward() does not depend on them (computed from another model, or from outputs detached from "
        "this one), so no step would ever move them. Compute the loss from the model the Accumulator was built on."
    )


def describe_setup(options: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any | None) -> dict[str, str]:
    """What every rank must have alike, as readable values: ``options`` plus the optimizer's and scheduler's kind
    and every param group's hyperparameters (their size, not their tensors)."""
    described = {name: _readable(value) for name, value in options.items()}
    described["optimizer"] = type(optimizer).__name__
    described["scheduler"] = "None" if scheduler is None else type(scheduler).__name__
    for index, group in enumerate(optimizer.param_groups):
        described[f"param_groups[{index}].params"] = str(len(group["params"]))
        for key in sorted(group):
            if key != "params":
                described[f"param_groups[{index}].{key}"] = _readable(group[key])
    return described


def _readable(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return repr(value.detach().cpu().tolist())
    return repr(value)


class StepGuard:
    """An optimizer step pre-hook that refuses ``optimizer.step()`` called by the loop inside a window.

    One hook per optimizer, however many accumulators were built over it: the newest one owns it.
    """

    def __init__(self, window_open: Callable[[], bool]) -> None:
        self.window_open = window_open
        self.stepping = False
        """True while the accumulator itself steps the optimizer."""

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer, window_open: Callable[[], bool]) -> StepGuard:
        guard = cls(window_open)
        previous = getattr(optimizer, "_distaccum_step_guard", None)
        optimizer._distaccum_step_guard = guard  # type: ignore[attr-defined]
        if previous is None and hasattr(optimizer, "register_step_pre_hook"):
            reference = weakref.ref(optimizer)
            optimizer.register_step_pre_hook(lambda *_: _check_step(reference))
        return guard


def _check_step(reference: weakref.ref[torch.optim.Optimizer]) -> None:
    optimizer = reference()
    guard: StepGuard | None = getattr(optimizer, "_distaccum_step_guard", None)
    if guard is None or guard.stepping or not guard.window_open():
        return
    raise RuntimeError(
        "optimizer.step() was called inside an accumulation window: the Accumulator steps the optimizer once, at "
        "the window's boundary (after the gradients of all its micro-steps are summed and reduced). Remove "
        "optimizer.step() (and optimizer.zero_grad()) from the loop; check `acc.stepped` to act after a step."
    )


class WindowGradients:
    """Notices gradients changed between two micro-steps of a window by something other than a backward.

    After each backward inside a window one gradient is remembered with its version counter (bumped by every
    in-place write); before the next backward it must be the same tensor at the same version. ``zero_grad()``
    (to None, or in place) and a clip by hand inside the window both change it.
    """

    __slots__ = ("_grad", "_version")

    def __init__(self) -> None:
        self._grad: torch.Tensor | None = None
        self._version = 0

    def remember(self, optimizer: torch.optim.Optimizer) -> None:
        grad = _first_grad(optimizer)
        self._grad = grad
        self._version = 0 if grad is None else grad._version

    def forget(self) -> None:
        self._grad = None

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raises RuntimeError when the remembered gradient was replaced or written since :meth:`remember`."""
        grad = self._grad
        if grad is None:
            return
        if _first_grad(optimizer) is grad and grad._version == self._version:
            return
        self._grad = None
        raise RuntimeError(
            "the gradients accumulated in this window were changed between two micro-steps (optimizer.zero_grad(), "
            "a clip or another write to param.grad outside acc.backward): the window's sum is lost. The Accumulator "
            "zeroes, clips and steps once, at the boundary: remove those calls from the loop (use "
            "max_grad_norm=... for clipping)."
        )


def _first_grad(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    # A generator, not params_of's list: this runs at every micro-step and stops at the first gradient.
    return next((p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None), None)


class SchedulerGuard:
    """Notices a scheduler stepped by the loop as well as by the accumulator (its ``last_epoch`` moved)."""

    __slots__ = ("_epoch", "scheduler")

    def __init__(self, scheduler: Any | None) -> None:
        self.scheduler = scheduler
        self._epoch: Any = None

    def remember(self) -> None:
        """Called when the run starts (after the user loaded any state) and after each step of the accumulator's."""
        self._epoch = getattr(self.scheduler, "last_epoch", None)

    def check(self) -> None:
        """Raises RuntimeError when the scheduler was stepped since :meth:`remember` by someone else."""
        epoch = getattr(self.scheduler, "last_epoch", None)
        if epoch == self._epoch or self._epoch is None:  # None: this rank's first act is a step (a flush())
            self._epoch = epoch
            return
        seen = self._epoch
        self._epoch = epoch
        raise RuntimeError(
            f"the scheduler passed to the Accumulator was stepped outside it (last_epoch {seen} -> {epoch} since its "
            "last step): the Accumulator steps it once per optimizer step, so the learning rate would move too fast. "
            "Remove scheduler.step() from the loop, or do not pass scheduler= and step it yourself when "
            "`acc.stepped`. (Load its state before the first micro-step.)"
        )


class LoopGuards:
    """The accumulator's watch over its loop: the step guard, the window's gradients, the scheduler, and the
    options every rank must share.

    Args:
        optimizer: the optimizer the accumulator steps.
        scheduler: the scheduler it steps (or None).
        window_open: whether a window is open now (a micro-step running, or some taken since the last step).
        options: the accumulator's options, compared across ranks with the optimizer's settings.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        *,
        window_open: Callable[[], bool],
        options: dict[str, Any],
    ) -> None:
        self.step = StepGuard.attach(optimizer, window_open)
        self.window_grads = WindowGradients()
        self.scheduler = SchedulerGuard(scheduler)
        self.options = options

    def run_starts(self, optimizer: torch.optim.Optimizer, *, first: bool) -> None:
        """A run's first micro-step (``first``: gradients already there are not its window's and are dropped), or
        the first after a load: nothing remembered from before holds."""
        self.window_grads.forget()
        self.scheduler.remember()
        if first:
            drop_stale(params_of(optimizer))

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """The accumulator's own optimizer step, which the step guard lets through."""
        self.step.stepping = True
        try:
            yield
        finally:
            self.step.stepping = False

    def described(self, optimizer: torch.optim.Optimizer, scheduler: Any | None) -> dict[str, str]:
        """:func:`describe_setup` of the options now (the optimizer's settings as a loaded state left them)."""
        return describe_setup(self.options, optimizer, scheduler)
