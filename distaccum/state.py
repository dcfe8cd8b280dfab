"""What an accumulator reports about itself (window position, backend, consumed samples) and what it saves and
restores (:meth:`~distaccum.Accumulator.state_dict`): its counters, the window's position and arithmetic, the plan
with a batch schedule's place in it (consumed samples) and the micro-batch size ``auto_micro_batch`` found, and
mid-window the gradients accumulated so far. Plain Python values and tensors, so that :mod:`distaccum.checkpoint`
can write them with ``weights_only`` loading.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from distaccum import collectives
from distaccum.backends import Backend, params_of
from distaccum.plan import BatchPlan
from distaccum.reduction import InBackward
from distaccum.schedule import PlanTracker
from distaccum.weighting import WindowLedger


class AccumulatorState:
    """The state of :class:`~distaccum.Accumulator` (which sets these attributes): reported, saved, restored."""

    optimizer: torch.optim.Optimizer
    optimizer_steps: int
    skipped_steps: int
    _plans: PlanTracker
    _window: WindowLedger
    _backend: Backend
    _reduction: InBackward
    _auto: bool
    check_ranks: bool
    _agreed: bool
    _in_micro_step: bool
    _boundary_now: bool
    _backward_done: bool
    _backward_begun: bool
    _broken: str | None

    def _finish_window(self, *, local: bool = False) -> None:
        raise NotImplementedError  # the accumulator's boundary: factor, step, StepResult

    def _check_agreement(self) -> None:
        raise NotImplementedError  # the accumulator's start-up agreement of the ranks

    @property
    def micro_step_in_window(self) -> int:
        """Micro-steps already taken in the open window (0 right after a step)."""
        return self._window.position

    @property
    def is_boundary(self) -> bool:
        """Inside ``micro_step``: whether it ends the window. Outside: whether the next one will."""
        if self._in_micro_step:
            return self._boundary_now
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
        if self._in_micro_step:
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
            self._backend.check_window_grads(params, grads)
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
        if self._in_micro_step or self._window.position:
            self._window.discarded = True

    def _abandon_micro_step(self, boundary: bool) -> None:  # the block raised; semantics: discard_window()
        self._window.position += 1
        self._window.discarded = True
        if not boundary and not self._backend.syncs_in_window:
            return
        if not self._backward_begun and self._reduction.in_backward and self._backend.join_reduction():
            self._backward_done = True  # the peers' reduction was joined with zeros: the window ends with theirs
        if not boundary:
            return
        if self._backward_done:  # this rank joined the boundary reduction: close the window with the others
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
