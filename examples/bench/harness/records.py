"""What crosses the process boundary between the launcher and its ranks: a job, and what each rank measured.

:class:`Job` is written as ``spec.json`` for every rank (:mod:`.launch`); each rank writes ``result-{rank}.json``
(:mod:`.worker`): a :class:`TimeResult` for a ``time`` job, a :class:`MemoryMeasurement` for a ``memory`` one.
Every record goes to JSON with :func:`dataclasses.asdict` (``to_json``) and comes back with ``from_json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # a leaf at run time: counting.py reads these records
    from examples.bench.harness.counting import CommCounter


@dataclass(frozen=True)
class Case:
    """One timing case: a model at a micro-batch size and ``accum_steps``; hashable, a key of the memory index."""

    model: str
    micro_batch_size: int
    accum_steps: int


@dataclass(frozen=True)
class Job:
    """What every rank of one group of fresh processes runs (``spec.json``)."""

    kind: Literal["time", "memory"]
    """``time``: every method of every case, round by round; ``memory``: one method of one case, a few steps."""
    cases: list[Case]
    methods: list[str]
    size: str
    seed: int
    threads: int
    """Torch threads per rank."""
    warmup: int
    rounds: int
    steps: int
    """Optimizer steps of a ``memory`` job."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "cases": [Case(**case) for case in data["cases"]]})


@dataclass
class MethodTimings:
    """One method on one rank over a case's timed rounds: one entry per round in each list, then its update."""

    seconds: list[float] = field(default_factory=list)
    """Wall time of the step (``perf_counter``)."""
    cpu_seconds: list[float] = field(default_factory=list)
    """CPU time of the process during the step (all its threads)."""
    bytes: list[int] = field(default_factory=list)
    """Bytes all-reduced during the step (every bucket, every scalar)."""
    gradient_reductions: list[int] = field(default_factory=list)
    other_collectives: list[int] = field(default_factory=list)
    reduce_scatters: list[int] = field(default_factory=list)
    gradient_all_reduces: list[int] = field(default_factory=list)
    all_gathers: list[int] = field(default_factory=list)
    by_micro_step: list[list[int]] = field(default_factory=list)
    """Gradient reductions of each micro-step (empty lists for methods that do not mark their micro-steps)."""
    update_mismatch: float | None = None
    """After the rounds: the weight difference to (b) (or to the first method), relative to (b)'s update."""
    update_mismatch_vs_reference: float | None = None
    """The same against the method's own reference; None when that one did not run."""
    fingerprint: list[float] = field(default_factory=list)
    """Sum and norm of the final weights: the ranks' replicas agree when theirs do."""

    def record_round(self, seconds: float, cpu_seconds: float, counter: CommCounter, bytes_reduced: int) -> None:
        """Append one timed round: its times, what ``counter`` counted during the step, and the bytes reduced."""
        self.seconds.append(seconds)
        self.cpu_seconds.append(cpu_seconds)
        self.bytes.append(bytes_reduced)
        self.gradient_reductions.append(counter.gradient_reductions)
        self.other_collectives.append(counter.other_collectives)
        self.reduce_scatters.append(counter.reduce_scatters)
        self.gradient_all_reduces.append(counter.gradient_all_reduces)
        self.all_gathers.append(counter.all_gathers)
        self.by_micro_step.append(counter.by_micro_step)


@dataclass(frozen=True)
class Gradient:
    """The size of a case's gradient: parameters and bytes (the case's ``gradient`` in the JSON)."""

    params: int
    bytes: int


@dataclass
class CaseTimings:
    """What one rank measured of one case in a ``time`` job."""

    case: Case
    gradient: Gradient
    methods: dict[str, MethodTimings]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseTimings:
        return cls(
            case=Case(**data["case"]),
            gradient=Gradient(**data["gradient"]),
            methods={name: MethodTimings(**record) for name, record in data["methods"].items()},
        )


@dataclass
class TimeResult:
    """One rank's result of a ``time`` job."""

    cases: list[CaseTimings]
    threads: int
    """Torch threads at the end (Accelerate and DeepSpeed may change them; each method is reset to the job's)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimeResult:
        return cls(cases=[CaseTimings.from_json(case) for case in data["cases"]], threads=data["threads"])


@dataclass(frozen=True)
class MemoryMeasurement:
    """One rank's result of a ``memory`` job: one method of one case, in a fresh process."""

    case: Case
    method: str
    peak_rss_bytes: int
    """``ru_maxrss`` of the process."""
    baseline_rss_bytes: int
    """RSS before the method was built."""
    peak_cuda_bytes: int | None
    """``torch.cuda.max_memory_allocated``; None on CPU."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryMeasurement:
        return cls(**{**data, "case": Case(**data["case"])})
