"""One backend per model wrapper, chosen from the model: :func:`select`.

The registry is ordered and names each backend by module and class, so a backend module is imported only
when a model is matched against it, and one that needs an optional library (DeepSpeed) is considered only
when the user has imported that library already: ``import distaccum`` imports none of them. Supporting a new
wrapper is a new module here and a row in :data:`REGISTRY`, never a branch in the accumulator.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

from distaccum import collectives
from distaccum.backends import sync
from distaccum.backends.base import Backend, PlainBackend, StepOptions, params_of
from distaccum.backends.sync import GRAD_SYNC_MODES, GradSync

__all__ = [
    "GRAD_SYNC_MODES",
    "REGISTRY",
    "Backend",
    "GradSync",
    "PlainBackend",
    "StepOptions",
    "backend_class",
    "params_of",
    "select",
    "sync",
    "wrapper_of",
]

REGISTRY: tuple[tuple[str | None, str, str], ...] = (
    # (library the user must have imported, or None; module; class), tried in order; PlainBackend is the fallback.
    ("deepspeed", "distaccum.backends.deepspeed", "DeepSpeedBackend"),
    (None, "distaccum.backends.ddp", "DDPBackend"),
    (None, "distaccum.backends.fsdp", "FSDP1Backend"),
    (None, "distaccum.backends.fsdp", "FSDP2Backend"),
)


def _candidates() -> list[type[Backend]]:
    found: list[type[Backend]] = []
    for library, module, name in REGISTRY:
        if library is None or library in sys.modules:
            found.append(getattr(importlib.import_module(module), name))
    return found


def wrapper_of(model: nn.Module) -> nn.Module:
    """``model`` without ``torch.compile``'s ``OptimizedModule`` layers: the wrapper that decides the backend
    (``torch.compile(DDP(model))``, as Accelerate's ``dynamo_backend`` builds it, is a DDP model)."""
    while isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):
        model = compiled
    return model


def backend_class(model: nn.Module) -> type[Backend]:
    """The backend class for ``model``'s wrapper (:class:`PlainBackend` for a plain module), compiled or not."""
    model = wrapper_of(model)
    for candidate in _candidates():
        if candidate.matches(model):
            return candidate
    return PlainBackend


def select(model: nn.Module, world_size: int, grad_sync: GradSync | None = None) -> Backend:
    """The backend for ``model``, reducing gradients when ``grad_sync`` says (:mod:`distaccum.backends.sync`);
    refuses an unwrapped model when ``world_size > 1``.

    Raises:
        ValueError: ``model`` is a plain module while ``world_size > 1`` (its gradients would never be
            averaged across ranks), the wrapper is configured in a way its backend cannot drive, or it cannot
            run ``grad_sync``.

    Example:
        >>> select(nn.Linear(2, 1), world_size=1).name
        'plain'
    """
    chosen = backend_class(model)
    wrapper = wrapper_of(model)
    if chosen is PlainBackend and world_size > 1:
        raise ValueError(
            f"model is a plain {type(wrapper).__name__} but world_size is {world_size}: its gradients would never "
            "be averaged across ranks and every rank would train its own model. Wrap it before building the "
            "Accumulator: DistributedDataParallel(model), FSDP / fully_shard(model), accelerator.prepare(model) "
            "or deepspeed.initialize(model=model, ...). (Under `accelerate launch` without a GPU, set "
            "ACCELERATE_USE_CPU=1 so that Accelerate wraps the model.)"
        )
    backend = chosen(wrapper, world_size)
    backend.grad_sync = sync.choose(backend, grad_sync)  # before bind_device: a refusal changes nothing
    collectives.bind_device(wrapper)  # NCCL's scalars go to the GPU that holds the model
    return backend
