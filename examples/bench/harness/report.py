"""Turn the ranks' records (:mod:`.records`) into the report's rows (:func:`summarize`, :mod:`.rows`) and the
printed report (:func:`format_report`, from the JSON form: results files read back are plain dicts).

JSON keys of the ratios and update checks: :mod:`.report_ratios`; of peak memory against k: :mod:`.report_memory`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from distaccum.tools.planner import DEFAULT_LATENCY_S
from examples.bench.harness.config import BenchConfig
from examples.bench.harness.counting import one_or_all, summarize_counts
from examples.bench.harness.methods import METHODS, method_labels
from examples.bench.harness.order import design_note
from examples.bench.harness.records import Case, CaseTimings, MemoryMeasurement, MethodTimings, TimeResult
from examples.bench.harness.report_memory import format_memory, memory_rows
from examples.bench.harness.report_ratios import BASELINE, format_ratios, paired_ratios, quantile
from examples.bench.harness.rows import (
    CaseSummary,
    CaseTargets,
    Counts,
    MemoryIndex,
    MemoryPeak,
    MethodSummary,
    Summary,
    SweepRow,
    Targets,
)

MIB = 1024 * 1024
TARGETS = {"time_vs_no_sync": 1.01, "memory_virtual_vs_real_micro": 1.05}


def _memory_index(memory_jobs: list[list[MemoryMeasurement]]) -> MemoryIndex:
    index = {}
    for ranks in memory_jobs:
        first = ranks[0]
        peaks_cuda = [r.peak_cuda_bytes for r in ranks if r.peak_cuda_bytes is not None]
        index[first.case, first.method] = MemoryPeak(
            peak_rss_mib=max(r.peak_rss_bytes for r in ranks) / MIB,
            start_rss_mib=max(r.baseline_rss_bytes for r in ranks) / MIB,
            peak_cuda_mib=max(peaks_cuda) / MIB if peaks_cuda else None,
        )
    return index


def _peak(entry: MemoryPeak | None) -> float | None:
    return None if entry is None else entry.peak_mib


def _summarize_method(name: str, label: str, records: list[MethodTimings], mem: MemoryPeak | None) -> MethodSummary:
    # A step ends in a collective, so ranks finish together; the slowest rank's time is the step's time.
    seconds = [max(values) for values in zip(*(r.seconds for r in records), strict=True)]
    median = statistics.median(seconds)
    # CPU time of the process (all its threads): what the method costs, whatever else the machine runs.
    cpu = [max(values) for values in zip(*(r.cpu_seconds for r in records), strict=True)]
    fingerprints = [r.fingerprint for r in records]
    return MethodSummary(
        label=label,
        seconds_per_step=seconds,
        median_s=median,
        p25_s=quantile(seconds, 0.25),
        p75_s=quantile(seconds, 0.75),
        spread=(quantile(seconds, 0.75) - quantile(seconds, 0.25)) / median if median else 0.0,
        cpu_seconds_per_step=cpu,
        median_cpu_s=statistics.median(cpu) if cpu else None,
        **summarize_counts(records),
        all_reduce_bytes_per_step=one_or_all({c for r in records for c in r.bytes} or {0}),
        update_mismatch_vs_no_sync=records[0].update_mismatch,
        update_reference=None,  # set by the case, which knows the methods that ran
        update_mismatch_vs_reference=records[0].update_mismatch_vs_reference,
        replicas_agree=all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
            for fp in fingerprints
            for a, b in zip(fp, fingerprints[0], strict=True)
        ),
        memory=mem,
        peak_mib=_peak(mem),
    )


def _summarize_case(ranks: list[CaseTimings], memory: MemoryIndex) -> CaseSummary:
    case = ranks[0].case
    labels = method_labels()
    methods: dict[str, MethodSummary] = {}
    for name in ranks[0].methods:
        entry = _summarize_method(name, labels[name], [rank.methods[name] for rank in ranks], memory.get((case, name)))
        reference = METHODS[name].reference if name in METHODS else None
        entry.update_reference = reference if reference in ranks[0].methods else None
        methods[name] = entry
    base = methods.get(BASELINE)
    for entry in methods.values():
        entry.time_vs_no_sync = entry.median_s / base.median_s if base else None
        entry.cpu_vs_no_sync = (
            entry.median_cpu_s / base.median_cpu_s if base and base.median_cpu_s and entry.median_cpu_s else None
        )
        entry.peak_vs_no_sync = entry.peak_mib / base.peak_mib if base and base.peak_mib and entry.peak_mib else None
    # The ratios read the JSON form of the methods, as they do of results read back from a file.
    ratios = paired_ratios({name: dataclasses.asdict(entry) for name, entry in methods.items()})
    return CaseSummary(**dataclasses.asdict(case), gradient=ranks[0].gradient, methods=methods, **ratios)


def _sweep(config: BenchConfig, memory: MemoryIndex, micro: dict[str, int]) -> list[SweepRow]:
    rows: list[SweepRow] = []
    ks = sorted(config.memory_sweep)
    for model in config.models:
        if not ks:
            break

        def peak(k: int, method: str, model: str = model) -> float | None:
            return _peak(memory.get((Case(model, micro[model], k), method)))

        base = peak(ks[0], "real_batch")
        for k in ks:
            virtual, real = peak(k, "distaccum"), peak(k, "real_batch")
            rows.append(
                SweepRow(
                    model=model,
                    micro_batch_size=micro[model],
                    accum_steps=k,
                    virtual_peak_mib=virtual,
                    real_peak_mib=real,
                    virtual_vs_real_micro=virtual / base if virtual and base else None,
                    real_vs_real_micro=real / base if real and base else None,
                    reference=f"real batch at accum_steps {ks[0]}",
                )
            )
    return rows


def _ratio(case: CaseSummary, name: str, other: str, field: str = "median_s") -> float | None:
    methods = case.methods
    if name in methods and other in methods:
        value, base = getattr(methods[name], field), getattr(methods[other], field)
        if value and base:
            return float(value / base)
    return None


def _targets(cases: list[CaseSummary], sweep: list[SweepRow]) -> Targets:
    per_case = []
    for case in cases:
        methods = case.methods
        reductions: dict[str, Counts] = {
            n: methods[n].gradient_reductions_per_step for n in ("distaccum", "sync_every") if n in methods
        }
        per_case.append(
            CaseTargets(
                model=case.model,
                accum_steps=case.accum_steps,
                gradient_reductions_per_step=reductions,
                distaccum_vs_no_sync=_ratio(case, "distaccum", "no_sync"),
                distaccum_vs_no_sync_cpu=_ratio(case, "distaccum", "no_sync", "median_cpu_s"),
                distaccum_vs_accelerate=_ratio(case, "distaccum", "accelerate"),
                distaccum_vs_deepspeed=_ratio(case, "distaccum", "deepspeed"),
                items_vs_distaccum=_ratio(case, "distaccum_items", "distaccum"),
                items_vs_distaccum_cpu=_ratio(case, "distaccum_items", "distaccum", "median_cpu_s"),
                noise_floor_resolves=(case.noise_floor or {}).get("resolves"),
            )
        )
    memory = [row.virtual_vs_real_micro for row in sweep if row.virtual_vs_real_micro is not None]
    return Targets(
        per_case=per_case,
        time_target_distaccum_vs_no_sync=TARGETS["time_vs_no_sync"],
        memory_virtual_vs_real_micro_max=max(memory) if memory else None,
        memory_target=TARGETS["memory_virtual_vs_real_micro"],
    )


def summarize(
    timed: list[TimeResult],
    memory_jobs: list[list[MemoryMeasurement]],
    *,
    config: BenchConfig,
    environment: dict[str, Any],
    models: dict[str, str],
) -> Summary:
    """All figures of a run from the ranks' records: the timing job's, one :class:`TimeResult` per rank, and the
    memory jobs', one list of ranks per job (:meth:`Summary.to_json` is what ``--json`` writes)."""
    memory = _memory_index(memory_jobs)
    cases = [_summarize_case([rank.cases[index] for rank in timed], memory) for index in range(len(timed[0].cases))]
    micro = {case.model: case.micro_batch_size for case in cases}
    sweep = _sweep(config, memory, micro)
    return Summary(
        config=config,
        environment=environment,
        models=models,
        cases=cases,
        memory_by_accum_steps=memory_rows(memory, method_labels()),
        memory_sweep=sweep,
        targets=_targets(cases, sweep),
    )


