"""``distaccum bench`` on the command line: its options, and the run that prints the table and writes files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distaccum.tools.bench.config import BenchConfig
from distaccum.tools.bench.launch import run_benchmark
from distaccum.tools.bench.methods import METHODS
from distaccum.tools.bench.models import MODELS
from distaccum.tools.bench.netns import LinkUnavailable
from distaccum.tools.bench.report import format_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``distaccum bench``."""
    defaults = BenchConfig()
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="ranks to start (default %(default)s)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(defaults.models))
    parser.add_argument("--accum-steps", nargs="+", type=int, default=list(defaults.accum_steps), metavar="K")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the model's (8)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(defaults.methods))
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed rounds (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="timed rounds (default %(default)s)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip per-method peak memory")
    parser.add_argument(
        "--memory-accum-steps",
        nargs="+",
        type=int,
        default=None,
        metavar="K",
        help="measure every method's memory only at these accum_steps (default: all of --accum-steps)",
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


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        nproc=args.nproc,
        models=tuple(args.models),
        accum_steps=tuple(args.accum_steps),
        micro_batch_size=args.micro_batch_size,
        methods=tuple(args.methods),
        warmup=args.warmup,
        rounds=args.rounds,
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
    """``distaccum bench``: run, print the table, write ``--json`` / ``--table``; 2 on a bad option or no netns."""
    try:
        config = _config(args)  # checks the options, --link-rate with --nproc included
    except ValueError as error:
        print(f"distaccum bench: error: {error}", file=sys.stderr)
        return 2
    try:
        results = run_benchmark(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    except LinkUnavailable as error:
        print(f"distaccum bench: error: {error}", file=sys.stderr)
        return 2
    text = format_report(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(f"$ {results['command']}\n{text}\n")
    return 0
