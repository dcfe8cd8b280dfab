"""Batch arithmetic: ``global_batch_size = accum_steps x micro_batch_size x world_size``.

Pure arithmetic, no communication: a :class:`BatchPlan` is cheap to build, compare and print, and every
process of a job can build the same one from the same flags.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

from distaccum import dist

_SIZE_FIELDS = ("global_batch_size", "micro_batch_size", "accum_steps", "world_size")


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a positive integer, got {value!r} (bool); pass e.g. {field}=8")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{field} must be a positive integer, got {value!r} ({type(value).__name__}); "
            f"pass a whole number, e.g. {field}=8"
        ) from None
    if number <= 0:
        raise ValueError(f"{field} must be a positive integer (>= 1), got {number}; pass e.g. {field}=8")
    return number


def _nearest_multiples(value: int, unit: int) -> str:
    lower = (value // unit) * unit
    upper = lower + unit
    if lower == 0:
        return f"{upper}"
    return f"{lower} or {upper}"


@dataclass(frozen=True, init=False)
class BatchPlan:
    """How one optimizer step's global batch is split over micro-batches, accumulation steps and ranks.

    Give any two of ``global_batch_size``, ``micro_batch_size`` and ``accum_steps``; the third is derived.
    ``world_size`` is read from the initialized process group, else from the launcher's ``WORLD_SIZE``
    environment variable, else 1.

    Args:
        global_batch_size: samples that contribute to one optimizer step, over all ranks.
        micro_batch_size: samples one rank processes in one forward/backward.
        accum_steps: micro-batches per optimizer step on each rank.
        world_size: data-parallel ranks; detected when omitted.

    Raises:
        ValueError: a size is not a positive integer, fewer than two sizes are given, or the sizes do not
            satisfy the equation (the message prints it with numbers and the nearest valid choices).

    Example:
        >>> plan = BatchPlan(global_batch_size=1024, micro_batch_size=16, world_size=4)
        >>> plan.accum_steps
        16
        >>> print(plan)
        global_batch_size 1024 = accum_steps 16 x micro_batch_size 16 x world_size 4
        >>> plan.for_world_size(8).accum_steps
        8
    """

    global_batch_size: int
    """Samples per optimizer step over all ranks."""
    micro_batch_size: int
    """Samples per forward/backward on one rank."""
    accum_steps: int
    """Micro-batches per optimizer step on each rank."""
    world_size: int
    """Data-parallel ranks the plan was made for."""

    def __init__(
        self,
        *,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        accum_steps: int | None = None,
        world_size: int | None = None,
    ) -> None:
        world = _positive_int("world_size", dist.world_size() if world_size is None else world_size)
        given = {
            name: _positive_int(name, value)
            for name, value in (
                ("global_batch_size", global_batch_size),
                ("micro_batch_size", micro_batch_size),
                ("accum_steps", accum_steps),
            )
            if value is not None
        }
        if len(given) < 2:
            raise ValueError(
                "BatchPlan needs two of global_batch_size, micro_batch_size, accum_steps; got "
                f"{given or 'none'}. Example: BatchPlan(global_batch_size=1024, micro_batch_size=16)"
            )
        glob = given.get("global_batch_size")
        micro = given.get("micro_batch_size")
        accum = given.get("accum_steps")
        if glob is None:
            assert micro is not None and accum is not None
            glob = accum * micro * world
        elif accum is None:
            assert micro is not None
            per_micro_step = micro * world
            if glob % per_micro_step:
                raise ValueError(
                    f"global_batch_size {glob} is not accum_steps x micro_batch_size x world_size: it must be a "
                    f"multiple of micro_batch_size {micro} x world_size {world} = {per_micro_step} per "
                    f"micro-step; nearest valid: {_nearest_multiples(glob, per_micro_step)}"
                )
            accum = glob // per_micro_step
        elif micro is None:
            per_sample_slot = accum * world
            if glob % per_sample_slot:
                raise ValueError(
                    f"global_batch_size {glob} is not accum_steps x micro_batch_size x world_size: it must be a "
                    f"multiple of accum_steps {accum} x world_size {world} = {per_sample_slot}; "
                    f"nearest valid: {_nearest_multiples(glob, per_sample_slot)}"
                )
            micro = glob // per_sample_slot
        elif glob != accum * micro * world:
            raise ValueError(
                f"global_batch_size {glob} is not accum_steps x micro_batch_size x world_size "
                f"({accum} x {micro} x {world} = {accum * micro * world}); give only two of the three, "
                f"or nearest valid global_batch_size: {_nearest_multiples(glob, micro * world)}"
            )
        object.__setattr__(self, "global_batch_size", glob)
        object.__setattr__(self, "micro_batch_size", micro)
        object.__setattr__(self, "accum_steps", accum)
        object.__setattr__(self, "world_size", world)

    def for_world_size(self, world_size: int) -> BatchPlan:
        """The same global and micro batch on ``world_size`` ranks, with ``accum_steps`` re-derived.

        Raises:
            ValueError: the global batch cannot be split over ``world_size`` ranks; the message lists the
                world sizes that work.
        """
        world = _positive_int("world_size", world_size)
        samples_per_rank_slot = self.global_batch_size // self.micro_batch_size
        if self.global_batch_size % (self.micro_batch_size * world):
            valid = [w for w in range(1, samples_per_rank_slot + 1) if samples_per_rank_slot % w == 0]
            raise ValueError(
                f"world_size {world} cannot keep global_batch_size {self.global_batch_size} with "
                f"micro_batch_size {self.micro_batch_size}: {self.global_batch_size} is not a multiple of "
                f"{self.micro_batch_size} x {world} = {self.micro_batch_size * world}; valid world sizes: "
                f"{', '.join(map(str, valid))}"
            )
        return BatchPlan(
            global_batch_size=self.global_batch_size, micro_batch_size=self.micro_batch_size, world_size=world
        )

    def check_world_size(self, world_size: int | None = None) -> None:
        """Refuse a plan made for another number of ranks than ``world_size`` (default: this job's).

        Raises:
            ValueError: they differ; the global batch would be wrong. The message gives the re-plan call.

        Example:
            >>> BatchPlan(global_batch_size=8, micro_batch_size=4, world_size=1).check_world_size(1)
        """
        live = dist.world_size() if world_size is None else world_size
        if self.world_size != live:
            raise ValueError(
                f"plan.world_size is {self.world_size} but this job runs {live} rank(s): the global batch would "
                f"be wrong. Re-plan for the live world size: plan = plan.for_world_size({live})"
            )

    def check_resume_from(self, saved: BatchPlan, micro_step: int) -> None:
        """Refuse to resume a state saved with ``saved`` at ``micro_step`` of its window under this plan.

        A boundary state (``micro_step`` 0) resumes under any plan with the same global and micro batch (an
        elastic restart re-derives ``accum_steps``); a mid-window one only under the same plan.

        Raises:
            ValueError: another global or micro batch, or another world size mid-window.
        """
        if (saved.global_batch_size, saved.micro_batch_size) != (self.global_batch_size, self.micro_batch_size):
            raise ValueError(
                f"checkpoint was made with plan ({saved}) but this accumulator has ({self}); build the "
                f"plan from the checkpoint: BatchPlan.from_dict(state['plan']).for_world_size(world_size)"
            )
        if saved != self and micro_step:
            raise ValueError(
                f"checkpoint was taken mid-window (micro-step {micro_step} of {saved.accum_steps}) on "
                f"{saved.world_size} rank(s) and cannot resume on {self.world_size}: the window's unreduced "
                f"gradients belong to ranks of the old job. Resume it on {saved.world_size} rank(s), or from a "
                "checkpoint taken at a window boundary (those resume on any valid world size)."
            )

    def as_dict(self) -> dict[str, int]:
        """The four sizes as a plain dict (for checkpoints and logs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, sizes: dict[str, int]) -> BatchPlan:
        """Inverse of :meth:`as_dict`; the equation is checked again."""
        return cls(**{name: sizes[name] for name in _SIZE_FIELDS})

    def __str__(self) -> str:
        return (
            f"global_batch_size {self.global_batch_size} = accum_steps {self.accum_steps} x "
            f"micro_batch_size {self.micro_batch_size} x world_size {self.world_size}"
        )
