"""``distaccum survey``: the learning-rate survey on scikit-learn's digits, from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import dist
from distaccum.tools.survey.data import digits_task
from distaccum.tools.survey.run import default_configs, lr_survey


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distaccum survey``."""
    option = parser.add_argument
    option("--global-batch-size", "-B", type=int, default=256, help="the real batch B (default: %(default)s)")
    option("--micro-batch-size", "-b", type=int, default=16, help="micro and small batch b (default: %(default)s)")
    option("--lr-min", type=float, default=1e-3, help="learning rate of the first step (default: %(default)s)")
    option("--lr-max", type=float, default=10.0, help="learning rate of the last step (default: %(default)s)")
    option("--steps", type=int, default=300, help="optimizer steps per configuration (default: %(default)s)")
    option("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    option("--hidden", type=int, default=64, help="MLP hidden width (default: %(default)s)")
    dtype_help = "model and data dtype; float64 shows the equality beyond float32 rounding (default: %(default)s)"
    option("--dtype", choices=("float32", "float64"), default="float64", help=dtype_help)
    option("--divergence-factor", type=float, default=4.0, help="stop at loss > factor x min (default: %(default)s)")
    option("--smoothing", type=float, default=0.9, help="EMA of the stop rule, 0 = raw (default: %(default)s)")
    option("--threads", type=int, default=1, help="torch intra-op threads per process (default: %(default)s)")
    option("--seed", type=int, default=0, help="initial weights and sample order (default: %(default)s)")
    option("--out", type=Path, default=None, help="write survey.csv, survey.png and summary.json to this folder")
    option("--no-progress", action="store_true", help="no progress bar")


def _print_summary(summary: dict[str, Any], seconds: float) -> None:
    def number(value: float | None) -> str:
        return "none" if value is None else f"{value:.4g}"

    dist.print0(f"lr survey: {seconds:.1f} s")
    for name, figures in summary["configs"].items():
        dist.print0(
            f"  {name:>8} {figures['micro_batch_size']} x {figures['accum_steps']} x {figures['world_size']} = "
            f"{figures['global_batch_size']}: min loss {number(figures['min_loss'])} at lr "
            f"{number(figures['lr_at_min_loss'])}, diverged at lr {number(figures['lr_at_divergence'])}"
        )
    for pair in summary["pairs"]:
        dist.print0(
            f"  max |{pair['b']} - {pair['a']}| / {pair['a']} over the {pair['steps_compared']} steps before "
            f"divergence: {number(pair['max_relative_distance'])}"
        )


def _main(args: argparse.Namespace) -> int:
    # The built-in MLP is too small to gain from intra-op threads, and on a busy machine they cost 10x or more.
    torch.set_num_threads(args.threads)
    make_model, batches = digits_task(args.seed, args.hidden, getattr(torch, args.dtype))
    started = time.perf_counter()
    result = lr_survey(
        make_model,
        lambda params: torch.optim.SGD(params, lr=args.lr_min, momentum=args.momentum),
        nn.functional.cross_entropy,
        batches,
        default_configs(args.global_batch_size, args.micro_batch_size),
        lr_min=args.lr_min,
        lr_max=args.lr_max,
        steps=args.steps,
        divergence_factor=args.divergence_factor,
        smoothing=args.smoothing,
        seed=args.seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    _print_summary(result.summary(), seconds)
    if args.out is not None and dist.rank() == 0:
        title = f"digits, MLP {args.hidden}-{args.hidden}, SGD momentum {args.momentum}, {args.dtype}"
        result.save(args.out, title=title)
        print(f"wrote survey.csv, survey.png, summary.json to {args.out}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``distaccum survey`` (on one process, or on every rank under torchrun); 2 on a bad option."""
    try:
        return dist.run(_main, args)
    except ValueError as error:
        # Every rank checks every configuration before training, so all ranks leave here together.
        print(f"distaccum survey: error: {error}", file=sys.stderr, flush=True)
        return 2
