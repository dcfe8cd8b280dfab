"""Two nodes over a shaped link (``--link-rate``): per case and method, the step time over the link next to the
loopback baseline and to ``distaccum plan``'s estimate of the communication (JSON key ``link_comparison``)."""

from __future__ import annotations

from typing import Any

from distaccum.tools.planner import DEFAULT_LATENCY_S, mode_traffic
from examples.bench.harness.rows import CaseSummary, LinkMethodRow, LinkRow


def _largest(value: int | list[int]) -> int:
    return value if isinstance(value, int) else max(value)


def link_comparison(
    cases: list[CaseSummary], loopback: list[CaseSummary], link: dict[str, Any], world_size: int
) -> list[LinkRow]:
    """Per case and method: step time over the link and on loopback, next to ``distaccum plan``'s estimate.

    The estimate is the planner's alpha-beta model of a DDP ring all-reduce over ``world_size`` ranks at the link's
    rate, with as many full-gradient reductions per step as the bench measured (bytes all-reduced / gradient bytes).
    """
    rows = []
    for case, base in zip(cases, loopback, strict=True):
        grad = case.gradient
        methods = {}
        for name, entry in case.methods.items():
            full = round(_largest(entry.all_reduce_bytes_per_step) / grad.bytes)
            traffic = mode_traffic("ddp", "every", 1, world_size, full, grad.params, grad.bytes // grad.params)
            collectives = traffic["reduce_scatters"] + traffic["all_reduces"]
            comm = collectives * DEFAULT_LATENCY_S + traffic["bytes_sent_per_rank"] / link["bandwidth_bytes_per_s"]
            loop = base.methods[name]
            methods[name] = LinkMethodRow(
                label=entry.label,
                measured_s=entry.median_s,
                spread=entry.spread,
                loopback_s=loop.median_s,
                measured_minus_loopback_s=entry.median_s - loop.median_s,
                gradient_reductions_per_step=entry.gradient_reductions_per_step,
                loopback_gradient_reductions_per_step=loop.gradient_reductions_per_step,
                full_gradient_all_reduces_per_step=full,
                bytes_sent_per_rank=traffic["bytes_sent_per_rank"],
                estimated_comm_s=comm,
                estimated_comm_plus_loopback_s=comm + loop.median_s,
            )
        every, ours = methods.get("sync_every"), methods.get("distaccum")
        ratios = {
            key: getattr(every, key) / getattr(ours, key) if every and ours and getattr(ours, key) else None
            for key in ("measured_s", "loopback_s", "estimated_comm_plus_loopback_s")
        }
        rows.append(LinkRow(case.model, case.accum_steps, methods, sync_every_vs_distaccum=ratios))
    return rows
