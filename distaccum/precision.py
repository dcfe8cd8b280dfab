"""Low-precision parameters under accumulation: a window's gradients summed in float32 (:class:`Fp32Sums`, reduced by
:class:`distaccum.reduction.ByHand`).

With ``model.to(torch.bfloat16)`` every ``.grad`` is bf16, and autograd adds each micro-step's gradient into it:
a bf16 sum, whose rounding grows with ``accum_steps``. Megatron (``main_grad``) and DeepSpeed (``grad_accum_dtype``)
sum in float32 for this reason, and so does FSDP2 with ``MixedPrecisionPolicy(reduce_dtype=torch.float32)``.
``Accumulator(..., accumulate_dtype=torch.float32)`` does it for a plain module and for DDP:

* the window's first micro-gradient stays in ``param.grad`` (a window of one micro-step is untouched, and the
  noise scale reads it as before); before the second backward it moves into a float32 sum per parameter, and from
  then on a post-accumulate-grad hook on each bf16/fp16 parameter adds its gradient into that sum as soon as
  autograd has it and drops ``param.grad``, so only one parameter's bf16 gradient is alive at a time;
* under DDP every micro-step runs under ``no_sync``, the boundary's too (as ``auto_micro_batch`` does), and the
  boundary all-reduces the float32 sums (and the other dtypes' gradients) by hand, in buckets of DDP's
  ``bucket_cap_mb``, with the window's factor folded into the division by the world size. Whether a parameter had
  a gradient rides in the same all-reduce, so one unused on every rank keeps ``grad`` None, as under DDP. DDP
  broadcasts its buffers (BatchNorm statistics) from rank 0 at the first forward after a synced one; nothing syncs
  here, so the boundary broadcasts them, for the same effect;
* then ``param.grad = sum.to(param.dtype)``: one rounding per step, and the optimizer step goes on as usual
  (non-finite check, clipping, GradScaler), on gradients in the parameters' dtype.

Measured (``examples/precision.py``; the figures are in ``examples/precision.txt``): an MLP 512-512-1 in bf16,
relative error of the step's gradient against the real batch in float64, 1 process and DDP x2. The bf16 sum drifts
with k (~5x the floor at k = 256); the float32 sum stays within 1.1x of it. Memory: 4 bytes per bf16/fp16 parameter
element for the sums, from the window's second micro-step to its boundary, where the bf16 ``.grad`` (2 bytes) would
have been: +2 bytes per element (measured: 1,052,676 bytes of sums against 526,338 of bf16 gradients); each sum is
freed as it is rounded. Hooks rather than one ``_foreach_add_`` after each backward, which would keep a whole bf16
gradient next to the sums at the backward's end (+4 bytes per element) for no gain in time (3.0-3.4 against 2.6-3.1
ms per micro-step, bf16 MLP of 4 layers 512-512, CPU). Time: one pass over those gradients per micro-step, +0-25% per
micro-step in the example on this CPU (micro-batches of 4: little compute to hide it in); under DDP the boundary
sends float32 (2x the bytes of bf16, once per window) after the last backward instead of overlapped with it.

Default ``"auto"``: float32 sums when some optimizer parameter is bf16/fp16, a window has more than one micro-step
and the wrapper allows it exactly (plain, DDP without ``static_graph``), because the error of the bf16 sum grows
with ``accum_steps`` and the float32 sum's does not, for 2 bytes per element; elsewhere the gradients are summed in
low precision with one warning that names the fix. Explicit ``torch.float32`` refuses what it cannot make exact:
FSDP1 and DeepSpeed keep the window's gradients in their own buffers (FSDP2 with
``MixedPrecisionPolicy(reduce_dtype=torch.float32)`` and DeepSpeed's ``grad_accum_dtype`` sum in float32
themselves; FSDP2 with that policy needs nothing from here and gets nothing), and ``DDP(static_graph=True)`` must
sync its first backward through DDP's own low-precision reduction.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Literal

import torch
from torch.utils.hooks import RemovableHandle

from distaccum.backends.base import Backend, Params, params_of

LOW = (torch.bfloat16, torch.float16)
AccumulateDtype = torch.dtype | Literal["auto"] | None


def warn_if_low(params: Params, accum_steps: int, wrapper_dtype: torch.dtype | None, fix: str | None = None) -> None:
    """Warn once (per accumulator) when gradients of ``params`` would be summed over a window in bf16/fp16."""
    if accum_steps == 1 or (wrapper_dtype is not None and wrapper_dtype not in LOW):
        return
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad and p.dtype in LOW})
    if low:
        warnings.warn(
            f"parameters in {' and '.join(low)}: their gradients are summed over the {accum_steps} micro-steps of a "
            f"window in {' and '.join(low)}, and the rounding grows with accum_steps (measured: 1.0e-2 at k=64 against "
            "4.4e-3 summed in float32, examples/precision.txt). "
            + (
                fix
                or "Pass accumulate_dtype=torch.float32 (plain, DDP), keep float32 parameters and run the forward "
                "under torch.autocast, or with FSDP2 use MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                "reduce_dtype=torch.float32)."
            ),
            stacklevel=3,
        )


def check_accumulate_dtype(accumulate_dtype: object) -> None:
    """Refuse an ``accumulate_dtype`` other than ``"auto"``, ``torch.float32`` or None.

    Raises:
        ValueError: it is another value.
    """
    if not (accumulate_dtype is None or accumulate_dtype == "auto" or accumulate_dtype == torch.float32):
        raise ValueError(
            f"accumulate_dtype must be torch.float32 (sum bf16/fp16 gradients in float32), None (in their own "
            f"dtype) or 'auto' (float32 where it is exact), got {accumulate_dtype!r}"
        )


def wants_float32_sums(
    accumulate_dtype: AccumulateDtype, optimizer: torch.optim.Optimizer, accum_steps: int, backend: Backend
) -> bool:
    """Whether the window's bf16/fp16 gradients are summed in float32 by distaccum (see the module docstring);
    where they are summed in their own dtype, with :func:`warn_if_low`'s warning, unless ``accumulate_dtype`` is
    None.

    Raises:
        ValueError: ``accumulate_dtype`` is not ``"auto"``, ``torch.float32`` or None, or ``torch.float32`` on a
            wrapper where float32 sums cannot be made exact (the message names the fix).
    """
    check_accumulate_dtype(accumulate_dtype)
    params = params_of(optimizer)
    low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad and p.dtype in LOW})
    # Reduced in every backward, the shards' sum is kept in the parameters' dtype whatever the wrapper reduces in.
    wrapper = None if backend.syncs_in_window else backend.accumulation_dtype()
    if accumulate_dtype is None or not low or wrapper == torch.float32:  # nothing to do, or the wrapper does it
        return False
    problem = backend.float32_sums_refusal()
    if accumulate_dtype == "auto" and (accum_steps == 1 or problem is not None):
        warn_if_low(params, accum_steps, wrapper, None if problem is None else f"Here {problem[0]}. {problem[1]}.")
        return False
    if problem is not None:
        raise ValueError(
            f"accumulate_dtype=torch.float32 sums the window's {' and '.join(low)} gradients in float32 buffers "
            f"that distaccum reduces by hand at the boundary; here {problem[0]}. {problem[1]}, or pass "
            f"accumulate_dtype=None to sum them in {' and '.join(low)}."
        )
    return True


class Fp32Sums:
    """Float32 sums of a window's bf16/fp16 micro-gradients, one per parameter, folded in by hooks as autograd
    produces each gradient. :class:`distaccum.reduction.ByHand` reduces and rounds them at the boundary.

    Args:
        optimizer: the optimizer, whose parameters are read at every use (a group added later gets its hooks).

    Example:
        >>> from distaccum import Accumulator, BatchPlan
        >>> model = torch.nn.Linear(4, 1).to(torch.bfloat16)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> acc = Accumulator(model, optimizer, BatchPlan(accum_steps=8, micro_batch_size=2))  # "auto": float32
        >>> for x in torch.randn(3, 2, 4, dtype=torch.bfloat16):
        ...     with acc.micro_step():
        ...         acc.backward(model(x).square().mean())
        >>> [grad.dtype for grad in acc.state_dict(include_grads=True)["grads"]]  # the window's sums so far
        [torch.float32, torch.float32]
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.sums: dict[torch.Tensor, torch.Tensor] = {}
        """Per bf16/fp16 parameter: the float32 sum of its micro-gradients so far in the open window."""
        self.collecting = False
        """A backward is running whose gradients the hooks fold into the sums."""
        self._absorb_due = True  # the window's first micro-gradient is in param.grad; new parameters need their hook
        self._hooks: dict[torch.Tensor, RemovableHandle] = {}
        weakref.finalize(self, _remove, self._hooks)  # the hooks hold no reference to the sums

    def clear(self) -> None:
        """Drop the window's sums (it will not step)."""
        self.sums.clear()

    def begin_window(self) -> None:
        """The window's first micro-step: its gradient stays in ``param.grad`` (a window of one is untouched)."""
        self.clear()  # left by a window that did not step
        self.collecting = False
        self._absorb_due = True

    def collect_next(self) -> None:
        """Before a later micro-step's backward: fold what is in ``param.grad`` once, then let the hooks collect."""
        if self._absorb_due:  # once per window (and after a restore), not a loop over the parameters per micro-step
            self.absorb()
            self._absorb_due = False
        self.collecting = True

    def absorb(self) -> None:
        """The first micro-gradient (and any that reached ``param.grad`` past the hooks) joins the sums; parameters
        added to the optimizer since the last call get their hook."""
        for param in params_of(self.optimizer):
            if param.dtype not in LOW or not param.requires_grad:
                continue
            if param not in self._hooks:
                self._hooks[param] = param.register_post_accumulate_grad_hook(
                    functools.partial(_fold, weakref.ref(self))
                )
            if param.grad is not None:
                self.fold(param)

    def fold(self, param: torch.Tensor) -> None:
        """``param.grad`` into its float32 sum; ``param.grad`` dropped."""
        assert param.grad is not None
        total = self.sums.get(param)
        self.sums[param] = param.grad.float() if total is None else total.add_(param.grad)
        param.grad = None

    def take(self) -> dict[torch.Tensor, torch.Tensor]:
        """The window's sums, every gradient absorbed; the sums start empty again."""
        self.absorb()
        sums = self.sums
        self.sums = {}
        return sums

    def with_sums(self, params: Params, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``grads`` (copies of ``param.grad``) with the float32 sums in place of bf16/fp16 ones."""
        for index, param in enumerate(params):
            total = self.sums.get(param)
            if total is not None:
                grad = grads[index]
                grads[index] = total.clone() if grad is None else total + grad
        return grads

    def restore(self, params: Params, grads: list[torch.Tensor | None]) -> None:
        """After the gradients were put back into ``param.grad``: saved float32 sums back into the sums."""
        self.sums.clear()
        self._absorb_due = True
        for param, grad in zip(params, grads, strict=True):
            if grad is not None and param.dtype in LOW and param.grad is not None:
                self.sums[param] = grad.detach().to(param.device, torch.float32, copy=True)
                param.grad = None

    @property
    def nbytes(self) -> int:
        """Bytes the float32 sums hold now."""
        return sum(total.numel() * total.element_size() for total in self.sums.values())


def _fold(sums_ref: weakref.ref[Fp32Sums], param: torch.Tensor) -> None:
    """The post-accumulate-grad hook: this backward's gradient of ``param`` into its float32 sum."""
    sums = sums_ref()
    if sums is None or not sums.collecting or param.grad is None:
        return
    sums.fold(param)


def sum_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype a window's gradient of ``param`` is summed in by hand."""
    return torch.float32 if param.dtype in LOW else param.dtype


def _remove(hooks: dict[torch.Tensor, RemovableHandle]) -> None:
    for handle in hooks.values():
        handle.remove()
