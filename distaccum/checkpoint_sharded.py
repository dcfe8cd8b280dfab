"""FSDP state through ``torch.distributed.checkpoint``: what it cannot keep exact, and a case it can with help.

``get_state_dict(model, optimizer)`` initializes an optimizer that holds no state yet by stepping it once with zero
gradients and learning rate 0 (``_init_optim_state``): Adam's step count becomes 1, so a checkpoint saved before
the first real step (or after a first window that was skipped) would resume with a step count one ahead, and every
later bias correction differs (measured by the combinations harness: 0.26 of what training changed). distaccum
keeps such an optimizer empty on both sides: it is cleared after the save and after the load, and the checkpoint
says so (:data:`EMPTY_OPTIMIZER`).

An optimizer that holds state for some parameters and none for others (a parameter that has had no gradient in
any step yet: a branch unused so far) cannot be restored exactly: the checkpoint lacks its keys, and the load would
initialize it with the made-up step (FSDP1: silently off by 7.7e-2; FSDP2: a missing-key error inside
``dcp.load``). Such a save is refused before anything is written, on every rank (the decision is summed over the
ranks, so a rank that sees nothing wrong does not wait in the save's collectives).

Not handled (the harness keeps it as a known failure): FSDP1 with a parameter of fewer rows than ranks, whose
checkpoint does not load back (``Missing key in checkpoint state_dict: optimizer.param_groups``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distaccum import collectives
from distaccum.backends import params_of

EMPTY_OPTIMIZER = "optimizer_empty"
"""The ``meta.json`` key: the optimizer held no state when the checkpoint was saved."""


def refusal(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why this sharded model's state cannot be saved exactly now, and what to do (None: it can); collective."""
    problem = _local_problem(model, optimizer)
    if collectives.sum_over_ranks([float(problem is not None)])[0] == 0:
        return None
    return problem or (
        "another rank cannot save its shard exactly (see that rank's error): torch.distributed.checkpoint would "
        "not restore it as it is"
    )


def _local_problem(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    params = [p for p in params_of(optimizer) if p.requires_grad]
    state = optimizer.state
    if state:
        missing = [p for p in params if p.numel() and not state.get(p)]  # FSDP1: a shard may hold none of it
        if missing:
            return (
                f"the optimizer holds state for {len(params) - len(missing)} of its {len(params)} parameters; the "
                f"other {len(missing)} have had no gradient in any step yet (a branch unused so far), and "
                "torch.distributed.checkpoint would restore them with a made-up first step. Save once every "
                "parameter has been stepped, or at a window boundary before the first step"
            )
    return None


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The model's and optimizer's state dicts for ``dcp.save``, and whether the optimizer held no state (it is left
    without state again, as it was: ``get_state_dict`` initialized it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    empty = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if empty:
        optimizer.state.clear()
    return model_state, optimizer_state, empty


def after_load(optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Leave an optimizer that was saved without state without state (the load initialized it)."""
    if meta.get(EMPTY_OPTIMIZER):
        optimizer.state.clear()
