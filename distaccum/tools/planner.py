"""``distaccum plan``: the batch arithmetic, the elastic world sizes and the gradient traffic of each sync mode.

Pure arithmetic: nothing is launched or measured::

    distaccum plan --global-batch-size 1024 --micro-batch-size 16 --world-size 8
    distaccum plan --global-batch-size 1024 --micro-batch-size 16 --world-size 8 \\
        --params 7B --dtype bf16 --bandwidth 100Gbit --nodes 2 --replicas 2 --json

The model, per rank and optimizer step (W ranks, k = accum_steps, S = params x bytes of ``--dtype``): a ring
all-reduce over n ranks sends ``2(n-1)/n x S`` bytes, a reduce-scatter ``(n-1)/n x S``; a group of one rank issues
none. Modes: ``boundary`` (DDP/FSDP: one reduction at the window's last micro-step, a full unsharded gradient held
in the window), ``sharded`` (FSDP2: a reduce-scatter every micro-step, gradients kept sharded; HSDP all-reduces
across replicas only at the boundary), ``every`` (all collectives every micro-step). Wrappers: ``ddp`` (no
``sharded`` mode), ``fsdp`` (FSDP2 over W), ``hsdp`` (``--replicas R`` groups of W/R shards). One collective per
reduction (buckets split it, same bytes). Estimate: ``collectives x --latency + bytes sent / --bandwidth``.

``--json`` prints one object with these keys (stable; sizes in bytes, times in seconds):

- ``plan``: ``global_batch_size``, ``micro_batch_size``, ``accum_steps``, ``world_size``, ``equation``.
- ``elastic_world_sizes``: ``[{"world_size", "accum_steps"}]``, every n with ``global % (micro x n) == 0``.
- ``gradient``: null without ``--params``; else ``params``, ``dtype``, ``bytes_per_element``, ``bytes`` (S).
- ``per_step``: null without ``--params``; else ``distaccum`` and ``every_micro_batch`` (DDP all-reduce over W),
  each ``reductions``, ``gradient_bytes_reduced``, ``bytes_sent_per_rank``, ``estimate_s``; and ``ratio``
  (every / distaccum bytes sent, = accum_steps; null on one rank).
- ``network``: null without ``--bandwidth``; else ``bandwidth_bytes_per_s``, ``latency_s``, ``nodes``, ``model``.
- ``modes``: ``[]`` without ``--params``; else one object per (wrapper, mode): ``wrapper``, ``mode``,
  ``shard_group``, ``replicas``, ``reduce_scatters``, ``all_reduces``, ``bytes_sent_per_rank``,
  ``grad_bytes_per_rank``, ``grad_sharded``, ``estimate_s`` (null without ``--bandwidth``).
- ``noise_scale``: null without ``--log`` or ``--noise-scale``; else ``b_simple``, ``source``,
  ``batch_over_noise_scale``, ``steps_over_min``, ``samples_over_min``, ``model``
  (:mod:`distaccum.tools.critical_batch`).
- ``notes``: sentences for a reader.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distaccum.plan import BatchPlan
from distaccum.tools.critical_batch import LOG_HOWTO, noise_advice, read_noise_scale
from distaccum.tools.units import (  # re-exported: the bench and users import them from here
    DTYPES,
    parse_bandwidth,
    parse_dtype,
    parse_latency,
    parse_params,
    parse_positive_float,
    parse_positive_int,
)

MODES = ("boundary", "sharded", "every")
DEFAULT_LATENCY_S = 20e-6
_COLUMNS = ("wrapper", "mode", "shard x repl", "reduce-scatter", "all-reduce", "sent/rank", "grad mem/rank", "est.")


def elastic_world_sizes(global_batch_size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """(world_size, accum_steps) for every world size that keeps the global and the micro batch.

    Example:
        >>> elastic_world_sizes(64, 16)
        [(1, 4), (2, 2), (4, 1)]
    """
    slots = global_batch_size // micro_batch_size  # micro-batches per optimizer step over all ranks
    small = [n for n in range(1, math.isqrt(slots) + 1) if slots % n == 0]
    sizes = sorted({*small, *(slots // n for n in small)})
    return [(n, slots // n) for n in sizes if global_batch_size % (micro_batch_size * n) == 0]


def mode_traffic(
    wrapper: str, mode: str, shard_group: int, replicas: int, accum_steps: int, params: int, element_bytes: int
) -> dict[str, Any]:
    """One ``modes`` entry (``estimate_s`` None): collectives, bytes sent, gradient memory per rank per step.

    Example:
        >>> mode_traffic("fsdp", "sharded", 4, 1, 8, 1000, 4)["bytes_sent_per_rank"]  # 8 x 3/4 x 4000
        24000
    """
    grad_bytes = params * element_bytes
    scatter_each, reduce_each = int(shard_group > 1), int(replicas > 1)  # a ring of one rank sends nothing
    scatters = scatter_each if mode == "boundary" else accum_steps * scatter_each
    reduces = accum_steps * reduce_each if mode == "every" else reduce_each
    sharded = mode != "boundary" and shard_group > 1
    # Ring algorithms: a reduce-scatter sends (n-1)/n x S, an all-reduce 2(n-1)/n x S; HSDP all-reduces one shard.
    sent = scatters * (shard_group - 1) / shard_group * grad_bytes
    sent += reduces * 2 * (replicas - 1) / replicas * grad_bytes / shard_group
    return {
        **{"wrapper": wrapper, "mode": mode, "shard_group": shard_group, "replicas": replicas},
        **{"reduce_scatters": scatters, "all_reduces": reduces, "bytes_sent_per_rank": round(sent)},
        "grad_bytes_per_rank": math.ceil(params / shard_group) * element_bytes if sharded else grad_bytes,
        "grad_sharded": sharded,
        "estimate_s": None,
    }


def _check_divides(flag: str, value: int | None, world: int, rule: str) -> None:
    if value is not None and world % value:
        valid = ", ".join(str(n) for n, _ in elastic_world_sizes(world, 1))
        raise ValueError(f"{flag} {value} does not divide --world-size {world}: {rule}; use one of {valid}")


def _plan(args: argparse.Namespace) -> BatchPlan:
    sizes = (args.global_batch_size, args.micro_batch_size, args.world_size)
    try:
        return BatchPlan(global_batch_size=sizes[0], micro_batch_size=sizes[1], world_size=sizes[2])
    except ValueError as error:
        flags = "--global-batch-size {} --micro-batch-size {} --world-size {}".format(*sizes)
        keep = ", ".join(str(n) for n, _ in elastic_world_sizes(sizes[0], sizes[1]))
        keep = f"; or keep both on --world-size {keep}" if keep else ""
        raise ValueError(f"{flags}: {error}{keep}") from None


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """The whole answer as a JSON-ready dict (keys in the module docstring).

    Raises:
        ValueError: the sizes do not make a plan, or ``--replicas``/``--nodes`` do not divide ``--world-size``.
    """
    plan = _plan(args)
    world, k, nodes = plan.world_size, plan.accum_steps, args.nodes or 1
    _check_divides("--replicas", args.replicas, world, "HSDP needs that many equal groups of shard ranks")
    _check_divides("--nodes", args.nodes, world, "every node runs the same number of ranks")
    elastic = elastic_world_sizes(plan.global_batch_size, plan.micro_batch_size)
    noise = None
    log, noise_scale = getattr(args, "log", None), getattr(args, "noise_scale", None)  # optional for callers
    if log is not None and noise_scale is not None:
        raise ValueError(f"--log {log} and --noise-scale {noise_scale:g}: give one of them")
    if log is not None:
        value, count = read_noise_scale(log)
        noise = noise_advice(plan.global_batch_size, value, f"--log {log}, the last of {count} values")
    elif noise_scale is not None:
        noise = noise_advice(plan.global_batch_size, noise_scale, "--noise-scale")
    report: dict[str, Any] = {
        "plan": {**plan.as_dict(), "equation": str(plan)},
        "elastic_world_sizes": [{"world_size": n, "accum_steps": steps} for n, steps in elastic],
        **{"gradient": None, "per_step": None, "network": None, "modes": [], "notes": []},
        "noise_scale": noise,
    }
    if args.params is None:
        report["notes"].append(
            "add --params (e.g. --params 7B) for the gradient bytes per optimizer step of each sync mode; "
            "--dtype, --replicas, --bandwidth and --nodes refine them and add a communication-time estimate"
        )
        return report
    element = DTYPES[args.dtype]
    grad = args.params * element
    report["gradient"] = {"params": args.params, "dtype": args.dtype, "bytes_per_element": element, "bytes": grad}
    wrappers = [("ddp", 1, world), ("fsdp", world, 1)]
    if args.replicas is not None:
        wrappers.append(("hsdp", world // args.replicas, args.replicas))
    modes = [
        mode_traffic(name, mode, shard, copies, k, args.params, element)
        for name, shard, copies in wrappers
        for mode in MODES
        if not (name == "ddp" and mode == "sharded")  # DDP never shards gradients
    ]
    if args.bandwidth is not None:
        for m in modes:
            wire_s = m["bytes_sent_per_rank"] / args.bandwidth  # alpha-beta: latency per collective + bytes / rate
            m["estimate_s"] = (m["reduce_scatters"] + m["all_reduces"]) * args.latency + wire_s
        model = "estimate (alpha-beta, not a measurement): collectives x latency + bytes sent per rank / bandwidth"
        if nodes > 1:
            model += (
                f"; {nodes} nodes: --bandwidth is each node's inter-node link, which every ring spanning the nodes "
                "crosses with the bytes one rank sends, so it sets the time (traffic that stays inside a node, "
                "e.g. an HSDP shard group on one node, is faster)"
            )
        link = {"bandwidth_bytes_per_s": args.bandwidth, "latency_s": args.latency}
        report["network"] = {**link, "nodes": nodes, "model": model}
    else:
        report["notes"].append("add --bandwidth (e.g. --bandwidth 100Gbit) for a communication-time estimate")
    report["modes"] = modes
    ddp = {m["mode"]: m for m in modes if m["wrapper"] == "ddp"}
    report["per_step"] = {
        name: {"reductions": ddp[mode]["all_reduces"], "gradient_bytes_reduced": ddp[mode]["all_reduces"] * grad}
        | {key: ddp[mode][key] for key in ("bytes_sent_per_rank", "estimate_s")}
        for name, mode in (("distaccum", "boundary"), ("every_micro_batch", "every"))
    }
    sent = [ddp[mode]["bytes_sent_per_rank"] for mode in ("every", "boundary")]
    report["per_step"]["ratio"] = round(sent[0] / sent[1], 9) if world > 1 else None
    if world == 1:
        report["notes"].append("one rank: nothing is reduced; pass the --world-size of the real job")
    return report


def _bytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    scale, unit = next(((s, u) for s, u in ((1.0, "s"), (1e-3, "ms")) if value >= s), (1e-6, "us"))
    return f"{value / scale:.3g} {unit}"


def render_text(report: dict[str, Any]) -> str:
    """The readable form of :func:`build_report`'s answer: plain text, aligned columns."""
    plan, grad, network = report["plan"], report["gradient"], report["network"]
    lines = [plan["equation"], "elastic restarts (same global and micro batch), each world size's accum_steps:"]
    elastic = report["elastic_world_sizes"]
    for start in range(0, len(elastic), 12):
        lines.append("  world_size  " + " ".join(f"{e['world_size']:>6}" for e in elastic[start : start + 12]))
        lines.append("  accum_steps " + " ".join(f"{e['accum_steps']:>6}" for e in elastic[start : start + 12]))
    if grad is not None:
        step, k = report["per_step"], plan["accum_steps"]
        lines += [
            "",
            f"gradient: {grad['params']:,} params x {grad['bytes_per_element']} bytes ({grad['dtype']}) = "
            f"{_bytes(grad['bytes'])}",
            f"per optimizer step, DDP all-reduce over {plan['world_size']} rank(s):",
        ]
        for label, key in (("distaccum (one per step)", "distaccum"), ("every micro-batch", "every_micro_batch")):
            row = step[key]
            lines.append(
                f"  {label:<26} {row['reductions']:>4} all-reduce(s), {_bytes(row['gradient_bytes_reduced'])} "
                f"reduced, {_bytes(row['bytes_sent_per_rank'])} sent per rank, est. {_seconds(row['estimate_s'])}"
            )
        if step["ratio"] is not None:
            lines.append(f"  syncing every micro-batch sends {step['ratio']:g}x the bytes (accum_steps {k})")
        rows = [_COLUMNS] + [
            (
                *(m["wrapper"], m["mode"], f"{m['shard_group']} x {m['replicas']}"),
                *(str(m["reduce_scatters"]), str(m["all_reduces"]), _bytes(m["bytes_sent_per_rank"])),
                _bytes(m["grad_bytes_per_rank"]) + (" shard" if m["grad_sharded"] else " full"),
                _seconds(m["estimate_s"]),
            )
            for m in report["modes"]
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        lines += ["", "per wrapper and sync mode (per rank, per optimizer step):"]
        line = "  " + "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))  # names left
        lines += [line.format(*row) for row in rows]
    if network is not None:
        rate = network["bandwidth_bytes_per_s"]
        lines += ["", *textwrap.wrap(f"{network['model']}.", 116)]
        lines.append(
            f"bandwidth {rate * 8 / 1e9:g} Gbit/s = {_bytes(rate)}/s, latency {_seconds(network['latency_s'])}"
        )
    noise = report["noise_scale"]
    if noise is not None:
        lines += [
            "",
            f"noise scale B_simple {noise['b_simple']:.4g} ({noise['source']}): global batch "
            f"{plan['global_batch_size']} = {noise['batch_over_noise_scale']:.3g} x B_simple; by McCandlish et al.'s "
            f"model that takes {noise['steps_over_min']:.3g} x the fewest steps and {noise['samples_over_min']:.3g} x "
            "the fewest samples (2 x each at B = B_simple: far above it a bigger batch mostly costs samples, far "
            "below it, it buys steps almost for free)",
        ]
        lines[-1:] = textwrap.wrap(lines[-1], 116)
    return "\n".join(lines + [f"note: {note}" for note in report["notes"]])


def _flag(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:  # argparse prints an ArgumentTypeError's text after the flag's name
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distaccum plan``."""
    whole = _flag(parse_positive_int)
    parser.add_argument("--global-batch-size", type=whole, required=True, help="samples per optimizer step, all ranks")
    parser.add_argument("--micro-batch-size", type=whole, required=True, help="samples per forward/backward per rank")
    parser.add_argument("--world-size", type=whole, required=True, help="data-parallel ranks of the job")
    parser.add_argument("--params", type=_flag(parse_params), help="parameter count: 7e9, 7B, 125M, 16.8M")
    parser.add_argument(
        "--dtype", type=_flag(parse_dtype), default="fp32", help="reduce dtype: fp32 (default), bf16, fp16"
    )
    parser.add_argument("--replicas", type=whole, help="HSDP rows: R replica groups, each sharding over world/R ranks")
    parser.add_argument(
        "--bandwidth",
        type=_flag(parse_bandwidth),
        help="link speed: 100Gbit, 10Gbit, 100Mbit, 25GB (bytes/s); a plain number is bits/s. Estimate per mode = "
        "collectives x LATENCY + bytes each rank sends / BANDWIDTH, ring algorithms: an all-reduce of S bytes over "
        "n ranks sends 2(n-1)/n x S, a reduce-scatter (n-1)/n x S",
    )
    parser.add_argument(
        "--latency",
        type=_flag(parse_latency),
        default=DEFAULT_LATENCY_S,
        help="alpha, seconds per collective: 20us, 0.5ms, 2e-5 (default 20us, a typical NCCL small-message latency)",
    )
    parser.add_argument("--nodes", type=whole, help="nodes; N > 1: --bandwidth is each node's inter-node link")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys: see the module docstring)")
    parser.add_argument(
        "--log", type=Path, help=f"a JSON-lines log of step results; its last noise_scale is used ({LOG_HOWTO})"
    )
    parser.add_argument("--noise-scale", type=_flag(parse_positive_float), help="a measured B_simple, in samples")


def run(args: argparse.Namespace) -> int:
    """Print the plan; return 0, or 2 with a message naming the flags when the sizes do not fit together."""
    try:
        report = build_report(args)
    except ValueError as error:
        print(f"distaccum plan: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0
