"""What the accumulator hands a backend's :meth:`~distaccum.backends.base.Backend.step`: how it wants its steps
taken (:class:`StepOptions`, fixed for its lifetime) and what each boundary decided (:class:`StepWindow`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """How the accumulator wants its optimizer steps taken (fixed for its lifetime).

    Raises:
        ValueError: ``max_grad_norm`` is not positive, or ``on_nonfinite`` is not a known policy.
    """

    max_grad_norm: float | None = None
    """Clip the window's global gradient norm to this (None: no clipping)."""
    grad_scaler: torch.amp.GradScaler | None = None
    """fp16 loss scaler, unscaled and updated once per step."""
    on_nonfinite: Literal["skip", "raise"] = "skip"
    """What a non-finite gradient does: skip the step on all ranks, or raise ``FloatingPointError``."""

    def __post_init__(self) -> None:
        norm = self.max_grad_norm
        if norm is not None and not (isinstance(norm, int | float) and not isinstance(norm, bool) and norm > 0):
            raise ValueError(
                f"max_grad_norm must be a positive number or None, got {norm!r}; pass e.g. 1.0, or None to disable "
                "clipping"
            )
        if self.on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {self.on_nonfinite!r}")


@dataclass(frozen=True)
class StepWindow:
    """What the accumulator's boundary hands to :meth:`Backend.step`."""

    factor: float
    """Multiply the reduced gradient by this (folded into the clipping multiply)."""
    skip: bool
    """The accumulator decided not to step (a window without items, a discarded one): drop the gradients."""
    number: int
    """This step's number (1-based), for messages."""
    norm: bool = False
    """Compute the global gradient norm (clipping, ``report_grad_norm``, the noise scale); it decides non-finite."""
    nonfinite: bool | None = None
    """Some rank saw a NaN/inf in its part before the boundary's all-reduce (None: not checked there)."""
    norm_value: float | None = None
    """The global norm before the factor, read with the boundary's scalars (None: not computed yet)."""
