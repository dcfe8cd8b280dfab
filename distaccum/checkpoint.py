"""Atomic training checkpoints: model, optimizer, accumulator, scheduler, scaler and data position together.

Layout of a checkpoint ``directory``::

    latest                      the name of the newest complete checkpoint, replaced atomically
    step-00000012/              a checkpoint at a window boundary: state.pt, meta.json (plan, serial, sha256s)
    step-00000012-micro-0002/   one taken mid-window (``include_grads=True``): also grads-rank00000.pt ..., each
                                rank's gradients and its own open-window state (item count, loss sum, ...)
    step-00000012/sharded/      FSDP models: model and optimizer in torch.distributed.checkpoint format

A checkpoint is written under a temporary name, sealed with the sha256 and size of its files, renamed when complete,
flushed to the disk, and only then named in ``latest``, so a job killed (or a machine losing power) at any moment
leaves a complete checkpoint; :func:`load` skips a damaged one (with a warning) for the previous
(:mod:`distaccum.checkpoint_files`). Whatever a directory someone else controls holds, loading runs no code, reads
nothing outside the checkpoint and stays bounded in memory and time; ``key=`` adds authenticity. The threat model
is in :mod:`distaccum.checkpoint_trust`. Replicated models
(a plain module, ``DistributedDataParallel``, an Accelerate-prepared DDP) hold the same state on every rank
at a window boundary: rank 0 writes, every rank reads (the directory must be on a filesystem all nodes
share). Sharded models (FSDP1, FSDP2) are written by every rank with ``torch.distributed.checkpoint``, which
also reshards them when the job resumes on another world size. A DeepSpeed engine (ZeRO 0-3) writes its own files
into the checkpoint with ``save_checkpoint`` (``deepspeed/``, :mod:`distaccum.checkpoint_engine`), at window
boundaries, and resumes on the same world size.

Exact resume. Mid-window, the gradients accumulated so far differ per rank (DDP has not reduced them yet), and so
does the window's arithmetic (item count, loss sum, a discard, the noise scale's reading): ``include_grads=True``
makes every rank write its own, and only the same world size can resume them. At a
window boundary there are none, and a checkpoint resumes on any world size that keeps the global and micro
batch (:func:`resume_plan`): ``accum_steps`` is re-derived and the optimizer step count carries on, so a data
order that is a function of the step continues unchanged. FSDP keeps unsynced gradients in private buffers:
checkpoint it at window boundaries.

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

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from distaccum import backends, dist
from distaccum import checkpoint_engine as engine_files
from distaccum import checkpoint_files as files
from distaccum import checkpoint_fit as fit
from distaccum import checkpoint_sharded as sharded_files
from distaccum import checkpoint_trust as trust
from distaccum.accumulator import Accumulator
from distaccum.plan import BatchPlan

FORMAT_VERSION = files.FORMAT_VERSION
_STATE = files.STATE
_SHARDED = "sharded"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, a DeepSpeed engine or ``torch.compile``: its state has plain tensor names.

    Example:
        >>> inner = torch.nn.Linear(2, 1)
        >>> unwrap(torch.compile(inner)) is inner
        True
    """
    while True:
        model = backends.wrapper_of(model)
        inner = backends.backend_class(model).inner(model)
        if inner is None:
            return model
        model = inner


def _layout(model: nn.Module) -> str:
    """How ``model``'s backend lays out its state: "replicated", "sharded" or "engine" (every wrapper can be saved)."""
    return backends.backend_class(model).checkpoint_layout


