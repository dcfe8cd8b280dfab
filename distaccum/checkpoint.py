"""Atomic training checkpoints at window boundaries: model, optimizer, accumulator, scheduler, scaler, data position.

Layout of a checkpoint ``directory``::

    latest                 the name of the newest complete checkpoint, replaced atomically
    step-00000012/         one checkpoint: state.pt and meta.json

A checkpoint is written under a temporary name, renamed when complete, and only then named in ``latest``
(``os.replace``), so a job killed at any moment leaves the previous checkpoint readable. Replicated models
(a plain module, ``DistributedDataParallel``, an Accelerate-prepared DDP) hold the same state on every rank
at a window boundary: rank 0 writes, every rank reads (the directory must be on a filesystem all nodes
share). Sharded models (FSDP) and DeepSpeed engines are refused with the tool to use instead.

Example:
    >>> import tempfile, torch
    >>> from distaccum import Accumulator, BatchPlan
    >>> model = torch.nn.Linear(2, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> acc = Accumulator(model, optimizer, BatchPlan(global_batch_size=4, micro_batch_size=2))
    >>> directory = tempfile.mkdtemp()
    >>> load(directory, model=model, optimizer=optimizer, accumulator=acc) is None
    True
    >>> _ = save(directory, model=model, optimizer=optimizer, accumulator=acc, data_state={"step": 0})
    >>> load(directory, model=model, optimizer=optimizer, accumulator=acc)
    {'step': 0}
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import dist
from distaccum.engine import Accumulator

FORMAT_VERSION = 1
_LATEST = "latest"
_STATE = "state.pt"
_META = "meta.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, a DeepSpeed engine or ``torch.compile``: its state has plain tensor names.

    Example:
        >>> inner = torch.nn.Linear(2, 1)
        >>> unwrap(torch.compile(inner)) is inner
        True
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _check_supported(model: nn.Module) -> None:
    if type(model).__name__ == "DeepSpeedEngine":
        raise ValueError(
            "distaccum.checkpoint does not save DeepSpeed engines: ZeRO shards the optimizer state over ranks. "
            "Use engine.save_checkpoint(dir) / engine.load_checkpoint(dir) and store accumulator.state_dict() "
            "in client_state."
        )
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel | FSDPModule):
        raise ValueError(
            f"distaccum.checkpoint saves replicated models, but model is a sharded {type(model).__name__}: rank 0 "
            "does not hold the full state. Use torch.distributed.checkpoint with get_state_dict(model, optimizer) "
            "and store accumulator.state_dict() next to it."
        )


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None when there is none."""
    pointer = Path(directory) / _LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / _META).is_file() else None


def save(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accumulator: Accumulator,
    scheduler: Any | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    data_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of the training state at a window boundary; collective (call it on every rank).

    Args:
        directory: where checkpoints live (created if missing); must be shared by all nodes.
        model: the (possibly DDP-wrapped) model; saved with plain tensor names.
        optimizer: its optimizer.
        accumulator: the :class:`~distaccum.Accumulator`; must be at a window boundary.
        scheduler: learning-rate scheduler, if any.
        grad_scaler: ``torch.amp.GradScaler``, if any.
        data_state: where the data stands (e.g. ``{"step": 12}``); :func:`load` returns it.
        keep: how many complete checkpoints to keep (older ones are deleted).

    Returns:
        The checkpoint's directory.

    Raises:
        ValueError: the accumulator is mid-window, ``keep < 1``, or the model is sharded / a DeepSpeed engine.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 checkpoints, got {keep}")
    if accumulator.micro_step_in_window != 0:
        raise ValueError(
            f"checkpoint requested mid-window (micro-step {accumulator.micro_step_in_window} of "
            f"{accumulator.plan.accum_steps}): the gradients accumulated so far are not saved. Save right after "
            "an optimizer step (when acc.stepped is True)."
        )
    _check_supported(model)
    root = Path(directory)
    name = f"step-{accumulator.optimizer_steps:08d}"
    final = root / name
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        temporary = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "accumulator": accumulator.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "grad_scaler": None if grad_scaler is None else grad_scaler.state_dict(),
            "data_state": {} if data_state is None else data_state,
        }
        torch.save(state, temporary / _STATE)
        meta = {"format": FORMAT_VERSION, "step": accumulator.optimizer_steps, "plan": accumulator.plan.as_dict()}
        (temporary / _META).write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():  # the same step saved twice (e.g. a resumed run that saves at once): replace it
            shutil.rmtree(final)
        temporary.rename(final)
        pointer = root / f".{_LATEST}.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / _LATEST)
        _prune(root, keep)
    if dist.is_initialized():
        # Nobody leaves save() before the checkpoint is complete: a rank killed right after can rely on it.
        torch_dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(path for path in root.glob("step-*") if (path / _META).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accumulator: Accumulator,
    scheduler: Any | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any] | None:
    """Restore the newest checkpoint in ``directory`` into the given objects, on every rank.

    Args:
        directory: the directory :func:`save` wrote to (missing or empty: nothing to resume).
        model, optimizer, accumulator, scheduler, grad_scaler: the objects to restore, built as for a fresh run
            (``scheduler``/``grad_scaler`` only when the checkpoint has them).

    Returns:
        The checkpoint's ``data_state`` (``{}`` when none was saved), or None when there is no checkpoint.

    Raises:
        ValueError: the checkpoint has a scheduler or scaler state and none was given (or the reverse), its
            plan differs from the accumulator's, or the model is sharded / a DeepSpeed engine.
    """
    _check_supported(model)
    path = latest(directory)
    if path is None:
        return None
    state = torch.load(path / _STATE, map_location="cpu", weights_only=False)
    for field, target in (("scheduler", scheduler), ("grad_scaler", grad_scaler)):
        if (state[field] is None) != (target is None):
            raise ValueError(
                f"checkpoint {path} {'has no' if state[field] is None else 'has a'} {field} state but "
                f"{field}={'None' if target is None else type(target).__name__} was given; pass the same "
                f"{field} as the run that saved it"
            )
    # The accumulator first: it refuses a checkpoint made with another plan before anything is overwritten.
    accumulator.load_state_dict(state["accumulator"])
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if grad_scaler is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
    data_state: dict[str, Any] = state["data_state"]
    return data_state
