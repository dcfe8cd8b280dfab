"""One rank of a benchmark job: ``python -m examples.bench.harness.worker SPEC.json RESULT_DIR``.

Two kinds of job, started by :mod:`examples.bench.harness.launch` with ``RANK``/``WORLD_SIZE``/``MASTER_*`` set:

* ``time``: one long-lived group builds every method of a case, then runs rounds in which each method does
  one optimizer step on the same micro-batches, so machine drift hits all methods alike; the order follows a
  Williams design (:mod:`.order`), so each method runs after each other one equally often. Per step it records
  seconds, the collectives counted while it ran and the bytes all-reduced.
* ``memory``: a fresh group builds one method and runs a few steps; peak RSS of the process (or peak CUDA
  memory) is then that method's footprint, with nothing left over from other methods.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from distaccum import dist
from examples.bench.harness.counting import CommCounter, counting_collectives
from examples.bench.harness.methods import METHODS, Context, Method
from examples.bench.harness.models import model_spec, round_batches
from examples.bench.harness.order import round_order
from examples.bench.harness.records import (
    Case,
    CaseTimings,
    Gradient,
    Job,
    MemoryMeasurement,
    MethodTimings,
    TimeResult,
)


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:  # no /proc (macOS): the start-of-run figure is only informative
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _context(job: Job, case: Case, counter: CommCounter, raw_all_reduce: Any) -> Context:
    return Context(
        spec=model_spec(case.model, job.size),
        micro_batch_size=case.micro_batch_size,
        accum_steps=case.accum_steps,
        seed=job.seed,
        device=dist.device(),
        world_size=dist.world_size(),
        counter=counter,
        raw_all_reduce=raw_all_reduce,
    )


class _BytesReduced:
    """``torch.distributed.all_reduce``, adding up the bytes of every tensor it reduces (all of DDP's buckets)."""

    def __init__(self, all_reduce: Any) -> None:
        self.all_reduce = all_reduce
        self.bytes = 0

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.bytes += tensor.numel() * tensor.element_size()
        return self.all_reduce(tensor, *args, **kwargs)


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().to("cpu", torch.float64).flatten() for p in params])


def _time_case(job: Job, case: Case, ctx: Context, reduced: _BytesReduced) -> CaseTimings:
    names = job.methods
    methods: dict[str, Method] = {}
    for name in names:
        methods[name] = METHODS[name](ctx)
        gc.collect()
    # Accelerate and DeepSpeed may change the thread count when they start; every method gets the same.
    torch.set_num_threads(job.threads)
    records = {name: MethodTimings() for name in names}
    for round_index in range(job.warmup + job.rounds):
        batches = round_batches(
            ctx.spec,
            seed=ctx.seed,
            step=round_index,
            rank=dist.rank(),
            micro_batch_size=ctx.micro_batch_size,
            accum_steps=ctx.accum_steps,
        )
        for name in round_order(names, round_index):
            method = methods[name]
            prepared = method.prepare(batches)
            torch_dist.barrier()
            _sync_device(ctx.device)
            ctx.counter.reset()
            reduced.bytes = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            method.step(prepared)
            _sync_device(ctx.device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if round_index >= job.warmup:
                records[name].record_round(elapsed, cpu, ctx.counter, reduced.bytes)
    # Same seed, same data, same number of steps: every method should have made the same update as (b).
    torch.manual_seed(ctx.seed)
    parameters: list[torch.Tensor] = list(ctx.spec.build().parameters())
    initial = _flat(parameters)
    gradient = Gradient(
        params=sum(p.numel() for p in parameters),
        bytes=sum(p.numel() * p.element_size() for p in parameters),
    )
    finals = {name: _flat(methods[name].parameters()) for name in names}

    def mismatch(name: str, reference: torch.Tensor) -> float:
        return float((finals[name] - reference).norm()) / max(float((reference - initial).norm()), 1e-300)

    for name in names:
        records[name].update_mismatch = mismatch(name, finals.get("no_sync", finals[names[0]]))
        # The clipping methods make another update than (b): their sanity check is against their own reference.
        own = METHODS[name].reference
        records[name].update_mismatch_vs_reference = mismatch(name, finals[own]) if own in finals else None
        records[name].fingerprint = [float(finals[name].sum()), float(finals[name].norm())]
        methods[name].close()
    methods.clear()
    gc.collect()
    return CaseTimings(case=case, gradient=gradient, methods=records)


def time_cases(job: Job) -> TimeResult:
    """Run every case of a ``time`` job on this rank; returns per-method step times and counts."""
    counter = CommCounter()
    original = torch_dist.all_reduce
    # Under the counting wrappers, and the DDP hooks' unwrapped all-reduce: every all-reduced byte passes here once.
    reduced = _BytesReduced(original)
    current: dict[str, Context] = {}
    cases = []
    accelerator = None
    torch_dist.all_reduce = reduced
    try:
        with counting_collectives(counter, gradient_buffers=lambda: current["ctx"].python_gradient_reductions):
            for case in job.cases:
                ctx = _context(job, case, counter, reduced)
                ctx.accelerator = accelerator
                current["ctx"] = ctx
                cases.append(_time_case(job, case, ctx, reduced))
                accelerator = ctx.accelerator
                del ctx
    finally:
        torch_dist.all_reduce = original
    return TimeResult(cases=cases, threads=torch.get_num_threads())


class _OneAtATime(Sequence[Any]):
    """A round's micro-batches, each moved to the device when the method reaches it, as a data loader hands them over.

    The timed job stages the whole round on the device ahead (outside its timed region); a memory job that did the
    same would add k micro-batches to every method's peak (on CUDA; on CPU the move is a no-op).
    """

    def __init__(self, batches: list[Any], device: torch.device) -> None:
        self._batches, self._device = batches, device

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _OneAtATime(self._batches[index], self._device)
        x, y = self._batches[index]
        return x.to(self._device), y.to(self._device)


def measure_memory(job: Job) -> MemoryMeasurement:
    """Build one method in this fresh process, run a few steps, and report peak memory."""
    case = job.cases[0]
    (name,) = job.methods
    ctx = _context(job, case, CommCounter(), torch_dist.all_reduce)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    baseline = _current_rss_bytes()
    method = METHODS[name](ctx)
    torch.set_num_threads(job.threads)
    for step in range(job.steps):
        batches = round_batches(
            ctx.spec,
            seed=ctx.seed,
            step=step,
            rank=dist.rank(),
            micro_batch_size=ctx.micro_batch_size,
            accum_steps=ctx.accum_steps,
        )
        # A method that reshapes the round (the real batch concatenates it) keeps its own prepare.
        staged = type(method).prepare is Method.prepare
        method.step(_OneAtATime(batches, ctx.device) if staged else method.prepare(batches))
    _sync_device(ctx.device)
    result = MemoryMeasurement(
        case=case,
        method=name,
        peak_rss_bytes=_peak_rss_bytes(),
        baseline_rss_bytes=baseline,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
    )
    method.close()
    del method, ctx
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank: read the job, run it inside a clean process group, write the result."""
    spec_path, result_dir = sys.argv[1:] if argv is None else argv
    job = Job.from_json(json.loads(Path(spec_path).read_text()))
    torch.set_num_threads(job.threads)
    run: Callable[[Job], TimeResult | MemoryMeasurement] = time_cases if job.kind == "time" else measure_memory
    result = dist.run(run, job)
    Path(result_dir, f"result-{dist.rank()}.json").write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
