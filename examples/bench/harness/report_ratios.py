"""Paired per-round ratios of step times: every method against (b), the equal-work pairs, and the noise floor.

A timed round runs every method once on the same micro-batches, so the ratio of two methods' times within one
round cancels what drifted between rounds (other jobs, clocks, heat). A figure here is the median of those
per-round ratios, with their quartiles and a bootstrap 95% interval of the median (rounds resampled with
replacement, :data:`RESAMPLES` times, fixed seed: the same records always give the same interval).

JSON keys per method of a case (``cases[i]["methods"][name]``, from :mod:`.report`): ``time_vs_no_sync`` and
``cpu_vs_no_sync``, the ratios of the medians (wall, CPU) to (b)'s; ``update_mismatch_vs_no_sync``, the weight
difference to (b) after the rounds relative to (b)'s update, and ``update_mismatch_vs_reference``, the same
against ``update_reference``, the method whose update it must equal ((b), or (i) for the clipping (i) and (j);
null when that one did not run).

JSON keys added here to every case of ``cases``, next to ``methods`` (a *ratio* is
``{"median", "p25", "p75", "low", "high", "half_width", "rounds"}``: the median per-round ratio, its quartiles,
the bootstrap interval ``[low, high]`` of the median and half its width, and the number of rounds; null where a
method has no times of that kind):

* ``paired_vs_no_sync[name]``: ``{"wall": ratio, "cpu": ratio}`` of every method but (b) against (b), wall time
  (slowest rank) and process CPU time (largest rank);
* ``equal_work_pairs["distaccum/no_sync"]``, ``["distaccum_items/no_sync"]``, ``["distaccum_clip/no_sync_clip"]``,
  ``["distaccum/no_sync_logged"]`` (those whose two methods ran): ``{"method", "baseline", "wall": ratio, "cpu":
  ratio, "update_mismatch"}``, two methods that do the same work, the last the weight difference between them
  relative to the baseline's update;
* ``noise_floor``: ``{"method": "no_sync_twin", "baseline": "no_sync", "wall": ratio, "cpu": ratio,
  "resolution": 0.01, "resolves": bool}``, two identical loops (the A/A twin); ``resolves`` is true when the CPU
  ratio's median is within ``resolution`` of 1 and its ``half_width`` below it, i.e. when the rounds used resolve
  a 1% difference. Null when (k) or (b) did not run; ``targets["per_case"][i]["noise_floor_resolves"]`` repeats
  ``resolves``.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

BASELINE = "no_sync"
"""Every ratio of :func:`paired_ratios` but (j)/(i) is against (b), the hand-written ``no_sync`` loop."""
EQUAL_WORK_PAIRS = (
    ("distaccum", "no_sync"),
    ("distaccum_items", "no_sync"),
    ("distaccum_clip", "no_sync_clip"),
    ("distaccum", "no_sync_logged"),
)
"""(method, baseline): distaccum and the hand-written loop doing the same work."""
TWIN = "no_sync_twin"
RESOLUTION = 0.01
"""The difference a run must resolve: the twin's CPU ratio within 1% of 1, its interval's half-width below 1%."""
RESAMPLES = 1000
_FIELDS = {"wall": "seconds_per_step", "cpu": "cpu_seconds_per_step"}


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, interpolating linearly between order statistics.

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.25)
    1.75
    """
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratio(times: list[float], baseline: list[float], *, seed: int = 0) -> dict[str, Any] | None:
    """Median, quartiles and bootstrap 95% interval of the per-round ratios ``times[r] / baseline[r]``.

    Args:
        times: one method's time per round.
        baseline: the other method's time in the same rounds.
        seed: of the bootstrap's resampling.

    Returns:
        ``{"median", "p25", "p75", "low", "high", "half_width", "rounds"}``, or None without rounds.

    Raises:
        ValueError: the two lists do not cover the same rounds.

    >>> paired_ratio([2.0, 2.2, 1.8], [1.0, 1.0, 1.0])["median"]
    2.0
    """
    if len(times) != len(baseline):
        raise ValueError(f"{len(times)} times against {len(baseline)} baseline times: pair them round by round")
    ratios = [t / b for t, b in zip(times, baseline, strict=True) if b > 0]
    if not ratios:
        return None
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(RESAMPLES))
    low, high = quantile(medians, 0.025), quantile(medians, 0.975)
    return {
        "median": statistics.median(ratios),
        "p25": quantile(ratios, 0.25),
        "p75": quantile(ratios, 0.75),
        "low": low,
        "high": high,
        "half_width": (high - low) / 2,
        "rounds": len(ratios),
    }


