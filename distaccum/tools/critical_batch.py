"""Where a global batch sits against the gradient noise scale (McCandlish et al., 2018), for ``distaccum plan``.

``B_simple`` comes from a training log (``Accumulator(..., noise_scale=0.95)`` puts it in every step result) or is
given by hand. The model: steps ``S = S_min (1 + B_simple / B)`` and samples ``E = E_min (1 + B / B_simple)``, so
at ``B = B_simple`` both are twice their minimum; far above it a bigger batch mostly costs samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOG_HOWTO = (
    "train with Accumulator(..., noise_scale=0.95) and write json.dumps(dataclasses.asdict(acc.last_step)) per step"
)


def read_noise_scale(path: Path) -> tuple[float, int]:
    """The last positive ``noise_scale`` in a JSON-lines log of step results, and how many lines had one.

    Raises:
        ValueError: the file is missing, a line is not JSON, or no line has a positive ``noise_scale``.
    """
    if not path.is_file():
        raise ValueError(f"--log {path}: no such file; pass the JSON-lines log the training wrote")
    values = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--log {path}: line {number} is not JSON ({error.msg}); {LOG_HOWTO}") from None
        value = record.get("noise_scale") if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            values.append(float(value))
    if not values:
        raise ValueError(f"--log {path}: no line has a positive noise_scale; {LOG_HOWTO}")
    return values[-1], len(values)


def noise_advice(global_batch_size: int, b_simple: float, source: str) -> dict[str, Any]:
    """Where ``global_batch_size`` sits against the noise scale, in McCandlish et al.'s model.

    Example:
        >>> noise_advice(1024, 256.0, "--noise-scale")["samples_over_min"]
        5.0
    """
    return {
        "b_simple": b_simple,
        "source": source,
        "batch_over_noise_scale": global_batch_size / b_simple,
        "steps_over_min": 1 + b_simple / global_batch_size,
        "samples_over_min": 1 + global_batch_size / b_simple,
        "model": "McCandlish et al. (2018): steps = S_min (1 + B_simple / B), samples = E_min (1 + B / B_simple), "
        "with B_simple as the estimate of the critical batch",
    }
