"""``--overhead``: distaccum's own cost per micro-step, on a model so small that the framework is
the whole cost: ``nn.Linear(4, 4)``, micro-batch 4, SGD, one process, CPU (or ``--device cuda``), one torch
thread. Example:
``python -m examples.bench.harness --overhead --json examples/bench/overhead-cpu.json --table
examples/bench/overhead-cpu.txt``.

Every variant (:data:`VARIANTS`) has its own model and optimizer from the same seed and trains on the same precomputed
micro-batches. A round runs each variant once over ``micro_steps`` micro-steps (rounded down to whole windows), in the
order of a Williams design (:mod:`.order`: each variant after each other one equally often). Each micro-step is timed
alone, ``time.process_time_ns`` (CPU) and ``time.perf_counter_ns`` (wall), summed apart over non-boundary and boundary
micro-steps. Own cost: a variant's time minus that of the hand loop doing the same work (:data:`BASELINES`) in the same
round, median and IQR over rounds; the hand loop's twin (A/A) is the noise floor. The cycle collector is off during a
pass and runs after it, untimed, counting what it finds. Absolute times include two reads of each clock per micro-step;
differences do not.

JSON keys (times in µs unless a key ends in ``ns``; *stats*: ``{"median", "p25", "p75", "iqr"}`` over rounds):

* ``kind`` (``"overhead"``), ``command``, ``environment`` (``python``, ``torch``, ``platform``, ``cpu_count``,
  ``threads``, ``load_average_before``, ``load_average_after``, ``wall_s``), ``config`` (:class:`OverheadConfig`'s
  fields, ``model``, ``micro_batch_size``, ``lr``, ``max_grad_norm``), ``variants`` (name -> label), ``baselines``;
* ``cases``, one per accum_steps: ``accum_steps``; ``micro_steps`` and ``boundaries`` per variant and round;
    * ``variants[name]``: ``rounds`` (lists over timed rounds: ``cpu_ns_non_boundary``, ``cpu_ns_boundary``,
      ``wall_ns_non_boundary``, ``wall_ns_boundary``, ``gc_objects``); stats ``cpu_us``, ``wall_us`` (per
      micro-step), ``cpu_us_non_boundary``, ``wall_us_non_boundary`` (per non-boundary micro-step; null at
      accum_steps 1), ``cpu_us_boundary``, ``wall_us_boundary`` (per boundary micro-step);
      ``gc_objects_per_micro_step``;
    * ``own_cost[name]``: the same six stats keys, of the per-round difference to ``baselines[name]``;
    * ``max_abs_diff[name]``: the largest weight difference to ``baselines[name]`` after the run;
* ``sanity``: ``tolerance``, ``max_abs_diff`` (distaccum vs the hand loop, worst case), ``passed`` (every pair).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distaccum.accumulator import Accumulator
from distaccum.plan import BatchPlan
from examples.bench.harness.config import PROG
from examples.bench.harness.order import round_order

MICRO_BATCH_SIZE = 4
LR = 1e-3
MAX_GRAD_NORM = 1.0
TOLERANCE = 1e-6
_TABLE = {  # name -> (label, the hand loop doing the same work: the variant's own cost is taken against it)
    "hand": ("hand loop: (loss / k).backward(), step + zero_grad every k", None),
    "hand_twin": ("hand loop again (A/A: the noise floor)", "hand"),
    "hand_items": ("hand loop weighting by items: loss * (n / N_window)", None),
    "hand_clip": ("hand loop, clip_grad_norm_ before the step", None),
    "hand_seeded": ("hand loop seeding its backward: loss.backward(tensor(1 / k)), as distaccum does", None),
    "distaccum": ("distaccum", "hand"),
    "distaccum_vs_seeded": ("distaccum again (against the seeded hand loop: its bookkeeping alone)", "hand_seeded"),
    "distaccum_items": ("distaccum, num_items", "hand_items"),
    "distaccum_clip": ("distaccum, max_grad_norm", "hand_clip"),
    "distaccum_no_check": ("distaccum, check_ranks=False", "hand"),
}
VARIANTS = {name: label for name, (label, _) in _TABLE.items()}
BASELINES = {name: baseline for name, (_, baseline) in _TABLE.items() if baseline}
HEADER = (
    "| variant | vs | µs / micro-step | wall µs | own µs / micro-step | own, non-boundary | own, boundary "
    "| own wall µs | max abs weight diff | gc objects / micro-step |"
)
RAW_KEYS = ("cpu_ns_non_boundary", "cpu_ns_boundary", "wall_ns_non_boundary", "wall_ns_boundary", "gc_objects")

MicroBatch = tuple[Tensor, Tensor, int, int]  # inputs, targets, items, the window's items
Step = Callable[[int, Tensor, Tensor, int, int], None]  # (index in the round, *MicroBatch)
Figures = dict[str, list[float] | None]


@dataclass(frozen=True, kw_only=True)
class OverheadConfig:
    """What ``--overhead`` runs."""

    accum_steps: tuple[int, ...] = (1, 8)
    """Micro-steps per optimizer step; one case each."""
    rounds: int = 15
    """Timed rounds; every figure is a median over them."""
    micro_steps: int = 2000
    """Micro-steps per variant and round, rounded down to a multiple of each accum_steps."""
    warmup: int = 1
    """Untimed rounds before them."""
    seed: int = 0
    device: str = "cpu"
    """``cpu`` or ``cuda``. On CUDA the device is synchronized after each micro-step, outside its timed interval:
    every micro-step starts on an idle queue, so what is timed is the host's cost of issuing it, plus any wait for the
    GPU that the micro-step itself makes (a host read)."""

    def __post_init__(self) -> None:
        if not self.accum_steps or min(self.accum_steps) < 1:
            raise ValueError(f"accum_steps needs values >= 1, got {list(self.accum_steps)}")
        for name, least in (("rounds", 1), ("micro_steps", max(self.accum_steps)), ("warmup", 0)):
            if getattr(self, name) < least:  # micro_steps: a round is at least one whole window
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU here: drop --device cuda")

    def micro_steps_at(self, accum_steps: int) -> int:
        return self.micro_steps // accum_steps * accum_steps

    def command(self) -> str:
        """The command line that reproduces this configuration."""
        knobs = f"--rounds {self.rounds} --micro-steps {self.micro_steps} --warmup {self.warmup}"
        seed = f" --seed {self.seed}" if self.seed else ""
        device = f" --device {self.device}" if self.device != "cpu" else ""
        steps = " ".join(map(str, self.accum_steps))
        return f"{PROG} --overhead --accum-steps {steps} {knobs}{seed}{device}"


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (linear interpolation, numpy's default) and IQR of ``values`` (at least one)."""
    # quantiles() wants two points before Python 3.13; one point is its own quartiles.
    p25, median, p75 = statistics.quantiles(list(values) * (2 if len(values) == 1 else 1), n=4, method="inclusive")
    return {"median": median, "p25": p25, "p75": p75, "iqr": p75 - p25}


