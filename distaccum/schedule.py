"""A global batch that changes as training goes: ramp-up keyed on consumed samples (or optimizer steps).

Pure arithmetic, like :mod:`distaccum.plan`: a :class:`BatchSchedule` is a list of stages ``(start, global batch)``
with a fixed micro-batch size and world size. The accumulator asks it for the plan after every optimizer step,
so ``accum_steps`` changes only at window boundaries and every step is exact for its own global batch. The
accumulator's state holds the consumed-sample count and the schedule, so a resume (on another world size too,
at a boundary) continues the ramp where it was instead of starting it again.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from distaccum import dist
from distaccum.plan import BatchPlan, _positive_int

Unit = Literal["samples", "steps"]


class BatchSchedule:
    """Global batch sizes by stage: ``stages[i] = (start, global_batch_size)`` holds from ``start`` consumed samples
    (or optimizer steps, ``unit="steps"``) until the next stage's start.

    Args:
        stages: ``(start, global_batch_size)`` pairs; the first starts at 0, starts strictly increase.
        micro_batch_size: samples per forward/backward on one rank (fixed; with ``auto_micro_batch`` the largest).
        world_size: data-parallel ranks; detected when omitted, as in :class:`~distaccum.BatchPlan`.
        unit: what ``start`` counts: ``"samples"`` consumed (default; Megatron's ``--rampup-batch-size``) or
            optimizer ``"steps"`` taken.

    Raises:
        ValueError: a stage whose global batch is not a multiple of ``micro_batch_size x world_size`` (the message
            prints the equation and the nearest valid sizes), a first start other than 0, starts that do not
            increase, or an unknown unit.

    Example:
        >>> schedule = BatchSchedule([(0, 256), (2_000_000, 512), (6_000_000, 1024)], micro_batch_size=16,
        ...                          world_size=8)
        >>> schedule.plan_at(consumed_samples=2_500_000).accum_steps
        4
        >>> BatchSchedule.linear(start=256, end=1024, increment=256, ramp_samples=6_000_000,
        ...                      micro_batch_size=16, world_size=8).stages
        ((0, 256), (2000000, 512), (4000000, 768), (6000000, 1024))
    """

    def __init__(
        self,
        stages: Iterable[Sequence[int]],
        *,
        micro_batch_size: int,
        world_size: int | None = None,
        unit: Unit = "samples",
    ) -> None:
        if unit not in ("samples", "steps"):
            raise ValueError(f"unit must be 'samples' or 'steps', got {unit!r}")
        self.unit: Unit = unit
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.world_size = _positive_int("world_size", dist.world_size() if world_size is None else world_size)
        pairs = [tuple(stage) for stage in stages]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"stages must be (start, global_batch_size) pairs, e.g. [(0, 256)], got {pairs!r}")
        starts = [int(start) for start, _ in pairs]
        if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(
                f"stage starts must begin at 0 and strictly increase (in {unit}), got {starts}; e.g. "
                "[(0, 256), (2_000_000, 512)]"
            )
        self.stages: tuple[tuple[int, int], ...] = tuple(
            (start, _positive_int("global_batch_size", size)) for start, (_, size) in zip(starts, pairs, strict=True)
        )
        for start, size in self.stages:
            try:  # the same equation and nearest valid sizes as a plain plan
                BatchPlan(global_batch_size=size, micro_batch_size=self.micro_batch_size, world_size=self.world_size)
            except ValueError as error:
                raise ValueError(f"batch schedule stage ({start} {unit}, {size}): {error}") from None

    @classmethod
    def linear(
        cls,
        *,
        start: int,
        end: int,
        increment: int,
        ramp_samples: int,
        micro_batch_size: int,
        world_size: int | None = None,
    ) -> BatchSchedule:
        """Megatron's ``--rampup-batch-size start increment ramp_samples``: from ``start`` up to ``end`` in steps of
        ``increment``, evenly over the first ``ramp_samples`` consumed samples, then ``end``.

        Raises:
            ValueError: ``end - start`` is not a positive multiple of ``increment``, or a stage is invalid.
        """
        start, end = _positive_int("start", start), _positive_int("end", end)
        increment, ramp = _positive_int("increment", increment), _positive_int("ramp_samples", ramp_samples)
        if end <= start or (end - start) % increment:
            raise ValueError(
                f"end - start must be a positive multiple of increment: {end} - {start} = {end - start}, "
                f"increment {increment}"
            )
        increments = (end - start) // increment
        # Megatron: size = start + floor(consumed / (ramp / increments)) * increment; for whole sample counts that
        # is the stage whose start is ceil(i * ramp / increments).
        stages = [(-(-i * ramp // increments), start + i * increment) for i in range(increments + 1)]
        return cls(stages, micro_batch_size=micro_batch_size, world_size=world_size)

    def global_batch_size_at(self, position: int) -> int:
        """The global batch of the stage that holds at ``position`` (samples consumed or steps taken)."""
        size = self.stages[0][1]
        for start, stage_size in self.stages:
            if position < start:
                break
            size = stage_size
        return size

    def plan_at(
        self, consumed_samples: int = 0, optimizer_steps: int = 0, *, micro_batch_size: int | None = None
    ) -> BatchPlan:
        """The plan for the window that starts after ``consumed_samples`` samples and ``optimizer_steps`` steps
        (``micro_batch_size``: a smaller size chosen by ``auto_micro_batch``; it divides every stage's share)."""
        position = consumed_samples if self.unit == "samples" else optimizer_steps
        return BatchPlan(
            global_batch_size=self.global_batch_size_at(position),
            micro_batch_size=micro_batch_size or self.micro_batch_size,
            world_size=self.world_size,
        )

    def per_rank_batches(self) -> list[int]:
        """Samples one rank processes per optimizer step, per stage."""
        return [size // self.world_size for _, size in self.stages]

    def for_world_size(self, world_size: int) -> BatchSchedule:
        """The same stages on ``world_size`` ranks (an elastic restart).

        Raises:
            ValueError: some stage's global batch cannot be split over ``world_size`` ranks.
        """
        return BatchSchedule(self.stages, micro_batch_size=self.micro_batch_size, world_size=world_size, unit=self.unit)

    def fingerprint(self) -> int:
        """A number equal on two ranks exactly when their stages, unit and micro-batch size are (31 bits)."""
        return zlib.crc32(repr((self.stages, self.unit, self.micro_batch_size)).encode()) & 0x7FFFFFFF

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and logs."""
        return {
            "stages": [list(stage) for stage in self.stages],
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "unit": self.unit,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> BatchSchedule:
        """Inverse of :meth:`as_dict`; every stage is checked again."""
        return cls(
            [tuple(stage) for stage in state["stages"]],
            micro_batch_size=state["micro_batch_size"],
            world_size=state["world_size"],
            unit=state["unit"],
        )

    def check_resume_from(self, saved: BatchSchedule) -> None:
        """Refuse to continue a run that followed another schedule (world size aside).

        Raises:
            ValueError: the stages, unit or micro-batch size differ.
        """
        if saved.fingerprint() != self.fingerprint():
            raise ValueError(
                f"checkpoint was made with batch schedule {saved} but this accumulator has {self}; resume with "
                "the same schedule (BatchSchedule.from_dict(state['schedule']).for_world_size(world_size)), so "
                "that the ramp continues where it was"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchSchedule) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.fingerprint(), self.world_size))

    def __repr__(self) -> str:
        stages = ", ".join(f"({start}, {size})" for start, size in self.stages)
        return (
            f"BatchSchedule([{stages}], micro_batch_size={self.micro_batch_size}, world_size={self.world_size}, "
            f"unit={self.unit!r})"
        )


def common_divisors(sizes: Sequence[int], at_most: int) -> list[int]:
    """Divisors of every size in ``sizes`` that are at most ``at_most``, largest first (micro-batch candidates)."""
    common = math.gcd(*sizes)
    return sorted((d for d in range(1, min(common, at_most) + 1) if common % d == 0), reverse=True)


class PlanTracker:
    """The plan of the next window: the fixed plan, or the schedule's stage at the samples consumed so far, at the
    micro-batch size in use (``auto_micro_batch`` lowers it, :mod:`distaccum.resize`). Changes only at boundaries.

    Args:
        plan: a fixed :class:`~distaccum.BatchPlan` or a :class:`BatchSchedule`.
        auto_micro_batch: ``plan``'s micro-batch size is only the largest to try.

    Raises:
        TypeError: ``plan`` is neither.
    """

    def __init__(self, plan: BatchPlan | BatchSchedule, *, auto_micro_batch: bool = False) -> None:
        if not isinstance(plan, (BatchPlan, BatchSchedule)):
            raise TypeError(f"plan must be a distaccum.BatchPlan or BatchSchedule, got {type(plan).__name__}")
        self.schedule = plan if isinstance(plan, BatchSchedule) else None
        self._stages = (
            plan
            if isinstance(plan, BatchSchedule)
            else BatchSchedule(
                [(0, plan.global_batch_size)], micro_batch_size=plan.micro_batch_size, world_size=plan.world_size
            )
        )
        self.consumed_samples = 0
        self.plan = self._stages.plan_at()
        self.largest_accum_steps = max(
            self._stages.plan_at(start, start).accum_steps for start, _ in self._stages.stages
        )
        """The most micro-steps any window will have (what warnings about long windows are about)."""
        self.candidates = (
            common_divisors(self._stages.per_rank_batches(), self.plan.micro_batch_size) if auto_micro_batch else []
        )
        """Micro-batch sizes ``auto_micro_batch`` may use, largest first (each divides every per-rank batch)."""

    def advance(self, samples: int, optimizer_steps: int) -> BatchPlan:
        """A window of ``samples`` (all ranks) closed, ``optimizer_steps`` after it: the next window's plan."""
        self.consumed_samples += samples
        if self.schedule is not None:  # a fixed plan (the usual case) stays the same object: nothing to rebuild
            self.plan = self._at(self.consumed_samples, optimizer_steps, self.plan.micro_batch_size)
        return self.plan

    def smaller(self) -> int | None:
        """The next micro-batch size to try after the current one ran out of memory (None: nothing smaller)."""
        return next((size for size in self.candidates if size < self.plan.micro_batch_size), None)

    def use_micro_batch_size(self, size: int, optimizer_steps: int) -> BatchPlan:
        """The plan of the window that starts again with micro-batches of ``size``."""
        self.plan = self._at(self.consumed_samples, optimizer_steps, size)
        return self.plan

    def _at(self, consumed_samples: int, optimizer_steps: int, micro_batch_size: int) -> BatchPlan:
        return self._stages.plan_at(consumed_samples, optimizer_steps, micro_batch_size=micro_batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the accumulator's state (the plan itself is saved by the accumulator)."""
        return {
            "consumed_samples": self.consumed_samples,
            "schedule": None if self.schedule is None else self.schedule.as_dict(),
        }

    def resume(self, state: dict[str, Any]) -> tuple[BatchPlan, int]:
        """The plan and consumed samples to go on from a saved accumulator state (nothing changed yet): the
        schedule's stage where it was (never its start again), at the micro-batch size found before.

        Raises:
            ValueError: the state followed another schedule, or none while this one has one; or its plan's global
                or micro batch differs from the one that holds here (:meth:`BatchPlan.check_resume_from`).
        """
        saved = BatchPlan.from_dict(state["plan"])
        steps = int(state["optimizer_steps"])
        consumed = int(state.get("consumed_samples", steps * saved.global_batch_size))  # format-2 states lack it
        if self.schedule is not None:
            if state.get("schedule") is None:
                raise ValueError(
                    "checkpoint was made without a batch schedule but this accumulator has one; resume it with the "
                    "plan it was made with (BatchPlan.from_dict(state['plan']))"
                )
            self.schedule.check_resume_from(BatchSchedule.from_dict(state["schedule"]))
        micro = saved.micro_batch_size if saved.micro_batch_size in self.candidates else self.plan.micro_batch_size
        live = self._at(consumed, steps, micro)
        live.check_resume_from(saved, int(state["micro_step"]))
        return live, consumed

    def restore(self, plan: BatchPlan, consumed_samples: int) -> None:
        """Take what :meth:`resume` returned."""
        self.plan = plan
        self.consumed_samples = consumed_samples
