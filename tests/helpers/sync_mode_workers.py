"""Rank functions for the ``grad_sync`` tests: every mode on FSDP2 (1-D and HSDP), FSDP1 and DDP, against one process
on the real batch, with the wrapper's collectives counted where the wrapper calls them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import Accumulator, BatchPlan
from tests.helpers.common import OUT_FEATURES, make_data, make_model, make_optimizer
from tests.helpers.wrappers import full_state

MODES = ("boundary", "sharded", "every")
MICRO_BATCH = 2
ACCUM_STEPS = 3
FULL_WINDOWS = 2
SHORT_WINDOW = 2  # micro-steps of the last window, ended with micro_step(last=True) or flush()
CLIP = 0.05  # binds on every step: the real batches' norms are 0.50-1.07 (measured; the tests check it)
CASES = (
    (torch.float32, "mean", "last"),
    (torch.float64, "mean", "last"),
    (torch.float64, "items", "last"),
    (torch.float64, "items", "flush"),
)


WINDOWS = [ACCUM_STEPS] * FULL_WINDOWS + [SHORT_WINDOW]


def item_mask(samples: int, seed: int = 2) -> torch.Tensor:
    """Which samples count (ragged ``num_items``; micro-batches with no item at all among them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(samples, generator=generator) < 0.6


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).square().mean(dim=1)


def window_data(data_ranks: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each window's real batch (inputs, targets, item mask), rank-major: data rank r's micro-batches are its slice."""
    sizes = [k * MICRO_BATCH * data_ranks for k in WINDOWS]
    inputs, targets = make_data(1, sum(sizes), dtype)
    mask = item_mask(sum(sizes))
    return list(zip(inputs[0].split(sizes), targets[0].split(sizes), mask.split(sizes), strict=True))


def reference(data_ranks: int, dtype: torch.dtype, weighting: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process on each window's real batch in plain torch (no distaccum): the weights, the norms before clipping."""
    model = make_model(dtype)
    optimizer = make_optimizer("sgd", model.parameters())
    norms = []
    for x, y, mask in window_data(data_ranks, dtype):
        optimizer.zero_grad()
        losses = per_sample_loss(model(x), y)
        loss = losses.mean() if weighting == "mean" else (losses * mask).sum() / mask.sum()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}, norms


def shard(model: nn.Module, layout: str, world_size: int) -> nn.Module:
    """FSDP2 per Linear and at the root, on a 1-D mesh, a (replicate, shard) 2 x 2 mesh, or the data-parallel dim of
    a (dp, tp) 2 x 2 mesh after tensor parallelism (first Linear column-wise, second row-wise); FSDP1; or DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if layout == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if layout == "fsdp1":
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    elif layout == "tp":
        two_d = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, two_d["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        mesh = two_d["dp"]
    else:
        mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def count_collectives(replica_ranks: list[int] | None) -> Iterator[dict[str, int]]:
    """Counts the gradient reductions where the wrappers call them: ``torch.distributed.reduce_scatter_single``
    (FSDP2's ``DefaultReduceScatter`` and FSDP1's ``_reduce_grad`` call it by that name; a wrapped
    ``reduce_scatter_tensor`` sees none), and ``torch.distributed.all_reduce`` on the replica group (FSDP2's
    ``foreach_reduce``, FSDP1's hybrid all-reduce, on a group of ``replica_ranks``; distaccum's scalars go over the
    default group and are not counted).
    DDP's all-reduces are counted by its comm hook instead (they run in C++)."""
    counts = {"reduce_scatter": 0, "all_reduce": 0}
    reduce_scatter, all_reduce = torch_dist.reduce_scatter_single, torch_dist.all_reduce

    def counting_reduce_scatter(*args, **kwargs):
        counts["reduce_scatter"] += 1
        return reduce_scatter(*args, **kwargs)

    def counting_all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if (
            group is not None
            and replica_ranks is not None
            and torch_dist.get_process_group_ranks(group) == replica_ranks
        ):
            counts["all_reduce"] += 1
        return all_reduce(tensor, *args, **kwargs)

    torch_dist.reduce_scatter_single, torch_dist.all_reduce = counting_reduce_scatter, counting_all_reduce
    try:
        yield counts
    finally:
        torch_dist.reduce_scatter_single, torch_dist.all_reduce = reduce_scatter, all_reduce


def ddp_reductions(model: nn.Module) -> int:
    """Bucket all-reduces so far through distaccum's DDP comm hook (0 before it is attached, and off DDP)."""
    hook = getattr(model, "_distaccum_checked_average", None)
    return 0 if hook is None else hook.reductions


def fsdp2_flags(model: nn.Module) -> list[tuple[bool, bool]]:
    """(reduce_grads, all_reduce_grads) of every FSDP2 parameter group, as the public setters write them."""
    from torch.distributed.fsdp import FSDPModule

    return [
        (group.reduce_grads, group.all_reduce_grads)
        for module in model.modules()
        if isinstance(module, FSDPModule)
        for group in module._get_fsdp_state()._fsdp_param_groups
    ]


