"""What an accumulator saves and restores (:meth:`~distaccum.Accumulator.state_dict`): its counters, the window's
position and arithmetic, the plan with a batch schedule's place in it (consumed samples) and the micro-batch size
``auto_micro_batch`` found, and mid-window the gradients accumulated so far. Plain Python values and tensors, so
that :mod:`distaccum.checkpoint` can write them with ``weights_only`` loading.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from distaccum.backends import Backend, params_of
from distaccum.plan import BatchPlan
from distaccum.schedule import PlanTracker
from distaccum.weighting import WindowLedger


class AccumulatorState:
    """The state methods of :class:`~distaccum.Accumulator` (which sets these attributes)."""

    optimizer: torch.optim.Optimizer
    optimizer_steps: int
    skipped_steps: int
    _plans: PlanTracker
    _window: WindowLedger
    _backend: Backend
    _agreed: bool

    @property
    def plan(self) -> BatchPlan:
        """The plan of the open window (a batch schedule's stage; ``auto_micro_batch``'s micro-batch size)."""
        return self._plans.plan

    def _use(self, plan: BatchPlan) -> None:  # at a boundary the tracker moved on: the window follows its plan
        self._window.accum_steps = plan.accum_steps

    def state_dict(self, *, include_grads: bool = False) -> dict[str, Any]:
        """Counters and window position (plain Python values), for exact resume; mid-window also the gradients.

        Args:
            include_grads: also save the gradients accumulated so far in an unfinished window (under ``"grads"``,
                one tensor or None per optimizer parameter), so that a resume mid-window loses nothing. Under
                DDP they are this rank's own unreduced gradients: every rank must save its own state. At a
                window boundary there are none (they were zeroed by the step) and nothing is added.

        Raises:
            ValueError: ``include_grads`` mid-window on FSDP or DeepSpeed (private buffers): save at a boundary.
        """
        state: dict[str, Any] = {
            "plan": self.plan.as_dict(),
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            **self._plans.state_dict(),
            "noise_scale": None if self._window.noise is None else self._window.noise.state_dict(),
            **self._window.state_dict(),
        }
        if include_grads and self._window.position:
            state["grads"] = self._backend.window_grads(params_of(self.optimizer), where=self._window.where)
            if self._window.batch_norm is not None:  # this rank's own, as the gradients
                state["window_batch_norm"] = self._window.batch_norm.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the ranks' agreement is checked again at the next micro-step.

        A boundary checkpoint may come from another world size with the same global and micro batch
        (elastic resume): ``accum_steps`` is this job's plan's, and the optimizer step count carries on.

        Raises:
            ValueError: the saved plan has another global or micro batch; or another world size while the
                checkpoint is mid-window; or saved gradients that do not fit this model.
        """
        plan, consumed = self._plans.resume(state)  # refuses another plan before anything changes
        grads, batch_norm = state.get("grads"), state.get("window_batch_norm")
        if self._window.batch_norm is not None and grads is not None:
            if batch_norm is None:
                warnings.warn(
                    f"loaded a mid-window state (micro-step {state['micro_step']}) without the window's BatchNorm "
                    "statistics (saved before distaccum kept them): the running statistics of this step will pool "
                    "only the micro-batches still to come",
                    stacklevel=2,
                )
            else:
                self._window.batch_norm.load_state_dict(batch_norm)  # checks the layers before anything changes
        if grads is not None:
            try:
                self._backend.restore_window_grads(params_of(self.optimizer), grads)
            except ValueError:
                if self._window.batch_norm is not None:
                    self._window.batch_norm.reset()
                raise
        self._plans.restore(plan, consumed)
        self._use(plan)
        self._window.load_state_dict(state, with_grads=grads is not None)
        if self._window.noise is not None and state.get("noise_scale"):
            self._window.noise.load_state_dict(state["noise_scale"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._agreed = False
