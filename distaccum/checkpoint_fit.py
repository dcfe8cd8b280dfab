"""Whether a checkpoint fits the run that loads it: the same kind of run (scheduler, scaler, layout, DeepSpeed world
size) and a model and optimizer of the saved shapes. Every check runs before anything is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import checkpoint_engine as engine_files


def check_fits(
    path: Path, model_state: dict[str, Any], module: Any, optimizer_state: dict[str, Any], optimizer: Any
) -> None:
    """Refuse a saved model or optimizer state that would not load into ``module`` / ``optimizer``, before
    anything is loaded (torch's own load copies every tensor that fits before it raises for the rest).

    Raises:
        ValueError: names the first tensor or parameter group that does not fit, and both shapes or counts.
    """
    problem = _model_problem(model_state, module.state_dict())
    saved_groups = [len(group["params"]) for group in optimizer_state["param_groups"]]
    live_groups = [len(group["params"]) for group in optimizer.param_groups]
    if problem is None and saved_groups != live_groups:
        problem = f"the optimizer has {saved_groups} parameters per group there and {live_groups} here"
    if problem is not None:
        raise ValueError(
            f"checkpoint {path} does not fit this model and optimizer: {problem}. A checkpoint loads into the model "
            f"and optimizer built as for the run that saved it ({type(module).__name__}); nothing was loaded. Build "
            "them as that run did, or point the load at a directory of this model's checkpoints."
        )


def _model_problem(model_state: dict[str, Any], live: dict[str, Any]) -> str | None:
    """The first tensor of ``live`` (the model's state) that ``model_state`` holds in another shape, or the tensors
    one of them lacks (None: they fit)."""
    missing = sorted(set(live) - set(model_state))
    unexpected = sorted(set(model_state) - set(live))
    wrong = [
        name
        for name, value in live.items()
        if isinstance(value, torch.Tensor)
        and name in model_state
        and (not isinstance(model_state[name], torch.Tensor) or model_state[name].shape != value.shape)
    ]
    if wrong:
        name = wrong[0]
        saved = tuple(model_state[name].shape) if isinstance(model_state[name], torch.Tensor) else "not a tensor"
        here = tuple(live[name].shape)
        return f"{name} has shape {saved} there and {here} here ({len(wrong)} tensor(s) differ)"
    if missing or unexpected:
        return f"tensors missing there: {missing[:3]}, unknown here: {unexpected[:3]}"
    return None


def check_kind(
    path: Path,
    meta: dict[str, Any],
    state: dict[str, Any],
    layout: str,
    *,
    model: nn.Module,
    accumulator: Any,
    **optional: Any,
) -> None:
    """Refuse a checkpoint of another kind of run: with(out) a scheduler or scaler, another model layout, another
    DeepSpeed world size."""
    _check_optional(path, state, optional)
    _check_layout(path, meta, layout, model)
    _check_engine(path, meta, layout, model, accumulator)


def _check_optional(path: Path, state: dict[str, Any], optional: dict[str, Any]) -> None:
    """Refuse a scheduler or scaler state without the object to load it into (or the reverse), and an enabled
    GradScaler for the empty state of a disabled one."""
    for field, target in optional.items():
        if (state[field] is None) != (target is None):
            raise ValueError(
                f"checkpoint {path} {'has no' if state[field] is None else 'has a'} {field} state but "
                f"{field}={'None' if target is None else type(target).__name__} was given; pass the same "
                f"{field} as the run that saved it"
            )
    scaler = optional["grad_scaler"]
    if scaler is not None and scaler.is_enabled() and not state["grad_scaler"]:
        raise ValueError(
            f"checkpoint {path} has an empty grad_scaler state (saved from a disabled GradScaler) but grad_scaler "
            "is enabled; pass a GradScaler built as the run that saved it (enabled=False)"
        )


def _check_layout(path: Path, meta: dict[str, Any], layout: str, model: nn.Module) -> None:
    """Refuse a replicated model's checkpoint for a sharded model, and a sharded one for any other."""
    if not meta.get("sharded") and layout == "sharded":
        raise ValueError(
            f"checkpoint {path} holds a replicated model's state but model is a sharded {type(model).__name__}; "
            "resume it with the plain or DDP model that saved it"
        )
    if meta.get("sharded") and layout != "sharded":  # nothing of its sharded/ folder is read for such a model
        raise ValueError(
            f"checkpoint {path} holds a sharded (FSDP) model's state but model is a {layout} "
            f"{type(model).__name__}; resume it with the FSDP model that saved it"
        )


def _check_engine(path: Path, meta: dict[str, Any], layout: str, model: nn.Module, accumulator: Any) -> None:
    """Refuse a DeepSpeed engine's checkpoint for another model (or the reverse), or on another world size."""
    saved_by = meta.get("engine_world_size")
    if (saved_by is not None) != (layout == "engine"):
        raise ValueError(
            f"checkpoint {path} holds {'a DeepSpeed engine' if saved_by else 'no DeepSpeed engine'} but model is "
            f"{type(model).__name__}; resume it with the kind of model that saved it"
        )
    if saved_by is not None and saved_by != accumulator.plan.world_size:
        raise ValueError(engine_files.other_world_size_refusal(path, saved_by, accumulator.plan.world_size))
