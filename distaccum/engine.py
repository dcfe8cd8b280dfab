"""The accumulation engine: micro-step counter, boundary rule, exact loss weighting and the optimizer step.

How the gradient of a window is made exact. Every micro-step's loss is scaled once before its backward, and
the summed gradient is corrected once at the boundary, after the backend reduced it (the fairseq / Megatron
"scale once at the boundary" scheme):

* without ``num_items``, each micro-batch loss is multiplied by ``1/accum_steps`` (free, like a hand-written
  loop). A full window then needs no correction at all; a short window (``flush`` / ``last=True``) is
  multiplied by ``accum_steps * world_size / micro_steps_seen`` so that it is the mean of the micro-batches
  it really had.
* with ``num_items=n``, the loss (a mean over ``n`` items) is multiplied by ``n / (c * accum_steps)``, where
  ``c`` is a rank-consistent estimate of items per micro-step (the global mean of the previous window; for
  the first window the mean ``n`` over ranks at the first micro-step where any rank has items, from one extra
  scalar all-reduce per run that also checks that all ranks give ``num_items`` or none do). The gradient is
  then ``sum(n_i * g_i) / (c * k * W)`` after the backend's average, and one scalar all-reduce of the
  window's item count ``N`` at the boundary gives the exact factor ``c * k * W / N``. Why this and not
  pre-counting the window: it needs no look-ahead into the data, works identically for DDP, FSDP1, FSDP2 and
  DeepSpeed (the correction is applied to reduced gradients, never to the backend's private buffers), and
  keeps the scaled loss at the magnitude of a plain ``loss / accum_steps``, so an fp16 ``GradScaler`` never
  sees a loss multiplied by a token count.

The same scalar all-reduce carries the window's loss (so :attr:`Accumulator.last_step` reports the true
window loss over all ranks), the micro-step count and a cheap check that all ranks are at the same step.

Faults. Uneven data across ranks: :meth:`Accumulator.iterate` agrees once per window (one scalar all-reduce)
on how many micro-batches every rank still has; the window where the first rank runs out is cut to that
number on all ranks and steps as the exact mean of what they trained on (or is dropped, ``drop_last=True``).
Exact resume: :meth:`Accumulator.state_dict` with ``include_grads=True`` keeps an unfinished window's
gradients (plain and DDP models, where they live in ``param.grad``); a boundary state loads into a job of
another world size with the same global and micro batch (elastic restart).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import dist, integrations
from distaccum.plan import BatchPlan
from distaccum.sync import GradSync, select_sync

T = TypeVar("T")

_FINGERPRINT = ("global_batch_size", "micro_batch_size", "accum_steps", "world_size", "micro_step", "step")


@dataclass(frozen=True)
class StepResult:
    """What the last window's optimizer step did, identical on every rank."""

    step: int
    """Optimizer steps attempted so far, this one included (skipped ones too)."""
    loss: float
    """The window loss over all ranks: the global item-weighted mean with ``num_items``, else the mean of
    micro-batch losses. NaN when ``num_items`` was 0 in every micro-step of every rank (the step is skipped)."""
    micro_steps: int
    """Micro-steps in the window summed over ranks (``accum_steps x world_size`` unless it was short)."""
    num_items: int | None
    """Global item count of the window when ``num_items`` was given."""
    grad_norm: float | None
    """Global gradient 2-norm before clipping (None when the backend steps by itself and does not say)."""
    skipped: bool
    """True when the optimizer did not step (non-finite gradient, GradScaler overflow, zero items)."""


def _item_count(num_items: int | torch.Tensor) -> int:
    count = int(num_items.item()) if isinstance(num_items, torch.Tensor) else int(num_items)
    if count < 0 or count != num_items:
        raise ValueError(f"num_items must be a non-negative integer, got {num_items!r}")
    return count


