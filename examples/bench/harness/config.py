"""What the harness runs (:class:`BenchConfig`) and the command line that reproduces it."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

from distaccum.tools.planner import parse_bandwidth
from examples.bench.harness.methods import METHODS, check_methods
from examples.bench.harness.models import model_spec

_NEEDS = {
    "accelerate": ("accelerate",),
    **dict.fromkeys(("deepspeed", "deepspeed_zero2", "deepspeed_zero3"), ("deepspeed",)),
    **dict.fromkeys(
        ("distaccum_deepspeed", "distaccum_zero2", "distaccum_zero3"), ("deepspeed", "distaccum.integrations.deepspeed")
    ),
}

PROG = "python -m examples.bench.harness"
"""How the harness runs, from the repository root: the start of every command line it writes."""

SWEEP_METHODS = ("distaccum", "real_batch")
"""Methods of the memory sweep: the virtual batch and the real batch of the same size."""


def available_methods() -> tuple[str, ...]:
    """The default methods: (a) to (k) where their libraries are installed (Accelerate and DeepSpeed are optional
    dependencies). The sharded ones, (l) to (t), are opt-in: name them with ``--methods``."""

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    return tuple(
        name
        for name, method in METHODS.items()
        if not method.opt_in and all(installed(module) for module in _NEEDS.get(name, ()))
    )


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What the harness runs."""

    nproc: int = 2
    """Ranks to start (gloo on CPU, nccl on GPU)."""
    models: tuple[str, ...] = ("mlp", "transformer")
    """Benchmark models, from :data:`examples.bench.harness.models.MODELS`."""
    accum_steps: tuple[int, ...] = (8,)
    """Micro-batches per optimizer step; one timing case per (model, accum_steps)."""
    micro_batch_size: int | None = None
    """Samples per micro-batch; None takes each model's default (8)."""
    methods: tuple[str, ...] = dataclasses.field(default_factory=available_methods)
    """Methods to compare, from :data:`examples.bench.harness.methods.METHODS`; default: (a) to (k), those installed."""
    warmup: int = 1
    """Untimed rounds per case (first-touch allocations, DDP bucket rebuild, lazy inits)."""
    rounds: int = 5
    """Timed rounds per case: each method's median is over these optimizer steps."""
    memory: bool = True
    """Measure peak memory of every method in fresh processes (at ``memory_accum_steps``)."""
    memory_accum_steps: tuple[int, ...] | None = None
    """accum_steps at which every method gets a memory run, timed or not; None: all of ``accum_steps``."""
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
    link_rate: str | None = None
    """Run the ranks as two nodes in network namespaces joined by a link of this rate (``100Mbit``, ``10Gbit``;
    Linux and root only, :mod:`examples.bench.harness.netns`), plus a loopback baseline; None: loopback only."""

    def __post_init__(self) -> None:
        for name in ("nproc", "rounds", "memory_steps", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        bad = [k for k in (*self.accum_steps, *self.memory_sweep, *(self.memory_accum_steps or ())) if k < 1]
        if not self.accum_steps or bad:
            raise ValueError(f"accum_steps and memory_sweep need values >= 1 (accum_steps needs one), got {bad}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        for name in self.models:
            model_spec(name, self.size)
        check_methods(list(self.methods))
        fixed = [name for name in self.methods if METHODS[name].nproc not in (None, self.nproc)]
        if fixed:
            raise ValueError(
                f"methods {' '.join(fixed)} run FSDP2 on a 2 x 2 (replicate, shard) mesh, which needs "
                f"{METHODS[fixed[0]].nproc} ranks, but nproc is {self.nproc}: use --nproc 4, or drop them from "
                "--methods"
            )
        if self.link_rate is not None:
            parse_bandwidth(self.link_rate)
            if self.nproc != 2:
                raise ValueError(
                    f"nproc {self.nproc} with link_rate {self.link_rate}: two nodes run one rank each; use --nproc 2"
                )

    @property
    def rank_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.nproc)


def allocator_environment() -> dict[str, str]:
    # glibc's malloc tunables change peak RSS (freed tensors kept on the heap or returned); they belong to the
    # command that produced a figure.
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("MALLOC_")}


def command_line(config: BenchConfig) -> str:
    """The command that reproduces ``config``, from the repository root (every knob spelled out, allocator env
    first)."""
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
        *([f"--link-rate {config.link_rate}"] if config.link_rate else []),
    ]
    prefix = "".join(f"{name}={value} " for name, value in allocator_environment().items())
    return f"{prefix}{PROG} " + " ".join(parts)
