"""BatchNorm under accumulation, measured: how far the virtual batch is from the real one with each normalization.

An MLP learns scikit-learn's digits (float64, SGD with momentum, global batch 256) twice from the same weights:
on the real batch (a plain PyTorch loop, 256 x 1) and on the virtual batch (the Accumulator, 16 x 16). Printed:
the largest relative gap between their training-loss curves. BatchNorm normalizes each micro-batch of 16 with
its own statistics, which no setting of distaccum changes (``batch_norm="exact"`` makes the running statistics,
used in eval mode, those of the real batches: tests/unit/test_batchnorm.py); GroupNorm and LayerNorm normalize
per sample and accumulate exactly. Committed output: examples/batchnorm.txt.

    python examples/batchnorm.py                 # ~10 s on 2 CPU cores; needs scikit-learn
    python examples/batchnorm.py --steps 20      # quicker
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from distaccum.tools.survey import digits_task

GLOBAL, MICRO, HIDDEN = 256, 16, 64
NORMS = {
    "BatchNorm (torch's per-micro-batch updates)": ("batch", "per_micro_batch"),
    'BatchNorm, batch_norm="exact"': ("batch", "exact"),
    "GroupNorm (8 groups)": ("group", "per_micro_batch"),
    "LayerNorm": ("layer", "per_micro_batch"),
}


def mlp(norm: str) -> nn.Module:
    def normalization() -> nn.Module:
        if norm == "batch":
            return nn.BatchNorm1d(HIDDEN)
        return nn.GroupNorm(8, HIDDEN) if norm == "group" else nn.LayerNorm(HIDDEN)

    torch.manual_seed(0)
    layers = [nn.Linear(64, HIDDEN), normalization(), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), normalization(), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(HIDDEN, 10)).double()


def train(norm: str, batch_norm: str, steps: int, virtual: bool) -> tuple[nn.Module, list[float]]:
    _, batches = digits_task(seed=0, dtype=torch.float64)
    model = mlp(norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plan = BatchPlan(global_batch_size=GLOBAL, micro_batch_size=MICRO)
    acc = Accumulator(model, optimizer, plan, batch_norm=batch_norm) if virtual else None
    losses = []
    for step in range(steps):
        inputs, targets = batches(step, GLOBAL)
        if acc is not None:
            for x, y in zip(inputs.split(MICRO), targets.split(MICRO), strict=True):
                with acc.micro_step():
                    acc.backward(nn.functional.cross_entropy(model(x), y))
            losses.append(acc.last_step.loss)
        else:  # the real batch, not through distaccum
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return model, losses


def measure(norm: str, batch_norm: str, steps: int) -> tuple[float, float, float]:
    """The largest relative gap between the real and the virtual training-loss curves, and their last losses."""
    _, real = train(norm, batch_norm, steps, virtual=False)
    _, virtual = train(norm, batch_norm, steps, virtual=True)
    return max(abs(v - r) / r for r, v in zip(real, virtual, strict=True)), real[-1], virtual[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # the BatchNorm warning is what this example measures
    print(
        f"digits, MLP 64-{HIDDEN}-{HIDDEN}-10, float64, {args.steps} steps: real batch {GLOBAL} x 1 vs virtual "
        f"{MICRO} x {GLOBAL // MICRO}"
    )
    print(f"{'normalization':46s} {'largest train-loss gap':>24s} {'last loss: real':>16s} {'virtual':>9s}")
    for label, (norm, batch_norm) in NORMS.items():
        gap, real, virtual = measure(norm, batch_norm, args.steps)
        print(f"{label:46s} {gap:24.2e} {real:16.4f} {virtual:9.4f}")


if __name__ == "__main__":
    main()
