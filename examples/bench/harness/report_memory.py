"""Peak memory per rank of every method against ``accum_steps``, from the memory jobs (one fresh group of processes
per method, model and k): the table that shows whether a method's peak grows with k.

JSON key ``memory_by_accum_steps``: one row per (model, micro_batch_size, method) that had a memory job,
``{"model", "micro_batch_size", "method", "label", "accum_steps": [k, ...], "peak_mib": [...], "start_mib": [...]}``
with the peaks (CUDA on GPU, else RSS; the largest rank) and the RSS at the start of the process, in the order of
``accum_steps``.
"""

from __future__ import annotations

from typing import Any

from examples.bench.harness.rows import MemoryIndex, MemoryPeak, MemoryRow


def memory_rows(memory: MemoryIndex, labels: dict[str, str]) -> list[MemoryRow]:
    """``memory_by_accum_steps`` from the report's memory index ``(case, method) -> peaks``."""
    grouped: dict[tuple[str, int, str], dict[int, MemoryPeak]] = {}
    for (case, method), entry in memory.items():
        grouped.setdefault((case.model, case.micro_batch_size, method), {})[case.accum_steps] = entry
    rows = []
    for (model, micro, method), by_k in grouped.items():
        ks = sorted(by_k)
        rows.append(
            MemoryRow(
                model=model,
                micro_batch_size=micro,
                method=method,
                label=labels.get(method, method),
                accum_steps=ks,
                peak_mib=[by_k[k].peak_mib for k in ks],
                start_mib=[by_k[k].start_rss_mib for k in ks],
            )
        )
    return rows


def format_memory(rows: list[dict[str, Any]], memory_kind: str) -> list[str]:
    """Report lines: per model, one row per method, one column per k that any method measured."""
    lines: list[str] = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        ks = sorted({k for row in mine for k in row["accum_steps"]})
        lines += [
            "",
            f"{memory_kind} per rank against accum_steps, {model} (fresh processes per method and k; - not measured)",
            f"{'method':<47} " + " ".join(f"{'k=' + str(k):>7}" for k in ks),
        ]
        for row in mine:
            peak = dict(zip(row["accum_steps"], row["peak_mib"], strict=True))
            cells = " ".join(f"{peak[k]:>7.0f}" if k in peak else f"{'-':>7}" for k in ks)
            lines.append(f"{row['label']:<47} {cells}")
    return lines
