"""Run a benchmark: start each job of ranks as fresh worker processes and collect what they measured."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from distaccum import dist
from examples.bench.harness.config import SWEEP_METHODS, BenchConfig, allocator_environment, command_line
from examples.bench.harness.models import model_spec
from examples.bench.harness.netns import Node, two_nodes
from examples.bench.harness.order import ORDER
from examples.bench.harness.records import Case, Job, MemoryMeasurement, TimeResult
from examples.bench.harness.report import summarize
from examples.bench.harness.report_link import link_comparison

WORKER = "examples.bench.harness.worker"
"""The module each rank runs (``python -m``), found through ``PYTHONPATH``: the checkout that holds this harness."""


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def environment_for_workers() -> dict[str, str]:
    """Variables every bench rank needs so that Accelerate and DeepSpeed take the CPU path without a GPU."""
    env: dict[str, str] = {}
    if not torch.cuda.is_available():
        # Without it Accelerate sees no GPU, leaves the model unwrapped and never averages gradients.
        env["ACCELERATE_USE_CPU"] = "1"
        env["DS_ACCELERATOR"] = "cpu"
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        # DeepSpeed JIT-compiles a communication op once; keep it next to the interpreter, not in $HOME.
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return env


def launch(
    job: Job, nproc: int, timeout_s: float, workdir: Path, *, nodes: tuple[Node, ...] | None = None
) -> list[dict[str, Any]]:
    """Run ``job`` on ``nproc`` fresh worker processes; return their results (the JSON they wrote) in rank order.

    With ``nodes`` (one per rank, from :func:`examples.bench.harness.netns.two_nodes`), rank ``r`` runs inside
    ``nodes[r]``'s network namespace, with the rendezvous on ``nodes[0]``'s address.

    Raises:
        TimeoutError: the ranks did not finish in ``timeout_s`` (they are killed first).
        RuntimeError: a rank failed; the message carries the end of its log.
    """
    if nodes is not None and len(nodes) != nproc:
        raise ValueError(f"{len(nodes)} nodes for {nproc} ranks: the ranks run one per node")
    for attempt in range(2):
        jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=workdir))
        (jobdir / "spec.json").write_text(json.dumps(job.to_json()))
        # The checkout that holds this harness (launch.py is examples/bench/harness/launch.py), and the distaccum next
        # to it: the workers import the same code, from any working directory, even when distaccum is not installed.
        package_root = str(Path(__file__).resolve().parents[3])
        base_env = {
            **os.environ,
            **environment_for_workers(),
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": str(job.threads),
            "MASTER_ADDR": nodes[0].address if nodes else "127.0.0.1",
            "MASTER_PORT": str(dist.free_port()),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
        }
        processes: list[subprocess.Popen[bytes]] = []
        timed_out = False
        try:
            for rank in range(nproc):
                env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                command = [sys.executable, "-m", WORKER, str(jobdir / "spec.json"), str(jobdir)]
                if nodes:
                    env.update(nodes[rank].environment())
                    command = nodes[rank].command(command)  # `ip netns exec` execs it: the pid stays the rank's
                with open(jobdir / f"log-{rank}.txt", "w") as log:
                    processes.append(
                        subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                    )
            deadline = time.monotonic() + timeout_s
            for process in processes:
                try:
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for process in processes:  # also when interrupted (Ctrl-C, SIGTERM): no rank outlives the launch
                if process.poll() is None:
                    # Each rank leads its own session: this ends it and anything it started (a compiler), nothing else.
                    os.killpg(process.pid, 9)
                    process.wait()
        logs = {rank: _tail(jobdir / f"log-{rank}.txt") for rank in range(nproc)}
        if timed_out:
            raise TimeoutError(f"bench job {job.kind} did not finish in {timeout_s:.0f} s; ranks killed. Logs:\n{logs}")
        failed = {rank: logs[rank] for rank, process in enumerate(processes) if process.returncode != 0}
        in_use = (os.strerror(errno.EADDRINUSE).lower(), "eaddrinuse")
        if failed and attempt == 0 and any(mark in text.lower() for text in failed.values() for mark in in_use):
            continue  # another program took the free port between probe and bind: retry once on a new one
        if failed:
            details = "\n".join(
                f"--- rank {rank} (exit {processes[rank].returncode}):\n{text}" for rank, text in failed.items()
            )
            raise RuntimeError(f"bench job {job.kind} failed:\n{details}")
        return [json.loads((jobdir / f"result-{rank}.json").read_text()) for rank in range(nproc)]
    raise AssertionError("unreachable")


def _micro_batch_size(config: BenchConfig, model: str) -> int:
    return config.micro_batch_size or model_spec(model, config.size).default_micro_batch_size


def _cases(config: BenchConfig) -> list[Case]:
    return [Case(name, _micro_batch_size(config, name), k) for name in config.models for k in config.accum_steps]


def _job(config: BenchConfig, kind: Literal["time", "memory"], cases: list[Case], methods: list[str]) -> Job:
    return Job(
        kind=kind,
        cases=cases,
        methods=methods,
        size=config.size,
        seed=config.seed,
        threads=config.rank_threads,
        warmup=config.warmup,
        rounds=config.rounds,
        steps=config.memory_steps,
    )


def _time(job: Job, config: BenchConfig, workdir: Path, nodes: tuple[Node, ...] | None = None) -> list[TimeResult]:
    return [TimeResult.from_json(rank) for rank in launch(job, config.nproc, config.timeout_s, workdir, nodes=nodes)]


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
    memory: list[list[MemoryMeasurement]] = []
    link: dict[str, Any] | None = None
    loopback: list[TimeResult] = []
    with tempfile.TemporaryDirectory(prefix="distaccum-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        nodes = None
        if config.link_rate is not None:
            two = stack.enter_context(two_nodes(config.link_rate))
            nodes, link = two.nodes, two.describe()
            log(f"two nodes over {config.link_rate}: namespaces {', '.join(n.namespace for n in nodes)}")
        log(f"timing {len(cases)} case(s) x {len(config.methods)} methods on {config.nproc} ranks ...")
        time_job = _job(config, "time", cases, list(config.methods))
        timed = _time(time_job, config, workdir, nodes)
        memory_runs: list[tuple[Case, str]] = []
        if config.memory:
            wanted = config.accum_steps if config.memory_accum_steps is None else config.memory_accum_steps
            # Any k, timed or not: a memory job needs no timing case (a step at k=64 can be too slow to time often).
            memory_cases = _cases(dataclasses.replace(config, accum_steps=wanted))
            memory_runs += [(case, method) for case in memory_cases for method in config.methods]
        for name in config.models:
            for k in config.memory_sweep:
                case = Case(name, _micro_batch_size(config, name), k)
                memory_runs += [(case, method) for method in SWEEP_METHODS if (case, method) not in memory_runs]
        for index, (case, method) in enumerate(memory_runs, 1):
            log(f"memory {index}/{len(memory_runs)}: {case.model} k={case.accum_steps} {method} ...")
            memory_job = _job(config, "memory", [case], [method])
            ranks = launch(memory_job, config.nproc, config.timeout_s, workdir, nodes=nodes)
            memory.append([MemoryMeasurement.from_json(rank) for rank in ranks])
        stack.close()  # the namespaces go before the baseline runs
        if nodes:
            log("loopback baseline: the same timing job on this machine's loopback ...")
            loopback = _time(time_job, config, workdir)
    environment = {
        **_versions(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "backend": dist.default_backend(),  # the ranks' own choice: $DISTACCUM_BACKEND=gloo shares one GPU
        "threads_per_rank": config.rank_threads,
        "round_order": ORDER,
        "allocator_environment": allocator_environment(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
    }
    models = {name: model_spec(name, config.size).description for name in config.models}
    summary = summarize(timed, memory, config=config, environment=environment, models=models)
    results = summary.to_json()
    if link is not None:
        baseline = summarize(loopback, [], config=config, environment={}, models={})
        results["link"] = link
        results["loopback_cases"] = [dataclasses.asdict(case) for case in baseline.cases]
        rows = link_comparison(summary.cases, baseline.cases, link, config.nproc)
        results["link_comparison"] = [dataclasses.asdict(row) for row in rows]
    return {"command": command_line(config), **results}
