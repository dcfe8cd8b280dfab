"""The main demo: a virtual batch of 64 (8 micro-batches of 8) trains exactly like the real batch of 64.

Prints the plan, one line per optimizer step (window loss over all ranks, gradient norm), and the equivalence
figure: the largest relative difference between the weights trained with distaccum and the weights trained on
the real batch in one process. Runs in a few seconds on a CPU.

    python examples/demo.py                                   # one process: 8 micro-batches x 8
    torchrun --nproc_per_node 2 examples/demo.py              # two ranks: 4 micro-batches x 8 x 2 ranks
    bash launch/dev.sh demo                                   # what the README's first command runs
"""

from __future__ import annotations

import argparse
import copy

import torch
from task import global_batch, loss_fn, make_model, micro_batches
from torch import nn

from distaccum import Accumulator, BatchPlan, dist


def real_batch_reference(model: nn.Module, steps: int, global_batch_size: int, lr: float) -> nn.Module:
    """The same training on the whole global batch at once, in this process: what distaccum must equal."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        inputs, targets = global_batch(step, global_batch_size)
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model


def main(args: argparse.Namespace) -> float:
    device = dist.device()
    initial = make_model(seed=0)
    model: nn.Module = copy.deepcopy(initial).to(device)
    if dist.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    plan = BatchPlan(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size)
    acc = Accumulator(model, optimizer, plan, max_grad_norm=1.0)
    dist.print0(f"plan: {plan} (backend: {acc.backend}, device: {device}, launcher: {dist.launcher()})")
    dist.print0(f"{'step':>4}  {'window loss':>11}  {'grad norm':>9}  micro-steps")
    for step in range(args.steps):
        batches = micro_batches(step, plan.global_batch_size, plan.micro_batch_size, dist.rank(), plan.world_size)
        for inputs, targets in batches:
            with acc.micro_step():
                acc.backward(loss_fn(model(inputs.to(device)), targets.to(device)))
        result = acc.last_step
        assert result is not None
        dist.print0(f"{result.step:>4}  {result.loss:>11.6f}  {result.grad_norm:>9.4f}  {result.micro_steps}")

    trained = getattr(model, "module", model).state_dict()
    reference = real_batch_reference(copy.deepcopy(initial), args.steps, plan.global_batch_size, args.lr).state_dict()
    error = max(float((trained[name].cpu() - reference[name]).norm() / reference[name].norm()) for name in reference)
    dist.print0(
        f"\nequivalence: after {args.steps} optimizer steps the weights trained on the virtual batch "
        f"({plan.accum_steps} x {plan.micro_batch_size} x {plan.world_size} rank(s)) differ from one real batch of "
        f"{plan.global_batch_size} in one process by at most {error:.2e} (relative, fp32)"
    )
    return error


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="exit 1 if the weights differ by more")
    parsed = parser.parse_args()
    worst = dist.run(main, parsed)
    raise SystemExit(0 if worst <= parsed.tolerance else 1)
