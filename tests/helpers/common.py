"""Tiny models, deterministic data and the single-process real-batch reference the tests compare against."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

IN_FEATURES = 8
OUT_FEATURES = 4


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, OUT_FEATURES)
    ).to(dtype)


def make_data(steps: int, samples_per_step: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(steps, samples_per_step, IN_FEATURES, generator=generator).to(dtype)
    targets = torch.randn(steps, samples_per_step, OUT_FEATURES, generator=generator).to(dtype)
    return inputs, targets


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    raise ValueError(name)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def rank_micro_batches(
    inputs: torch.Tensor, targets: torch.Tensor, rank: int, world_size: int, micro_batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of one global batch: a contiguous slice per rank, cut in micro-batches."""
    per_rank = inputs.shape[0] // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    yield from zip(inputs[mine].split(micro_batch_size), targets[mine].split(micro_batch_size), strict=True)


def reference_run(
    optimizer_name: str, steps: int, global_batch_size: int, dtype: torch.dtype = torch.float32, max_grad_norm=None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train on the real global batch in one process; return the weights and the per-step grad norms."""
    model = make_model(dtype)
    optimizer = make_optimizer(optimizer_name, model.parameters())
    inputs, targets = make_data(steps, global_batch_size, dtype)
    norms = []
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model(inputs[step]), targets[step]).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        norms.append(float(norm))
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}, norms


def max_relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """Largest ||a - e|| / ||e|| over tensors with matching names (wrapper prefixes stripped)."""

    def strip(name: str) -> str:
        for prefix in ("module.", "_fsdp_wrapped_module.", "_orig_mod."):
            name = name.replace(prefix, "")
        return name

    actual = {strip(k): v for k, v in actual.items()}
    expected = {strip(k): v for k, v in expected.items()}
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    return max(
        float((actual[k].double() - expected[k].double()).norm() / expected[k].double().norm().clamp_min(1e-30))
        for k in expected
    )


@contextlib.contextmanager
def count_calls(module: object, names: tuple[str, ...], counter: list[int]) -> Iterator[None]:
    """Adds 1 to ``counter[0]`` on every call of ``module.<name>`` inside the block (the real function runs)."""
    originals = {name: getattr(module, name) for name in names}

    def counting(original):
        def call(*args, **kwargs):
            counter[0] += 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(module, name, counting(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)