def _format_link(results: dict[str, Any]) -> list[str]:
    link = results["link"]
    lines = [
        "",
        f"two nodes over {link['rate']} ({link['bandwidth_bytes_per_s'] / 1e6:g} MB/s each way; {link['shaping']}), "
        f"one rank per network namespace; the loopback baseline is the same timing job run after it",
        f"estimate: `distaccum plan`'s alpha-beta model of a DDP ring all-reduce over {results['config']['nproc']} "
        f"ranks: full-gradient all-reduces x {DEFAULT_LATENCY_S * 1e6:g} us + bytes sent per rank / rate",
    ]
    header = (
        f"{'method':<47} {'link s/step':>11} {'IQR':>5} {'loopback s':>10} {'link-loop':>9} {'grad red.':>9} "
        f"{'full AR':>7} {'MB sent':>8} {'est. comm s':>11} {'est.+loop':>9}"
    )
    for row in results["link_comparison"]:
        lines += ["", f"{row['model']}, accum_steps {row['accum_steps']}", header, "-" * len(header)]
        for m in row["methods"].values():
            counts = _counts(m["gradient_reductions_per_step"])
            if m["gradient_reductions_per_step"] != m["loopback_gradient_reductions_per_step"]:
                counts += f" (loopback {_counts(m['loopback_gradient_reductions_per_step'])})"
            lines.append(
                f"{m['label']:<47} {m['measured_s']:>11.3f} {m['spread'] * 100:>4.0f}% {m['loopback_s']:>10.3f} "
                f"{m['measured_minus_loopback_s']:>9.3f} {counts:>9} {m['full_gradient_all_reduces_per_step']:>7} "
                f"{m['bytes_sent_per_rank'] / 1e6:>8.1f} {m['estimated_comm_s']:>11.3f} "
                f"{m['estimated_comm_plus_loopback_s']:>9.3f}"
            )
        ratio = row["sync_every_vs_distaccum"]
        lines.append(
            f"sync_every / distaccum: measured {_fmt(ratio['measured_s'], '.2f')}x over the link, "
            f"{_fmt(ratio['loopback_s'], '.2f')}x on loopback; estimated (est. comm + loopback) "
            f"{_fmt(ratio['estimated_comm_plus_loopback_s'], '.2f')}x"
        )
    return lines


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _update(case: dict[str, Any], entry: dict[str, Any]) -> str:
    reference, mismatch = entry.get("update_reference"), entry.get("update_mismatch_vs_reference")
    if reference is None or mismatch is None:
        return f"{entry['update_mismatch_vs_no_sync']:.1e} (b)"
    return f"{mismatch:.1e} {case['methods'][reference]['label'].partition(' ')[0]}"


