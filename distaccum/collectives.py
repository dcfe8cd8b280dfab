"""Rank-consistent scalars: the few small collectives the accumulator needs, and the errors when ranks disagree.

Every function is a no-op in a single process (no group, or a group of one), so callers never branch on it.
Values travel as float64 (int64 for gathers) on the communication device: CUDA for NCCL, CPU for gloo. All
of them are collective: every rank must call them in the same order, which is what the accumulator's rank
agreement at start-up and at every window boundary protects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import dist
from distaccum.plan import BatchPlan


def active() -> bool:
    """True when there are other ranks to talk to."""
    return dist.is_initialized() and torch_dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where a collective's tensors must live: this rank's GPU under NCCL, else the CPU."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bind_device(model: nn.Module) -> None:
    """Under NCCL, make the GPU that holds ``model`` this process's current device, where :func:`comm_device`
    puts every scalar collective. A script that did ``model.to(local_rank)`` without ``torch.cuda.set_device``
    (which :func:`distaccum.dist.init` calls) would otherwise run every rank's collectives on ``cuda:0``."""
    if not active() or torch_dist.get_backend() != "nccl":
        return
    device = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    if device is not None and device.index is not None and device.index != torch.cuda.current_device():
        torch.cuda.set_device(device)


def sum_over_ranks(values: Sequence[float | torch.Tensor]) -> list[float]:
    """Element-wise sum over ranks of a few scalars, in one all-reduce (the values themselves in one process).

    A value may be a 0-dim tensor still on its device (a loss sum, a non-finite flag): it joins the others there,
    so the whole sum costs one host read, not one per device value.
    """
    tensors = [(index, value) for index, value in enumerate(values) if isinstance(value, torch.Tensor)]
    if not active() and not tensors:
        return [float(value) for value in values]
    device = comm_device() if active() else tensors[0][1].device
    host = [0.0 if isinstance(value, torch.Tensor) else float(value) for value in values]
    reduced = torch.tensor(host, dtype=torch.float64).to(device, non_blocking=True)
    for index, value in tensors:
        reduced[index] = value.detach().reshape(())
    if active():
        torch_dist.all_reduce(reduced)
    return [float(value) for value in reduced.tolist()]


def min_over_ranks(value: float) -> float:
    """The smallest ``value`` over ranks."""
    if not active():
        return float(value)
    smallest = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    torch_dist.all_reduce(smallest, op=torch_dist.ReduceOp.MIN)
    return float(smallest.item())


def gather_from_ranks(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values``, in rank order (one all-gather)."""
    if not active():
        return [[int(value) for value in values]]
    mine = torch.tensor(values, dtype=torch.int64, device=comm_device())
    rows = [torch.empty_like(mine) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(rows, mine)
    return [[int(value) for value in row.tolist()] for row in rows]


def check_same_on_all_ranks(
    fields: Sequence[str],
    values: Sequence[int],
    *,
    what: str,
    fix: str,
    described: dict[str, str] | None = None,
) -> None:
    """Gather ``values`` and raise on every rank, naming each field that differs from rank 0's.

    ``described``: texts that must match too, gathered as one fingerprint (field ``options``); when it differs,
    every rank gathers the texts themselves (a second collective, on the error path only) to name each one.

    Raises:
        RuntimeError: some rank's values differ; the message lists ``rank r has field=v where rank 0 has w``.
    """
    described = described or {}
    fields = (*fields, "options")
    rows = gather_from_ranks([*values, fingerprint(repr(sorted(described.items())))])
    problems = [
        f"rank {rank} has {field}={value} where rank 0 has {expected}"
        for rank, row in enumerate(rows)
        for field, value, expected in zip(fields, row, rows[0], strict=True)
        if value != expected and field != "options"
    ]
    if any(row[-1] != rows[0][-1] for row in rows):
        texts: list[dict[str, str]] = [{} for _ in rows]
        torch_dist.all_gather_object(texts, described)
        problems += [
            f"rank {rank} has {key}={texts[rank].get(key, '(none)')} where rank 0 has {texts[0].get(key, '(none)')}"
            for rank in range(1, len(rows))
            for key in sorted(texts[0].keys() | texts[rank].keys())
            if texts[rank].get(key) != texts[0].get(key)
        ]
    if problems:
        raise RuntimeError(f"ranks disagree on {what}: " + "; ".join(problems) + f". {fix}")


def check_plan_agreement(
    plan: BatchPlan,
    micro_step: int,
    step: int,
    setup: dict[str, int] | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Start-up check (one all-gather): every rank has the same plan, window position and step (and ``setup``:
    more integers that must match, e.g. a batch schedule's fingerprint; and ``options``: texts that must match, e.g.
    ``max_grad_norm`` or an optimizer's ``lr``, gathered as one fingerprint).

    Raises:
        RuntimeError: on every rank, naming each rank and field that differs from rank 0.
    """
    fields = ("global_batch_size", "micro_batch_size", "accum_steps", "world_size")
    setup = setup or {}
    check_same_on_all_ranks(
        (*fields, "micro_step", "step", *setup),
        [*(getattr(plan, field) for field in fields), micro_step, step, *setup.values()],
        what="the accumulation plan, their position in the window, or their options",
        fix="Build the BatchPlan, the Accumulator's options and the optimizer from the same arguments on every rank "
        "and load the same checkpoint.",
        described=options,
    )


def fingerprint(text: str) -> int:
    """A stable 63-bit integer for ``text`` (the same in every process, unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sum_checking_step(
    values: Sequence[float | torch.Tensor], step: int, *, shared: float | torch.Tensor | None = None
) -> list[float]:
    """:func:`sum_over_ranks` of ``values``, checking in the same all-reduce that every rank is at ``step``.

    Equal steps are the only ones whose sum ``s`` and sum of squares ``q`` over ``W`` ranks satisfy
    ``s**2 == W * q``, so two more scalars in the all-reduce the boundary makes anyway replace a collective.
    ``shared``: a value every rank holds alike (the global gradient norm), read in the same all-reduce and appended
    to the totals as it is (rank 0's copy: the other ranks add zero).

    Raises:
        RuntimeError: some rank is at another optimizer step (it skipped or repeated micro-steps).
    """
    extra = [] if shared is None else [shared if not active() or torch_dist.get_rank() == 0 else 0.0]
    *totals, total, total_of_squares = sum_over_ranks([*values, *extra, float(step), float(step) ** 2])
    world = torch_dist.get_world_size() if active() else 1
    if total * total != world * total_of_squares:
        raise RuntimeError(
            f"ranks disagree on the optimizer step at a window boundary (this rank: {step}, mean over ranks: "
            f"{total / world:g}); some rank skipped or repeated micro-steps. Every rank must run the same "
            "number of micro-steps per window."
        )
    return totals


def agree_on_item_mode(count: int | None, *, abstain: bool = False) -> tuple[int, float]:
    """Whether ranks give ``num_items``, in one all-reduce: (ranks giving it, their items summed). ``abstain``: this
    rank has no micro-batch to say it of (a flush() with nothing pending meeting the others' first backward).

    Raises:
        RuntimeError: some ranks give it and others do not (they would mismatch collectives later).
    """
    giving, items, abstaining = sum_over_ranks([float(count is not None), float(count or 0), float(abstain)])
    world = torch_dist.get_world_size() if active() else 1
    if 0 < giving < world - abstaining:
        raise RuntimeError(
            f"{int(giving)} of {world} ranks gave num_items to acc.backward() and the others did not (this rank "
            f"{'did' if count is not None else 'did not'}); every rank must call acc.backward(loss, "
            "num_items=...) alike."
        )
    return int(giving), items
