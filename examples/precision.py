"""bf16 parameters under accumulation: the window's gradient summed in bf16 or in float32, against the real batch.

An MLP (512-512-1, tanh) held in bf16 accumulates k micro-batches of 4 samples per rank. The table gives the
relative error ||g - g_ref|| / ||g_ref|| of the gradient the optimizer receives, against the gradient of the same
real batch computed in float64 from the same (bf16) weights, averaged over a few windows of fresh data:
``accumulate_dtype=None`` (each micro-step adds into the bf16 ``.grad``), ``accumulate_dtype=torch.float32``
(float32 sums, rounded to bf16 once per step; the default ``"auto"`` picks it for k > 1), and, for contrast, one
backward of the whole real batch in bf16. Then the bytes the window's gradients hold mid-window (read from
``acc.state_dict(include_grads=True)``: bf16 gradients against float32 sums) and the CPU time per micro-step.
Under torchrun every rank runs k micro-batches: the real batch is 4 x k x world_size samples. The committed
output is examples/precision.txt.

    python examples/precision.py                                        # ~15 s on 2 CPU cores
    python examples/precision.py --ks 1 8 --windows 1                   # quicker
    torchrun --standalone --nproc_per_node 2 examples/precision.py      # DDP x2 (gloo)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from distaccum import Accumulator, BatchPlan, dist

MICRO, WIDTH = 4, 512
MODES = {"bf16 sums": None, "float32 sums": torch.float32}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)).to(torch.bfloat16)


def real_batch(k: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window's global batch (every rank draws the same, then takes its share)."""
    generator = torch.Generator().manual_seed(1000 * k + window)
    samples = MICRO * k * dist.world_size()
    return torch.randn(samples, WIDTH, generator=generator), torch.randn(samples, 1, generator=generator)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().mean()


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def reference(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real batch's gradient in one process, from the same weights, computed in ``dtype``."""
    copy = make_model().to(dtype)
    copy.load_state_dict({name: value.to(dtype) for name, value in model.state_dict().items()})
    loss_fn(copy(inputs.to(dtype)), targets.to(dtype)).backward()
    return flat([p.grad for p in copy.parameters()])


def accumulate(k: int, mode: torch.dtype | None, windows: int) -> tuple[list[float], int, float]:
    """Relative errors against the float64 real batch (per window), bytes mid-window, CPU seconds per micro-step."""
    world, rank = dist.world_size(), dist.rank()
    module = make_model()
    model = nn.parallel.DistributedDataParallel(module) if world > 1 else module
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: every window sees the same model
    seen: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(flat([p.grad for p in module.parameters()])))
    acc = Accumulator(model, optimizer, BatchPlan(accum_steps=k, micro_batch_size=MICRO), accumulate_dtype=mode)
    errors, nbytes, seconds = [], 0, 0.0
    for window in range(windows):
        inputs, targets = real_batch(k, window)
        share = slice(rank * MICRO * k, (rank + 1) * MICRO * k)
        start = time.process_time()
        for step, (x, y) in enumerate(zip(inputs[share].split(MICRO), targets[share].split(MICRO), strict=True)):
            with acc.micro_step():
                acc.backward(loss_fn(model(x.to(torch.bfloat16)), y.to(torch.bfloat16)))
            if window == 0 and step == 1 and k > 2:  # mid-window: what the open window's gradients hold
                copying = time.process_time()
                saved = acc.state_dict(include_grads=True)["grads"]
                nbytes = sum(g.numel() * g.element_size() for g in saved if g is not None)
                start += time.process_time() - copying  # the copy is not part of the accumulation's cost
        seconds += time.process_time() - start
        expected = reference(module, inputs, targets, torch.float64)
        errors.append(float((seen[-1] - expected).norm() / expected.norm()))
    return errors, nbytes, seconds / (windows * k)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    world = dist.world_size()
    dist.print0(
        f"MLP {WIDTH}-{WIDTH}-1 in bf16, micro-batch {MICRO} x world_size {world}; relative error of the step's "
        f"gradient vs the real batch in float64, mean over windows (at least {args.windows} per k)"
    )
    dist.print0(
        f"{'k':>4} {'windows':>7} {'bf16 sums':>10} {'float32 sums':>12} {'bf16 real batch':>15} {'ratio':>6} "
        f"{'bytes bf16':>10} {'bytes fp32':>10} {'us/micro bf16':>13} {'us/micro fp32':>13}"
    )
    module = make_model()
    for mode in MODES.values():
        accumulate(4, mode, 1)  # warm-up: the first forwards and backwards of a process are slower
    for k in args.ks:
        windows = max(args.windows, 32 // k)  # small k: more windows, for the time per micro-step
        results = {name: accumulate(k, mode, windows) for name, mode in MODES.items()}
        contrast = []
        for window in range(windows):
            inputs, targets = real_batch(k, window)
            expected = reference(module, inputs, targets, torch.float64)
            in_bf16 = reference(module, inputs, targets, torch.bfloat16)
            contrast.append(float((in_bf16 - expected).norm() / expected.norm()))
        low, high = (sum(results[name][0]) / windows for name in MODES)
        bf16_batch = sum(contrast) / windows
        (_, low_bytes, low_time), (_, high_bytes, high_time) = results.values()
        dist.print0(
            f"{k:>4} {windows:>7} {low:>10.2e} {high:>12.2e} {bf16_batch:>15.2e} {high / low:>6.2f} "
            f"{low_bytes or '-':>10} {high_bytes or '-':>10} {low_time * 1e6:>13.0f} {high_time * 1e6:>13.0f}"
        )
    params = sum(p.numel() for p in module.parameters())
    dist.print0(
        f"{params} parameters: bf16 gradients {2 * params} bytes, float32 sums {4 * params} bytes (held from the "
        "window's second micro-step to its boundary, in place of the bf16 gradients)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 64, 256], help="accum_steps to measure")
    parser.add_argument("--windows", type=int, default=3, help="least windows of fresh data per k (averaged)")
    return parser.parse_args()


if __name__ == "__main__":
    dist.run(main, parse_args())
