"""The window ledger: how each micro-step's loss is scaled, and the one factor that makes the window's gradient exact.

No collectives here: the accumulator reduces :meth:`WindowLedger.local_stats` over ranks and hands the sums to
:meth:`WindowLedger.close`.

Every micro-step's loss is scaled once before its backward, and the summed gradient is corrected once at the
boundary, after the backend reduced it (the fairseq / Megatron "scale once at the boundary" scheme):

* without ``num_items``, each micro-batch loss is multiplied by ``1/accum_steps`` (free, like a hand-written
  loop). A full window then needs no correction at all; a short window (``flush`` / ``last=True``) is
  multiplied by ``accum_steps * world_size / micro_steps_seen`` so that it is the mean of the micro-batches
  it really had.
* with ``num_items=n``, the loss (a mean over ``n`` items) is multiplied by ``n / (c * accum_steps)``, where
  ``c`` is a rank-consistent estimate of items per micro-step (the global mean of the previous window; for
  the first window the mean ``n`` over ranks at the first micro-step where any rank has items, from one extra
  scalar all-reduce per run that also checks that all ranks give ``num_items`` or none do). The gradient is
  then ``sum(n_i * g_i) / (c * k * W)`` after the backend's average, and one scalar all-reduce of the window's
  item count ``N`` at the boundary gives the exact factor ``c * k * W / N``. Why this and not pre-counting the
  window: it needs no look-ahead into the data, works identically for DDP, FSDP1, FSDP2 and DeepSpeed (the
  correction is applied to reduced gradients, never to the backend's private buffers), and keeps the scaled loss
  at the magnitude of a plain ``loss / accum_steps``: an fp16 ``GradScaler`` never sees a loss times a count.

The same boundary all-reduce carries the window's loss (so the step result reports the true window loss over
all ranks), the micro-step count, and whether any rank discarded the window.

Discarded windows (``acc.discard_window()``, or a ``with acc.micro_step():`` block that raised). A window whose
gradients may hold a partial micro-batch never steps, and every rank agrees on that through the boundary
all-reduce, so ranks keep the same window position and the same collectives:

* the micro-step that raised still counts as one; the window runs on to its boundary, where the reduction
  happens as usual, and the step is skipped on every rank (``skipped_steps``, ``last_step.skipped``, loss NaN);
* if the boundary micro-step itself raised after ``acc.backward()``, this rank already joined the reduction: the
  window closes right there, skipped;
* if it raised before ``acc.backward()``, DDP joins the peers' reduction with a backward of zeros and the window
  closes with theirs (``DDPBackend.join_reduction``); one process, and DDP where it cannot join (its peers wait
  for the process group's timeout), drop it locally; FSDP and DeepSpeed refuse further micro-steps (resume);
* a failure in the boundary's own work (``on_nonfinite="raise"``, a refusal) drops the window's reduced
  gradients and resets the window, so training can go on from the next window.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distaccum.batchnorm import BatchNormWindow
from distaccum.noise import NoiseScale

Mode = Literal["items", "mean"]


@dataclass(frozen=True)
class StepResult:
    """What the last window's optimizer step did, identical on every rank."""

    step: int
    """Optimizer steps attempted so far, this one included (skipped ones too)."""
    loss: float
    """The window loss over all ranks: the global item-weighted mean with ``num_items``, else the mean of
    micro-batch losses. NaN when ``num_items`` was 0 in every micro-step of every rank, or when the window was
    discarded (both skip the step)."""
    micro_steps: int
    """Micro-steps in the window summed over ranks (``accum_steps x world_size`` unless it was short)."""
    num_items: int | None
    """Global item count of the window when ``num_items`` was given."""
    grad_norm: float | None
    """Global gradient 2-norm before clipping (None when the backend steps by itself and does not say)."""
    skipped: bool
    """True when the optimizer did not step (non-finite gradient, GradScaler overflow, zero items, a discarded
    window)."""
    noise_scale: float | None = None
    """The smoothed gradient noise scale ``B_simple`` in samples (items with ``num_items``), with
    ``Accumulator(noise_scale=decay)``: around it a bigger batch stops paying (:mod:`distaccum.noise`)."""


