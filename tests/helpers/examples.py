"""The examples' task as the launcher tests use it: sizes, the single-process real-batch reference, the check."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from tests.helpers.common import max_relative_error
from tests.helpers.launchers import ROOT

EXAMPLES = ROOT / "examples"
TOLERANCE = 1e-6
# Shared by the launcher tests: 32 = accum 4 x micro 8 x 1 rank = accum 2 x micro 8 x 2 ranks.
GLOBAL_BATCH, MICRO_BATCH, STEPS, LR = 32, 8, 4, 0.05
SIZES = ["--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", str(MICRO_BATCH), "--lr", str(LR)]


def load_task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_task", EXAMPLES / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_weights(steps: int, lr_decay: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One process, the real global batch of examples/task.py, the examples' optimizer (and schedule)."""
    task = load_task()
    model = task.make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scheduler = None if lr_decay is None else torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    for step in range(steps):
        inputs, targets = task.global_batch(step, GLOBAL_BATCH, seed)
        optimizer.zero_grad()
        task.loss_fn(model(inputs), targets).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_matches_reference(path: Path, expected: dict[str, torch.Tensor]) -> float:
    weights = torch.load(path, weights_only=True)
    assert sorted(weights) == sorted(expected), "saved names must be plain (no module./wrapper prefixes)"
    error = max_relative_error(weights, expected)
    assert error <= TOLERANCE, f"{path.name}: max relative weight error {error:.3g} > {TOLERANCE}"
    return error
