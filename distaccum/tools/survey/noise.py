"""The gradient noise scale by brute force: every per-sample gradient of a dataset, in float64.

``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al., 2018, "An Empirical Model of Large-Batch Training") is the
batch size at which the noise of a batch's gradient, ``tr(Sigma) / B``, equals the squared norm of the true
gradient: below it a bigger batch buys almost proportionally fewer steps, far above it almost none. This module
measures it exactly on a small dataset, as the reference that cheaper online estimates are checked against.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn


def brute_force_noise_scale(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    chunk_size: int = 256,
) -> dict[str, float]:
    """``tr(Sigma)``, ``|G|^2`` and ``B_simple`` from the per-sample gradients of all ``N`` samples, in float64.

    With ``g_i`` the gradient of sample ``i``'s loss (``loss_fn`` on a batch of that one sample) and
    ``g = mean_i g_i``:

    - ``trace_sigma = sum_i |g_i - g|^2 / (N - 1)``, the unbiased trace of the per-sample gradient covariance;
    - ``grad_sq = |g|^2 - trace_sigma / N``, the squared norm of the true gradient: ``|g|^2`` alone is biased
      upwards by the noise of a mean over ``N`` samples, ``tr(Sigma) / N``;
    - ``b_simple = trace_sigma / grad_sq`` (``inf`` when ``grad_sq <= 0``: the gradient is lost in the noise).

    The model is evaluated on a float64 deep copy (``model`` itself is not changed), one sample at a time
    through ``torch.func.vmap``, in its current train/eval mode: BatchNorm in train mode and dropout cannot be
    evaluated per sample. Only parameters with ``requires_grad`` count.

    Args:
        model: the model at the point to measure.
        inputs: all ``N`` samples' inputs (first dimension: samples); floating inputs are cast to float64.
        targets: their targets, in the same order; floating targets are cast to float64.
        loss_fn: ``(outputs, targets) -> scalar mean loss`` over a batch, e.g. ``nn.functional.cross_entropy``.
        chunk_size: samples per vmap call (memory: ``chunk_size x parameters`` float64 values; two passes).

    Returns:
        ``{"trace_sigma": ..., "grad_sq": ..., "b_simple": ...}`` as Python floats.

    Raises:
        ValueError: fewer than 2 samples, a sample count that differs between inputs and targets, or a
            ``chunk_size`` below 1.

    Example:
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> # per-sample gradients of (w x - y)^2 at w = 0: -2 x y = -2 and -6; mean -4, variance 8
        >>> brute_force_noise_scale(model, torch.ones(2, 1), torch.tensor([[1.0], [3.0]]), nn.functional.mse_loss)
        {'trace_sigma': 8.0, 'grad_sq': 12.0, 'b_simple': 0.6666666666666666}
    """
    count = inputs.shape[0]
    if count < 2:
        raise ValueError(f"the noise scale needs at least 2 samples (a variance), got {count}")
    if targets.shape[0] != count:
        raise ValueError(f"inputs has {count} samples but targets has {targets.shape[0]}; pass the same samples")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    double = copy.deepcopy(model).to(torch.float64)
    params = {name: p.detach() for name, p in double.named_parameters() if p.requires_grad}
    buffers = dict(double.named_buffers())
    x, y = (t.to(torch.float64) if t.is_floating_point() else t for t in (inputs, targets))

    def sample_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = torch.func.functional_call(double, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))

    def flat_grads() -> Iterator[torch.Tensor]:
        for x_chunk, y_chunk in zip(x.split(chunk_size), y.split(chunk_size), strict=True):
            grads = per_sample(params, x_chunk, y_chunk)
            yield torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)

    mean = torch.stack([chunk.sum(dim=0) for chunk in flat_grads()]).sum(dim=0) / count
    # A second pass over deviations, not sum |g_i|^2 - N |g|^2: late in training those two nearly cancel.
    spread = float(sum((chunk - mean).square().sum() for chunk in flat_grads()))
    trace_sigma = spread / (count - 1)
    grad_sq = float(mean.square().sum()) - trace_sigma / count
    b_simple = trace_sigma / grad_sq if grad_sq > 0 else math.inf
    return {"trace_sigma": trace_sigma, "grad_sq": grad_sq, "b_simple": b_simple}


def sampled_noise_scale(exact: dict[str, float], count: int) -> float:
    """``B_simple`` of the ``count`` samples themselves, drawn with replacement (what an online estimate over
    micro-batches drawn that way measures): population covariance over the squared mean gradient, from
    :func:`brute_force_noise_scale`'s unbiased values.

    Example:
        >>> sampled_noise_scale({"trace_sigma": 8.0, "grad_sq": 12.0, "b_simple": 2 / 3}, 2)
        0.25
    """
    trace = exact["trace_sigma"] * (count - 1) / count
    return trace / (exact["grad_sq"] + exact["trace_sigma"] / count)