Scalar = float | torch.Tensor
"""A value the boundary's all-reduce carries: a float, or a 0-dim tensor still on the model's device (read once,
with the others)."""


@dataclass(frozen=True, kw_only=True)
class WindowStats:
    """What the boundary's one all-reduce sums over ranks: one rank's window (:meth:`WindowLedger.local_stats`),
    or, after the sum, every rank's (counts of ranks where a field is a rank's 0/1). Flattened to a list of scalars
    and back by :meth:`values` and :meth:`from_values` (the field order is the wire layout; both sides build it)."""

    items: Scalar
    """Items of the window (``num_items`` summed)."""
    loss_sum: Scalar
    """Loss sum of the window (item-weighted with items)."""
    micro_steps: float
    """Micro-steps the window ran."""
    item_ranks: float
    """Ranks that gave ``num_items`` in the window."""
    mean_ranks: float
    """Ranks that did not."""
    discarding_ranks: float
    """Ranks whose window was discarded (a micro-step raised, or ``discard_window()``)."""
    out_of_memory_ranks: float
    """Ranks that ran out of memory under ``auto_micro_batch``."""
    nonfinite_ranks: Scalar
    """Ranks whose part of the reduced gradient holds a NaN/inf (when checked before the all-reduce)."""
    noise: tuple[Scalar, ...] = ()
    """The noise scale's small-batch reading (:meth:`distaccum.noise.NoiseScale.local_stats`; empty when off)."""
    batch_norm: tuple[Scalar, ...] = ()
    """Exact BatchNorm's window statistics (:meth:`distaccum.batchnorm.BatchNormWindow.local_stats`)."""

    def values(self) -> list[Scalar]:
        """The fields in wire order, flattened."""
        fixed = [
            self.items,
            self.loss_sum,
            self.micro_steps,
            self.item_ranks,
            self.mean_ranks,
            self.discarding_ranks,
            self.out_of_memory_ranks,
            self.nonfinite_ranks,
        ]
        return [*fixed, *self.noise, *self.batch_norm]

    def from_values(self, summed: list[float]) -> WindowStats:
        """The record of ``summed`` (:meth:`values` of every rank's record, summed), in this record's layout."""
        if len(summed) != len(self.values()):
            raise ValueError(f"the window's stats have {len(self.values())} values, the sum has {len(summed)}")
        fixed = len(summed) - len(self.noise) - len(self.batch_norm)
        noise_end = fixed + len(self.noise)
        return WindowStats(
            items=summed[0],
            loss_sum=summed[1],
            micro_steps=summed[2],
            item_ranks=summed[3],
            mean_ranks=summed[4],
            discarding_ranks=summed[5],
            out_of_memory_ranks=summed[6],
            nonfinite_ranks=summed[7],
            noise=tuple(summed[fixed:noise_end]),
            batch_norm=tuple(summed[noise_end:]),
        )


@dataclass(frozen=True)
class WindowClose:
    """What a finished window needs: the gradient factor, and what the step result reports."""

    factor: float
    """Multiply the reduced gradient by this (1.0: nothing to do)."""
    loss: float
    """The window loss over all ranks (NaN when the window had no item)."""
    micro_steps: int
    """Micro-steps of the window summed over ranks."""
    num_items: int | None
    """Global item count, in item mode."""
    skip: bool
    """No item anywhere in the window: there is no gradient to take."""
    noise: list[float] | None = None
    """The noise-scale stats summed over ranks (:meth:`distaccum.noise.NoiseScale.local_stats`)."""
    before_reduction: float = 1.0
    """Multiply this rank's own gradients by this before they are reduced (a deferred first ``c``, below)."""
    retry: bool = False
    """Some rank ran out of memory (``auto_micro_batch``): start the window again with smaller micro-batches."""
    nonfinite: bool = False
    """Some rank found a NaN/inf in its part of the reduced gradient (when the ranks checked before the close)."""


