"""Where a window's gradients are reduced over the ranks, chosen once at construction: :func:`choose`.

* :class:`InBackward` (the default for every wrapper): inside the window backward runs without sync (the
  wrapper's ``no_sync``, :attr:`~distaccum.backends.Backend.grad_sync`), and the boundary micro-step's backward
  reduces, through the wrapper itself (DDP's buckets, FSDP's reduce-scatter, DeepSpeed's engine). At the close
  the gradients are already reduced, so their norm and their NaN/inf check can ride on the boundary's all-reduce
  of the window's scalars.
* :class:`ByHand`: every micro-step runs without sync, the boundary's too, and the close reduces the window once,
  in the backend's buckets, with the window's factor folded into the division, in a sum dtype: float32 for bf16/fp16
  parameters with ``accumulate_dtype`` (:mod:`distaccum.precision`), else the gradients' own. Needed where ranks
  must be able to stop mid-window without leaving a peer in a collective (``auto_micro_batch``,
  :mod:`distaccum.resize`), or where the sum must not be kept in the parameters' dtype. Only wrappers whose window
  gradients live in ``param.grad`` can do it (plain, DDP); the backend says why not elsewhere.

The accumulator never asks which one it has: it opens micro-steps, runs backwards, finishes and discards windows
through this interface.
"""

from __future__ import annotations

import contextlib

import torch

from distaccum import precision
from distaccum.backends.base import Backend, Params

Context = contextlib.AbstractContextManager[None] | None


