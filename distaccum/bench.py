"""``distaccum bench``: step time, gradient reductions and peak memory of eight ways to accumulate.

The contenders (:mod:`distaccum.bench_methods`): (a) DDP with an all-reduce on every micro-batch, (b) the
hand-written ``no_sync`` loop, (c) distaccum, (g) distaccum with ``num_items``, (d) Accelerate's
``accumulate``, (e) DeepSpeed ZeRO 0, (h) distaccum driving a DeepSpeed engine (the integration), (f) the real
batch ``micro x k`` in one pass. The models
(:mod:`distaccum.bench_models`): a 16.8M-parameter MLP (communication-heavy) and a small causal transformer
over ragged token sequences (activation-heavy).

How it measures (the design, and why):

* **Time**: one job of ``--nproc`` long-lived ranks builds every method of a case, then runs
  ``--warmup`` + ``--rounds`` rounds; in each round every method does one optimizer step on the same
  micro-batches, in an order that rotates every round, so machine drift (other jobs, thermal) hits all methods
  alike. A step's time is the slowest rank's; the figure is the median over timed rounds.
* **Reductions**: counted while the timed steps run, never assumed: a DDP comm hook counts one call per
  gradient bucket; Python-level collectives (DeepSpeed's gradient all-reduce, distaccum's scalar window
  all-reduce) are counted by wrapping ``torch.distributed``'s functions.
* **Memory**: a fresh group of processes per (method, model, accum_steps): peak RSS of the process
  (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU, the largest over ranks. A fresh process
  is the only way a peak belongs to one method alone, which is why memory is not measured in the timing job.

Example:
    ``distaccum bench --nproc 2 --json bench.json`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distaccum.bench_methods import METHODS, check_methods, environment_for_workers
from distaccum.bench_models import MODELS, model_spec
from distaccum.bench_report import format_report, summarize

_NEEDS = {
    "accelerate": ("accelerate",),
    "deepspeed": ("deepspeed",),
    "distaccum_deepspeed": ("deepspeed", "distaccum.integrations.deepspeed"),
}

SWEEP_METHODS = ("distaccum", "real_batch")
"""Methods of the memory sweep: the virtual batch and the real batch of the same size."""


def available_methods() -> tuple[str, ...]:
    """Every method whose libraries are installed (Accelerate and DeepSpeed are optional dependencies)."""

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    return tuple(name for name in METHODS if all(installed(module) for module in _NEEDS.get(name, ())))


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What ``distaccum bench`` runs."""

    nproc: int = 2
    """Ranks to start (gloo on CPU, nccl on GPU)."""
    models: tuple[str, ...] = ("mlp", "transformer")
    """Benchmark models, from :data:`distaccum.bench_models.MODELS`."""
    accum_steps: tuple[int, ...] = (8,)
    """Micro-batches per optimizer step; one timing case per (model, accum_steps)."""
    micro_batch_size: int | None = None
    """Samples per micro-batch; None takes each model's default (8)."""
    methods: tuple[str, ...] = dataclasses.field(default_factory=available_methods)
    """Methods to compare, from :data:`distaccum.bench_methods.METHODS`; default: all that are installed."""
    warmup: int = 1
    """Untimed rounds per case (first-touch allocations, DDP bucket rebuild, lazy inits)."""
    rounds: int = 5
    """Timed rounds per case: each method's median is over these optimizer steps."""
    memory: bool = True
    """Measure peak memory of every method in fresh processes (at ``memory_accum_steps``)."""
    memory_accum_steps: tuple[int, ...] | None = None
    """accum_steps of the timing cases whose methods get a memory run; None: all of ``accum_steps``."""
    memory_sweep: tuple[int, ...] = (1, 64)
    """accum_steps of the memory sweep (virtual vs real batch); empty to skip."""
    memory_steps: int = 1
    """Optimizer steps each memory process runs."""
    size: str = "full"
    """``full`` models, or ``tiny`` ones for smoke tests."""
    threads: int | None = None
    """Torch threads per rank; None: CPU cores divided by ranks (at least 1)."""
    seed: int = 0
    timeout_s: float = 3600.0
    """Upper bound for each job of ranks; a hang fails instead of blocking forever."""

    def __post_init__(self) -> None:
        for name in ("nproc", "rounds", "memory_steps", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        bad = [k for k in (*self.accum_steps, *self.memory_sweep) if k < 1]
        if not self.accum_steps or bad:
            raise ValueError(f"accum_steps and memory_sweep need values >= 1 (accum_steps needs one), got {bad}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        for name in self.models:
            model_spec(name, self.size)
        check_methods(list(self.methods))

    @property
    def rank_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.nproc)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def launch(job: dict[str, Any], nproc: int, timeout_s: float, workdir: Path) -> list[dict[str, Any]]:
    """Run ``job`` on ``nproc`` fresh worker processes; return their results in rank order.

    Raises:
        TimeoutError: the ranks did not finish in ``timeout_s`` (they are killed first).
        RuntimeError: a rank failed; the message carries the end of its log.
    """
    for attempt in range(2):
        jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=workdir))
        (jobdir / "spec.json").write_text(json.dumps(job))
        package_root = str(Path(__file__).resolve().parent.parent)
        base_env = {
            **os.environ,
            **environment_for_workers(),
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": str(job["threads"]),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
        }
        processes = []
        for rank in range(nproc):
            env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            with open(jobdir / f"log-{rank}.txt", "w") as log:
                command = [sys.executable, "-m", "distaccum.bench_worker", str(jobdir / "spec.json"), str(jobdir)]
                processes.append(
                    subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
        deadline = time.monotonic() + timeout_s
        timed_out = False
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        for process in processes:
            if process.poll() is None:
                # Each rank leads its own session: this ends it and anything it started (a compiler), nothing else.
                os.killpg(process.pid, 9)
                process.wait()
        logs = {rank: _tail(jobdir / f"log-{rank}.txt") for rank in range(nproc)}
        if timed_out:
            raise TimeoutError(
                f"bench job {job['kind']} did not finish in {timeout_s:.0f} s; ranks killed. Logs:\n{logs}"
            )
        failed = {rank: logs[rank] for rank, process in enumerate(processes) if process.returncode != 0}
        in_use = (os.strerror(errno.EADDRINUSE).lower(), "eaddrinuse")
        if failed and attempt == 0 and any(mark in text.lower() for text in failed.values() for mark in in_use):
            continue  # another program took the free port between probe and bind: retry once on a new one
        if failed:
            details = "\n".join(
                f"--- rank {rank} (exit {processes[rank].returncode}):\n{text}" for rank, text in failed.items()
            )
            raise RuntimeError(f"bench job {job['kind']} failed:\n{details}")
        return [json.loads((jobdir / f"result-{rank}.json").read_text()) for rank in range(nproc)]
    raise AssertionError("unreachable")


def _cases(config: BenchConfig) -> list[dict[str, Any]]:
    return [
        {
            "model": name,
            "micro_batch_size": config.micro_batch_size or model_spec(name, config.size).default_micro_batch_size,
            "accum_steps": k,
        }
        for name in config.models
        for k in config.accum_steps
    ]


def _job(config: BenchConfig, kind: str, cases: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    return {
        "kind": kind,
        "cases": cases,
        "methods": methods,
        "size": config.size,
        "seed": config.seed,
        "threads": config.rank_threads,
        "warmup": config.warmup,
        "rounds": config.rounds,
        "steps": config.memory_steps,
    }


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for package in ("distaccum", "accelerate", "deepspeed"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_benchmark(config: BenchConfig, *, log: Any = print) -> dict[str, Any]:
    """Run the benchmark described by ``config``; returns everything measured (what ``--json`` writes).

    Args:
        config: what to run.
        log: called with one progress line at a time (``print`` by default).

    Raises:
        TimeoutError, RuntimeError: a job of ranks hung or failed (see :func:`launch`).
    """
    started = time.time()
    load_before = os.getloadavg()
    cases = _cases(config)
    raw: dict[str, Any] = {"time": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="distaccum-bench-") as tmp:
        workdir = Path(tmp)
        log(f"timing {len(cases)} case(s) x {len(config.methods)} methods on {config.nproc} ranks ...")
        raw["time"] = launch(_job(config, "time", cases, list(config.methods)), config.nproc, config.timeout_s, workdir)
        memory_runs: list[tuple[dict[str, Any], str]] = []
        if config.memory:
            wanted = config.accum_steps if config.memory_accum_steps is None else config.memory_accum_steps
            memory_runs += [
                (case, method) for case in cases if case["accum_steps"] in wanted for method in config.methods
            ]
        for name in config.models:
            micro = config.micro_batch_size or model_spec(name, config.size).default_micro_batch_size
            for k in config.memory_sweep:
                case = {"model": name, "micro_batch_size": micro, "accum_steps": k}
                memory_runs += [(case, method) for method in SWEEP_METHODS if (case, method) not in memory_runs]
        for index, (case, method) in enumerate(memory_runs, 1):
            log(f"memory {index}/{len(memory_runs)}: {case['model']} k={case['accum_steps']} {method} ...")
            raw["memory"].append(
                launch(_job(config, "memory", [case], [method]), config.nproc, config.timeout_s, workdir)
            )
    environment = {
        **_versions(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "threads_per_rank": config.rank_threads,
        "allocator_environment": _allocator_environment(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
    }
    models = {name: model_spec(name, config.size).description for name in config.models}
    results = summarize(raw, config=dataclasses.asdict(config), environment=environment, models=models)
    return {"command": command_line(config), **results}


def _allocator_environment() -> dict[str, str]:
    # glibc's malloc tunables change peak RSS (freed tensors kept on the heap or returned); they belong to the
    # command that produced a figure.
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("MALLOC_")}


def command_line(config: BenchConfig) -> str:
    """The ``distaccum bench`` command that reproduces ``config`` (every knob spelled out, allocator env first)."""
    parts = [
        f"--nproc {config.nproc}",
        "--models " + " ".join(config.models),
        "--accum-steps " + " ".join(map(str, config.accum_steps)),
        *([f"--micro-batch-size {config.micro_batch_size}"] if config.micro_batch_size else []),
        *([] if config.methods == available_methods() else ["--methods " + " ".join(config.methods)]),
        f"--warmup {config.warmup} --rounds {config.rounds}",
        *([] if config.memory else ["--no-memory"]),
        *(
            ["--memory-accum-steps " + " ".join(map(str, config.memory_accum_steps))]
            if config.memory and config.memory_accum_steps is not None
            else []
        ),
        "--memory-sweep " + " ".join(map(str, config.memory_sweep)),
        f"--memory-steps {config.memory_steps}",
        *([] if config.size == "full" else [f"--size {config.size}"]),
        *([f"--threads {config.threads}"] if config.threads else []),
        *([f"--seed {config.seed}"] if config.seed else []),
    ]
    prefix = "".join(f"{name}={value} " for name, value in _allocator_environment().items())
    return prefix + "distaccum bench " + " ".join(parts)


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
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all figures as JSON")
    parser.add_argument("--table", type=Path, default=None, metavar="PATH", help="also write the table here")


def run(args: argparse.Namespace) -> int:
    """``distaccum bench``: run, print the table, write ``--json`` / ``--table``."""
    config = BenchConfig(
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
    )
    results = run_benchmark(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    text = format_report(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(f"$ {results['command']}\n{text}\n")
    return 0