class WindowLedger:
    """Per-window bookkeeping: position, item count, loss sum, mode; and ``c``, the items-per-micro-step estimate.

    Args:
        accum_steps: micro-steps in a full window.
        batch_norm: exact BatchNorm running statistics to pool over the window (:mod:`distaccum.batchnorm`).
    """

    def __init__(
        self,
        accum_steps: int,
        batch_norm: BatchNormWindow | None = None,
        *,
        deferred: bool = False,
        noise: NoiseScale | None = None,
    ) -> None:
        self.accum_steps = accum_steps
        self.batch_norm = batch_norm
        self.noise = noise
        self.deferred = deferred
        """No collective inside a window (``auto_micro_batch``): until ``c`` is known, each rank scales with its own
        first count and :meth:`close` makes the ranks' gradients consistent before the reduction."""
        self.item_scale: float | None = None
        """``c``: the rank-consistent items per micro-step the window's losses are scaled with (None until known)."""
        self.items_agreed = False
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.position = 0
        self.items = 0
        self.loss_sum: torch.Tensor | None = None
        """The window's loss sum (item-weighted with items), on the losses' device: no host sync."""
        self.loaded_loss = 0.0  # the loss sum of a window resumed from a state
        self.mode: Mode | None = None
        self.own_scale: float | None = None  # deferred: this rank's first count of the window
        self.discarded = False
        """A micro-step of this window raised (or discard_window() was called): it must not step."""
        self.out_of_memory = False
        """A micro-step ran out of memory under ``auto_micro_batch`` (:mod:`distaccum.resize`)."""
        if self.batch_norm is not None:
            self.batch_norm.reset()
        if self.noise is not None:
            self.noise.local_stats_reset()

    @property
    def where(self) -> str:
        """The open window's position, for messages: ``micro-step 2 of 4``."""
        return f"micro-step {self.position} of {self.accum_steps}"

    def needs_item_agreement(self, count: int | None) -> bool:
        """Whether this micro-step's backward must first agree with the other ranks on items: at the first
        backward of a run (or after a load), and while some rank gives items and ``c`` is not known yet."""
        return not self.items_agreed or (count is not None and self.item_scale is None)

    def agree_on_items(self, ranks_giving: int, items: float) -> None:
        """Take the ranks' agreement; set ``c`` from the first one that saw items (never changed mid-window:
        the window's gradients were scaled with it)."""
        self.items_agreed = True
        # None until some rank has items: a fallback of 1 would scale the rest of the first window by raw item
        # counts (fp16 overflow). Every rank computes the same value, so all repeat this in lockstep meanwhile.
        if ranks_giving and self.item_scale is None and items > 0:
            self.item_scale = items / ranks_giving

    def record(self, loss: torch.Tensor, count: int | None) -> tuple[torch.Tensor, float]:
        """Book one micro-step's loss; returns the loss to differentiate and its scale.

        Raises:
            ValueError: ``num_items`` was given in this micro-step and not in an earlier one of the window, or
                the reverse.
        """
        mode: Mode = "mean" if count is None else "items"
        if self.mode not in (None, mode):
            raise ValueError(
                f"num_items was {'not ' if count is None else ''}given in this micro-step but was "
                f"{'' if count is None else 'not '}given earlier in the window; give num_items in every "
                "micro-step or in none."
            )
        self.mode = mode
        if count is None:
            self._add(loss, 1)
            return loss, 1.0 / self.accum_steps
        if self.deferred and self.item_scale is None and self.own_scale is None and count:
            self.own_scale = float(count)
        # While no rank has seen an item yet, every rank's count is 0 and so is its scale.
        c = self.item_scale or self.own_scale
        scale = count / (c * self.accum_steps) if c else 0.0
        self.items += count
        if count:
            self._add(loss, count)
        else:
            # A mean over zero items is NaN (cross_entropy with all targets ignored); it contributes nothing,
            # but the backward must still run so that every rank joins the reduction.
            loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        return loss, scale

    def loss_total(self) -> float:
        """This rank's loss sum over the window (item-weighted with items), summed in float64."""
        return float(self._loss_sum())

    def _loss_sum(self) -> float | torch.Tensor:
        # On an accelerator the sum stays there (a 0-dim tensor) and is read with the window's other scalars.
        total = self.loss_sum
        if total is None:
            return self.loaded_loss
        return self.loaded_loss + (float(total) if total.device.type == "cpu" else total)

    def _add(self, loss: torch.Tensor, count: int) -> None:
        # One in-place add into a scalar made once per window: keeping each micro-step's loss instead (and stacking
        # them at the boundary) left small live allocations between the activations and grew a CPU process's
        # peak RSS with k (+111 MiB at k = 64 on the bench's transformer, measured).
        # Summed in the loss's dtype (fp32 for half losses): an add without a cast costs half as much per micro-step.
        if self.loss_sum is None:  # the window's first loss starts the sum: a copy, no zeros to add to
            self.loss_sum = loss.detach().to(torch.float64 if loss.dtype == torch.float64 else torch.float32, copy=True)
            if count != 1:
                self.loss_sum.mul_(count)
        elif count == 1:
            self.loss_sum.add_(loss.detach())
        else:
            self.loss_sum.add_(loss.detach(), alpha=count)

    def local_stats(self, nonfinite: Scalar = 0.0) -> WindowStats:
        """This rank's window, to be summed over ranks (:class:`WindowStats`); ``nonfinite``: nonzero where this
        rank's part of the reduced gradient is not finite (a flag on the model's device, or 0.0: not checked)."""
        return WindowStats(
            items=float(self.items),
            loss_sum=self._loss_sum(),
            micro_steps=float(self.position),
            item_ranks=float(self.mode == "items"),
            mean_ranks=float(self.mode == "mean"),
            discarding_ranks=float(self.discarded),
            out_of_memory_ranks=float(self.out_of_memory),
            nonfinite_ranks=nonfinite,
            noise=tuple(self.noise.local_stats()) if self.noise is not None else (),
            batch_norm=tuple(self.batch_norm.local_stats()) if self.batch_norm is not None else (),
        )

    def close(self, totals: WindowStats, averaged_over: int) -> WindowClose:
        """The window's factor and result from :meth:`local_stats` summed over ranks.

        Args:
            totals: the summed stats.
            averaged_over: how many ranks' gradients the backend's reduction averaged.

        Raises:
            RuntimeError: some ranks gave ``num_items`` in this window and others did not.
        """
        items = float(totals.items)
        loss_sum = float(totals.loss_sum)
        micro = totals.micro_steps
        item_ranks = totals.item_ranks
        nonfinite = float(totals.nonfinite_ranks)
        noise = [float(value) for value in totals.noise] if self.noise is not None else None
        if totals.out_of_memory_ranks:  # before any check: the window's micro-steps did not all run; it runs again
            return WindowClose(0.0, math.nan, int(micro), None, skip=True, retry=True)
        if item_ranks and totals.mean_ranks:
            raise RuntimeError(
                f"{int(item_ranks)} rank(s) gave num_items in this window and {int(totals.mean_ranks)} did not; all "
                "ranks must use acc.backward(loss, num_items=...) alike."
            )
        micro_steps = int(micro)
        if totals.discarding_ranks:  # some rank's micro-step raised: no rank steps on this window
            return WindowClose(0.0, math.nan, micro_steps, int(items) if item_ranks else None, skip=True)
        if self.batch_norm is not None:  # the forwards happened, whether or not the optimizer steps
            self.batch_norm.apply([float(value) for value in totals.batch_norm])
        if not item_ranks:
            factor = self.accum_steps * averaged_over / micro_steps
            return WindowClose(
                factor, loss_sum / micro_steps, micro_steps, None, skip=False, noise=noise, nonfinite=bool(nonfinite)
            )
        if not items:
            # No item anywhere in the window: the step is skipped on all ranks, and the mean loss over zero items
            # is NaN, as torch's own cross_entropy reports it.
            return WindowClose(0.0, math.nan, micro_steps, 0, skip=True)
        before = 1.0
        if self.item_scale is None:  # deferred: rank r scaled by its own c_r; c_r / c makes every rank's use c
            assert self.deferred, "c is set at the first micro-step where some rank had items"
            self.item_scale = items / micro_steps
            before = (self.own_scale or self.item_scale) / self.item_scale  # no own c: no items, zero gradients
        factor = self.item_scale * self.accum_steps * averaged_over / items
        # Keeps the next window's scaled losses at the size of loss / accum_steps (fp16-safe).
        self.item_scale = items / micro_steps
        return WindowClose(
            factor,
            loss_sum / items,
            micro_steps,
            int(items),
            skip=False,
            noise=noise,
            before_reduction=before,
            nonfinite=bool(nonfinite),
        )

    def result(
        self, window: WindowClose, step: int, grad_norm: float | None, skipped: bool, micro_batch_size: int
    ) -> StepResult:
        """What ``window``'s step (number ``step``, taken or ``skipped``) reports."""
        return StepResult(
            step=step,
            loss=window.loss,
            micro_steps=window.micro_steps,
            num_items=window.num_items,
            grad_norm=grad_norm,
            skipped=skipped,
            noise_scale=self._noise_after_step(window, grad_norm, micro_batch_size),
        )

    def _noise_after_step(self, window: WindowClose, grad_norm: float | None, micro_batch_size: int) -> float | None:
        """The noise scale after ``window``'s step, whose gradient norm was ``grad_norm`` (None: noise scale off)."""
        if self.noise is None or window.noise is None or grad_norm is None:
            return None if self.noise is None else self.noise.value
        big_batch = window.num_items if window.num_items is not None else window.micro_steps * micro_batch_size
        return self.noise.update(window.noise, grad_norm**2, big_batch)

    def close_locally(self) -> WindowClose:
        """Close a discarded window that this rank alone ends, without the other ranks: skipped."""
        return WindowClose(0.0, math.nan, self.position, None, skip=True)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (checkpoint format version 1 keys)."""
        return {
            "micro_step": self.position,
            "item_scale": self.item_scale,
            "window_items": self.items,
            "window_loss": self.loss_total() if self.mode is not None else None,
            "window_mode": self.mode,
            "window_discarded": self.discarded,
            "window_own_scale": self.own_scale,  # deferred mode: this rank's own first count
        }

    def load_state_dict(self, state: dict[str, Any], *, with_grads: bool) -> None:
        """Restore :meth:`state_dict`; ``with_grads``: the open window's gradients were restored too."""
        if state["micro_step"] and not with_grads:
            warnings.warn(
                f"loaded a mid-window state (micro-step {state['micro_step']} of {self.accum_steps}) without its "
                f"gradients: the window's first {state['micro_step']} micro-batches are lost. Save with "
                "acc.state_dict(include_grads=True) (distaccum.checkpoint does) for an exact resume.",
                stacklevel=3,
            )
        self.items_agreed = False  # the ranks agree again at the next backward
        self.position = int(state["micro_step"])
        self.item_scale = state["item_scale"]
        self.items = int(state["window_items"])
        loss = state["window_loss"]
        self.loss_sum = None
        self.loaded_loss = 0.0 if loss is None else float(loss)
        self.mode = state["window_mode"]
        self.discarded = bool(state.get("window_discarded", False))  # absent in format-1 checkpoints
        self.own_scale = state.get("window_own_scale")
        self.out_of_memory = False
