"""The backend interface, and its plain implementation: one process, a bare module, the torch optimizer step.

A backend answers the few questions the accumulator asks of a model wrapper (Lightning Fabric's
``_BackwardSyncControl`` is the model): how to skip the gradient reduction inside a window (:meth:`window_sync`),
how to run a backward, how to scale, measure and clip the reduced gradient, how to reduce what was accumulated
when the data ends mid-window, and how to take the optimizer step. Plain, DDP and FSDP models share the torch
optimizer step of :meth:`Backend.step`; DeepSpeed, whose engine steps by itself, overrides it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from distaccum.backends.step import StepOptions, StepWindow
from distaccum.backends.sync import GradSync
from distaccum.backends.tensors import SeededBackward, by_kind, grads_of, nonfinite_flag, read_is_a_sync

Params = list[torch.Tensor]
_NOTHING = contextlib.nullcontext()  # reusable: entered on every micro-step of a window without a switch (FSDP)


def params_of(optimizer: torch.optim.Optimizer) -> Params:
    """The optimizer's parameters as they are now: read at every use, so a group added with
    ``add_param_group`` after the accumulator was built is scaled, clipped and checkpointed too."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class Backend:
    """A model wrapper, as the accumulator drives it; the torch optimizer steps (:class:`PlainBackend`: none)."""

    name: ClassVar[str] = "wrapper"
    grads_in_params: ClassVar[bool] = True
    """True when gradients accumulated without sync live in ``param.grad`` (so a mid-window state can hold
    them); False for wrappers that accumulate in private buffers (FSDP, DeepSpeed)."""
    checkpoint_layout: ClassVar[Literal["replicated", "sharded", "engine"]] = "replicated"
    """How :mod:`distaccum.checkpoint` saves the model: rank 0 writes one copy, every rank its shard (DCP), or the
    engine its own files (DeepSpeed's ``save_checkpoint``)."""
    replicated: ClassVar[bool] = True
    """True when every rank holds the same whole reduced gradient (a local non-finite check is a global one)."""
    default_grad_sync: ClassVar[GradSync] = "boundary"
    """What ``Accumulator(grad_sync=None)`` means on this wrapper."""
    engine_steps: ClassVar[bool] = False
    """The wrapper's engine checks for NaN/inf and clips in its own :meth:`step` (DeepSpeed): nothing before it."""

    def __init__(self, model: nn.Module, world_size: int) -> None:
        self.model = model
        self.world_size = world_size
        self.grad_sync: GradSync = self.default_grad_sync  # when backward reduces (backends.sync.choose)
        self._checks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # check_and_scale's flag and 1.0
        self._clean: set[torch.device] = set()  # devices whose flag was last read as 0
        self._seeded = SeededBackward()

    hand_reduction_is_collective: ClassVar[bool] = False
    """:meth:`reduce_by_hand` talks to other ranks (every rank must pass the same tensors)."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` is this backend's wrapper."""
        return False

    @classmethod
    def inner(cls, model: nn.Module) -> nn.Module | None:
        """The user's module inside this wrapper, when the wrapper holds it as another module (else None)."""
        return None

    def check_options(self, options: StepOptions) -> None:
        """Refuse step options this wrapper cannot honour, at construction (before any work)."""

    def accumulation_dtype(self) -> torch.dtype | None:
        """The dtype the wrapper sums a window's gradients in, when it is not the parameters' own (None)."""
        return None

    @property
    def averaging_ranks(self) -> int:
        """How many ranks' gradients a reduction averages over (1 when nothing is reduced)."""
        return self.world_size

    def grad_sync_refusal(self, mode: GradSync) -> str | None:
        """Why this wrapper cannot run ``mode``, and what to use instead (None: it can)."""
        if mode == "boundary":
            return None
        return f"the {self.name} engine decides by itself when it reduces; leave grad_sync as None or 'boundary'"

    def float32_sums_refusal(self) -> tuple[str, str] | None:
        """Why distaccum's float32 sums of bf16/fp16 gradients (reduced by hand at the boundary) cannot be exact on
        this wrapper, and the fix (None: they can)."""
        if self.syncs_in_window:
            return (
                f"grad_sync={self.grad_sync!r} reduces the gradients in every micro-step's backward, which adds them "
                "to the reduced sum so far in the parameters' dtype",
                "Use grad_sync='boundary' (the default) with accumulate_dtype=torch.float32",
            )
        return f"{self.name} has no float32 window in distaccum", "Sum in float32 through the wrapper's own option"

    def collective_free_refusal(self) -> str | None:
        """Why this wrapper's forward or backward makes a collective even without sync (so that a rank that stops
        mid-window would leave its peers in it: ``auto_micro_batch``); None: it makes none."""
        return f"{self.name} makes collectives inside forward and backward (parameter gathers)"

    def reduce_by_hand(self, tensors: list[torch.Tensor], factor: float) -> None:
        """Average this rank's window sums ``tensors`` over the ranks in place, times ``factor`` (folded into the
        division). Here: one process, only the factor."""
        if factor != 1.0 and tensors:
            torch._foreach_mul_(tensors, factor)

    @property
    def syncs_in_window(self) -> bool:
        """Whether backward reduces inside the window too (``"every"``, or ``"sharded"`` on FSDP)."""
        return False

    def window_sync(self) -> contextlib.AbstractContextManager[None] | None:
        """Context of a micro-step inside the window (not its boundary) under :attr:`grad_sync`, in which backward
        accumulates gradients locally without reducing them (None: nothing to set)."""
        return None

    def boundary_sync(self) -> contextlib.AbstractContextManager[None] | None:
        """Context of the boundary micro-step, whose backward reduces, and what the wrapper does before such a
        backward (None: nothing to set)."""
        return None

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        """Backward of ``weight * loss`` (the window's weight as the seed: :mod:`distaccum.backends.tensors`)."""
        self._seeded(loss, weight)

    def _scale_grads(self, params: Params, factor: float) -> None:
        """Multiply every gradient by ``factor`` in place (already reduced gradients)."""
        grads = grads_of(params)
        if grads:
            torch._foreach_mul_(grads, factor)

    def _grad_norm(self, params: Params) -> torch.Tensor:
        """Global 2-norm of the gradients as they are (the caller folds clipping into one multiply)."""
        grads = grads_of(params)
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        full = getattr(total, "full_tensor", None)  # DTensor (FSDP2): partial norms over shards
        return full() if full is not None else total

    def early_check(self, params: Params, options: StepOptions, *, norm: bool) -> EarlyCheck:
        """What the boundary's all-reduce of the window's scalars can carry about the reduced gradient, so that the
        step decides on it with one host read (:meth:`decide_nonfinite`).

        With ``norm`` (clipping, ``report_grad_norm``, the noise scale): the global norm left on the device; not on
        the CPU, where reading it at the step costs nothing and joining it to the scalars cost 33 us per step on one
        process, nor after an fp16 GradScaler unscales, nor where the engine steps. Without: a NaN/inf flag (nonzero)
        where ranks hold different parts (each reads its own, on its device), and for whole gradients on an
        accelerator, where the step's read of a fused flag would be a second host sync; on the CPU the step checks
        them in the multiply that applies the window factor."""
        if self.engine_steps or (not norm and self.replicated and not _on_accelerator(params)):
            return EarlyCheck()
        if not norm:
            return EarlyCheck(nonfinite=self._nonfinite_flag(params))
        if enabled_scaler(options.grad_scaler) is not None or not _on_accelerator(params):
            return EarlyCheck()
        return EarlyCheck(norm=self._grad_norm(params))

    def _nonfinite_flag(self, params: Params) -> float | torch.Tensor:
        """This rank's NaN/inf flag of its part of the reduced gradient (nonzero: found)."""
        return nonfinite_flag(grads_of(params))

    def _check_and_scale(self, params: Params, factor: float) -> bool:
        """Multiply the (replicated) reduced gradients by ``factor`` and say whether any was NaN/inf, in one fused
        pass per device and dtype (GradScaler's kernel), so the non-finite check costs no pass of its own."""
        found_any = False
        for grads in by_kind(grads_of(params)):
            device = grads[0].device
            if grads[0].dtype == torch.float64 and float(torch.tensor(factor, dtype=torch.float32)) != factor:
                torch._foreach_mul_(grads, factor)  # the kernel's fp32 factor would round a float64 gradient
                factor_here = 1.0
            else:
                factor_here = factor
            found, multiplier = self._check_buffers(device, factor_here)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, multiplier)
            found_any = found_any or bool(found.item())
            if not found_any:
                self._clean.add(device)  # read as 0: the next check needs no zero_() first
        return found_any

    def _check_buffers(self, device: torch.device, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept between steps (one found flag and the usual factor 1.0 per device): nothing allocated per step.
        if device not in self._checks:
            # float32 whatever torch.set_default_dtype says: GradScaler's kernel takes no other flag or factor.
            found = torch.zeros(1, dtype=torch.float32, device=device)
            self._checks[device] = found, torch.ones(1, dtype=torch.float32, device=device)
        found, one = self._checks[device]
        if device not in self._clean:  # set, or not read after the kernel (a raise in between): zero it
            found.zero_()
        self._clean.discard(device)
        return found, one if factor == 1.0 else torch.full((1,), factor, dtype=torch.float32, device=device)

    def join_reduction(self) -> bool:
        """After a micro-step raised before its reducing backward: join the other ranks' reduction (True), or not."""
        return False

    def reduce_pending(self, params: Params) -> None:
        """Average gradients that were accumulated under :meth:`window_sync` (end of data mid-window)."""

    def discard_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the reduced gradients of a window that will not step."""
        optimizer.zero_grad(set_to_none=True)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Params,
        options: StepOptions,
        window: StepWindow,
    ) -> tuple[float | None, bool]:
        """The window's optimizer step: unscale, factor and clip in one multiply, step (or skip), scaler update,
        zero_grad.

        Args:
            optimizer: the torch optimizer.
            params: its parameters.
            options: clipping, scaler and non-finite policy.
            window: what the boundary decided (:class:`StepWindow`).

        Returns:
            (global gradient norm before clipping, or None when not computed; whether the step was skipped).

        Raises:
            FloatingPointError: the gradient is not finite and ``options.on_nonfinite`` is ``"raise"``.
        """
        scaler = enabled_scaler(options.grad_scaler)
        if window.skip:
            optimizer.zero_grad(set_to_none=True)
            return None, True
        if scaler is not None:
            scaler.unscale_(optimizer)
        verdict = self.decide_nonfinite(optimizer, params, options, window)
        if verdict.found:
            self._drop_nonfinite(optimizer, options, window, verdict.norm)
            return verdict.norm, True  # the norm is None unless it was asked for
        if verdict.multiplier != 1.0:
            self._scale_grads(params, verdict.multiplier)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return verdict.norm, False

    def decide_nonfinite(
        self, optimizer: torch.optim.Optimizer, params: Params, options: StepOptions, window: StepWindow
    ) -> Verdict:
        """The step's one NaN/inf decision, the same on every rank, from the cheapest source the boundary has: the
        global norm (when one is computed: clipping, ``report_grad_norm``, the noise scale), the flag every rank
        read with the boundary's all-reduce, the fp16 GradScaler's ``unscale_`` (on a gradient every rank shares),
        or else a fused pass that checks while it applies the window's factor (GradScaler's kernel)."""
        if window.norm:
            # The norm is global (every backend reduces it over shards), so the decision is the same on every rank.
            measured = float(self._grad_norm(params)) if window.norm_value is None else window.norm_value
            norm = measured * window.factor
            found = not math.isfinite(norm)
            multiplier = window.factor
            if options.max_grad_norm is not None and not found:  # torch's clip coefficient, on the true norm
                multiplier *= min(1.0, options.max_grad_norm / (norm + 1e-6))
            return Verdict(found, multiplier, norm)
        if window.nonfinite is not None:  # checked by every rank before the boundary's all-reduce
            return Verdict(window.nonfinite, window.factor)
        scaler = enabled_scaler(options.grad_scaler)
        if scaler is not None and self.replicated:  # unscale_ checked the gradient, which every rank shares
            found = any(bool(flag.item()) for flag in _found_inf(scaler, optimizer).values())
            return Verdict(found, window.factor)
        return Verdict(self._check_and_scale(params, window.factor), 1.0)

    def _drop_nonfinite(
        self, optimizer: torch.optim.Optimizer, options: StepOptions, window: StepWindow, norm: float | None
    ) -> None:
        """A non-finite gradient: no step. An fp16 overflow backs off the scale (on every rank alike); without a
        scaler, ``on_nonfinite="raise"`` raises."""
        optimizer.zero_grad(set_to_none=True)
        scaler = enabled_scaler(options.grad_scaler)
        if scaler is not None:
            _record_overflow(scaler, optimizer)
            scaler.update()
        elif options.on_nonfinite == "raise":
            raise nonfinite_error(norm, window.number)


@dataclass(frozen=True)
class EarlyCheck:
    """What rides on the boundary's all-reduce about the reduced gradient (:meth:`Backend.early_check`)."""

    nonfinite: float | torch.Tensor | None = None
    """This rank's NaN/inf flag of its part (nonzero: found; None: decided at the step)."""
    norm: torch.Tensor | None = None
    """The global gradient norm on the device, read with the window's scalars (None: computed at the step)."""


