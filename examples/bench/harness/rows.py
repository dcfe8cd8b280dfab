"""The report's rows, from the ranks' records (:mod:`.records`) to what ``--json`` writes.

Each row is a dataclass whose fields, in order, are its JSON keys: :meth:`Summary.to_json` (``dataclasses.asdict``)
writes them. The JSON read back, and results files of earlier runs, are plain dicts: :func:`.report.format_report`,
:mod:`.report_ratios` and :mod:`.plot` read that form. The keys of the ratios (``paired_vs_no_sync``,
``equal_work_pairs``, ``noise_floor``) are documented in :mod:`.report_ratios`, those of ``memory_by_accum_steps`` in
:mod:`.report_memory`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from examples.bench.harness.config import BenchConfig
from examples.bench.harness.records import Case, Gradient

Counts = int | list[int]
"""A count per step: an int where all steps (and ranks) agree, else the sorted distinct values."""


@dataclass(frozen=True)
class MemoryPeak:
    """Peak memory of one method at one case, the largest over ranks (a method's ``memory`` in the JSON)."""

    peak_rss_mib: float
    start_rss_mib: float
    """RSS at the start of the process, before the method was built."""
    peak_cuda_mib: float | None

    @property
    def peak_mib(self) -> float:
        """The peak the report compares: CUDA on GPU, else RSS."""
        return self.peak_rss_mib if self.peak_cuda_mib is None else self.peak_cuda_mib


MemoryIndex = dict[tuple[Case, str], MemoryPeak]
"""The memory jobs' peaks by (case, method), in the order the jobs ran."""


@dataclass
class MethodSummary:
    """One method of one case (``cases[i]["methods"][name]``): times over the rounds, counts, update, memory."""

    label: str
    seconds_per_step: list[float]
    """Per timed round, the slowest rank's step time."""
    median_s: float
    p25_s: float
    p75_s: float
    spread: float
    """Interquartile range over the median."""
    cpu_seconds_per_step: list[float]
    """Per timed round, the largest rank's process CPU time."""
    median_cpu_s: float | None
    gradient_reductions_per_step: Counts
    other_collectives_per_step: Counts
    reduce_scatters_per_step: Counts
    gradient_all_reduces_per_step: Counts
    all_gathers_per_step: Counts
    gradient_reductions_by_micro_step: list[int] | list[list[int]] | None
    all_reduce_bytes_per_step: Counts
    update_mismatch_vs_no_sync: float | None
    update_reference: str | None
    update_mismatch_vs_reference: float | None
    replicas_agree: bool
    memory: MemoryPeak | None
    peak_mib: float | None
    time_vs_no_sync: float | None = None
    """Ratios of the medians (and peaks) to (b)'s, set once every method of the case is summarized."""
    cpu_vs_no_sync: float | None = None
    peak_vs_no_sync: float | None = None


@dataclass
class CaseSummary:
    """One timing case (``cases[i]``): every method's figures and the per-round ratios between them."""

    model: str
    micro_batch_size: int
    accum_steps: int
    gradient: Gradient
    methods: dict[str, MethodSummary]
    paired_vs_no_sync: dict[str, Any]
    equal_work_pairs: dict[str, Any]
    noise_floor: dict[str, Any] | None


@dataclass(frozen=True)
class MemoryRow:
    """``memory_by_accum_steps[i]``: one method's peaks against k, in the order of ``accum_steps``."""

    model: str
    micro_batch_size: int
    method: str
    label: str
    accum_steps: list[int]
    peak_mib: list[float]
    start_mib: list[float]


@dataclass(frozen=True)
class SweepRow:
    """``memory_sweep[i]``: the virtual batch micro x k against the real batch micro x k, at one k."""

    model: str
    micro_batch_size: int
    accum_steps: int
    virtual_peak_mib: float | None
    real_peak_mib: float | None
    virtual_vs_real_micro: float | None
    real_vs_real_micro: float | None
    reference: str


@dataclass(frozen=True)
class CaseTargets:
    """``targets["per_case"][i]``: the figures the issue set targets for, in one case."""

    model: str
    accum_steps: int
    gradient_reductions_per_step: dict[str, Counts]
    """Of distaccum and sync_every, those that ran."""
    distaccum_vs_no_sync: float | None
    distaccum_vs_no_sync_cpu: float | None
    distaccum_vs_accelerate: float | None
    distaccum_vs_deepspeed: float | None
    items_vs_distaccum: float | None
    items_vs_distaccum_cpu: float | None
    noise_floor_resolves: bool | None


@dataclass(frozen=True)
class Targets:
    """``targets``: per case, then the memory target over the sweep."""

    per_case: list[CaseTargets]
    time_target_distaccum_vs_no_sync: float
    memory_virtual_vs_real_micro_max: float | None
    memory_target: float


@dataclass(frozen=True)
class LinkMethodRow:
    """``link_comparison[i]["methods"][name]``: one method over the link, on loopback, and the estimate."""

    label: str
    measured_s: float
    spread: float
    loopback_s: float
    measured_minus_loopback_s: float
    gradient_reductions_per_step: Counts
    loopback_gradient_reductions_per_step: Counts
    full_gradient_all_reduces_per_step: int
    bytes_sent_per_rank: float
    estimated_comm_s: float
    estimated_comm_plus_loopback_s: float


@dataclass(frozen=True)
class LinkRow:
    """``link_comparison[i]``: one case over the link."""

    model: str
    accum_steps: int
    methods: dict[str, LinkMethodRow]
    sync_every_vs_distaccum: dict[str, float | None]
    """Ratios of sync_every to distaccum: ``measured_s``, ``loopback_s``, ``estimated_comm_plus_loopback_s``."""


@dataclass
class Summary:
    """All figures of a run (what ``--json`` writes, but the ``command`` and, with a link, the link's keys)."""

    config: BenchConfig
    environment: dict[str, Any]
    models: dict[str, str]
    cases: list[CaseSummary]
    memory_by_accum_steps: list[MemoryRow]
    memory_sweep: list[SweepRow]
    targets: Targets

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