def _counts(value: int | list[int]) -> str:
    return str(value) if isinstance(value, int) else "/".join(map(str, value))


def _split(entry: dict[str, Any]) -> str:
    """Reduce-scatters/all-reduces of the gradient per step ("-" in JSON written before they were counted apart)."""
    parts = [entry.get(f"{kind}_per_step") for kind in ("reduce_scatters", "gradient_all_reduces")]
    return "-" if None in parts else "/".join(_counts(part) for part in parts)  # type: ignore[arg-type]


def format_report(results: dict[str, Any]) -> str:
    """The printed report: one table per case, the memory sweep, and the targets."""
    env = results["environment"]
    memory_kind = "peak CUDA MiB" if env["device"] == "cuda" else "peak RSS MiB"
    config = results["config"]
    lines = [
        f"bench harness: {config['nproc']} ranks ({env['backend']}, {env['threads_per_rank']} thread(s)/rank), "
        f"torch {env['torch']}, accelerate {env['accelerate']}, deepspeed {env['deepspeed']}; "
        f"{config['warmup']} warm-up + {config['rounds']} timed rounds, methods interleaved, {design_note(results)}",
        f"load average before/after: {env['load_average_before'][0]:.2f} / {env['load_average_after'][0]:.2f}; "
        f"wall {env['wall_seconds']:.0f} s",
    ]
    header = (
        f"{'method':<47} {'s/step':>8} {'IQR':>5} {'vs (b)':>7} {'CPU s':>7} {'vs (b)':>7} {'grad red./step':>14} "
        f"{'RS/AR':>7} {'other coll.':>11} "
        f"{memory_kind + '/rank':>18} {'vs (b)':>7} {'update vs ref':>13}"
    )
    for case in results["cases"]:
        lines += [
            "",
            f"{case['model']}: {results['models'][case['model']]}; micro_batch_size {case['micro_batch_size']}, "
            f"accum_steps {case['accum_steps']}",
            header,
            "-" * len(header),
        ]
        for entry in case["methods"].values():
            agree = "" if entry["replicas_agree"] else " (replicas differ!)"
            lines.append(
                f"{entry['label']:<47} {entry['median_s']:>8.4f} {entry['spread'] * 100:>4.0f}% "
                f"{_fmt(entry['time_vs_no_sync'], '.3f'):>6}x {_fmt(entry['median_cpu_s'], '.4f'):>7} "
                f"{_fmt(entry['cpu_vs_no_sync'], '.3f'):>6}x {_counts(entry['gradient_reductions_per_step']):>14} "
                f"{_split(entry):>7} {_counts(entry['other_collectives_per_step']):>11} "
                f"{_fmt(entry['peak_mib'], '.0f'):>18} {_fmt(entry['peak_vs_no_sync'], '.3f'):>7} "
                f"{_update(case, entry):>13}{agree}"
            )
        lines += format_ratios(case)
    lines += format_memory(results.get("memory_by_accum_steps", []), memory_kind)
    if results["memory_sweep"]:
        lines += [
            "",
            f"memory sweep ({memory_kind} per rank, fresh processes): virtual batch micro x k (distaccum) vs real "
            "batch micro x k in one pass; ratios against the real batch at the smallest k",
            f"{'model':<12} {'micro':>5} {'k':>4} {'virtual':>9} {'real':>9} {'virtual/real(micro)':>20} "
            f"{'real/real(micro)':>17}",
        ]
        for row in results["memory_sweep"]:
            lines.append(
                f"{row['model']:<12} {row['micro_batch_size']:>5} {row['accum_steps']:>4} "
                f"{_fmt(row['virtual_peak_mib'], '.0f'):>9} {_fmt(row['real_peak_mib'], '.0f'):>9} "
                f"{_fmt(row['virtual_vs_real_micro'], '.3f'):>20} {_fmt(row['real_vs_real_micro'], '.3f'):>17}"
            )
    targets = results["targets"]
    lines += ["", "targets (reported, not asserted):"]
    for row in targets["per_case"]:
        red = row["gradient_reductions_per_step"]
        lines.append(
            f"  {row['model']} k={row['accum_steps']}: reductions/step distaccum {_counts(red.get('distaccum', '-'))} "
            f"vs sync-every {_counts(red.get('sync_every', '-'))}; time distaccum/no_sync "
            f"{_fmt(row['distaccum_vs_no_sync'], '.3f')} (CPU {_fmt(row['distaccum_vs_no_sync_cpu'], '.3f')}; "
            f"target <= {targets['time_target_distaccum_vs_no_sync']}), "
            f"/accelerate {_fmt(row['distaccum_vs_accelerate'], '.3f')}, /deepspeed "
            f"{_fmt(row['distaccum_vs_deepspeed'], '.3f')} (target <= 1); num_items/plain "
            f"{_fmt(row['items_vs_distaccum'], '.3f')} (CPU {_fmt(row['items_vs_distaccum_cpu'], '.3f')})"
        )
    lines.append(
        f"  memory: max virtual(micro x k)/real(micro) {_fmt(targets['memory_virtual_vs_real_micro_max'], '.3f')} "
        f"(target <= {targets['memory_target']})"
    )
    if results.get("link"):
        lines += _format_link(results)
    return "\n".join(lines)
