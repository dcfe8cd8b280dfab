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
from typing import Any

import torch

from distaccum import dist
from distaccum.tools.bench.config import SWEEP_METHODS, BenchConfig, allocator_environment, command_line
from distaccum.tools.bench.models import model_spec
from distaccum.tools.bench.netns import Node, two_nodes
from distaccum.tools.bench.order import ORDER
from distaccum.tools.bench.report import link_comparison, summarize


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
    job: dict[str, Any], nproc: int, timeout_s: float, workdir: Path, *, nodes: tuple[Node, ...] | None = None
) -> list[dict[str, Any]]:
    """Run ``job`` on ``nproc`` fresh worker processes; return their results in rank order.

    With ``nodes`` (one per rank, from :func:`distaccum.tools.bench.netns.two_nodes`), rank ``r`` runs inside
    ``nodes[r]``'s network namespace, with the rendezvous on ``nodes[0]``'s address.

    Raises:
        TimeoutError: the ranks did not finish in ``timeout_s`` (they are killed first).
        RuntimeError: a rank failed; the message carries the end of its log.
    """
    if nodes is not None and len(nodes) != nproc:
        raise ValueError(f"{len(nodes)} nodes for {nproc} ranks: the ranks run one per node")
    for attempt in range(2):
        jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=workdir))
        (jobdir / "spec.json").write_text(json.dumps(job))
        # The folder that holds this distaccum (launch.py is distaccum/tools/bench/launch.py): the workers import
        # the same code even when it is not installed.
        package_root = str(Path(__file__).resolve().parents[3])
        base_env = {
            **os.environ,
            **environment_for_workers(),
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": str(job["threads"]),
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
                command = [sys.executable, "-m", "distaccum.tools.bench.worker", str(jobdir / "spec.json"), str(jobdir)]
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
    link: dict[str, Any] | None = None
    loopback: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distaccum-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        nodes = None
        if config.link_rate is not None:
            two = stack.enter_context(two_nodes(config.link_rate))
            nodes, link = two.nodes, two.describe()
            log(f"two nodes over {config.link_rate}: namespaces {', '.join(n.namespace for n in nodes)}")
        log(f"timing {len(cases)} case(s) x {len(config.methods)} methods on {config.nproc} ranks ...")
        time_job = _job(config, "time", cases, list(config.methods))
        raw["time"] = launch(time_job, config.nproc, config.timeout_s, workdir, nodes=nodes)
        memory_runs: list[tuple[dict[str, Any], str]] = []
        if config.memory:
            wanted = config.accum_steps if config.memory_accum_steps is None else config.memory_accum_steps
            # Any k, timed or not: a memory job needs no timing case (a step at k=64 can be too slow to time often).
            memory_cases = _cases(dataclasses.replace(config, accum_steps=wanted))
            memory_runs += [(case, method) for case in memory_cases for method in config.methods]
        for name in config.models:
            micro = config.micro_batch_size or model_spec(name, config.size).default_micro_batch_size
            for k in config.memory_sweep:
                case = {"model": name, "micro_batch_size": micro, "accum_steps": k}
                memory_runs += [(case, method) for method in SWEEP_METHODS if (case, method) not in memory_runs]
        for index, (case, method) in enumerate(memory_runs, 1):
            log(f"memory {index}/{len(memory_runs)}: {case['model']} k={case['accum_steps']} {method} ...")
            memory_job = _job(config, "memory", [case], [method])
            raw["memory"].append(launch(memory_job, config.nproc, config.timeout_s, workdir, nodes=nodes))
        stack.close()  # the namespaces go before the baseline runs
        if nodes:
            log("loopback baseline: the same timing job on this machine's loopback ...")
            loopback = launch(time_job, config.nproc, config.timeout_s, workdir)
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
    results = summarize(raw, config=dataclasses.asdict(config), environment=environment, models=models)
    if link is not None:
        baseline = summarize({"time": loopback, "memory": []}, config=results["config"], environment={}, models={})
        results["link"] = link
        results["loopback_cases"] = baseline["cases"]
        results["link_comparison"] = link_comparison(results["cases"], baseline["cases"], link, config.nproc)
    return {"command": command_line(config), **results}
