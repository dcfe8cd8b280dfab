"""BatchNorm under accumulation: what differs from the real batch, and exact running statistics.

A BatchNorm layer in training mode normalizes each micro-batch with that micro-batch's own statistics
(``micro_batch_size`` samples, not ``global_batch_size``), and updates its running statistics at every micro-batch:
``accum_steps`` times per optimizer step instead of once. The first is what accumulation is (GroupNorm or
LayerNorm normalize per sample and have no such difference); the second is made exact by
``Accumulator(..., batch_norm="exact")``:

* every train-mode forward of the window adds its per-channel count, sum and sum of squares (computed in the
  forward's dtype, accumulated in float64); ``SyncBatchNorm`` layers pool them over all ranks through the
  boundary's all-reduce (plain BatchNorm keeps each rank's own, as it normalizes with them);
* the running buffers stay as they were at the window's start while the window runs;
* when the window closes, they are updated once with the pooled mean and unbiased variance, as one forward of
  the real batch would, and ``num_batches_tracked`` advances once (``momentum=None``: a cumulative average, as
  torch does). A discarded window (a micro-step that raised) never happened for them either.

The default, ``"warn"``, leaves torch's behaviour and warns once when a model with BatchNorm accumulates;
``"per_micro_batch"`` chooses torch's behaviour without the warning. Freezing the statistics (BatchNorm layers in
eval mode) needs nothing from distaccum. A mid-window checkpoint keeps the open window's statistics with its
gradients (per rank: plain BatchNorm layers pooled only their own rank's micro-batches).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BatchNormMode = Literal["warn", "exact", "per_micro_batch"]


class BatchNormWindow:
    """Running statistics of a model's BatchNorm layers, pooled over a window and applied once at its end."""

    def __init__(self, layers: list[_BatchNorm]) -> None:
        self.layers = layers
        self.synced = [isinstance(layer, nn.SyncBatchNorm) for layer in layers]
        self._held: dict[int, list[torch.Tensor]] = {}  # the real buffers, while a forward updates copies
        self._stats: dict[int, torch.Tensor] = {}  # per layer: [count, sum per channel, sum of squares per channel]
        for index, layer in enumerate(layers):
            handles = (
                layer.register_forward_pre_hook(functools.partial(self._before, index)),
                layer.register_forward_hook(functools.partial(self._after, index)),
            )
            setattr(layer, _HANDLES, handles)

    @classmethod
    def attach(cls, model: nn.Module, mode: BatchNormMode, accum_steps: int) -> BatchNormWindow | None:
        """The tracker for ``model`` with ``mode="exact"``; warns once with ``"warn"`` when it matters.

        Raises:
            ValueError: an unknown ``mode``.
        """
        check_mode(mode)
        layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        # An Accumulator built again on the same model replaces the previous one's tracker, whatever the mode:
        # stale hooks would keep swapping the buffers for copies that nothing applies.
        for layer in layers:
            for handle in getattr(layer, _HANDLES, ()):
                handle.remove()
            setattr(layer, _HANDLES, ())
        if mode == "warn" and layers and accum_steps > 1:
            warnings.warn(
                f"the model has {len(layers)} BatchNorm layer(s): under accumulation each normalizes every "
                f"micro-batch with its own statistics, and their running statistics are updated {accum_steps} times "
                "per optimizer step instead of once. Pass batch_norm='exact' for running statistics equal to the "
                "real batch's (normalization stays per micro-batch), put the BatchNorm layers in eval mode to freeze "
                "them, or use GroupNorm/LayerNorm; batch_norm='per_micro_batch' keeps this behaviour silently.",
                stacklevel=3,
            )
        return cls(layers) if mode == "exact" and layers else None

    def _before(self, index: int, layer: _BatchNorm, args: tuple[Any, ...]) -> None:
        if not layer.training:
            return
        # The forward updates copies, not the buffers (restoring those in place would break the backward, which
        # saved them): the buffers stay as they were while the window runs.
        self._held[index] = _buffers(layer)
        for name, buffer in zip(_BUFFERS, self._held[index], strict=True):
            setattr(layer, name, buffer.clone())
        inputs = args[0].detach()
        dims = [0, *range(2, inputs.dim())]
        with torch.no_grad():
            variance, mean = torch.var_mean(inputs, dim=dims, correction=0)
            count = inputs.numel() // inputs.shape[1]
            mean, variance = mean.double(), variance.double()
            stats = torch.cat([mean.new_full((1,), float(count)), count * mean, count * (variance + mean * mean)])
        self._stats[index] = stats if index not in self._stats else self._stats[index] + stats

    def _after(self, index: int, layer: _BatchNorm, args: tuple[Any, ...], output: Any) -> None:
        held = self._held.pop(index, None)
        if held is not None:
            for name, buffer in zip(_BUFFERS, held, strict=True):
                setattr(layer, name, buffer)

    def local_stats(self) -> list[float]:
        """The ``SyncBatchNorm`` layers' window statistics, to be summed over ranks (fixed length per model)."""
        values: list[float] = []
        for index, layer in enumerate(self.layers):
            if self.synced[index]:
                stats = self._stats.get(index)
                values += [0.0] * (1 + 2 * layer.num_features) if stats is None else stats.tolist()
        return values

    def apply(self, synced_totals: list[float]) -> None:
        """Update every layer's running statistics once from the window (``synced_totals``: over all ranks)."""
        offset = 0
        for index, layer in enumerate(self.layers):
            stats = self._stats.get(index)
            if self.synced[index]:
                width = 1 + 2 * layer.num_features
                stats = torch.tensor(synced_totals[offset : offset + width], dtype=torch.float64)
                offset += width
            if stats is None or stats[0] < 2:  # no train-mode forward in this window: nothing to pool
                continue
            count, total, squares = stats[0], stats[1 : 1 + layer.num_features], stats[1 + layer.num_features :]
            mean = total / count
            unbiased = (squares / count - mean * mean) * count / (count - 1)
            running_mean, running_var, tracked = _buffers(layer)
            with torch.no_grad():
                tracked.add_(1)
                factor = 1.0 / float(tracked) if layer.momentum is None else layer.momentum
                for buffer, value in ((running_mean, mean), (running_var, unbiased)):
                    buffer.copy_((1 - factor) * buffer.double() + factor * value.to(buffer.device))

    def reset(self) -> None:
        """Start a new window."""
        self._stats.clear()

    def state_dict(self) -> list[list[float]]:
        """The open window's statistics, per layer (an empty list: no train-mode forward yet), plain floats."""
        return [self._stats[index].tolist() if index in self._stats else [] for index in range(len(self.layers))]

    def load_state_dict(self, state: list[list[float]]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the statistics were saved for other BatchNorm layers.
        """
        widths = [1 + 2 * layer.num_features for layer in self.layers]
        fits = len(state) == len(widths) and all(
            not values or len(values) == width for values, width in zip(state, widths, strict=True)
        )
        if not fits:
            raise ValueError(
                f"the checkpoint's open-window BatchNorm statistics are for other layers ({[len(v) for v in state]} "
                f"values per layer; this model's BatchNorm layers need {widths}); resume with the model that saved it"
            )
        self._stats = {i: torch.tensor(v, dtype=torch.float64) for i, v in enumerate(state) if v}


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_HANDLES = "_distaccum_batch_norm_hooks"


def _buffers(layer: _BatchNorm) -> list[torch.Tensor]:
    return [getattr(layer, name) for name in _BUFFERS]


def check_mode(mode: BatchNormMode) -> None:
    """``Accumulator(batch_norm=mode)``'s value.

    Raises:
        ValueError: not ``"warn"``, ``"exact"`` or ``"per_micro_batch"``.
    """
    if mode not in ("warn", "exact", "per_micro_batch"):
        raise ValueError(f"batch_norm must be 'warn', 'exact' or 'per_micro_batch', got {mode!r}")