def train_case(
    rank: int, world_size: int, layout: str, mode: str, dtype: torch.dtype, weighting: str, end: str
) -> dict:
    """Full windows, then a short one ended by ``end``; per micro-step: collectives, flags inside and after.

    Under tensor parallelism the two ranks of a tp pair take the same data, and the plan counts all 4 ranks as
    data-parallel (distaccum's plan has no data-parallel sub-mesh): its global batch is twice the real one."""
    model = shard(make_model(dtype), layout, world_size)
    data_ranks, data_rank = (world_size // 2, rank // 2) if layout == "tp" else (world_size, rank)
    optimizer = make_optimizer("sgd", model.parameters())
    plan = BatchPlan(global_batch_size=ACCUM_STEPS * MICRO_BATCH * world_size, micro_batch_size=MICRO_BATCH)
    acc = Accumulator(model, optimizer, plan, max_grad_norm=CLIP, grad_sync=mode)
    mesh = getattr(next(model.parameters()), "device_mesh", None)
    replicas = sorted(torch_dist.get_process_group_ranks(mesh.get_group("replicate"))) if layout == "hsdp" else None
    record: dict = {"counts": [], "inside": [], "after": [], "flush_error": None}
    with count_collectives(replicas) as counts:
        for index, (x, y, mask) in enumerate(window_data(data_ranks, dtype)):
            per_rank = x.shape[0] // data_ranks
            mine = slice(data_rank * per_rank, (data_rank + 1) * per_rank)
            batches = list(zip(*(t[mine].split(MICRO_BATCH) for t in (x, y, mask)), strict=True))
            short = index == FULL_WINDOWS
            for position, (xb, yb, mb) in enumerate(batches):
                before = (counts["reduce_scatter"], counts["all_reduce"], ddp_reductions(model))
                last = short and end == "last" and position == len(batches) - 1
                with acc.micro_step(last=last):
                    losses = per_sample_loss(model(xb), yb)
                    if weighting == "mean":
                        acc.backward(losses.mean())
                    else:
                        items = int(mb.sum())
                        acc.backward((losses * mb).sum() / max(items, 1), num_items=items)
                    record["inside"].append(fsdp2_flags(model))
                after = (counts["reduce_scatter"], counts["all_reduce"], ddp_reductions(model))
                record["counts"].append(tuple(a - b for a, b in zip(after, before, strict=True)))
                record["after"].append(fsdp2_flags(model))
            if short and end == "flush":
                try:
                    acc.flush()
                except ValueError as error:
                    record["flush_error"] = str(error)
    record["state"] = full_state(model)
    record["steps"] = acc.optimizer_steps
    del model, optimizer, acc
    return record


def restore_check(rank: int, world_size: int, layout: str) -> dict:
    """A module the user set apart keeps its own flags through every mode's window context (found, not re-derived)."""
    from distaccum.backends import select

    model = shard(make_model(), layout, world_size)
    first = model[0]
    first.set_requires_gradient_sync(False, recurse=False)
    first.set_requires_all_reduce(True, recurse=False)  # an odd pair no mode sets: only a restore can bring it back
    found = fsdp2_flags(model)
    seen = {}
    for mode in MODES:
        backend = select(model, world_size, mode)
        with backend.window_sync():
            seen[mode] = fsdp2_flags(model)
        assert fsdp2_flags(model) == found, (mode, fsdp2_flags(model), found)
    return {"found": found, "inside": seen}


class Routed(nn.Module):
    """A head (its own FSDP unit) used on a window's first micro-step only, never at its boundary."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.body = make_model(dtype)
        self.head = nn.Linear(OUT_FEATURES, OUT_FEATURES).to(dtype)

    def forward(self, x: torch.Tensor, position: int) -> torch.Tensor:
        out = self.body(x)
        return self.head(out) if position == 0 else out


def routed_reference(data_ranks: int) -> dict[str, torch.Tensor]:
    model = Routed(torch.float64)
    optimizer = make_optimizer("sgd", model.parameters())
    for x, y, _ in window_data(data_ranks, torch.float64)[:FULL_WINDOWS]:
        optimizer.zero_grad()
        per_rank = [t.split(MICRO_BATCH) for t in (x, y)]
        losses = [
            per_sample_loss(model(xb, i % ACCUM_STEPS), yb) for i, (xb, yb) in enumerate(zip(*per_rank, strict=True))
        ]
        torch.cat(losses).mean().backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def train_routed(rank: int, world_size: int, mode: str) -> dict[str, torch.Tensor]:
    """HSDP with the head used only inside the window (FSDP2 returns before the replica all-reduce of a unit that
    has no gradient in the boundary backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Routed(torch.float64)
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = make_optimizer("sgd", model.parameters())
    plan = BatchPlan(global_batch_size=ACCUM_STEPS * MICRO_BATCH * world_size, micro_batch_size=MICRO_BATCH)
    acc = Accumulator(model, optimizer, plan, grad_sync=mode)
    for x, y, _ in window_data(world_size, torch.float64)[:FULL_WINDOWS]:
        per_rank = x.shape[0] // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for position, (xb, yb) in enumerate(zip(x[mine].split(MICRO_BATCH), y[mine].split(MICRO_BATCH), strict=True)):
            with acc.micro_step():
                acc.backward(per_sample_loss(model(xb, position), yb).mean())
    return full_state(model)


def run_layouts(rank: int, world_size: int, layouts: dict[str, tuple[str, ...]]) -> dict:
    """Every mode x case of each layout in one spawn (starting the ranks costs more than training them)."""
    results = {}
    for layout, modes in layouts.items():
        if layout == "routed":
            results.update({("routed", mode): train_routed(rank, world_size, mode) for mode in modes})
            continue
        for mode in modes:
            for dtype, weighting, end in CASES:
                results[(layout, mode, dtype, weighting, end)] = train_case(
                    rank, world_size, layout, mode, dtype, weighting, end
                )
        if layout in ("fsdp2", "hsdp"):
            results[(layout, "restore")] = restore_check(rank, world_size, layout)
    return results
