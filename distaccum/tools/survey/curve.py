"""What a survey records per configuration (:class:`Curve`) and the rule that stops a curve at divergence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from distaccum import BatchPlan


@dataclass
class Curve:
    """One configuration's record: learning rate and window loss per optimizer step, until divergence."""

    name: str
    plan: BatchPlan
    steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def smoothed(losses: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average of ``losses`` (``smoothing=0``: the losses themselves)."""
    average, result = 0.0, []
    for index, loss in enumerate(losses):
        average = smoothing * average + (1 - smoothing) * loss
        result.append(average / (1 - smoothing ** (index + 1)))
    return result


def divergence_step(losses: Sequence[float], factor: float, smoothing: float = 0.0) -> int | None:
    """Index of the first loss whose smoothed value is non-finite or above ``factor`` x the smoothed minimum so far.

    Smoothing matters once the loss nears zero: a raw loss of 0.09 after a minimum of 0.02 is noise, not
    divergence, yet it is 4x the minimum.
    """
    best = math.inf
    for index, value in enumerate(smoothed(losses, smoothing)):
        best = min(best, value)
        if not math.isfinite(value) or value > factor * best:
            return index
    return None