def _both(methods: dict[str, Any], name: str, baseline: str) -> dict[str, Any]:
    return {
        kind: paired_ratio(methods[name].get(field) or [], methods[baseline].get(field) or [])
        for kind, field in _FIELDS.items()
    }


def resolves(cpu: dict[str, Any] | None, resolution: float = RESOLUTION) -> bool:
    """Whether an A/A CPU ratio shows that the rounds resolve ``resolution``: median and half-width within it."""
    return cpu is not None and abs(cpu["median"] - 1) <= resolution and cpu["half_width"] < resolution


def paired_ratios(methods: dict[str, Any]) -> dict[str, Any]:
    """``paired_vs_no_sync``, ``equal_work_pairs`` and ``noise_floor`` of one case (see the module docstring).

    Args:
        methods: the case's per-method figures, each with ``seconds_per_step`` and ``cpu_seconds_per_step``
            (per round, same rounds for all) and ``update_mismatch_vs_reference``.
    """
    vs_base = {name: _both(methods, name, BASELINE) for name in methods if name != BASELINE and BASELINE in methods}
    pairs = {
        f"{name}/{base}": {"method": name, "baseline": base}
        | _both(methods, name, base)
        | {"update_mismatch": methods[name].get("update_mismatch_vs_reference")}
        for name, base in EQUAL_WORK_PAIRS
        if name in methods and base in methods
    }
    floor = None
    if TWIN in vs_base:
        floor = {"method": TWIN, "baseline": BASELINE, **vs_base[TWIN], "resolution": RESOLUTION}
        floor["resolves"] = resolves(floor["cpu"])
    return {"paired_vs_no_sync": vs_base, "equal_work_pairs": pairs, "noise_floor": floor}


def _show(ratio: dict[str, Any] | None) -> str:
    return "-" if ratio is None else f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def format_ratios(case: dict[str, Any]) -> list[str]:
    """Report lines of one case's :func:`paired_ratios`: every method against (b), the pairs, the noise floor."""
    methods = case["methods"]
    if not case.get("paired_vs_no_sync"):
        return []
    letter = {name: entry["label"].partition(" ")[0] for name, entry in methods.items()}
    rounds = len(methods[BASELINE]["seconds_per_step"])
    title = f"per-round ratios over {rounds} rounds: median [bootstrap 95%]"
    lines = ["", f"{title:<58} {'wall':>22} {'CPU':>22}"]

    def row(name: str, wall: dict[str, Any] | None, cpu: dict[str, Any] | None) -> str:
        return f"{name:<58} {_show(wall):>22} {_show(cpu):>22}"

    for name, ratio in case["paired_vs_no_sync"].items():
        lines.append(
            row(f"{letter[name]} / (b): {methods[name]['label'].partition(' ')[2]}", ratio["wall"], ratio["cpu"])
        )
    for key, pair in case["equal_work_pairs"].items():
        mismatch = pair["update_mismatch"]
        name = f"equal work {letter[pair['method']]} / {letter[pair['baseline']]}: {key}"
        lines.append(
            row(name, pair["wall"], pair["cpu"]) + ("" if mismatch is None else f"  update mismatch {mismatch:.1e}")
        )
    floor = case["noise_floor"]
    if floor is not None:
        cpu = floor["cpu"]
        lines.append(row(f"noise floor (A/A) {letter[TWIN]} / (b): identical loops", floor["wall"], cpu))
        detail = (
            "no CPU times"
            if cpu is None
            else (f"CPU median {abs(cpu['median'] - 1):.1%} from 1, half-width {cpu['half_width']:.1%}")
        )
        advice = "" if floor["resolves"] else "; run more --rounds, or on a quieter machine"
        lines.append(
            f"these {rounds} rounds resolve {floor['resolution']:.0%} in CPU time: "
            f"{'yes' if floor['resolves'] else 'no'} ({detail}; both must be within {floor['resolution']:.0%}{advice})"
        )
    return lines
