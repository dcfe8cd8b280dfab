"""Low-precision parameters under accumulation: a window's gradients summed in float32 (:class:`Fp32Window`).

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as torch_dist
from torch.utils.hooks import RemovableHandle

from distaccum.backends.base import Backend, Params, params_of

if TYPE_CHECKING:
    from distaccum.weighting import WindowLedger

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


def refusal(backend: Backend) -> tuple[str, str] | None:
    """Why float32 sums cannot be made exact on ``backend``'s wrapper, and the fix (None: they can)."""
    if backend.syncs_in_window:
        return (
            f"grad_sync={backend.grad_sync!r} reduces the gradients in every micro-step's backward, which adds them "
            "to the reduced sum so far in the parameters' dtype",
            "Use grad_sync='boundary' (the default) with accumulate_dtype=torch.float32",
        )
    if backend.name == "fsdp1":
        return (
            "FSDP1 keeps a window's unsynced gradients in its own flat buffers, in the parameters' dtype",
            "Use FSDP2 (fully_shard) with MixedPrecisionPolicy(reduce_dtype=torch.float32), which sums in float32",
        )
    if backend.name == "deepspeed":
        return (
            "DeepSpeed keeps a window's gradients in its own buffers",
            'Set "data_types": {"grad_accum_dtype": "fp32"} in the DeepSpeed config (ZeRO stage 2)',
        )
    if backend.name == "fsdp2":
        dtype = backend.accumulation_dtype() or "None: the parameters' dtype"
        return (
            f"FSDP2 sums a window's unsharded gradients in its reduce_dtype ({dtype})",
            "Pass fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
            "reduce_dtype=torch.float32)), which sums in float32",
        )
    if backend.name not in ("plain", "ddp"):
        return f"{backend.name} has no float32 window in distaccum", "Sum in float32 through the wrapper's own option"
    if getattr(backend.model, "static_graph", False):
        return (
            "DDP(static_graph=True) must sync its first backward through DDP's own reduction, in the parameters' "
            "dtype, before the window's float32 sums could be reduced once",
            "Pass static_graph=False (under distaccum DDP syncs once per window anyway)",
        )
    return None


