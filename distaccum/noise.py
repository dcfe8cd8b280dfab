"""The gradient noise scale, measured from the accumulation itself: where a larger batch stops paying.

McCandlish et al., "An Empirical Model of Large-Batch Training" (2018), define ``B_simple = tr(Sigma) / |G|^2``
(Sigma: the per-sample gradient covariance, G: the true gradient), around which doubling the batch stops
halving the steps. Their appendix A estimates it without bias from the squared norms of a gradient at two batch
sizes, ``B_small`` and ``B_big``:

    |G|^2      ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma)  ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and smooths each with an exponential moving average before taking the ratio. Under accumulation both are at hand
at every boundary: ``G_small`` is one micro-batch's gradient, read on each rank after the window's first backward
(one norm of the local gradients, only when asked for; its batch is the micro-batch, or its items with
``num_items``); ``G_big`` is the step's gradient, whose norm the step computes anyway. The ranks' small norms
travel in the boundary's one scalar all-reduce and are averaged, which lowers the estimate's variance. A window of
one micro-step gives no estimate (there is no gradient of a smaller batch to read), nor do wrappers whose window
gradients are not in ``param.grad`` (FSDP, DeepSpeed: refused at construction). A mid-window checkpoint keeps each
rank's own reading (:meth:`NoiseScale.window_state`), so the resumed step still measures.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class NoiseScale:
    """EMA-smoothed ``B_simple`` from the small (one micro-batch) and big (the window) gradients of each step.

    Args:
        decay: the moving averages' decay per step, in [0, 1); 0 keeps only the last step.

    Raises:
        ValueError: ``decay`` outside [0, 1).
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(self.check_decay(decay))  # type: ignore[arg-type]
        self._trace = 0.0  # EMA of tr(Sigma), bias-corrected through _weight (as Adam's moments)
        self._grad_sq = 0.0
        self._weight = 0.0
        self._small: torch.Tensor | None = None  # this window's micro-batch squared norm (a device scalar)
        self._small_batch = 0.0

    def measure(self, grads: list[torch.Tensor], loss_scale: float, batch: float) -> None:
        """Read one micro-batch's gradient: ``grads`` hold it multiplied by ``loss_scale``; ``batch`` samples or
        items. Kept on the device until the boundary (no host sync here)."""
        if not grads or loss_scale == 0 or batch <= 0:
            return
        norms = torch._foreach_norm(grads)
        self._small = torch.stack([norm.double() for norm in norms]).square().sum() / float(loss_scale) ** 2
        self._small_batch = float(batch)

    @classmethod
    def checked(cls, decay: float | None, backend: str, grads_in_params: bool) -> NoiseScale | None:
        """The estimator for ``Accumulator(noise_scale=decay)`` (None: off).

        Raises:
            ValueError: the backend keeps the window's gradients out of ``param.grad``, or a bad ``decay``.
        """
        decay = cls.check_decay(decay)
        if decay is not None and not grads_in_params:
            raise ValueError(
                f"noise_scale={decay} reads a micro-batch's gradient in param.grad, where {backend} does not keep "
                "it during the window; measure the noise scale with DDP (or one process) and pass noise_scale=None"
            )
        return None if decay is None else cls(decay)

    @staticmethod
    def check_decay(decay: float | None) -> float | None:
        """``Accumulator(noise_scale=decay)``'s value: None, or an EMA decay in [0, 1).

        Raises:
            ValueError: anything else.
        """
        if decay is None:
            return None
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay < 1.0:
            raise ValueError(f"noise_scale must be an EMA decay in [0, 1), got {decay!r}; e.g. noise_scale=0.95")
        return float(decay)

    def local_stats_reset(self) -> None:
        """Forget this window's small-batch reading (the window closed, or runs again)."""
        self._small = None

    def local_stats(self) -> list[float]:
        """To be summed over ranks: the small squared norm, its batch, and whether this rank measured."""
        if self._small is None:
            return [0.0, 0.0, 0.0]
        return [float(self._small), self._small_batch, 1.0]

    def update(self, totals: list[float], big_sq: float | None, big_batch: float) -> float | None:
        """Take a step's ``totals`` (:meth:`local_stats` summed over ranks) and its gradient's squared norm
        ``big_sq`` over ``big_batch`` samples (or items); return the smoothed ``B_simple`` (None until defined)."""
        small_sq, small_batch, ranks = totals
        if ranks and big_sq is not None and math.isfinite(big_sq) and math.isfinite(small_sq):
            small_sq, small_batch = small_sq / ranks, small_batch / ranks
            if big_batch > small_batch > 0:
                grad_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
                trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
                keep = self.decay
                self._grad_sq = keep * self._grad_sq + (1 - keep) * grad_sq
                self._trace = keep * self._trace + (1 - keep) * trace
                self._weight = keep * self._weight + (1 - keep)
        return self.value

    @property
    def value(self) -> float | None:
        """The current estimate of ``B_simple`` (None before the first step, or while ``|G|^2`` is not positive)."""
        if not self._weight or self._grad_sq <= 0:
            return None
        return self._trace / self._grad_sq  # the bias corrections (division by _weight) cancel in the ratio

    def state_dict(self) -> dict[str, float]:
        """The moving averages, plain floats."""
        return {"trace": self._trace, "grad_sq": self._grad_sq, "weight": self._weight, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the decay given at construction stays)."""
        self._trace, self._grad_sq, self._weight = (
            float(state["trace"]),
            float(state["grad_sq"]),
            float(state["weight"]),
        )

    def window_state(self) -> list[float] | None:
        """The open window's small-batch reading (squared norm, batch), this rank's own; None before one."""
        if self._small is None:
            return None
        return [float(self._small), self._small_batch]

    def load_window_state(self, state: list[float] | None) -> None:
        """Restore :meth:`window_state` (None: no reading, as in a state saved before distaccum kept it)."""
        self._small = None if state is None else torch.tensor(float(state[0]), dtype=torch.float64)
        self._small_batch = 0.0 if state is None else float(state[1])
