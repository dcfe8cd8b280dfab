"""Adapters for the training libraries distaccum works with (Accelerate, DeepSpeed).

Each integration module imports its library, so none is imported here: an adapter is consulted only when the
user already imported its library (``"accelerate" in sys.modules``), and ``import distaccum`` stays light.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def adapt(
    optimizer: torch.optim.Optimizer, scheduler: Any | None, grad_scaler: torch.amp.GradScaler | None
) -> tuple[torch.optim.Optimizer, Any | None, torch.amp.GradScaler | None]:
    """The optimizer, scheduler and scaler the :class:`~distaccum.Accumulator` should drive, library wrappers resolved.

    Objects that no integration recognizes are returned unchanged.

    Raises:
        ValueError: a library is configured to accumulate or scale by itself too (see
            :func:`distaccum.integrations.accelerate.adapt`).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> adapt(optimizer, None, None) == (optimizer, None, None)
        True
    """
    if "accelerate" in sys.modules:
        from distaccum.integrations import accelerate

        optimizer, scheduler, grad_scaler = accelerate.adapt(optimizer, scheduler, grad_scaler)
    return optimizer, scheduler, grad_scaler
