"""Turn the ranks' raw benchmark records into figures (:func:`summarize`) and a printable report.

JSON keys of the ratios and update checks: :mod:`.report_ratios`; of peak memory against k: :mod:`.report_memory`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from distaccum.tools.bench.counting import one_or_all, summarize_counts
from distaccum.tools.bench.methods import METHODS, method_labels
from distaccum.tools.bench.order import design_note
from distaccum.tools.bench.report_memory import format_memory, memory_rows
from distaccum.tools.bench.report_ratios import BASELINE, format_ratios, paired_ratios, quantile
from distaccum.tools.planner import DEFAULT_LATENCY_S, mode_traffic

MIB = 1024 * 1024
TARGETS = {"time_vs_no_sync": 1.01, "memory_virtual_vs_real_micro": 1.05}


def _memory_index(memory_jobs: list[list[dict[str, Any]]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    index = {}
    for ranks in memory_jobs:
        first = ranks[0]
        key = (first["model"], first["micro_batch_size"], first["accum_steps"], first["method"])
        peaks_cuda = [r["peak_cuda_bytes"] for r in ranks if r["peak_cuda_bytes"] is not None]
        index[key] = {
            "peak_rss_mib": max(r["peak_rss_bytes"] for r in ranks) / MIB,
            "start_rss_mib": max(r["baseline_rss_bytes"] for r in ranks) / MIB,
            "peak_cuda_mib": max(peaks_cuda) / MIB if peaks_cuda else None,
        }
    return index


def _peak(entry: dict[str, Any] | None) -> float | None:
    if entry is None:
        return None
    return entry["peak_cuda_mib"] if entry["peak_cuda_mib"] is not None else entry["peak_rss_mib"]


def _summarize_case(ranks: list[dict[str, Any]], memory: dict[tuple[Any, ...], dict[str, Any]]) -> dict[str, Any]:
    case = {key: ranks[0][key] for key in ("model", "micro_batch_size", "accum_steps")}
    labels = method_labels()
    methods: dict[str, Any] = {}
    for name in ranks[0]["methods"]:
        records = [rank["methods"][name] for rank in ranks]
        # A step ends in a collective, so ranks finish together; the slowest rank's time is the step's time.
        seconds = [max(values) for values in zip(*(r["seconds"] for r in records), strict=True)]
        median = statistics.median(seconds)
        # CPU time of the process (all its threads): what the method costs, whatever else the machine runs.
        cpu = [max(values) for values in zip(*(r.get("cpu_seconds", []) for r in records), strict=True)]
        fingerprints = [r["fingerprint"] for r in records]
        mem = memory.get((case["model"], case["micro_batch_size"], case["accum_steps"], name))
        reference = METHODS[name].reference if name in METHODS else None
        methods[name] = {
            "label": labels[name],
            "seconds_per_step": seconds,
            "median_s": median,
            "p25_s": quantile(seconds, 0.25),
            "p75_s": quantile(seconds, 0.75),
            "spread": (quantile(seconds, 0.75) - quantile(seconds, 0.25)) / median if median else 0.0,
            "cpu_seconds_per_step": cpu,
            "median_cpu_s": statistics.median(cpu) if cpu else None,
            **summarize_counts(records),
            "all_reduce_bytes_per_step": one_or_all({c for r in records for c in r.get("bytes", [])} or {0}),
            "update_mismatch_vs_no_sync": records[0]["update_mismatch"][0],
            "update_reference": reference if reference in ranks[0]["methods"] else None,
            "update_mismatch_vs_reference": records[0].get("update_mismatch_vs_reference", [None])[0],
            "replicas_agree": all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                for fp in fingerprints
                for a, b in zip(fp, fingerprints[0], strict=True)
            ),
            "memory": mem,
            "peak_mib": _peak(mem),
        }
    base = methods.get(BASELINE)
    for entry in methods.values():
        entry["time_vs_no_sync"] = entry["median_s"] / base["median_s"] if base else None
        entry["cpu_vs_no_sync"] = (
            entry["median_cpu_s"] / base["median_cpu_s"]
            if base and base["median_cpu_s"] and entry["median_cpu_s"]
            else None
        )
        entry["peak_vs_no_sync"] = (
            entry["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] and entry["peak_mib"] else None
        )
    return {**case, "gradient": ranks[0].get("gradient"), "methods": methods, **paired_ratios(methods)}


def _sweep(config: dict[str, Any], memory: dict[tuple[Any, ...], dict[str, Any]], micro: dict[str, int]) -> list[Any]:
    rows = []
    ks = sorted(config["memory_sweep"])
    for model in config["models"]:
        if not ks:
            break
        base = _peak(memory.get((model, micro[model], ks[0], "real_batch")))
        for k in ks:
            virtual = _peak(memory.get((model, micro[model], k, "distaccum")))
            real = _peak(memory.get((model, micro[model], k, "real_batch")))
            rows.append(
                {
                    "model": model,
                    "micro_batch_size": micro[model],
                    "accum_steps": k,
                    "virtual_peak_mib": virtual,
                    "real_peak_mib": real,
                    "virtual_vs_real_micro": virtual / base if virtual and base else None,
                    "real_vs_real_micro": real / base if real and base else None,
                    "reference": f"real batch at accum_steps {ks[0]}",
                }
            )
    return rows


def _ratio(case: dict[str, Any], name: str, other: str, field: str = "median_s") -> float | None:
    methods = case["methods"]
    if name in methods and other in methods and methods[name][field] and methods[other][field]:
        return float(methods[name][field] / methods[other][field])
    return None


def _targets(cases: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> dict[str, Any]:
    per_case = []
    for case in cases:
        methods = case["methods"]
        reductions = {
            n: methods[n]["gradient_reductions_per_step"] for n in ("distaccum", "sync_every") if n in methods
        }
        per_case.append(
            {
                "model": case["model"],
                "accum_steps": case["accum_steps"],
                "gradient_reductions_per_step": reductions,
                "distaccum_vs_no_sync": _ratio(case, "distaccum", "no_sync"),
                "distaccum_vs_no_sync_cpu": _ratio(case, "distaccum", "no_sync", "median_cpu_s"),
                "distaccum_vs_accelerate": _ratio(case, "distaccum", "accelerate"),
                "distaccum_vs_deepspeed": _ratio(case, "distaccum", "deepspeed"),
                "items_vs_distaccum": _ratio(case, "distaccum_items", "distaccum"),
                "items_vs_distaccum_cpu": _ratio(case, "distaccum_items", "distaccum", "median_cpu_s"),
                "noise_floor_resolves": (case.get("noise_floor") or {}).get("resolves"),
            }
        )
    memory = [row["virtual_vs_real_micro"] for row in sweep if row["virtual_vs_real_micro"] is not None]
    return {
        "per_case": per_case,
        "time_target_distaccum_vs_no_sync": TARGETS["time_vs_no_sync"],
        "memory_virtual_vs_real_micro_max": max(memory) if memory else None,
        "memory_target": TARGETS["memory_virtual_vs_real_micro"],
    }


def summarize(
    raw: dict[str, Any], *, config: dict[str, Any], environment: dict[str, Any], models: dict[str, str]
) -> dict[str, Any]:
    """All figures of a run from the ranks' raw records (the JSON that ``--json`` writes)."""
    memory = _memory_index(raw["memory"])
    time_ranks = raw["time"]
    cases = [
        _summarize_case([rank["cases"][index] for rank in time_ranks], memory)
        for index in range(len(time_ranks[0]["cases"]))
    ]
    micro = {case["model"]: case["micro_batch_size"] for case in cases}
    sweep = _sweep(config, memory, micro)
    return {
        "config": config,
        "environment": environment,
        "models": models,
        "cases": cases,
        "memory_by_accum_steps": memory_rows(memory, method_labels()),
        "memory_sweep": sweep,
        "targets": _targets(cases, sweep),
    }


