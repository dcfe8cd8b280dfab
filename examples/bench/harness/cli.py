"""The harness on the command line (``python -m examples.bench.harness`` from the repository root): its options,
and the run that prints the table and writes files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.bench.harness.config import PROG, BenchConfig
from examples.bench.harness.launch import run_benchmark
from examples.bench.harness.methods import METHODS
from examples.bench.harness.models import MODELS
from examples.bench.harness.netns import LinkUnavailable
from examples.bench.harness.overhead import OverheadConfig, format_overhead, run_overhead
from examples.bench.harness.plot import plot_results, require_matplotlib
from examples.bench.harness.report import format_report

DESCRIPTION = "step time, reductions and peak memory of accumulation methods"
_OVERHEAD_OPTIONS = {"help", "overhead", "accum_steps", "rounds", "micro_steps", "warmup", "seed", "json", "table"}
_OVERHEAD_OPTIONS |= {"device"}
"""What ``--overhead`` reads; it refuses any other option given."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the harness."""
    defaults = BenchConfig()
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="ranks to start (default %(default)s)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(defaults.models))
    parser.add_argument(
        "--accum-steps",
        nargs="+",
        type=int,
        default=None,  # None: the default of the mode, which --overhead changes
        metavar="K",
        help=f"default {' '.join(map(str, defaults.accum_steps))}; with --overhead "
        f"{' '.join(map(str, OverheadConfig.accum_steps))}",
    )
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the model's (8)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(defaults.methods),
        help="default: (a) to (k), those installed; opt-in: fsdp2_* (FSDP2 per grad_sync mode), hsdp_* (--nproc 4 "
        "only), deepspeed_zero2/3 and distaccum_zero2/3",
    )
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds (default %(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds (default {defaults.rounds}; --overhead {OverheadConfig.rounds})",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip per-method peak memory")
    parser.add_argument(
        "--memory-accum-steps",
        nargs="+",
        type=int,
        default=None,
        metavar="K",
        help="measure every method's memory at these accum_steps, timed or not (default: all of --accum-steps)",
    )
    parser.add_argument("--memory-sweep", nargs="*", type=int, default=list(defaults.memory_sweep), metavar="K")
    parser.add_argument("--memory-steps", type=int, default=defaults.memory_steps)
    parser.add_argument("--size", choices=("full", "tiny"), default=defaults.size, help="tiny: smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores/ranks)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per job of ranks")
    parser.add_argument(
        "--link-rate",
        default=None,
        metavar="RATE",
        help="run the 2 ranks as two nodes in network namespaces joined by a veth link shaped to RATE (100Mbit, "
        "1Gbit, 10Gbit; Linux and root only), and the timing job once more on loopback as a baseline; the report "
        "adds `distaccum plan`'s communication estimate at RATE next to the measured step times",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all figures as JSON")
    parser.add_argument("--table", type=Path, default=None, metavar="PATH", help="also write the table here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG here (needs matplotlib): peak memory per rank against accum_steps from the memory sweep, "
        "and step time against accum_steps per method; default: with --json X.json, X.png next to it when "
        "matplotlib is installed",
    )
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="run only the microbenchmark of distaccum's own cost per micro-step (nn.Linear(4, 4), one process, "
        "CPU or --device cuda, one thread; examples/bench/harness/overhead.py) with --accum-steps, --rounds, "
        "--micro-steps, --warmup, --seed, --device, --json, --table",
    )
    parser.add_argument(
        "--micro-steps",
        type=int,
        default=None,
        metavar="M",
        help=f"--overhead: micro-steps per variant and round (default {OverheadConfig.micro_steps})",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="--overhead: where the tiny model runs (default %(default)s); cuda synchronizes after each micro-step, "
        "untimed",
    )


def build_parser() -> argparse.ArgumentParser:
    """The harness's parser: :func:`add_arguments` under the name it runs by."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m examples.bench.harness``: parse ``argv`` (default ``sys.argv[1:]``) and run."""
    return run(build_parser().parse_args(argv))


def _config(args: argparse.Namespace) -> BenchConfig:
    defaults = BenchConfig()
    return BenchConfig(
        nproc=args.nproc,
        models=tuple(args.models),
        accum_steps=tuple(args.accum_steps or defaults.accum_steps),
        micro_batch_size=args.micro_batch_size,
        methods=tuple(args.methods),
        warmup=args.warmup,
        rounds=defaults.rounds if args.rounds is None else args.rounds,
        memory=args.memory,
        memory_accum_steps=None if args.memory_accum_steps is None else tuple(args.memory_accum_steps),
        memory_sweep=tuple(args.memory_sweep),
        memory_steps=args.memory_steps,
        size=args.size,
        threads=args.threads,
        seed=args.seed,
        timeout_s=args.timeout,
        link_rate=args.link_rate,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write ``--json`` / ``--table`` / ``--plot``; 2 on a bad option
    (``--plot`` without matplotlib included) or no netns."""
    if args.overhead:
        return _run_overhead(args)
    if args.micro_steps is not None:
        print(f"{PROG}: error: --micro-steps belongs to --overhead", file=sys.stderr)
        return 2
    try:
        config = _config(args)  # checks the options, --link-rate with --nproc included
        if args.plot is not None:
            require_matplotlib()  # before the run, not after minutes of it
    except (ValueError, ImportError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    plot = _plot_path(args)
    try:
        results = run_benchmark(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except LinkUnavailable as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    text = format_report(results)
    _write(args, results, text)
    if plot is not None:
        plot_results(results, plot)
    return 0


def _write(args: argparse.Namespace, results: dict[str, Any], text: str) -> None:
    """Print the table; write ``--json`` and ``--table`` where asked."""
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(f"$ {results['command']}\n{text}\n")


def _plot_path(args: argparse.Namespace) -> Path | None:
    if args.plot is not None or args.json is None:
        return args.plot
    try:
        require_matplotlib()
    except ImportError as error:
        print(f"{PROG}: no PNG next to {args.json}: {error}", file=sys.stderr)
        return None
    return args.json.with_suffix(".png")


def _run_overhead(args: argparse.Namespace) -> int:
    """``--overhead``: only the microbenchmark; 2 on a bad option, 1 when the sanity check fails."""
    parser = build_parser()
    unused = [
        action.option_strings[0]
        for action in parser._actions
        if action.dest not in _OVERHEAD_OPTIONS and getattr(args, action.dest) != action.default
    ]
    steps = None if args.accum_steps is None else tuple(args.accum_steps)
    given = {"accum_steps": steps, "rounds": args.rounds, "micro_steps": args.micro_steps}
    try:
        if unused:
            raise ValueError(f"--overhead runs one process on its own tiny model; drop {' '.join(unused)}")
        config = OverheadConfig(
            **{name: value for name, value in given.items() if value is not None},
            warmup=args.warmup,
            seed=args.seed,
            device=args.device,
        )
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    results = run_overhead(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    text = format_overhead(results)
    _write(args, results, text)
    if not results["sanity"]["passed"]:
        print(f"{PROG}: error: the sanity check failed (weights differ, see the table)", file=sys.stderr)
        return 1
    return 0
