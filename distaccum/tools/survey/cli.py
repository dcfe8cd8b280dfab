"""``distaccum survey``: the learning-rate survey on scikit-learn's digits, and with ``--tradeoff`` the steps
and samples to a target loss per batch size (:mod:`~distaccum.tools.survey.tradeoff`), from the command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import BatchPlan, dist
from distaccum.tools.survey import tradeoff
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
    trade = parser.add_argument_group(
        "trade-off (--tradeoff)",
        "steps and samples to a target training loss per global batch (micro-batch -b, momentum, hidden, dtype, "
        "seed, threads and --out apply; -B, --lr-min/max, --steps do not); --quick is a CI-sized run",
    ).add_argument
    trade("--tradeoff", action="store_true", help="run the batch-size trade-off instead of the lr survey")
    trade("--batch-sizes", type=int, nargs="+", help=f"global batches (default: {_FULL['batch_sizes']})")
    trade("--target-loss", type=float, help=f"training-loss target (default: {_FULL['target_loss']})")
    trade("--lr-start", type=float, default=0.025, help="first batch's grid centre (default: %(default)s)")
    trade("--lr-count", type=int, help=f"grid learning rates per batch (default: {_FULL['lr_count']})")
    trade("--max-epochs", type=float, help=f"cap per run, in epochs (default: {_FULL['max_epochs']})")
    trade("--seeds", type=int, help=f"seeds (split, weights, order) averaged (default: {_FULL['seeds']})")
    trade("--heldout", type=int, default=297, help="held-out digits (default: %(default)s)")
    trade("--noise-batch-size", type=int, help="run whose B_simple is measured (default: the median batch)")
    trade("--quick", action="store_true", help=f"CI-sized defaults: {_QUICK}")


_FULL: dict[str, Any] = {"batch_sizes": [16, 32, 64, 128, 256, 512, 1024], "target_loss": 0.05, "lr_count": 7}
_FULL |= {"max_epochs": 30.0, "seeds": 3}
_QUICK: dict[str, Any] = {
    "batch_sizes": [16, 64, 256],
    "target_loss": 0.3,
    "lr_count": 3,
    "max_epochs": 5.0,
    "seeds": 1,
}


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


def _tradeoff_main(args: argparse.Namespace) -> int:
    if dist.world_size() > 1:
        raise ValueError(
            f"--tradeoff runs on one process (accumulation makes its batches), WORLD_SIZE is {dist.world_size()}"
        )
    preset = _QUICK if args.quick else _FULL
    knobs = {name: preset[name] if getattr(args, name) is None else getattr(args, name) for name in preset}
    if knobs["target_loss"] <= 0 or knobs["max_epochs"] <= 0 or min(knobs["lr_count"], knobs["seeds"]) < 1:
        raise ValueError(f"--target-loss and --max-epochs must be > 0, --lr-count and --seeds >= 1, got {knobs}")
    if args.noise_batch_size is not None and args.noise_batch_size not in knobs["batch_sizes"]:
        raise ValueError(
            f"--noise-batch-size {args.noise_batch_size} is not one of --batch-sizes {knobs['batch_sizes']}"
        )
    for size in knobs["batch_sizes"]:
        BatchPlan(global_batch_size=size, micro_batch_size=args.micro_batch_size)  # names the nearest valid sizes
    torch.set_num_threads(args.threads)
    tasks = [
        tradeoff.digits_split(args.seed + repeat, args.hidden, getattr(torch, args.dtype), args.heldout)
        for repeat in range(knobs["seeds"])
    ]
    train = {"micro_batch_size": args.micro_batch_size, "momentum": args.momentum}
    # Untimed warm-up: the first steps of a process pay one-time costs that would land on the first batch size.
    tradeoff.train_to_target(tasks[0], max(knobs["batch_sizes"]), args.lr_start, target_loss=0.0, max_steps=3, **train)
    started = time.perf_counter()
    points = tradeoff.sweep(
        tasks, knobs["batch_sizes"], target_loss=knobs["target_loss"], lr_start=args.lr_start,
        lr_count=knobs["lr_count"], max_samples=int(knobs["max_epochs"] * len(tasks[0].train[1])),
        log=(lambda line: None) if args.no_progress else print, **train,
    )  # fmt: skip
    reached = [p for p in points if p["best"] is not None]
    chosen = [p for p in reached if p["global_batch_size"] == args.noise_batch_size] or reached[len(reached) // 2 :]
    noise: list[dict[str, float]] = []
    if chosen:
        run = chosen[0]["best"][0]
        levels = [knobs["target_loss"] * (run.losses[0] / knobs["target_loss"]) ** (k / 3) for k in (2, 1, 0)]
        noise = tradeoff.noise_along(tasks[0], run, levels, target_loss=knobs["target_loss"], **train)
    config = {**knobs, **train, "lr_start": args.lr_start, "hidden": args.hidden, "dtype": args.dtype}
    config |= {"seed": args.seed, "train_samples": len(tasks[0].train[1]), "heldout_samples": args.heldout}
    summary = tradeoff.summarize(points, noise, **config)
    print(f"trade-off: {time.perf_counter() - started:.1f} s; to training loss <= {knobs['target_loss']}:")
    print("      B  accum        lr   steps  samples   wall s    cpu s  held-out acc  (means over seeds)")
    for row in summary["points"]:
        figures = "not reached"
        if row["steps"] is not None:
            figures = f"{row['lr']:>9.4g} {row['steps']:>7.1f} {row['samples']:>8.0f} {row['seconds']:>8.2f}"
            figures += f" {row['cpu_seconds']:>8.2f} {row['heldout_accuracy']:>13.4f}"
        print(f"  {row['global_batch_size']:>5} {row['accum_steps']:>6} {figures}")
    fit = summary["fit"]
    if fit is not None:
        print(f"  fit: S_min {fit['s_min']:.4g}, E_min {fit['e_min']:.4g}, B_crit {fit['b_crit']}")
    for point in noise:
        print(f"  B_simple at step {point['step']} (loss {point['loss']:.3g}): {point['b_simple']:.4g}")
    if args.out is not None:
        title = f"digits, MLP {args.hidden}-{args.hidden}, SGD momentum {args.momentum}, "
        title += f"micro-batch {args.micro_batch_size}, train loss <= {knobs['target_loss']}"
        tradeoff.save(summary, args.out, title=title)
        print(f"wrote tradeoff.json, tradeoff.csv, tradeoff.png to {args.out}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``distaccum survey`` (on one process, or on every rank under torchrun); 2 on a bad option."""
    try:
        if getattr(args, "tradeoff", False):
            return _tradeoff_main(args)
        return dist.run(_main, args)
    except ValueError as error:
        # Every rank checks every configuration before training, so all ranks leave here together.
        print(f"distaccum survey: error: {error}", file=sys.stderr, flush=True)
        return 2
