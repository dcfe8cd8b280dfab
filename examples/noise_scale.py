"""The gradient noise scale during training, as the Accumulator reports it and by brute force, on the digits.

An MLP learns scikit-learn's digits with a virtual batch of 128 (16 x 8, SGD, momentum 0.9, lr 0.141: the
trade-off survey's choice for that batch) and ``Accumulator(..., noise_scale=0.95)``. Every few steps the script
also computes ``B_simple = tr(Sigma) / |G|^2`` from every per-sample gradient of the 1797 digits at the current
weights (``distaccum.tools.survey.noise``), for the set the micro-batches are drawn from. Printed: the table; written
with ``--out``: ``noise_scale.png`` and ``noise_scale.txt``. Committed output: examples/noise_scale.png and .txt.

    python examples/noise_scale.py --out examples     # ~10 s on 2 CPU cores; needs scikit-learn and matplotlib
    python examples/noise_scale.py --steps 20         # quicker, no files
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan
from distaccum.tools.survey.data import digits_data, digits_task
from distaccum.tools.survey.noise import brute_force_noise_scale, sampled_noise_scale

MICRO, ACCUM, LR = 16, 8, 0.141


def brute_force(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """B_simple of the digits as the micro-batches sample them (with replacement), from every per-sample gradient."""
    exact = brute_force_noise_scale(model, inputs, targets, nn.functional.cross_entropy)
    return sampled_noise_scale(exact, inputs.shape[0])


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    make_model, _ = digits_task(dtype=torch.float64)
    inputs, targets = digits_data(torch.float64)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    plan = BatchPlan(micro_batch_size=MICRO, accum_steps=ACCUM, world_size=1)
    acc = Accumulator(model, optimizer, plan, noise_scale=args.decay)
    generator = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'step':>4} {'loss':>8} {'online':>9} {'brute force':>11}")
    while acc.optimizer_steps < args.steps:
        exact = brute_force(model, inputs, targets) if acc.optimizer_steps % args.every == 0 else None
        for _ in range(ACCUM):
            index = torch.randint(0, inputs.shape[0], (MICRO,), generator=generator)
            with acc.micro_step():
                acc.backward(nn.functional.cross_entropy(model(inputs[index]), targets[index]))
        assert acc.last_step is not None
        online = acc.last_step.noise_scale
        rows.append((acc.optimizer_steps, acc.last_step.loss, online, exact))
        text = f"{acc.optimizer_steps:>4} {acc.last_step.loss:>8.4f} {online or float('nan'):>9.1f}"
        print(text + (f" {exact:>11.1f}" if exact is not None else ""))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        lines = [
            f"{s}\t{loss:.6f}\t{o if o is not None else 'nan'}\t{e if e is not None else ''}" for s, loss, o, e in rows
        ]
        (args.out / "noise_scale.txt").write_text("step\tloss\tonline\tbrute_force\n" + "\n".join(lines) + "\n")
        plot(rows, args.out / "noise_scale.png", args.decay)
        print(f"wrote {args.out / 'noise_scale.png'} and noise_scale.txt")


def plot(rows: list[tuple[int, float, float | None, float | None]], path: Path, decay: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    online = [(step, value) for step, _, value, _ in rows if value is not None]
    exact = [(step - 1, value) for step, _, _, value in rows if value is not None]  # measured before that step
    axis.plot(*zip(*online, strict=True), label=f"Accumulator(noise_scale={decay}): one micro-batch + the step")
    axis.plot(*zip(*exact, strict=True), "o", label="brute force: every per-sample gradient of the 1797 digits")
    axis.set_xlabel("optimizer step (virtual batch 16 x 8)")
    axis.set_ylabel("gradient noise scale B_simple (samples)")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.set_title("digits MLP, SGD: the noise scale grows as the loss falls")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--every", type=int, default=5, help="brute force every N steps")
    parser.add_argument("--decay", type=float, default=0.95, help="the estimate's EMA decay")
    parser.add_argument("--out", type=Path, default=None, help="write noise_scale.png and noise_scale.txt here")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