def per_round_figures(raw: dict[str, list[int]], micro_steps: int, accum_steps: int) -> Figures:
    """Per timed round, µs per micro-step (all, non-boundary, boundary) from the ns sums of :func:`_time_pass`."""
    boundaries = micro_steps // accum_steps
    inner = micro_steps - boundaries
    figures: Figures = {}
    for clock in ("cpu", "wall"):
        outer, last = raw[f"{clock}_ns_non_boundary"], raw[f"{clock}_ns_boundary"]
        figures[f"{clock}_us"] = [(a + b) / micro_steps / 1e3 for a, b in zip(outer, last, strict=True)]
        figures[f"{clock}_us_non_boundary"] = [a / inner / 1e3 for a in outer] if inner else None
        figures[f"{clock}_us_boundary"] = [b / boundaries / 1e3 for b in last]
    return figures


def own_cost(figures: Figures, baseline: Figures) -> dict[str, dict[str, float] | None]:
    """Stats of the per-round difference ``figures - baseline``, figure by figure (None where there is none)."""
    own: dict[str, dict[str, float] | None] = dict.fromkeys(figures)
    for key, values in figures.items():
        if values is not None and (base := baseline[key]) is not None:
            own[key] = summarize([a - b for a, b in zip(values, base, strict=True)])
    return own


def _data(count: int, accum_steps: int, seed: int, device: str = "cpu") -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(count, MICRO_BATCH_SIZE, 4, generator=generator).to(device)
    targets = torch.randn(count, MICRO_BATCH_SIZE, 4, generator=generator).to(device)
    # Every micro-batch is MICRO_BATCH_SIZE items, so N_window is known ahead, as a hand loop needs it to be.
    return [(inputs[i], targets[i], MICRO_BATCH_SIZE, MICRO_BATCH_SIZE * accum_steps) for i in range(count)]