class Fp32Window:
    """Float32 sums of a window's bf16/fp16 gradients, reduced over DDP ranks and rounded once at the boundary.

    In front of the backend for what touches the window's gradients (the accumulator calls ``backward``,
    ``reduce_pending``, ``discard_grads``, ``window_grads`` and ``restore_window_grads`` here instead of there); build
    it with :meth:`build`, which decides whether there is one.

    Args:
        backend: the model's backend (plain or DDP).
        optimizer: the optimizer, whose parameters are read at every use.
        window: the accumulator's window ledger (its position says where a window starts).

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

    def __init__(self, backend: Backend, optimizer: torch.optim.Optimizer, window: WindowLedger) -> None:
        self.backend = backend
        self.optimizer = optimizer
        self.window = window
        self.sums: dict[torch.Tensor, torch.Tensor] = {}
        """Per bf16/fp16 parameter: the float32 sum of its micro-gradients so far in the open window."""
        self._collecting = False
        self._absorb_due = True  # the window's first micro-gradient is in param.grad; new parameters need their hook
        self._hooks: dict[torch.Tensor, RemovableHandle] = {}
        self._reduce: Callable[[list[torch.Tensor], float], None] | None = None
        if backend.name == "ddp":
            from distaccum.backends.ddp import DDPBackend

            assert isinstance(backend, DDPBackend)
            self._reduce = backend.reduce_tensors
        weakref.finalize(self, _remove, self._hooks)  # the hooks hold no reference to the window

    @classmethod
    def build(
        cls,
        accumulate_dtype: AccumulateDtype,
        optimizer: torch.optim.Optimizer,
        accum_steps: int,
        backend: Backend,
        window: WindowLedger,
    ) -> Fp32Window | None:
        """The window for ``accumulate_dtype`` (see the module docstring), or None where the gradients are summed in
        their own dtype (then with :func:`warn_if_low`'s warning, unless ``accumulate_dtype`` is None).

        Raises:
            ValueError: ``accumulate_dtype`` is not ``"auto"``, ``torch.float32`` or None, or ``torch.float32`` on a
                wrapper where float32 sums cannot be made exact (the message names the fix).
        """
        if not (accumulate_dtype is None or accumulate_dtype == "auto" or accumulate_dtype == torch.float32):
            raise ValueError(
                f"accumulate_dtype must be torch.float32 (sum bf16/fp16 gradients in float32), None (in their own "
                f"dtype) or 'auto' (float32 where it is exact), got {accumulate_dtype!r}"
            )
        params = params_of(optimizer)
        low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad and p.dtype in LOW})
        # Reduced in every backward, the shards' sum is kept in the parameters' dtype whatever the wrapper reduces in.
        wrapper = None if backend.syncs_in_window else backend.accumulation_dtype()
        if accumulate_dtype is None or not low or wrapper == torch.float32:  # nothing to do, or the wrapper does it
            return None
        problem = refusal(backend)
        if accumulate_dtype == "auto" and (accum_steps == 1 or problem is not None):
            warn_if_low(params, accum_steps, wrapper, None if problem is None else f"Here {problem[0]}. {problem[1]}.")
            return None
        if problem is not None:
            raise ValueError(
                f"accumulate_dtype=torch.float32 sums the window's {' and '.join(low)} gradients in float32 buffers "
                f"that distaccum reduces by hand at the boundary; here {problem[0]}. {problem[1]}, or pass "
                f"accumulate_dtype=None to sum them in {' and '.join(low)}."
            )
        return cls(backend, optimizer, window)

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        """The backend's backward of ``weight * loss``; from a window's 2nd micro-step on, hooks fold into sums."""
        if self.window.position == 0:
            self.sums.clear()  # left by a window that did not step
            self._collecting = False
            self._absorb_due = True
        else:
            if self._absorb_due:  # once per window (and after a restore), not a loop over the parameters per micro-step
                self._absorb()
                self._absorb_due = False
            self._collecting = True
        try:
            self.backend.backward(loss, weight)
        finally:
            self._collecting = False

    def _absorb(self) -> None:
        # The first micro-gradient (and any that reached param.grad past the hooks) joins the sums; parameters added
        # to the optimizer since the last call get their hook.
        for param in params_of(self.optimizer):
            if param.dtype not in LOW or not param.requires_grad:
                continue
            if param not in self._hooks:
                self._hooks[param] = param.register_post_accumulate_grad_hook(
                    functools.partial(_fold, weakref.ref(self))
                )
            if param.grad is not None:
                total = self.sums.get(param)
                self.sums[param] = param.grad.float() if total is None else total.add_(param.grad)
                param.grad = None

    def finish(self, params: Params, factor: float, before_reduction: float = 1.0, *, skip: bool = False) -> float:
        """At the boundary: the sums, times ``factor``, averaged over DDP ranks, into ``param.grad`` (one rounding).

        Args:
            params: the optimizer's parameters.
            factor: the window's factor (rank-consistent), folded into the reduction.
            before_reduction: this rank's own factor, applied before the reduction (``auto_micro_batch``).
            skip: the window does not step: its sums are dropped.

        Returns:
            The factor the step still has to apply: 1.0, or ``factor`` when the window is skipped.
        """
        if skip:
            self.sums.clear()
            return factor
        if self._reduce is None and not self.sums and factor * before_reduction == 1.0:
            return 1.0  # one micro-step, one process: its gradient is already the step's, in the parameters' dtype
        self._absorb()
        sums, self.sums = self.sums, {}
        ddp = self._reduce is not None
        owners = [p for p in params if p.requires_grad and (ddp or p in sums or p.grad is not None)]
        # Float32 sums; other dtypes' gradients in place; zeros where a DDP rank has none (every rank reduces alike).
        present = [p in sums or p.grad is not None for p in owners]
        tensors = [
            sums.pop(p) if p in sums else p.grad if p.grad is not None else torch.zeros_like(p, dtype=_sum_dtype(p))
            for p in owners
        ]
        if self._reduce is not None and owners:
            if before_reduction != 1.0:
                torch._foreach_mul_(tensors, before_reduction)
            # Whether each parameter had a gradient on some rank, summed in the same all-reduce.
            had = torch.tensor(present, dtype=torch.float32, device=owners[0].device)
            self._reduce([*tensors, had], factor)
            if not all(present):  # read only where this rank lacked some gradient (a host sync)
                present = [bool(flag) for flag in had.tolist()]
            _broadcast_buffers(self.backend)
        elif factor * before_reduction != 1.0 and tensors:
            torch._foreach_mul_(tensors, factor * before_reduction)
        for index, (param, has) in enumerate(zip(owners, present, strict=True)):
            total = tensors[index]
            if not has:
                param.grad = None
            elif total.dtype != param.dtype:
                param.grad = total.to(param.dtype)
                tensors[index] = param.grad  # the float32 sum is freed as it is rounded: no second full copy
            elif param.grad is None:
                param.grad = total
        return 1.0

    def reduce_pending(self, params: Params) -> None:
        """Nothing before the step: :meth:`finish` reduces the window (end of data mid-window too)."""

    def discard_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the window's sums and the backend's gradients."""
        self.sums.clear()
        self.backend.discard_grads(optimizer)

    def window_grads(self, params: Params, where: str) -> list[torch.Tensor | None]:
        """The backend's copies of the open window's gradients, with the float32 sums in place of bf16/fp16 ones."""
        grads = self.backend.window_grads(params, where)
        for index, param in enumerate(params):
            total = self.sums.get(param)
            if total is not None:
                grad = grads[index]
                grads[index] = total.clone() if grad is None else total + grad
        return grads

    def restore_window_grads(self, params: Params, grads: list[torch.Tensor | None]) -> None:
        """The backend's restore (which checks that they fit), then saved float32 sums back into the sums."""
        self.sums.clear()
        self._absorb_due = True
        self.backend.restore_window_grads(params, grads)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None and param.dtype in LOW and param.grad is not None:
                self.sums[param] = grad.detach().to(param.device, torch.float32, copy=True)
                param.grad = None

    @property
    def nbytes(self) -> int:
        """Bytes the float32 sums hold now."""
        return sum(total.numel() * total.element_size() for total in self.sums.values())


def _fold(window_ref: weakref.ref[Fp32Window], param: torch.Tensor) -> None:
    """The post-accumulate-grad hook: this backward's gradient of ``param`` into its float32 sum."""
    window = window_ref()
    if window is None or not window._collecting or param.grad is None:
        return
    total = window.sums.get(param)
    window.sums[param] = param.grad.float() if total is None else total.add_(param.grad)
    param.grad = None


def _sum_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in LOW else param.dtype


def _remove(hooks: dict[torch.Tensor, RemovableHandle]) -> None:
    for handle in hooks.values():
        handle.remove()


def _broadcast_buffers(backend: Backend) -> None:
    """DDP's buffer sync from rank 0 (``broadcast_buffers``), which no forward made in a window without sync."""
    model = backend.model
    buffers = list(getattr(model, "modules_buffers", ())) if getattr(model, "broadcast_buffers", False) else []
    if not buffers:
        return
    from distaccum.backends.ddp import buckets

    group = getattr(model, "process_group", None)
    for bucket in buckets(buffers, int(getattr(model, "bucket_bytes_cap", 25 * 2**20))):
        flat = torch._utils._flatten_dense_tensors(bucket)
        torch_dist.broadcast(flat, src=0 if group is None else torch_dist.get_global_rank(group, 0), group=group)
        for buffer, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
            buffer.copy_(synced)