class InBackward:
    """The wrapper reduces the window in its boundary backward.

    Args:
        backend: the model's backend.
    """

    in_backward = True
    """The boundary backward reduces: at the close the gradients are reduced already (and a rank that failed before
    that backward can join the others' reduction with zeros, :meth:`Backend.join_reduction`)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def context(self, boundary: bool) -> Context:
        """The context of a micro-step's forward and backward: without sync inside the window, reducing at its end."""
        if not boundary:
            return self.backend.window_sync()
        return self.backend.boundary_sync()

    def backward(self, loss: torch.Tensor, weight: float, *, first: bool) -> None:
        """Backward of ``weight * loss`` (``first``: the window's first micro-step)."""
        self.backend.backward(loss, weight)

    def reduce_pending(self, params: Params) -> None:
        """The data ended mid-window, after a micro-step that did not reduce: reduce what was accumulated now."""
        self.backend.reduce_pending(params)

    def finish(self, params: Params, factor: float, before_reduction: float, *, skip: bool) -> float:
        """At the close: the factor the step still has to apply (all of it: the gradients are reduced already)."""
        return factor

    def discard_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the window's gradients (it will not step)."""
        self.backend.discard_grads(optimizer)

    def drop_unreduced(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this rank's local, unsynced gradients of a window that will never step (no reduction joined)."""
        optimizer.zero_grad(set_to_none=True)

    def window_grads(self, params: Params, where: str) -> list[torch.Tensor | None]:
        """Copies of this rank's gradients accumulated so far in the open window (its own, unreduced).

        Raises:
            ValueError: this wrapper accumulates in private buffers (:attr:`Backend.grads_in_params` is False).
        """
        if not self.backend.grads_in_params:
            raise ValueError(
                f"include_grads=True at {where}: {self.backend.name} keeps the gradients accumulated without sync in "
                "private buffers that cannot be saved and restored. Checkpoint at a window boundary (right after a "
                "step, when acc.micro_step_in_window == 0)."
            )
        return [None if p.grad is None else p.grad.detach().clone() for p in params]

    def check_window_grads(self, params: Params, grads: list[torch.Tensor | None]) -> None:
        """Refuse :meth:`window_grads` that this wrapper cannot take back or that do not fit ``params``.

        Raises:
            ValueError: this wrapper keeps them in private buffers, or they do not fit ``params``.
        """
        if not self.backend.grads_in_params:
            raise ValueError(
                f"the state holds mid-window gradients but this model's backend is {self.backend.name}, which keeps "
                "them in private buffers; resume it with a plain or DDP model, or from a boundary checkpoint"
            )
        shapes = [tuple(p.shape) for p in params]
        saved = [None if g is None else tuple(g.shape) for g in grads]
        if len(saved) != len(shapes) or any(s not in (None, want) for s, want in zip(saved, shapes, strict=True)):
            raise ValueError(
                f"the state's saved gradients ({len(saved)} tensors) do not fit this optimizer's {len(shapes)} "
                "parameters; load it into the same model and optimizer that saved it"
            )

    def restore_window_grads(self, params: Params, grads: list[torch.Tensor | None]) -> None:
        """Put :meth:`window_grads` back into ``param.grad``, after :meth:`check_window_grads`."""
        self.check_window_grads(params, grads)
        for param, grad in zip(params, grads, strict=True):
            param.grad = None if grad is None else grad.detach().to(param.device, param.dtype).clone()


class ByHand(InBackward):
    """Every micro-step without sync; the close reduces the window once, by hand, in a sum dtype.

    Args:
        backend: the model's backend (one that keeps window gradients in ``param.grad``).
        optimizer: the optimizer, whose parameters are read at every use.
        float32_sums: sum bf16/fp16 gradients in float32 (:class:`distaccum.precision.Fp32Sums`).
    """

    in_backward = False

    def __init__(self, backend: Backend, optimizer: torch.optim.Optimizer, *, float32_sums: bool) -> None:
        super().__init__(backend)
        self.sums = precision.Fp32Sums(optimizer) if float32_sums else None

    def context(self, boundary: bool) -> Context:
        return self.backend.window_sync()  # the boundary too: the close reduces

    def backward(self, loss: torch.Tensor, weight: float, *, first: bool) -> None:
        if self.sums is None:
            self.backend.backward(loss, weight)
            return
        if first:
            self.sums.begin_window()
        else:
            self.sums.collect_next()
        try:
            self.backend.backward(loss, weight)
        finally:
            self.sums.collecting = False

    def reduce_pending(self, params: Params) -> None:
        """Nothing before the close: :meth:`finish` reduces the window (a short one at the end of data too)."""

    def finish(self, params: Params, factor: float, before_reduction: float, *, skip: bool) -> float:
        """The window's sums (float32 ones where kept, else the gradients), times ``factor``, averaged over the ranks,
        into ``param.grad``: one reduction, one rounding. ``before_reduction``: this rank's own factor, applied before
        the reduction (``auto_micro_batch``'s first window with items). Returns the factor the step still has to apply:
        1.0, or ``factor`` when the window is skipped (its sums are dropped)."""
        if skip:  # nothing to reduce: the sums are dropped without folding the last gradients in first
            if self.sums is not None:
                self.sums.clear()
            return factor
        sums = {} if self.sums is None else self.sums.take()
        collective = self.backend.hand_reduction_is_collective
        if not collective and not sums and factor * before_reduction == 1.0:
            return 1.0  # one micro-step, one process: its gradient is already the step's, in the parameters' dtype
        owners = _owners(params, sums, every=collective)
        present = [p in sums or p.grad is not None for p in owners]
        tensors = [_window_sum(param, sums) for param in owners]
        if collective and owners:
            present = self._reduce_over_ranks(tensors, present, factor, before_reduction)
        elif factor * before_reduction != 1.0 and tensors:
            torch._foreach_mul_(tensors, factor * before_reduction)
        _into_grads(owners, tensors, present)
        return 1.0

    def _reduce_over_ranks(
        self, tensors: list[torch.Tensor], present: list[bool], factor: float, before_reduction: float
    ) -> list[bool]:
        if before_reduction != 1.0:
            torch._foreach_mul_(tensors, before_reduction)
        had = torch.tensor(present, dtype=torch.float32, device=tensors[0].device)
        self.backend.reduce_by_hand([*tensors, had], factor)
        if all(present):
            return present
        return [bool(flag) for flag in had.tolist()]  # read only where this rank lacked some gradient (a host sync)

    def discard_grads(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sums is not None:
            self.sums.clear()
        self.backend.discard_grads(optimizer)

    def drop_unreduced(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sums is not None:
            self.sums.clear()
        optimizer.zero_grad(set_to_none=True)

    def window_grads(self, params: Params, where: str) -> list[torch.Tensor | None]:
        grads = super().window_grads(params, where)
        return grads if self.sums is None else self.sums.with_sums(params, grads)

    def restore_window_grads(self, params: Params, grads: list[torch.Tensor | None]) -> None:
        super().restore_window_grads(params, grads)
        if self.sums is not None:
            self.sums.restore(params, grads)


def choose(
    backend: Backend,
    optimizer: torch.optim.Optimizer,
    *,
    accumulate_dtype: precision.AccumulateDtype,
    largest_accum_steps: int,
    auto_micro_batch: bool,
) -> InBackward:
    """The window reduction for these options on ``backend``'s wrapper.

    Raises:
        ValueError: ``accumulate_dtype`` is bad or cannot be made exact here, or an option that reduces by hand with
            a ``grad_sync`` mode that reduces in every backward.
    """
    explicit = accumulate_dtype == torch.float32  # "auto" gives way to grad_sync (with a warning) instead
    what = "auto_micro_batch=True" if auto_micro_batch else "accumulate_dtype=torch.float32" if explicit else ""
    if what and backend.syncs_in_window:
        raise ValueError(
            f"{what} reduces a window's gradients by hand, once, at its boundary, but grad_sync={backend.grad_sync!r} "
            f"reduces them in every micro-step's backward. Use grad_sync='boundary' (or None) with {what}, or leave "
            f"{what.split('=')[0]} at its default."
        )
    float32_sums = precision.wants_float32_sums(accumulate_dtype, optimizer, largest_accum_steps, backend)
    if not (float32_sums or auto_micro_batch):
        return InBackward(backend)
    return ByHand(backend, optimizer, float32_sums=float32_sums)


def _owners(params: Params, sums: dict[torch.Tensor, torch.Tensor], *, every: bool) -> Params:
    """The parameters whose window sum is reduced: with ``every`` (a collective reduction) every trainable one, as
    every rank must reduce the same tensors (zeros where a rank has no gradient; whether it had one rides along)."""
    if every:
        return [param for param in params if param.requires_grad]
    return [param for param in params if param.requires_grad and (param in sums or param.grad is not None)]


def _window_sum(param: torch.Tensor, sums: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    if param in sums:
        return sums.pop(param)
    if param.grad is not None:
        return param.grad
    return torch.zeros_like(param, dtype=precision.sum_dtype(param))


def _into_grads(owners: Params, tensors: list[torch.Tensor], present: list[bool]) -> None:
    """Each reduced sum into ``param.grad`` in the parameter's dtype (None where no rank had a gradient); each
    float32 sum is freed as it is rounded: no second full copy."""
    for index, (param, has) in enumerate(zip(owners, present, strict=True)):
        total = tensors[index]
        if not has:
            param.grad = None
        elif total.dtype != param.dtype:
            param.grad = total.to(param.dtype)
            tensors[index] = param.grad
        elif param.grad is None:
            param.grad = total
