"""The call path: ``micro_step`` -> ``backward`` -> at the boundary: one scalar all-reduce -> factor -> scale ->
step -> scheduler -> :class:`StepResult`. The window's arithmetic: :mod:`distaccum.weighting`; where it is reduced:
:mod:`distaccum.reduction`; the micro-step state machine: :mod:`distaccum.window`; scalar collectives:
:mod:`distaccum.collectives`; the model wrapper: :mod:`distaccum.backends`; uneven data: :mod:`distaccum.uneven`;
the micro-batch size on out of memory: :mod:`distaccum.resize`.

What the accumulator reports about itself and saves (:meth:`Accumulator.state_dict`): its counters, the window's
position and arithmetic, the plan with a batch schedule's place in it and the micro-batch size ``auto_micro_batch``
found, and mid-window the gradients accumulated so far: plain Python values and tensors, so that
:mod:`distaccum.checkpoint` can write them with ``weights_only`` loading.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from distaccum import backends, collectives, guards, precision, resize, uneven
from distaccum.backends import params_of
from distaccum.backends.base import EarlyCheck, StepWindow, grads_of
from distaccum.batchnorm import BatchNormMode
from distaccum.micro_step import MicroStep
from distaccum.options import Options, configure
from distaccum.plan import BatchPlan
from distaccum.schedule import BatchSchedule
from distaccum.weighting import StepResult, WindowClose, WindowLedger
from distaccum.window import MicroSteps

__all__ = ["Accumulator", "StepResult"]

T = TypeVar("T")


class Accumulator:
    """Gradient accumulation over ``plan.accum_steps`` micro-batches per optimizer step, on any backend.

    Args:
        model: the model the loss comes from: a plain module (one process), ``DistributedDataParallel``,
            FSDP1, an FSDP2 ``fully_shard`` module, or a DeepSpeed engine.
        optimizer: the optimizer over ``model``'s parameters.
        plan: the batch plan; its ``world_size`` must equal the live one. A :class:`~distaccum.BatchSchedule`
            instead changes the global batch (``accum_steps``) at window boundaries as samples are consumed.
        scheduler: stepped once per optimizer step that really happened.
        max_grad_norm: clip the window's global gradient norm to this (None: no clipping).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16; unscaled and updated once per step.
        on_nonfinite: ``"skip"`` the step on all ranks when the gradient is NaN/inf (counted in
            :attr:`skipped_steps`), or ``"raise"`` ``FloatingPointError``. With an enabled ``grad_scaler`` a
            non-finite gradient is an fp16 overflow: skipped, and the scale backs off, on every rank.
        check_ranks: at the first micro-step, check that all ranks agree on the plan and their position.
        batch_norm: ``"exact"``: BatchNorm running statistics updated once per step from the whole window, as the
            real batch would; ``"warn"`` (default) / ``"per_micro_batch"``: torch's (:mod:`distaccum.batchnorm`).
        auto_micro_batch: the plan's ``micro_batch_size`` is the largest to try; out of memory on any rank makes
            every rank retry the window with a smaller one (loop over :meth:`split`; :mod:`distaccum.resize`).
        noise_scale: measure the gradient noise scale into ``last_step.noise_scale``, smoothed with this EMA
            decay (e.g. 0.95; None: off, no cost): one norm per window (:mod:`distaccum.noise`).
        report_grad_norm: compute the global gradient norm into ``last_step.grad_norm`` even without clipping (one
            read of the gradients per step; with ``max_grad_norm`` or ``noise_scale`` it is computed anyway).
        accumulate_dtype: ``torch.float32`` sums bf16/fp16 gradients in float32, rounded once per step (None: not).
            ``"auto"``: float32 if accum_steps > 1 on plain/DDP: the bf16 sum's error grows with k (:mod:`.precision`).
        grad_sync: when backward reduces: ``"boundary"`` (default everywhere: one reduction per step, as measured the
            fastest; a whole gradient per rank in the window), ``"sharded"`` (FSDP: reduce-scatter every micro-step
            keeping only shards, HSDP's replica all-reduce at the boundary), ``"every"`` (all of it, every micro-step).

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
        plan: BatchPlan | BatchSchedule,
        *,
        scheduler: Any | None = None,
        max_grad_norm: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        on_nonfinite: Literal["skip", "raise"] = "skip",
        check_ranks: bool = True,
        batch_norm: BatchNormMode = "warn",
        auto_micro_batch: bool = False,
        noise_scale: float | None = None,
        report_grad_norm: bool = False,
        accumulate_dtype: precision.AccumulateDtype = "auto",
        grad_sync: backends.GradSync | None = None,
    ) -> None:
        options = Options(
            scheduler=scheduler,
            max_grad_norm=max_grad_norm,
            grad_scaler=grad_scaler,
            on_nonfinite=on_nonfinite,
            check_ranks=check_ranks,
            batch_norm=batch_norm,
            auto_micro_batch=auto_micro_batch,
            noise_scale=noise_scale,
            report_grad_norm=report_grad_norm,
            accumulate_dtype=accumulate_dtype,
            grad_sync=grad_sync,
        )
        setup = configure(model, optimizer, plan, options)  # every refusal, before anything is set
        self._plans = setup.plans
        self._options = setup.step
        self._norm = options.computes_norm
        self._backend = setup.backend
        self._reduction = setup.reduction
        self._auto = auto_micro_batch
        self.model = model
        self.optimizer = setup.optimizer
        self.schedule = self._plans.schedule
        self.scheduler = setup.scheduler
        self.grad_scaler = setup.grad_scaler
        self.check_ranks = check_ranks
        accum_steps = self._plans.plan.accum_steps
        self._window = WindowLedger(accum_steps, setup.batch_norm, deferred=auto_micro_batch, noise=setup.noise)
        self.micro_batch_retries = 0
        """Windows started again with a smaller micro-batch after some rank ran out of memory."""
        self.last_step: StepResult | None = None
        """Result of the most recent optimizer step (None before the first)."""
        self.stepped = False
        """True when the most recent micro-step ended a window (an optimizer step was attempted)."""
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.dropped_micro_batches = 0
        """Micro-batches of this rank that :meth:`iterate` did not train on (see there)."""
        self._steps = MicroSteps()
        self._agreed = False
        self._broken: str | None = None
        self._guards = guards.LoopGuards(
            self.optimizer,
            self.scheduler,
            window_open=lambda: self._steps.inside or self._window.position > 0,
            options=setup.agreed,
        )

    def micro_step(self, *, last: bool = False) -> MicroStep[Accumulator]:
        """Run one forward and backward inside; gradient sync is skipped unless this micro-step ends the window.

        Leaving the boundary micro-step runs, once: scaler unscale, clip, step, scaler update, scheduler, zero_grad.

        Args:
            last: the data ends here; make this micro-step the boundary of a (possibly short) window. All ranks
                must pass it together.

        Raises:
            RuntimeError: nested ``micro_step``, or the block ended without :meth:`backward`.
        """
        if self._steps.inside or self._broken or self._auto or not self._agreed or not self._steps.run:
            self._check_opening()
        full = self._window.position + 1 >= self._window.accum_steps  # the plan's, kept by _use
        boundary = self._steps.open(ends_window=last or full)
        self.stepped = False
        return MicroStep(self, self._end_micro_step, boundary, self._reduction.context(boundary))

    def _end_micro_step(self, boundary: bool, error: BaseException | None) -> bool:  # MicroStep.__exit__
        begun = self._steps.backward_begun
        done = self._steps.backward_done
        self._steps.close()
        if error is None and not done:
            error = RuntimeError(
                "acc.micro_step() ended without acc.backward(loss): every micro-step must run exactly one backward "
                "so that all ranks take part in the gradient reduction; call acc.backward(loss) in the block."
            )
            self._abandon_micro_step(boundary, begun=begun, done=done)
            raise error
        if error is not None:
            if self._auto and resize.is_out_of_memory(error):
                self._window.out_of_memory = True  # split() takes this rank to the boundary's all-reduce
                return True
            self._abandon_micro_step(boundary, begun=begun, done=done)
            return False
        self._window.position += 1
        if boundary:
            self._finish_window()
        return False

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
        self._check_backward_call()
        guards.check_loss(loss)
        window = self._window
        count = None if num_items is None else guards.item_count(num_items)
        self._before_backward(count)
        loss, scale = window.record(loss, count)
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        self._reduction.backward(loss, scale, first=window.position == 0)
        self._steps.end_backward()
        self._after_backward(count, scale)

    def _check_backward_call(self) -> None:
        if self._steps.backward_done or not self._steps.inside:
            raise RuntimeError(
                "acc.backward() was called twice in one micro-step; add the losses and call it once "
                "(acc.backward(loss_a + loss_b))."
                if self._steps.inside
                else "acc.backward() was called outside `with acc.micro_step():`; the accumulator could not decide "
                "whether to sync gradients. Put the forward and acc.backward(loss) inside the `with` block."
            )

    def _before_backward(self, count: int | None) -> None:
        """The checks before a backward (a rank that raises here joins the reduction it would have made: no hang),
        and, at a run's first backward, the ranks' agreement on giving ``num_items``."""
        window = self._window
        if window.position:
            self._guards.window_grads.check(self.optimizer)
        if self._steps.boundary:
            self._guards.scheduler.check()
        self._steps.begin_backward()  # from here on collectives may be in flight: no joining them after a failure
        if not self._auto and window.needs_item_agreement(count):
            # First backward of a run: ranks agree on giving num_items (a rank without it fails here, on every
            # rank, instead of mismatching collectives later) and seed the items-per-micro-step estimate.
            window.agree_on_items(*collectives.agree_on_item_mode(count))

    def _after_backward(self, count: int | None, scale: float) -> None:
        """What a micro-step inside the window remembers: its gradients' identity (a change between micro-steps is
        named at the next backward), and the noise scale's small-batch reading at the window's first micro-step."""
        window = self._window
        if self._steps.boundary:
            return
        if self._backend.grads_in_params and not self._auto:
            self._guards.window_grads.remember(self.optimizer)
        if window.noise is not None and window.position == 0:
            loss_scale = scale * (self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0)
            window.noise.measure(grads_of(params_of(self.optimizer)), loss_scale, count or self.plan.micro_batch_size)

    def _finish_window(self, *, local: bool = False) -> None:
        """The boundary: the window's scalars all-reduced into its factor, then its step (or a retry, smaller).
        ``local``: a boundary that joined no reduction (see ``_abandon_micro_step``): skipped, without collectives."""
        try:
            window, nonfinite, norm = self._close_window(local)
            if window.retry:  # some rank ran out of memory: no step; split() runs the window again, smaller
                self._reduction.discard_grads(self.optimizer)
                smaller = resize.next_size(self.plan.micro_batch_size, self._plans.smaller())
                self.micro_batch_retries += 1
                self._use(self._plans.use_micro_batch_size(smaller, self.optimizer_steps))
                return
            self._step_window(window, nonfinite, norm)
        except BaseException:
            # The boundary work failed (a refusal, on_nonfinite="raise"): its gradients must not reach a later step.
            self._reduction.discard_grads(self.optimizer)
            raise
        finally:
            self._window.reset()
            self._guards.window_grads.forget()

    def _close_window(self, local: bool) -> tuple[WindowClose, bool | None, float | None]:
        """The window closed over all ranks in one all-reduce: (its :class:`WindowClose`; whether some rank's part
        of the gradient is not finite, None where not checked yet; the global norm, None where not computed yet)."""
        if local:
            return self._window.close_locally(), None, None
        params = params_of(self.optimizer)
        # Gradients reduced already (in the boundary backward): a NaN/inf flag known now, or the global norm (which
        # decides it then), rides on the all-reduce below: one decision, one host read.
        reduced = self._reduction.in_backward
        early = self._backend.early_check(params, self._options, norm=self._norm) if reduced else EarlyCheck()
        stats = self._window.local_stats(0.0 if early.nonfinite is None else early.nonfinite)
        totals = collectives.sum_checking_step(stats.values(), self.optimizer_steps, shared=early.norm)
        shared = totals.pop() if early.norm is not None else None
        window = self._window.close(stats.from_values(totals), self._backend.averaging_ranks)
        return window, None if early.nonfinite is None else window.nonfinite, shared

    def _step_window(self, window: WindowClose, nonfinite: bool | None, norm: float | None) -> None:
        """The closed window's optimizer step (skipped where the close says so), then the counters."""
        params = params_of(self.optimizer)
        factor = 1.0 if window.skip else window.factor
        factor = self._reduction.finish(params, factor, window.before_reduction, skip=window.skip)
        if not self.optimizer_steps and self._backend.grads_in_params and not window.skip:
            guards.check_grads_reached(params)
        number = self.optimizer_steps + 1
        steps = StepWindow(factor, window.skip, number, norm=self._norm, nonfinite=nonfinite, norm_value=norm)
        try:
            with self._guards.stepping():
                grad_norm, skipped = self._backend.step(self.optimizer, params, self._options, steps)
        except FloatingPointError:  # on_nonfinite="raise": a skipped step that says so; its data was consumed
            self._count_step(window, None, skipped=True)
            raise
        self._count_step(window, grad_norm, skipped)

    def _count_step(self, window: WindowClose, grad_norm: float | None, skipped: bool) -> None:
        self.optimizer_steps += 1
        self.skipped_steps += int(skipped)
        self._use(self._plans.advance(window.micro_steps * self.plan.micro_batch_size, self.optimizer_steps))
        if not skipped and self.scheduler is not None:  # after the counters: it may read consumed_samples
            self.scheduler.step()
        self._guards.scheduler.remember()
        self.stepped = True
        self.last_step = self._window.result(
            window, self.optimizer_steps, grad_norm, skipped, self.plan.micro_batch_size
        )

    def flush(self) -> StepResult | None:
        """Step a short last window at the end of data, normalized by what it really had. Collective: every rank
        calls it (those with nothing pending too); returns the step's result, or None when no rank had one."""
        if self._steps.inside:
            raise RuntimeError("acc.flush() was called inside `with acc.micro_step():`; call it after the loop")
        self._join_opening_collectives()  # before the all-reduce below: a rank with no micro-step since a load
        if collectives.sum_over_ranks([self._window.position])[0] == 0:
            return None
        self._reduction.reduce_pending(params_of(self.optimizer))
        self._finish_window()
        return self.last_step

    def iterate(self, micro_batches: Iterable[T], *, drop_last: bool = False) -> Iterator[T]:
        """Yield this rank's micro-batches, one per ``acc.micro_step()``, so that ranks whose data ends at different
        points never hang: the window where the first rank runs out is cut to what every rank has and steps as their
        exact mean (or not at all, ``drop_last=True``); details and an example in :mod:`distaccum.uneven`."""
        if self.check_ranks and not self._agreed:
            self._check_agreement()  # before the first count all-reduce: a plan mismatch names itself
        source = iter(micro_batches)
        while True:
            need = self.plan.accum_steps - self.micro_step_in_window
            window, common = uneven.take_window(source, need)
            self.dropped_micro_batches += len(window) - common
            if common < need and (drop_last or common == 0):
                self._end_of_uneven_data(drop_last, common)
                return
            yield from self._one_per_micro_step(window[:common], cut=common < need)
            if common < need:
                return

    def _end_of_uneven_data(self, drop_last: bool, common: int) -> None:
        """The data ends before the window does, on some rank: drop the short window, or step what it had."""
        if drop_last:
            self.dropped_micro_batches += common
            self._discard_window()
        elif self.micro_step_in_window:  # resumed mid-window and the data ends right there
            self.flush()

    def _one_per_micro_step(self, batches: list[T], *, cut: bool) -> Iterator[T]:
        """Yield ``batches``, checking that each ran in one micro-step; ``cut``: the last one ends the data."""
        for index, batch in enumerate(batches):
            expected = self._steps.run + 1
            self._steps.data_ends = cut and index == len(batches) - 1
            try:
                yield batch
            except GeneratorExit:  # the loop was left early: the flag must not end some later window
                self._steps.data_ends = False
                raise
            if self._steps.run != expected or self._steps.inside:
                raise RuntimeError(
                    "acc.iterate() yields one micro-batch per acc.micro_step(): run each one inside "
                    f"`with acc.micro_step():` (this one ran {self._steps.run - expected + 1})"
                )

    def split(self, batch: T) -> Iterator[T]:
        """Yield ``batch`` (this rank's share of a global batch: a tensor, or a tuple or dict of them) in micro-batches
        of ``plan.micro_batch_size``, one per ``acc.micro_step()``; the last ends the window. With ``auto_micro_batch``
        a window where some rank ran out of memory is yielded again, smaller (:mod:`distaccum.resize`)."""
        if self._auto and self._window.discarded and self.micro_step_in_window and not self._steps.inside:
            # An exception left the last split window open: it joins the boundary's all-reduce now, where the others
            # end theirs, and is skipped on every rank (no collective inside a window in this mode, so none is missed).
            self._finish_window()
        if self.micro_step_in_window or self._steps.inside:
            raise RuntimeError(
                f"acc.split(batch) starts a window, but this one is open at micro-step {self.micro_step_in_window}; "
                "split every loader batch with acc.split() (or none)"
            )
        size = resize.batch_length(batch)
        resize.check_share(size, self.plan)
        while True:
            yield from self._split_once(batch, size)
            if self._window.out_of_memory:  # this rank stopped early: join the boundary's all-reduce now
                resize.release_memory()
                self._finish_window()
            if self.stepped:
                return
            resize.release_memory()  # another rank ran out: the window starts again at the smaller size

    def _split_once(self, batch: T, size: int) -> Iterator[T]:
        """One try of the window: ``batch`` in micro-batches of the size in use, until this rank runs out of memory."""
        micro = self.plan.micro_batch_size
        self._steps.splitting = True
        try:
            for start in range(0, size, micro):
                expected = self._steps.run + 1
                yield resize.slice_batch(batch, start, start + micro)
                if self._steps.run != expected or self._steps.inside:
                    raise RuntimeError("acc.split() yields one micro-batch per acc.micro_step(): run each inside it")
                if self._window.out_of_memory:
                    break
        finally:
            self._steps.splitting = False

    def _check_opening(self) -> None:  # micro_step's rare cases: misuse, auto_micro_batch, a run's first micro-step
        if self._steps.inside:
            raise RuntimeError(
                "acc.micro_step() is already active: micro-steps do not nest. Close the first `with` block before "
                "opening the next (one micro-batch per micro_step)."
            )
        if self._broken:
            raise RuntimeError(self._broken)
        if self._auto and not self._steps.splitting:
            raise RuntimeError("auto_micro_batch=True: run the micro-steps over acc.split(batch), which retries them")
        if not self._agreed or not self._steps.run:  # a run's start, or a load_state_dict: state set anew
            self._guards.run_starts(self.optimizer, first=not self._window.position and not self._steps.run)
        if not self._agreed and self.check_ranks:
            self._check_agreement()
        self._agreed = True  # check_ranks=False: nothing to agree on until a load_state_dict

    def _check_agreement(self) -> None:
        self._agreed = True
        setup = {"auto_micro_batch": int(self._auto), "schedule": self.schedule.fingerprint() if self.schedule else 0}
        described = self._guards.described(self.optimizer, self.scheduler)
        collectives.check_plan_agreement(self.plan, self._window.position, self.optimizer_steps, setup, described)

    @property
    def micro_step_in_window(self) -> int:
        """Micro-steps already taken in the open window (0 right after a step)."""
        return self._window.position

    @property
    def is_boundary(self) -> bool:
        """Inside ``micro_step``: whether it ends the window. Outside: whether the next one will."""
        if self._steps.inside:
            return self._steps.boundary
        return self._window.position + 1 >= self.plan.accum_steps

    @property
    def consumed_samples(self) -> int:
        """Samples (all ranks) in the windows closed so far: what schedules of batch and LR are keyed on."""
        return self._plans.consumed_samples

    @property
    def backend(self) -> str:
        """Name of the backend chosen for the model (``plain``, ``ddp``, ``fsdp1``, ``fsdp2``, ``deepspeed``)."""
        return self._backend.name

    @property
    def grads_in_params(self) -> bool:
        """Whether unsynced gradients live in ``param.grad`` (plain, DDP: :meth:`state_dict` can save them)."""
        return self._backend.grads_in_params

    @property
    def plan(self) -> BatchPlan:
        """The plan of the open window (a batch schedule's stage; ``auto_micro_batch``'s micro-batch size)."""
        return self._plans.plan

    def _use(self, plan: BatchPlan) -> None:  # at a boundary the tracker moved on: the window follows its plan
        self._window.accum_steps = plan.accum_steps

    def state_dict(self, *, include_grads: bool = False) -> dict[str, Any]:
        """Counters and window position (plain Python values), for exact resume; mid-window also the gradients.

        The open window's arithmetic (item count, loss sum, a discard, the noise scale's small-batch reading) is
        this rank's own, as its gradients are: under DDP every rank saves its own state (:func:`distaccum.checkpoint
        .save` writes it next to each rank's gradients).

        Args:
            include_grads: also save the gradients accumulated so far in an unfinished window (under ``"grads"``,
                one tensor or None per optimizer parameter; the float32 sums of bf16/fp16 gradients where
                ``accumulate_dtype`` keeps them), so that a resume mid-window loses nothing. Under
                DDP they are this rank's own unreduced gradients: every rank must save its own state. At a
                window boundary there are none (they were zeroed by the step) and nothing is added.

        Raises:
            ValueError: ``include_grads`` mid-window on FSDP or DeepSpeed (private buffers): save at a boundary.
        """
        noise = self._window.noise
        state: dict[str, Any] = {
            "plan": self.plan.as_dict(),
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            **self._plans.state_dict(),
            "noise_scale": None if noise is None else noise.state_dict(),
            "window_noise": None if noise is None else noise.window_state(),
            **self._window.state_dict(),
        }
        if include_grads and self._window.position:
            # With float32 sums of bf16/fp16 gradients (distaccum.precision), those sums, in float32.
            state["grads"] = self._reduction.window_grads(params_of(self.optimizer), self._window.where)
            if self._window.batch_norm is not None:  # this rank's own, as the gradients
                state["window_batch_norm"] = self._window.batch_norm.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the ranks' agreement is checked again at the next micro-step.

        Everything is checked before anything changes: a refused state leaves the accumulator as it was. A window
        open here is dropped (its gradients too): the result is the same as loading into fresh objects.
        A boundary checkpoint may come from another world size with the same global and micro batch
        (elastic resume): ``accum_steps`` is this job's plan's, and the optimizer step count carries on.

        Raises:
            RuntimeError: called inside ``with acc.micro_step():``.
            ValueError: the saved plan has another global or micro batch; or another world size while the
                checkpoint is mid-window; or saved gradients or BatchNorm statistics that do not fit this model;
                or this FSDP/DeepSpeed accumulator is mid-window (its gradients are in private buffers).
        """
        window = self._window
        if self._steps.inside:
            raise RuntimeError(
                "load_state_dict() was called inside `with acc.micro_step():`, whose backward belongs to the window "
                "being replaced; load between micro-steps (before the loop, or right after a step)"
            )
        if window.position and not self._backend.grads_in_params:
            raise ValueError(
                f"load_state_dict() into an accumulator mid-window ({window.where}) of a {self.backend} model: the "
                "window's unsynced gradients are in the wrapper's private buffers, which a load cannot clear, so "
                "they would be added to the loaded state. Load into freshly built objects (or right after a step)."
            )
        plan, consumed = self._plans.resume(state)  # refuses another plan before anything changes
        grads, batch_norm = state.get("grads"), state.get("window_batch_norm")
        params = params_of(self.optimizer)
        if grads is not None:
            self._reduction.check_window_grads(params, grads)
        statistics = False  # the open window's BatchNorm statistics restored
        if window.batch_norm is not None and grads is not None:
            if batch_norm is None:
                warnings.warn(
                    f"loaded a mid-window state (micro-step {state['micro_step']}) without the window's BatchNorm "
                    "statistics (saved before distaccum kept them): the running statistics of this step will pool "
                    "only the micro-batches still to come",
                    stacklevel=2,
                )
            else:
                window.batch_norm.load_state_dict(batch_norm)  # the last check: it refuses before it changes
                statistics = True
        # Nothing is refused from here on. The open window's gradients would be added to the loaded ones.
        if window.position:
            self._reduction.discard_grads(self.optimizer)
        if grads is not None:
            self._reduction.restore_window_grads(params, grads)
        if window.batch_norm is not None and not statistics:
            window.batch_norm.reset()
        self._plans.restore(plan, consumed)
        self._use(plan)
        window.load_state_dict(state, with_grads=grads is not None)
        if window.noise is not None:
            if state.get("noise_scale"):
                window.noise.load_state_dict(state["noise_scale"])
            window.noise.load_window_state(state.get("window_noise") if grads is not None else None)
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._agreed = False

    def discard_window(self) -> None:
        """Discard the open window (no-op between windows): it runs on to its boundary, where every rank joins
        the reduction as usual, and its step is skipped on every rank, so one rank may call it alone. A micro-step
        whose ``with`` block raises does the same; the rules are in :mod:`distaccum.weighting` (discarded windows).
        """
        if self._steps.inside or self._window.position:
            self._window.discarded = True

    def _abandon_micro_step(self, boundary: bool, *, begun: bool, done: bool) -> None:
        """The block raised (``begun``: after its backward began; ``done``: after it ran); as discard_window()."""
        self._window.position += 1
        self._window.discarded = True
        if not boundary and not self._backend.syncs_in_window:
            return
        if not begun and self._reduction.in_backward and self._backend.join_reduction():
            done = True  # the peers' reduction was joined with zeros: the window ends with theirs
        if not boundary:
            return
        if done:  # this rank joined the boundary reduction: close the window with the others
            self._finish_window()
        elif self._backend.grads_in_params:  # no reduction joined: close locally, re-check the ranks next time
            self._finish_window(local=True)
            self._agreed = False
        else:
            self._broken = (
                f"a {self.backend} boundary micro-step raised before acc.backward(): its unsynced gradients are in "
                "buffers only a backward can reduce or clear, so no later step would be exact. Resume from the last "
                "checkpoint (distaccum.checkpoint.load) in a fresh process."
            )

    def _join_opening_collectives(self) -> None:
        """flush() on a rank that ran no micro-step since the start or a load: meet the collectives the other ranks'
        first micro-step and backward make, in their order: the ranks' agreement, then the item mode's (abstaining:
        this rank has no micro-batch to count)."""
        if not self._agreed and self.check_ranks:
            self._check_agreement()
        if not self._auto and self._window.needs_item_agreement(None):
            self._window.agree_on_items(*collectives.agree_on_item_mode(None, abstain=True))

    def _discard_window(self) -> None:  # local, unsynced gradients of a window that will never step
        self._reduction.drop_unreduced(self.optimizer)
        self._window.reset()

    def __repr__(self) -> str:
        return f"Accumulator({self.plan}, {self.backend}, step {self.optimizer_steps}, at {self._window.position})"