@dataclass(frozen=True)
class Verdict:
    """The step's NaN/inf decision (:meth:`Backend.decide_nonfinite`)."""

    found: bool
    """The gradient holds a NaN/inf on some rank: no step, on every rank."""
    multiplier: float
    """What the gradients are still to be multiplied by (the window factor, the clip coefficient; 1.0: done)."""
    norm: float | None = None
    """The global gradient norm before clipping, where computed."""


def nonfinite_error(norm: float | None, number: int) -> FloatingPointError:
    """What ``on_nonfinite="raise"`` raises for step ``number`` (``norm``: the global norm, where computed)."""
    return FloatingPointError(
        f"non-finite gradient {'' if norm is None else f'norm {norm} '}at optimizer step {number}; the step was not "
        "taken. Use on_nonfinite='skip' to skip such steps on all ranks instead."
    )


def enabled_scaler(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """``scaler`` when it scales (a disabled one, ``GradScaler(enabled=args.fp16)``, detects nothing: not a guard)."""
    return scaler if scaler is not None and scaler.is_enabled() else None


class PlainBackend(Backend):
    """A plain module in a single process: nothing to skip, nothing to reduce."""

    name: ClassVar[str] = "plain"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def grad_sync_refusal(self, mode: GradSync) -> str | None:
        if mode in ("boundary", "every"):  # one process: nothing to reduce
            return None
        return "one process reduces nothing, so nothing is sharded. Use 'boundary' (default) or 'every' (the same)"

    def float32_sums_refusal(self) -> tuple[str, str] | None:
        return None

    def collective_free_refusal(self) -> str | None:
        return None


def _on_accelerator(params: Params) -> bool:
    """Whether the gradients live where a host read is a sync (judged by the first one; False without any)."""
    first = next((p.grad for p in params if p.grad is not None), None)
    return first is not None and read_is_a_sync(first)


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict[torch.device, torch.Tensor]:
    found: dict[torch.device, torch.Tensor] = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return found


def _record_overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    # GradScaler.update() backs off when unscale_ found an inf on this rank; make it see one on every rank.
    found = _found_inf(scaler, optimizer)
    assert found, "unscale_ records one found_inf tensor per device"
    for flag in found.values():
        flag.fill_(1.0)