def _variant(name: str, accum_steps: int, seed: int, device: str = "cpu") -> tuple[nn.Module, Step]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(4, 4).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    k = accum_steps
    if name.startswith("distaccum"):
        plan = BatchPlan(global_batch_size=MICRO_BATCH_SIZE * k, micro_batch_size=MICRO_BATCH_SIZE, world_size=1)
        clip = MAX_GRAD_NORM if name == "distaccum_clip" else None
        acc = Accumulator(model, optimizer, plan, max_grad_norm=clip, check_ranks=name != "distaccum_no_check")

        def with_items(i: int, x: Tensor, y: Tensor, items: int, window_items: int) -> None:
            with acc.micro_step():
                acc.backward(F.mse_loss(model(x), y), num_items=items)

        def default(i: int, x: Tensor, y: Tensor, items: int, window_items: int) -> None:
            with acc.micro_step():
                acc.backward(F.mse_loss(model(x), y))

        return model, with_items if name == "distaccum_items" else default

    def hand(i: int, x: Tensor, y: Tensor, items: int, window_items: int) -> None:
        (F.mse_loss(model(x), y) / k).backward()
        if (i + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def hand_items(i: int, x: Tensor, y: Tensor, items: int, window_items: int) -> None:
        (F.mse_loss(model(x), y) * (items / window_items)).backward()
        if (i + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    inverse_k = torch.full((), 1.0 / k, device=device)

    def hand_seeded(i: int, x: Tensor, y: Tensor, items: int, window_items: int) -> None:
        F.mse_loss(model(x), y).backward(
            inverse_k
        )  # the gradient of loss / k, bit for bit, without the division's node
        if (i + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def hand_clip(i: int, x: Tensor, y: Tensor, items: int, window_items: int) -> None:
        (F.mse_loss(model(x), y) / k).backward()
        if (i + 1) % k == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    loops = {"hand": hand, "hand_twin": hand, "hand_items": hand_items, "hand_clip": hand_clip}
    return model, (loops | {"hand_seeded": hand_seeded})[name]


def _time_pass(step: Step, data: list[MicroBatch], accum_steps: int, device: str = "cpu") -> tuple[int, int, int, int]:
    """One variant's pass over a round: CPU ns (non-boundary, boundary), then wall ns (the same two)."""
    cpu, wall = [0, 0], [0, 0]
    cpu_clock, wall_clock = time.process_time_ns, time.perf_counter_ns
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    synchronize()
    for i, (x, y, items, window_items) in enumerate(data):
        cpu_start, wall_start = cpu_clock(), wall_clock()
        step(i, x, y, items, window_items)
        wall_end, cpu_end = wall_clock(), cpu_clock()
        synchronize()  # untimed: the next micro-step starts on an idle queue
        boundary = int((i + 1) % accum_steps == 0)
        cpu[boundary] += cpu_end - cpu_start
        wall[boundary] += wall_end - wall_start
    return cpu[0], cpu[1], wall[0], wall[1]


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def _run_case(config: OverheadConfig, accum_steps: int) -> dict[str, Any]:
    count = config.micro_steps_at(accum_steps)
    data = _data(count, accum_steps, config.seed, config.device)
    built = {name: _variant(name, accum_steps, config.seed, config.device) for name in VARIANTS}
    names = list(VARIANTS)
    raw: dict[str, dict[str, list[int]]] = {name: {key: [] for key in RAW_KEYS} for name in names}
    gc.collect()
    for round_index in range(config.warmup + config.rounds):
        for name in round_order(names, round_index):
            times = _time_pass(built[name][1], data, accum_steps, config.device)
            found = gc.collect(0)  # the cycles this pass left, all young: the collector is off while it runs
            if round_index >= config.warmup:
                for key, value in zip(RAW_KEYS, (*times, found), strict=True):
                    raw[name][key].append(value)
    figures = {name: per_round_figures(raw[name], count, accum_steps) for name in names}
    variants: dict[str, dict[str, Any]] = {}
    for name in names:
        variants[name] = {key: None if values is None else summarize(values) for key, values in figures[name].items()}
        variants[name]["gc_objects_per_micro_step"] = sum(raw[name]["gc_objects"]) / (config.rounds * count)
        variants[name]["rounds"] = raw[name]
    case = {"accum_steps": accum_steps, "micro_steps": count, "boundaries": count // accum_steps, "variants": variants}
    case["own_cost"] = {name: own_cost(figures[name], figures[base]) for name, base in BASELINES.items()}
    case["max_abs_diff"] = {name: _max_abs_diff(built[name][0], built[base][0]) for name, base in BASELINES.items()}
    return case


def run_overhead(config: OverheadConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every variant at every accum_steps (one torch thread, collector off; both restored after)."""
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    environment: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    environment |= {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": 1}
    if config.device == "cuda":
        environment["gpu"] = torch.cuda.get_device_name()
    environment["load_average_before"], started = list(os.getloadavg()), time.perf_counter()
    torch.set_num_threads(1)
    gc.disable()
    try:
        cases = []
        for accum_steps in config.accum_steps:
            log(f"overhead: accum_steps {accum_steps}, {config.warmup} + {config.rounds} rounds of {len(VARIANTS)}")
            cases.append(_run_case(config, accum_steps))
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()
    environment |= {"load_average_after": list(os.getloadavg()), "wall_s": time.perf_counter() - started}
    setup = {"model": "nn.Linear(4, 4)", "micro_batch_size": MICRO_BATCH_SIZE, "lr": LR, "max_grad_norm": MAX_GRAD_NORM}
    worst = max(case["max_abs_diff"]["distaccum"] for case in cases)
    passed = all(diff <= TOLERANCE for case in cases for diff in case["max_abs_diff"].values())
    results = {"kind": "overhead", "command": config.command(), "environment": environment}
    results |= {"config": {**dataclasses.asdict(config), **setup}, "variants": VARIANTS, "baselines": BASELINES}
    return results | {"cases": cases, "sanity": {"tolerance": TOLERANCE, "max_abs_diff": worst, "passed": passed}}


def _cell(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['median']:.2f} [{stats['iqr']:.2f}]"


def _where(config: dict[str, Any], env: dict[str, Any]) -> str:
    if config.get("device", "cpu") != "cuda":
        return "CPU"
    return f"CUDA ({env.get('gpu', 'GPU')}; synchronized after each micro-step, untimed)"


def format_overhead(results: dict[str, Any]) -> str:
    """The markdown report of :func:`run_overhead`'s results."""
    config, env, sanity = results["config"], results["environment"], results["sanity"]
    load = f"{env['load_average_before'][0]:.2f} -> {env['load_average_after'][0]:.2f}"
    lines = [
        f"bench harness --overhead: {config['model']}, micro-batch {config['micro_batch_size']}, SGD lr "
        f"{config['lr']}, max_grad_norm {config['max_grad_norm']}; one process, {_where(config, env)}, "
        f"{env['threads']} torch thread; torch {env['torch']}, Python {env['python']}, {env['platform']}, "
        f"{env['cpu_count']} CPUs; load average "
        f"{load}; wall {env['wall_s']:.0f} s",
        f"{config['rounds']} timed rounds after {config['warmup']} warm-up, each running every variant once on the "
        "same micro-batches, interleaved; median [IQR] over rounds, µs of CPU time unless marked wall. Own: minus "
        "the equal-work hand loop (vs), paired per round: per micro-step, per non-boundary, per boundary micro-step.",
    ]
    for case in results["cases"]:
        lines += [
            f"\n### accum_steps {case['accum_steps']}: {case['micro_steps']} micro-steps, {case['boundaries']} "
            f"optimizer steps per variant and round\n\n{HEADER}",
            "|---|---|" + "---:|" * 8,
        ]
        for name, label in results["variants"].items():
            entry, own = case["variants"][name], case["own_cost"].get(name)
            cells = [label, results["baselines"].get(name, ""), _cell(entry["cpu_us"]), _cell(entry["wall_us"])]
            cells += [_cell(own[key]) if own else "" for key in ("cpu_us", "cpu_us_non_boundary", "cpu_us_boundary")]
            cells += [_cell(own["wall_us"]) if own else "", f"{case['max_abs_diff'][name]:.1e}" if own else ""]
            lines.append("| " + " | ".join([*cells, f"{entry['gc_objects_per_micro_step']:.2f}"]) + " |")
    steps = ", ".join(str(case["accum_steps"]) for case in results["cases"])
    lines.append(
        f"\nsanity: distaccum's weights equal the hand loop's after the run (same data, same steps; accum_steps "
        f"{steps}): max abs diff {sanity['max_abs_diff']:.1e}, tolerance {sanity['tolerance']:.0e}; every pair "
        f"within it: {'ok' if sanity['passed'] else 'FAILED'}"
    )
    return "\n".join(lines)