def _barrier() -> None:
    if dist.is_initialized():
        torch_dist.barrier()


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint :func:`load` tries first: the complete one ``latest`` names, else the newest complete one
    (with a warning), or None when there is none."""
    found = files.candidates(files.checkpoint_root(directory))
    return found[0].path if found else None


def resume_plan(
    directory: str | os.PathLike[str], world_size: int | None = None, *, key: bytes | str | None = None
) -> BatchPlan | None:
    """The plan of the checkpoint :func:`load` would restore, re-planned for ``world_size`` (default: this job's),
    or None without one. ``key`` as for :func:`load`.

    Build the :class:`~distaccum.Accumulator` with it to resume on another number of ranks (elastic restart).

    Raises:
        ValueError: the checkpoint's global batch cannot be split over ``world_size`` ranks of its micro batch
            size (the message lists the world sizes that can resume it); ``directory`` is a file or one checkpoint;
            no checkpoint is intact.
    """
    found = files.candidates(files.checkpoint_root(directory))
    if not found:
        return None
    _, meta, _ = files.first_intact(found, directory, trust.key_bytes(key))
    saved = BatchPlan.from_dict(meta["plan"])
    return saved.for_world_size(dist.world_size() if world_size is None else world_size)


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
    include_grads: bool = False,
    key: bytes | str | None = None,
) -> Path:
    """Write a checkpoint of the training state; collective (call it on every rank).

    Args:
        directory: where checkpoints live (created if missing); must be shared by all nodes.
        model: the model, plain, DDP-wrapped or FSDP-sharded; replicated ones are saved with plain tensor names.
        optimizer: its optimizer.
        accumulator: the :class:`~distaccum.Accumulator`.
        scheduler: learning-rate scheduler, if any.
        grad_scaler: ``torch.amp.GradScaler``, if any.
        data_state: where the data stands (e.g. ``{"step": 12, "micro_batch": 2}``), tensors and plain data only;
            :func:`load` returns it.
        keep: how many complete checkpoints to keep (older ones are deleted).
        include_grads: allow a checkpoint mid-window: every rank also writes the gradients it accumulated so far
            (plain and DDP models only). Without it, only window boundaries are saved.
        key: sign the checkpoint with this secret (HMAC-SHA256 of its manifest), so that :func:`load` with the
            same key refuses a tampered one; default: the environment variable ``DISTACCUM_CHECKPOINT_KEY``, if
            set, else unsigned (see the threat model in :mod:`distaccum.checkpoint_trust`).

    Returns:
        The checkpoint's directory.

    Raises:
        ValueError: mid-window without ``include_grads`` or with an FSDP model or a DeepSpeed engine, ``keep < 1``,
            a ``data_state`` that is not tensors and plain data, or a ``directory`` that is a file or one checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 checkpoints, got {keep}")
    signing_key = trust.key_bytes(key)
    root = files.checkpoint_root(directory)  # on every rank: a refusal on rank 0 alone would hang the others
    trust.check_plain({} if data_state is None else data_state)
    position = accumulator.micro_step_in_window
    layout = _layout(model)
    _refuse_mid_window(position, accumulator, layout, include_grads)
    if layout == "sharded":
        _refuse_inexact_shards(model, optimizer)  # collective: every rank decides alike
    # Raises for FSDP mid-window on every rank before anything is written.
    window = accumulator.state_dict(include_grads=True) if position else {}
    grads = window.pop("grads", None)
    batch_norm = window.pop("window_batch_norm", None)
    name = _checkpoint_name(accumulator.optimizer_steps, position)
    temporary = root / f".tmp-{name}"
    every_rank_writes = layout in ("sharded", "engine") or grads is not None
    rank = dist.rank()
    if rank == 0:
        _make_temporary(root, temporary)
    if every_rank_writes:
        _barrier()  # every rank writes into the temporary directory: it must exist first
    weights = _write_weights(model, optimizer, layout, temporary, rank)
    _write_rank_window(temporary, rank, grads, window, batch_norm)
    if every_rank_writes:
        _barrier()
    if rank == 0:
        state = _state(weights, accumulator, scheduler, grad_scaler, data_state)
        _write_state(state, temporary)
        meta = _meta(accumulator, position, layout, grads is not None, weights.empty_optimizer)
        files.publish(root, temporary, name, meta, keep=keep, key=signing_key)
    # Nobody leaves save() before the checkpoint is complete: a rank killed right after can rely on it.
    _barrier()
    return root / name


def _refuse_mid_window(position: int, accumulator: Accumulator, layout: str, include_grads: bool) -> None:
    """Refuse a checkpoint at micro-step ``position`` of the window that would not hold the window's gradients."""
    if position and layout == "engine":
        raise ValueError(
            f"checkpoint requested mid-window (micro-step {position} of {accumulator.plan.accum_steps}) of a "
            "DeepSpeed engine: it keeps the window's gradients in ZeRO's private buffers, which no checkpoint holds. "
            "Save right after an optimizer step (when acc.stepped is True)."
        )
    if position and not include_grads:
        raise ValueError(
            f"checkpoint requested mid-window (micro-step {position} of {accumulator.plan.accum_steps}): the "
            "gradients accumulated so far are not saved. Save right after an optimizer step (when acc.stepped "
            "is True), or pass include_grads=True (plain and DDP models) to save them too."
        )


def _refuse_inexact_shards(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a sharded model whose state ``torch.distributed.checkpoint`` would not restore as it is; collective."""
    problem = sharded_files.refusal(model, optimizer)
    if problem is not None:
        raise ValueError(f"checkpoint.save of the sharded {type(model).__name__}: {problem}.")


def _checkpoint_name(optimizer_steps: int, position: int) -> str:
    """``step-<optimizer steps>``, and ``-micro-<position>`` for a checkpoint taken mid-window."""
    name = f"step-{optimizer_steps:08d}"
    if position:
        name += f"-micro-{position:04d}"
    return name


def _make_temporary(root: Path, temporary: Path) -> None:
    """Create ``root`` if missing and the empty ``temporary`` folder the checkpoint is written into (rank 0)."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)  # not writable by others: check_root
    files.remove_leftovers(root)  # of saves killed midway, this one's name included
    temporary.mkdir()


@dataclass(frozen=True)
class _Weights:
    """What ``state.pt`` holds of the model and optimizer (None: their own files hold it, or this rank writes no
    ``state.pt``), and whether a sharded model's optimizer held no state."""

    model: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    empty_optimizer: bool = False


def _write_weights(
    model: nn.Module, optimizer: torch.optim.Optimizer, layout: str, temporary: Path, rank: int
) -> _Weights:
    """Write the model's and optimizer's own files into ``temporary`` (sharded: every rank with DCP; a DeepSpeed
    engine: every rank its shards), or take their state for rank 0's ``state.pt`` (replicated)."""
    if layout == "sharded":
        return _Weights(empty_optimizer=_write_shards(model, optimizer, temporary))
    if layout == "engine":
        engine_files.save(model, temporary)
        trust.sync_tree(temporary / engine_files.ENGINE_DIR)  # this rank's shards, on disk before the barrier
        return _Weights()
    if rank == 0:
        return _Weights(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict())
    return _Weights()


def _write_shards(model: nn.Module, optimizer: torch.optim.Optimizer, temporary: Path) -> bool:
    """Write this rank's shards of a sharded model and its optimizer with DCP; whether the optimizer held no state."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state, empty_optimizer = sharded_files.state_dicts(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary / _SHARDED)
    return empty_optimizer


def _write_rank_window(temporary: Path, rank: int, grads: Any, window: dict[str, Any], batch_norm: Any) -> None:
    """Mid-window: write this rank's own gradients and window arithmetic (format 3), and its open window's
    BatchNorm statistics (none of them at a window boundary)."""
    if grads is not None:  # the window's arithmetic is this rank's own, as its gradients are (format 3)
        _save_synced({"grads": grads, "window": window}, temporary / f"grads-rank{rank:05d}.pt")
    if batch_norm is not None:  # the open window's BatchNorm statistics, this rank's own as its gradients
        _save_synced(batch_norm, temporary / f"batchnorm-rank{rank:05d}.pt")


def _save_synced(value: Any, path: Path) -> None:
    torch.save(value, path)
    trust.sync_file(path)


def _state(
    weights: _Weights,
    accumulator: Accumulator,
    scheduler: Any | None,
    grad_scaler: torch.amp.GradScaler | None,
    data_state: dict[str, Any] | None,
) -> dict[str, Any]:
    """What rank 0 writes to ``state.pt``."""
    return {
        "model": weights.model,
        "optimizer": weights.optimizer,
        "accumulator": accumulator.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "grad_scaler": None if grad_scaler is None else grad_scaler.state_dict(),
        "data_state": {} if data_state is None else data_state,
    }


def _write_state(state: dict[str, Any], temporary: Path) -> None:
    """Write ``state.pt`` into ``temporary``; a failed write removes ``temporary``."""
    try:
        torch.save(state, temporary / _STATE)
    except BaseException:  # a full disk, say: leave no half-written directory next to the intact ones
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _meta(
    accumulator: Accumulator, position: int, layout: str, has_grads: bool, empty_optimizer: bool
) -> dict[str, Any]:
    """The checkpoint's own fields of ``meta.json`` (:func:`distaccum.checkpoint_files.publish` adds the rest)."""
    world_size = accumulator.plan.world_size
    return {
        "step": accumulator.optimizer_steps,
        "micro_step": position,
        "plan": accumulator.plan.as_dict(),
        "sharded": layout == "sharded",
        "grads_world_size": world_size if has_grads else None,
        "engine_world_size": world_size if layout == "engine" else None,
        sharded_files.EMPTY_OPTIMIZER: empty_optimizer,
    }


def load(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accumulator: Accumulator,
    scheduler: Any | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    key: bytes | str | None = None,
) -> dict[str, Any] | None:
    """Restore the newest checkpoint in ``directory`` into the given objects, on every rank (collective).

    A boundary checkpoint resumes on another world size when ``accumulator`` was built with
    :func:`resume_plan`'s plan; a mid-window one only on the world size that saved it.

    Args:
        directory: the directory :func:`save` wrote to (missing or empty: nothing to resume).
        model, optimizer, accumulator, scheduler, grad_scaler: the objects to restore, built as for a fresh run
            (``scheduler``/``grad_scaler`` only when the checkpoint has them).
        key: the secret :func:`save` signed with (default: ``DISTACCUM_CHECKPOINT_KEY``, if set): a checkpoint that
            is unsigned or whose signature does not match is skipped with a warning, like a damaged one.

    Returns:
        The checkpoint's ``data_state`` (``{}`` when none was saved), or None when there is no checkpoint.

    Raises:
        ValueError: the checkpoint has a scheduler or scaler state and none was given (or the reverse), its
            plan's global or micro batch differs from the accumulator's, it is mid-window and the world size
            changed, a replicated checkpoint meets a sharded model, a DeepSpeed checkpoint meets another model
            or world size (or the reverse), no checkpoint is intact (each damaged one is skipped with a warning
            first; a ``state.pt`` that is not tensors and plain data, lacks fields or defeats torch's reader is
            damaged), or a mid-window rank file holds other objects (refused without running them);
            ``directory`` is a regular file or one checkpoint; the model or optimizer does not fit the saved state;
            ``accumulator`` is mid-window on FSDP or DeepSpeed. Every refusal comes before anything is changed.
        RuntimeError: called inside ``with acc.micro_step():``.
    """
    layout = _layout(model)
    found = files.candidates(files.checkpoint_root(directory))
    if not found:
        return None
    path, meta, read = files.first_intact(found, directory, trust.key_bytes(key), read_state=True)
    state: dict[str, Any] = read if read is not None else {}
    fit.check_kind(
        path, meta, state, layout, model=model, accumulator=accumulator, scheduler=scheduler, grad_scaler=grad_scaler
    )
    accumulator_state = files.rank_state(path, meta, state["accumulator"], accumulator.plan.world_size, dist.rank())
    # Everything that can be refused is refused before anything changes: the model's and optimizer's fit here,
    # then the accumulator (which checks its whole state before it changes), then the loads that cannot fail.
    sharded = bool(meta.get("sharded"))
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        reader, planner = sharded_files.loading(path / _SHARDED)  # refuses a crafted .metadata, running nothing
        model_state, optimizer_state = get_state_dict(model, optimizer)
        sharded_files.check_fits(path / _SHARDED, model_state)
    elif layout == "engine":
        engine_files.check_files(path)  # every engine file read weights_only, before the accumulator changes
    else:
        fit.check_fits(path, state["model"], unwrap(model), state["optimizer"], optimizer)
    try:  # it checks its whole state before it changes anything
        accumulator.load_state_dict(accumulator_state)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(
            f"checkpoint {path}: its accumulator state is malformed ({error!r}); nothing was loaded"
        ) from None
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        both: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(both, storage_reader=reader, planner=planner)  # in place, resharded to this job's layout
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
        sharded_files.after_load(optimizer, meta)
    elif layout == "engine":
        engine_files.load(model, path)
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if grad_scaler is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
    data_state: dict[str, Any] = state["data_state"]
    return data_state