def _largest(value: int | list[int]) -> int:
    return value if isinstance(value, int) else max(value)


def link_comparison(
    cases: list[dict[str, Any]], loopback: list[dict[str, Any]], link: dict[str, Any], world_size: int
) -> list[dict[str, Any]]:
    """Per case and method: step time over the link and on loopback, next to ``distaccum plan``'s estimate.

    The estimate is the planner's alpha-beta model of a DDP ring all-reduce over ``world_size`` ranks at the link's
    rate, with as many full-gradient reductions per step as the bench measured (bytes all-reduced / gradient bytes).
    """
    rows = []
    for case, base in zip(cases, loopback, strict=True):
        grad = case["gradient"]
        methods = {}
        for name, entry in case["methods"].items():
            full = round(_largest(entry["all_reduce_bytes_per_step"]) / grad["bytes"])
            traffic = mode_traffic("ddp", "every", 1, world_size, full, grad["params"], grad["bytes"] // grad["params"])
            collectives = traffic["reduce_scatters"] + traffic["all_reduces"]
            comm = collectives * DEFAULT_LATENCY_S + traffic["bytes_sent_per_rank"] / link["bandwidth_bytes_per_s"]
            loop = base["methods"][name]
            methods[name] = {
                "label": entry["label"],
                "measured_s": entry["median_s"],
                "spread": entry["spread"],
                "loopback_s": loop["median_s"],
                "measured_minus_loopback_s": entry["median_s"] - loop["median_s"],
                "gradient_reductions_per_step": entry["gradient_reductions_per_step"],
                "loopback_gradient_reductions_per_step": loop["gradient_reductions_per_step"],
                "full_gradient_all_reduces_per_step": full,
                "bytes_sent_per_rank": traffic["bytes_sent_per_rank"],
                "estimated_comm_s": comm,
                "estimated_comm_plus_loopback_s": comm + loop["median_s"],
            }
        pair = [methods.get(n) for n in ("sync_every", "distaccum")]
        ratios = {
            key: pair[0][key] / pair[1][key] if pair[0] and pair[1] and pair[1][key] else None
            for key in ("measured_s", "loopback_s", "estimated_comm_plus_loopback_s")
        }
        rows.append(
            {"model": case["model"], "accum_steps": case["accum_steps"], "methods": methods}
            | {"sync_every_vs_distaccum": ratios}
        )
    return rows


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
        f"distaccum bench: {config['nproc']} ranks ({env['backend']}, {env['threads_per_rank']} thread(s)/rank), "
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
