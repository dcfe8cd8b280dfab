"""``distaccum env``: what this process sees (launcher, ranks, backend, device, plan) and whether it is consistent.

Run it with the launcher and sizes of the real job, before the job::

    python -m distaccum env --global-batch-size 1024 --micro-batch-size 16
    torchrun --nproc_per_node 2 -m distaccum env --global-batch-size 1024 --micro-batch-size 16
    bash launch/env_check.sh --global-batch-size 1024 --micro-batch-size 16

With several ranks it joins the process group (``--no-init`` skips that), gathers every rank's view, and rank 0
prints one report. The exit status is 1 on every rank when anything is inconsistent: a batch plan that does
not divide, ranks that disagree, launcher variables that contradict each other, or ``accelerate launch`` on a
machine without CUDA and without ``ACCELERATE_USE_CPU=1`` (Accelerate would then silently not average), or with it
under the DeepSpeed plugin (Accelerate would then silently drop DeepSpeed for DDP).
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any

import torch
import torch.distributed as torch_dist

from distaccum import BatchPlan, dist

_AGREE = ("world_size", "plan", "backend", "device_type")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distaccum env``."""
    parser.add_argument("--global-batch-size", type=int, help="planned samples per optimizer step, all ranks")
    parser.add_argument("--micro-batch-size", type=int, help="planned samples per forward/backward per rank")
    parser.add_argument("--accum-steps", type=int, help="planned micro-batches per step (instead of one of the two)")
    parser.add_argument(
        "--no-init", action="store_true", help="do not join the process group (each rank reports only itself)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other ranks")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _plan(args: argparse.Namespace, world_size: int) -> tuple[str, str | None]:
    """(plan text, problem or None)."""
    sizes = {
        "global_batch_size": args.global_batch_size,
        "micro_batch_size": args.micro_batch_size,
        "accum_steps": args.accum_steps,
    }
    given = {name: value for name, value in sizes.items() if value is not None}
    if not given:
        return "not checked (give --global-batch-size and --micro-batch-size)", None
    try:
        return str(BatchPlan(**given, world_size=world_size)), None
    except ValueError as error:
        return "INVALID", f"batch plan: {error}"


def facts(args: argparse.Namespace) -> dict[str, Any]:
    """This process's view: launcher variables, device, backend and the plan for the given sizes."""
    world = dist.world_size()
    cuda = torch.cuda.is_available()
    plan_text, plan_problem = _plan(args, world)
    view: dict[str, Any] = {
        "host": platform.node(),
        "pid": os.getpid(),
        "launcher": dist.launcher(),
        "world_size": world,
        "rank": dist.rank(),
        "local_rank": dist.local_rank(),
        "local_world_size": os.environ.get("LOCAL_WORLD_SIZE", "-"),
        "master": f"{os.environ.get('MASTER_ADDR', '-')}:{os.environ.get('MASTER_PORT', '-')}",
        "backend": torch_dist.get_backend() if dist.is_initialized() else dist.default_backend(),
        "device": str(dist.device()),
        "device_type": dist.device().type,
        "torch": torch.__version__,
        "cuda": f"{torch.version.cuda} with {torch.cuda.device_count()} GPU(s)" if cuda else "not available",
        "plan": plan_text,
        "problems": [] if plan_problem is None else [plan_problem],
    }
    view["problems"] += _launcher_problems(view)
    return view


def _launcher_problems(view: dict[str, Any]) -> list[str]:
    problems = []
    world, rank, local_rank = view["world_size"], view["rank"], view["local_rank"]
    if not 0 <= rank < world:
        problems.append(f"rank {rank} is outside world_size {world}: RANK must be in 0..{world - 1}")
    local_world = view["local_world_size"]
    if local_world != "-" and not 0 <= local_rank < int(local_world):
        problems.append(f"local_rank {local_rank} is outside LOCAL_WORLD_SIZE {local_world}")
    if world > 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        problems.append(
            f"WORLD_SIZE is {world} but MASTER_ADDR is not set: the ranks cannot meet. Start the job with torchrun, "
            "accelerate launch or srun + torchrun, or export MASTER_ADDR and MASTER_PORT"
        )
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if view["launcher"] == "accelerate" and deepspeed and _truthy("ACCELERATE_USE_CPU"):
        problems.append(
            "accelerate launch asked for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) and ACCELERATE_USE_CPU is set: "
            "Accelerate drops the DeepSpeed plugin silently and runs DDP. For DeepSpeed without a GPU, unset "
            "ACCELERATE_USE_CPU and build Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend='gloo')])"
        )
    if (
        view["launcher"] == "accelerate"
        and world > 1
        and not torch.cuda.is_available()
        and not _truthy("ACCELERATE_USE_CPU")
        and not deepspeed  # DeepSpeed wraps the model itself; without a GPU it needs the gloo handler instead
    ):
        problems.append(
            f"accelerate launch started {world} processes on a machine without CUDA and ACCELERATE_USE_CPU is not "
            "set: Accelerate will not wrap the model and gradients are never averaged (the Accumulator refuses "
            "such a model). Launch with ACCELERATE_USE_CPU=1 accelerate launch ... (or use launch/accelerate.sh)"
        )
    if torch.cuda.is_available() and local_world != "-" and int(local_world) > torch.cuda.device_count():
        problems.append(
            f"{local_world} processes on this node share {torch.cuda.device_count()} GPU(s); use "
            f"--nproc_per_node {torch.cuda.device_count()}"
        )
    return problems


def _gather(view: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    dist.init(timeout_s=timeout_s)
    view["backend"] = torch_dist.get_backend()
    views: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(views, view)
    return views


def _agreement_problems(views: list[dict[str, Any]]) -> list[str]:
    first = views[0]
    return [
        f"rank {other['rank']} ({other['host']}) has {field}={other[field]!r} where rank 0 has {first[field]!r}"
        for other in views[1:]
        for field in _AGREE
        if other[field] != first[field]
    ]


def report(views: list[dict[str, Any]], problems: list[str]) -> str:
    """The text ``distaccum env`` prints: rank 0's view, a table of all ranks, and the verdict."""
    first = views[0]
    lines = [f"{key:<16} {first[key]}" for key in ("launcher", "world_size", "master", "backend", "torch", "cuda")]
    lines.append(f"{'plan':<16} {first['plan']}")
    lines.append(f"{'rank':>5} {'local_rank':>10}  {'device':<8} {'pid':>8}  host")
    lines += [f"{v['rank']:>5} {v['local_rank']:>10}  {v['device']:<8} {v['pid']:>8}  {v['host']}" for v in views]
    if problems:
        lines.append(f"consistent       NO ({len(problems)} problem(s))")
        lines += [f"  - {problem}" for problem in problems]
    else:
        lines.append("consistent       yes")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the report; return 0 when consistent, 1 otherwise (on every rank)."""
    view = facts(args)
    world, rank = view["world_size"], view["rank"]
    can_meet = dist.is_initialized() or ("MASTER_ADDR" in os.environ and 0 <= rank < world)
    if world == 1 or args.no_init or not can_meet:
        # Nothing to gather (one process, --no-init, or a launch too broken to join): each rank reports itself.
        prefix = f"[rank {rank}] " if world > 1 else ""
        print("\n".join(prefix + line for line in report([view], view["problems"]).splitlines()), flush=True)
        return 1 if view["problems"] else 0
    views = _gather(view, args.timeout)
    problems = [f"rank {v['rank']}: {p}" for v in views for p in v["problems"]] + _agreement_problems(views)
    if dist.rank() == 0:
        print(report(views, problems), flush=True)
    del views
    dist.shutdown()
    return 1 if problems else 0