class Accumulator:
    """Gradient accumulation over ``plan.accum_steps`` micro-batches per optimizer step, on any backend.

    Args:
        model: the model the loss comes from: a plain module (one process), ``DistributedDataParallel``,
            FSDP1, an FSDP2 ``fully_shard`` module, or a DeepSpeed engine.
        optimizer: the optimizer over ``model``'s parameters.
        plan: the batch plan; its ``world_size`` must equal the live one.
        scheduler: stepped once per optimizer step that really happened.
        max_grad_norm: clip the window's global gradient norm to this (None: no clipping).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16; unscaled and updated once per step.
        on_nonfinite: ``"skip"`` the step on all ranks when the gradient is NaN/inf (counted in
            :attr:`skipped_steps`), or ``"raise"`` ``FloatingPointError``.
        check_ranks: at the first micro-step, check that all ranks agree on the plan and their position.

    Raises:
        ValueError: bad argument, a plan made for another world size, or an unwrapped model on several ranks.

    Example:
        >>> model = nn.Linear(4, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> acc = Accumulator(model, optimizer, BatchPlan(global_batch_size=8, micro_batch_size=4))
        >>> for x in torch.randn(4, 4, 4):
        ...     with acc.micro_step():
        ...         acc.backward(model(x).square().mean())
        >>> acc.optimizer_steps
        2
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: BatchPlan,
        *,
        scheduler: Any | None = None,
        max_grad_norm: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        on_nonfinite: Literal["skip", "raise"] = "skip",
        check_ranks: bool = True,
    ) -> None:
        if not isinstance(plan, BatchPlan):
            raise TypeError(f"plan must be a distaccum.BatchPlan, got {type(plan).__name__}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, int | float) and max_grad_norm > 0):
            raise ValueError(
                f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}; pass e.g. 1.0, "
                "or None to disable clipping"
            )
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        live = dist.world_size()
        if plan.world_size != live:
            raise ValueError(
                f"plan.world_size is {plan.world_size} but this job runs {live} rank(s): the global batch would "
                f"be wrong. Re-plan for the live world size: plan = plan.for_world_size({live})"
            )
        # A library's wrapped optimizer/scheduler (accelerator.prepare) is driven through what it wraps, so that
        # accumulation, loss scaling and scheduling happen once (distaccum.integrations).
        optimizer, scheduler, grad_scaler = integrations.adapt(optimizer, scheduler, grad_scaler)
        self.model = model
        self.optimizer = optimizer
        self.plan = plan
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.grad_scaler = grad_scaler
        self.on_nonfinite = on_nonfinite
        self.check_ranks = check_ranks
        self._sync: GradSync = select_sync(model, live)
        if self._sync.owns_step and grad_scaler is not None:
            raise ValueError(
                f"grad_scaler is set, but {self._sync.name} scales fp16 losses by itself: scaling twice corrupts "
                "gradients. Remove grad_scaler and configure fp16 in the engine's config."
            )
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_step: StepResult | None = None
        """Result of the most recent optimizer step (None before the first)."""
        self.stepped = False
        """True when the most recent micro-step ended a window (an optimizer step was attempted)."""
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._item_scale: float | None = None
        self._in_micro_step = False
        self._agreed = False
        self._items_agreed = False
        self._end_of_data = False  # set by iterate(): the next micro-step is the last one of the data
        self._micro_steps_run = 0
        self.dropped_micro_batches = 0
        """Micro-batches of this rank that :meth:`iterate` did not train on (see there)."""
        self._reset_window()

    # ----------------------------------------------------------------------------------------- window state
    def _reset_window(self) -> None:
        self._pos = 0
        self._boundary_now = False
        self._backward_done = False
        self._window_items = 0
        self._window_loss: torch.Tensor | None = None
        self._window_mode: Literal["items", "mean"] | None = None

    @property
    def micro_step_in_window(self) -> int:
        """Micro-steps already taken in the open window (0 right after a step)."""
        return self._pos

    @property
    def is_boundary(self) -> bool:
        """Inside ``micro_step``: whether it ends the window. Outside: whether the next one will."""
        if self._in_micro_step:
            return self._boundary_now
        return self._pos + 1 >= self.plan.accum_steps

    @property
    def backend(self) -> str:
        """Name of the gradient-sync backend chosen for the model (``plain``, ``ddp``, ``fsdp1``...)."""
        return self._sync.name

    # -------------------------------------------------------------------------------------------- micro-step
    @contextlib.contextmanager
    def micro_step(self, *, last: bool = False) -> Iterator[Accumulator]:
        """Run one forward and backward inside; gradient sync is skipped unless this micro-step ends the window.

        Leaving the boundary micro-step runs, once: scaler unscale, clip, optimizer step, scaler update,
        scheduler step, zero_grad.

        Args:
            last: the data ends here; make this micro-step the boundary of a (possibly short) window. All ranks
                must pass it together.

        Raises:
            RuntimeError: nested ``micro_step``, or the block ended without :meth:`backward`.
        """
        if self._in_micro_step:
            raise RuntimeError(
                "acc.micro_step() is already active: micro-steps do not nest. Close the first `with` block "
                "before opening the next (one micro-batch per micro_step)."
            )
        if self.check_ranks and not self._agreed:
            self._check_agreement()
        boundary = last or self._end_of_data or self._pos + 1 >= self.plan.accum_steps
        self._end_of_data = False
        self._micro_steps_run += 1
        self._in_micro_step = True
        self._boundary_now = boundary
        self._backward_done = False
        self.stepped = False
        try:
            with contextlib.nullcontext() if boundary else self._sync.no_sync():
                yield self
            if not self._backward_done:
                raise RuntimeError(
                    "acc.micro_step() ended without acc.backward(loss): every micro-step must run exactly one "
                    "backward so that all ranks take part in the gradient reduction. Call acc.backward(loss) "
                    "inside the `with` block."
                )
        finally:
            self._in_micro_step = False
        self._pos += 1
        if boundary:
            self._finish_window()

    def backward(self, loss: torch.Tensor, *, num_items: int | torch.Tensor | None = None) -> None:
        """Backward of ``loss`` scaled once for the window (and by the GradScaler, if any).

        Args:
            loss: scalar loss of this micro-batch, a mean over its samples (or over ``num_items`` items).
            num_items: how many items (tokens not ignored, samples, pixels) ``loss`` averages over. When given,
                the step's gradient is the sum of all item losses of the window over all ranks divided by the
                global item count: ragged batches are weighted exactly. Zero is allowed (the loss is ignored,
                also when it is NaN); its backward must still be finite, as that of ``F.cross_entropy`` with every
                target ``ignore_index`` is (0 * NaN is NaN: divide a hand-made sum by ``count.clamp_min(1)``).

        Raises:
            RuntimeError: called outside ``micro_step`` or twice in one micro-step.
            ValueError: ``loss`` is not a scalar, ``num_items`` is negative, or some micro-steps of a window give
                ``num_items`` and others don't.
        """
        if not self._in_micro_step:
            raise RuntimeError(
                "acc.backward() was called outside `with acc.micro_step():`; the accumulator could not decide "
                "whether to sync gradients. Put the forward and acc.backward(loss) inside the `with` block."
            )
        if self._backward_done:
            raise RuntimeError(
                "acc.backward() was called twice in one micro-step; add the losses and call it once "
                "(acc.backward(loss_a + loss_b))."
            )
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}; reduce it (.mean())")
        mode: Literal["items", "mean"] = "mean" if num_items is None else "items"
        if self._window_mode not in (None, mode):
            raise ValueError(
                f"num_items was {'not ' if num_items is None else ''}given in this micro-step but was "
                f"{'' if num_items is None else 'not '}given earlier in the window; give num_items in every "
                "micro-step or in none."
            )
        self._window_mode = mode
        count = None if num_items is None else _item_count(num_items)
        if not self._items_agreed or (count is not None and self._item_scale is None):
            self._agree_on_items(count)
        detached = loss.detach().to(torch.float64)
        if count is None:
            scale = 1.0 / self.plan.accum_steps
        else:
            # While no rank has seen an item yet, every rank's count is 0 and so is its scale.
            scale = count / (self._item_scale * self.plan.accum_steps) if self._item_scale else 0.0
            self._window_items += count
            if count == 0:
                # A mean over zero items is NaN (cross_entropy with all targets ignored); it contributes nothing,
                # but the backward must still run so that every rank joins the reduction.
                loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
                detached = torch.zeros_like(detached)
            detached = detached * count
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        scaled = loss * scale
        if self.grad_scaler is not None:
            scaled = self.grad_scaler.scale(scaled)
        self._sync.backward(scaled)
        self._backward_done = True

    def flush(self) -> StepResult | None:
        """Step a short last window at the end of data, normalized by what it really had.

        Collective: every rank must call it (ranks with nothing pending too). Returns the step's result, or
        None when no rank had a pending micro-step.
        """
        if self._in_micro_step:
            raise RuntimeError("acc.flush() was called inside `with acc.micro_step():`; call it after the loop")
        pending = self._pos
        if self._distributed:
            counts = torch.tensor([float(pending)], dtype=torch.float64, device=self._comm_device)
            torch_dist.all_reduce(counts)
            pending = int(counts.item())
        if pending == 0:
            return None
        self._sync.reduce_pending(self._params)
        self._finish_window()
        return self.last_step

    def iterate(self, micro_batches: Iterable[T], *, drop_last: bool = False) -> Iterator[T]:
        """Yield this rank's micro-batches so that ranks whose data ends at different points never hang.

        Run each yielded micro-batch inside ``with acc.micro_step():``. At each window's start every rank takes
        the micro-batches the window still needs from its iterator (one window of look-ahead) and one scalar
        all-reduce tells all ranks the smallest count. While every rank has a full window, nothing changes.
        In the window where the first rank runs out, every rank trains on that smallest number ``m`` of
        micro-batches, the ``m``-th ends the window (as ``micro_step(last=True)``) and the step is the exact
        mean over the ``m x world_size`` micro-batches, as a real batch of those samples. Longer ranks' surplus
        micro-batches of that window are not trained on (counted in :attr:`dropped_micro_batches`) and their
        iterators are not read further. With ``drop_last=True`` a short last window is not stepped at all (its
        micro-batches are counted as dropped), so every optimizer step sees exactly ``global_batch_size``
        samples. Uneven ranks are a data problem to fix upstream (e.g. ``DistributedSampler``); this makes its
        cost a few dropped micro-batches instead of a hang.

        Args:
            micro_batches: this rank's micro-batches (a ``DataLoader``, a generator...).
            drop_last: skip a short last window instead of stepping it.

        Yields:
            The micro-batches to train on, in order.

        Raises:
            RuntimeError: a yielded micro-batch was not run in exactly one ``acc.micro_step()``.

        Example:
            >>> model = nn.Linear(4, 1)
            >>> acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
            ...                   BatchPlan(global_batch_size=8, micro_batch_size=4))
            >>> for x in acc.iterate(torch.randn(3, 4, 4)):  # 3 micro-batches: one full window and one short
            ...     with acc.micro_step():
            ...         acc.backward(model(x).square().mean())
            >>> acc.optimizer_steps, acc.last_step.micro_steps
            (2, 1)
        """
        if self.check_ranks and not self._agreed:
            self._check_agreement()  # before the first count all-reduce: a plan mismatch names itself
        source = iter(micro_batches)
        while True:
            need = self.plan.accum_steps - self._pos
            window = list(itertools.islice(source, need))
            common = self._min_over_ranks(len(window))
            self.dropped_micro_batches += len(window) - common
            if common < need and (drop_last or common == 0):
                if drop_last:
                    self.dropped_micro_batches += common
                    self._drop_pending_window()
                elif self._pos:  # resumed mid-window and the data ends right there
                    self.flush()
                return
            for index, batch in enumerate(window[:common]):
                expected = self._micro_steps_run + 1
                self._end_of_data = common < need and index == common - 1
                try:
                    yield batch
                except GeneratorExit:  # the loop was left early: the flag must not end some later window
                    self._end_of_data = False
                    raise
                if self._micro_steps_run != expected or self._in_micro_step:
                    raise RuntimeError(
                        "acc.iterate() yields one micro-batch per acc.micro_step(): run each one inside "
                        f"`with acc.micro_step():` (this one ran {self._micro_steps_run - expected + 1})"
                    )
            if common < need:
                return

    def _min_over_ranks(self, count: int) -> int:
        if not self._distributed:
            return count
        smallest = torch.tensor([float(count)], dtype=torch.float64, device=self._comm_device)
        torch_dist.all_reduce(smallest, op=torch_dist.ReduceOp.MIN)
        return int(smallest.item())

    def _drop_pending_window(self) -> None:
        # Unsynced local gradients of a window that will never step; no collective needed to discard them.
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_window()

    # -------------------------------------------------------------------------------------------- boundary
    @property
    def _distributed(self) -> bool:
        return dist.is_initialized() and self.plan.world_size > 1

    @property
    def _comm_device(self) -> torch.device:
        if torch_dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _agree_on_items(self, count: int | None) -> None:
        """First backward of a run: ranks agree on giving ``num_items`` and on the first items-per-micro-step
        estimate ``c``, with one scalar all-reduce, so that a rank without ``num_items`` fails here, on every
        rank, instead of mismatching collectives later."""
        local = [float(count is not None), float(count or 0)]
        if self._distributed:
            reduced = torch.tensor(local, dtype=torch.float64, device=self._comm_device)
            torch_dist.all_reduce(reduced)
            local = reduced.tolist()
        giving, items = int(local[0]), local[1]
        world = self.plan.world_size if self._distributed else 1
        if 0 < giving < world:
            raise RuntimeError(
                f"{giving} of {world} ranks gave num_items to acc.backward() and the others did not (this rank "
                f"{'did' if count is not None else 'did not'}); every rank must call acc.backward(loss, "
                "num_items=...) alike."
            )
        self._items_agreed = True
        # None until some rank has items: a fallback of 1 would scale the rest of the first window by raw item
        # counts (fp16 overflow). Every rank computes the same value, so all repeat this in lockstep meanwhile.
        # Never changed mid-window: the gradients accumulated so far were scaled with it.
        if giving and self._item_scale is None and items > 0:
            self._item_scale = items / giving

    def _window_stats(self) -> tuple[float, float, int, bool]:
        """(items, loss sum, micro-steps, item mode) over all ranks; checks the ranks agree on the step."""
        loss_sum = 0.0 if self._window_loss is None else float(self._window_loss)
        local = [
            float(self._window_items),
            loss_sum,
            float(self._pos),
            float(self._window_mode == "items"),
            float(self._window_mode == "mean"),
            float(self.optimizer_steps),
            float(self.optimizer_steps) ** 2,
        ]
        if not self._distributed:
            return local[0], local[1], int(local[2]), self._window_mode == "items"
        stats = torch.tensor(local, dtype=torch.float64, device=self._comm_device)
        torch_dist.all_reduce(stats)
        items, loss_sum, micro, item_ranks, mean_ranks, steps, steps_sq = stats.tolist()
        world = self.plan.world_size
        if steps * steps != world * steps_sq:
            raise RuntimeError(
                f"ranks disagree on the optimizer step at a window boundary (this rank: {self.optimizer_steps}, "
                f"mean over ranks: {steps / world:g}); some rank skipped or repeated micro-steps. Every rank "
                "must run the same number of micro-steps per window."
            )
        if item_ranks and mean_ranks:
            raise RuntimeError(
                f"{int(item_ranks)} rank(s) gave num_items in this window and {int(mean_ranks)} did not; all "
                "ranks must use acc.backward(loss, num_items=...) alike."
            )
        return items, loss_sum, int(micro), item_ranks > 0

    def _finish_window(self) -> None:
        items, loss_sum, micro, item_mode = self._window_stats()
        averaged_over = self._sync.averaging_ranks
        skipped = False
        if item_mode:
            # No item anywhere in the window: there is no gradient to take (the step is skipped on all ranks)
            # and the mean loss over zero items is NaN, as torch's own cross_entropy reports it.
            skipped = items == 0
            factor = 0.0
            window_loss = math.nan
            if items:
                assert self._item_scale is not None  # set at the first micro-step where some rank had items
                factor = self._item_scale * self.plan.accum_steps * averaged_over / items
                window_loss = loss_sum / items
                # Keeps the next window's scaled losses at the size of loss / accum_steps (fp16-safe).
                self._item_scale = items / micro
        else:
            factor = self.plan.accum_steps * averaged_over / micro
            window_loss = loss_sum / micro
        if factor != 1.0 and not skipped:
            self._sync.scale_grads(self._params, factor)
        if self._sync.owns_step:
            grad_norm, engine_skipped = self._sync.engine_step(self.max_grad_norm, skip=skipped)
            skipped = skipped or engine_skipped
        else:
            grad_norm, skipped = self._optimizer_step(skip=skipped)
        if not skipped and self.scheduler is not None:
            self.scheduler.step()
        self.optimizer_steps += 1
        self.skipped_steps += int(skipped)
        self.stepped = True
        self.last_step = StepResult(
            step=self.optimizer_steps,
            loss=window_loss,
            micro_steps=micro,
            num_items=int(items) if item_mode else None,
            grad_norm=grad_norm,
            skipped=skipped,
        )
        self._reset_window()

    def _optimizer_step(self, *, skip: bool) -> tuple[float | None, bool]:
        scaler = self.grad_scaler
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return None, True
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        norm = float(self._sync.grad_norm(self._params, self.max_grad_norm))
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale_before
        elif not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite gradient norm {norm} at optimizer step {self.optimizer_steps + 1}; the step "
                    "was not taken. Use on_nonfinite='skip' to skip such steps on all ranks instead."
                )
            skipped = True
        else:
            self.optimizer.step()
            skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    # --------------------------------------------------------------------------------------- rank agreement
    def _fingerprint(self) -> list[int]:
        plan = self.plan
        return [
            plan.global_batch_size,
            plan.micro_batch_size,
            plan.accum_steps,
            plan.world_size,
            self._pos,
            self.optimizer_steps,
        ]

    def _check_agreement(self) -> None:
        self._agreed = True
        if not self._distributed:
            return
        mine = torch.tensor(self._fingerprint(), dtype=torch.int64, device=self._comm_device)
        rows = [torch.empty_like(mine) for _ in range(self.plan.world_size)]
        torch_dist.all_gather(rows, mine)
        reference = rows[0].tolist()
        problems = [
            f"rank {rank_index} has {field}={value} where rank 0 has {expected}"
            for rank_index, row in enumerate(rows)
            for field, value, expected in zip(_FINGERPRINT, row.tolist(), reference, strict=True)
            if value != expected
        ]
        if problems:
            raise RuntimeError(
                "ranks disagree on the accumulation plan or their position in the window: "
                + "; ".join(problems)
                + ". Build the BatchPlan from the same arguments on every rank and load the same checkpoint."
            )

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self, *, include_grads: bool = False) -> dict[str, Any]:
        """Counters and window position (plain Python values), for exact resume; mid-window also the gradients.

        Args:
            include_grads: also save the gradients accumulated so far in an unfinished window (under ``"grads"``,
                one tensor or None per optimizer parameter), so that a resume mid-window loses nothing. Under
                DDP they are this rank's own unreduced gradients: every rank must save its own state. At a
                window boundary there are none (they were zeroed by the step) and nothing is added.

        Raises:
            ValueError: ``include_grads`` mid-window with a backend that accumulates in private buffers (FSDP,
                DeepSpeed): checkpoint those at a window boundary.
        """
        state: dict[str, Any] = {
            "plan": self.plan.as_dict(),
            "micro_step": self._pos,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "item_scale": self._item_scale,
            "window_items": self._window_items,
            "window_loss": None if self._window_loss is None else float(self._window_loss),
            "window_mode": self._window_mode,
        }
        if include_grads and self._pos:
            if not self.grads_in_params:
                raise ValueError(
                    f"include_grads=True at micro-step {self._pos} of {self.plan.accum_steps}: {self.backend} keeps "
                    "the gradients accumulated without sync in private buffers that cannot be saved and restored. "
                    "Checkpoint at a window boundary (right after a step, when acc.micro_step_in_window == 0)."
                )
            state["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in self._params]
        return state

    @property
    def grads_in_params(self) -> bool:
        """Whether the window's unsynced gradients live in ``param.grad`` (plain module, DDP), so that
        :meth:`state_dict` can save them mid-window; False for FSDP and DeepSpeed."""
        return self._sync.grads_in_params

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the ranks' agreement is checked again at the next micro-step.

        A boundary checkpoint may come from another world size with the same global and micro batch
        (elastic resume): ``accum_steps`` is this job's plan's, and the optimizer step count carries on.

        Raises:
            ValueError: the saved plan has another global or micro batch; or another world size while the
                checkpoint is mid-window; or saved gradients that do not fit this model.
        """
        saved = BatchPlan.from_dict(state["plan"])
        position = int(state["micro_step"])
        if (saved.global_batch_size, saved.micro_batch_size) != (
            self.plan.global_batch_size,
            self.plan.micro_batch_size,
        ):
            raise ValueError(
                f"checkpoint was made with plan ({saved}) but this accumulator has ({self.plan}); build the "
                f"plan from the checkpoint: BatchPlan.from_dict(state['plan']).for_world_size(world_size)"
            )
        if saved != self.plan and position:
            raise ValueError(
                f"checkpoint was taken mid-window (micro-step {position} of {saved.accum_steps}) on "
                f"{saved.world_size} rank(s) and cannot resume on {self.plan.world_size}: the window's unreduced "
                f"gradients belong to ranks of the old job. Resume it on {saved.world_size} rank(s), or from a "
                "checkpoint taken at a window boundary (those resume on any valid world size)."
            )
        grads = state.get("grads")
        if grads is not None:
            self._check_saved_grads(grads)
        elif position:
            warnings.warn(
                f"loaded a mid-window state (micro-step {position} of {saved.accum_steps}) without its gradients: "
                f"the window's first {position} micro-batches are lost. Save with "
                "acc.state_dict(include_grads=True) (distaccum.checkpoint does) for an exact resume.",
                stacklevel=2,
            )
        self._reset_window()
        self._pos = position
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._item_scale = state["item_scale"]
        self._window_items = int(state["window_items"])
        loss = state["window_loss"]
        self._window_loss = None if loss is None else torch.tensor(loss, dtype=torch.float64)
        self._window_mode = state["window_mode"]
        self._agreed = False
        self._items_agreed = False
        if grads is not None:
            for param, grad in zip(self._params, grads, strict=True):
                param.grad = None if grad is None else grad.detach().to(param.device, param.dtype).clone()

    def _check_saved_grads(self, grads: list[torch.Tensor | None]) -> None:
        if not self.grads_in_params:
            raise ValueError(
                f"the state holds mid-window gradients but this model's backend is {self.backend}, which keeps "
                "them in private buffers; resume it with a plain or DDP model, or from a boundary checkpoint"
            )
        shapes = [tuple(p.shape) for p in self._params]
        saved = [None if g is None else tuple(g.shape) for g in grads]
        fits = len(saved) == len(shapes) and all(s in (None, want) for s, want in zip(saved, shapes, strict=True))
        if not fits:
            raise ValueError(
                f"the state's saved gradients ({len(saved)} tensors) do not fit this optimizer's {len(shapes)} "
                "parameters; load it into the same model and optimizer that saved it"
            )

    def __repr__(self) -> str:
        return (
            f"Accumulator({self.plan}, backend={self.backend}, step={self.optimizer_steps}, "
            f"micro_step_in_window={self._pos})"
        )
