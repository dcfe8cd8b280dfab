"""DeepSpeed integration: :func:`initialize` builds a ``DeepSpeedEngine`` whose config agrees with the plan.

``import distaccum`` never imports DeepSpeed; :func:`initialize` imports it when called. The engine is then
driven by :class:`distaccum.backends.deepspeed.DeepSpeedBackend`, which the ``Accumulator`` picks for it (its
docstring says how the window, the loss scaling, the boundary correction and clipping work).

Clipping: DeepSpeed 0.19 clips at 1.0 when the config does not say otherwise. :func:`initialize` writes
``gradient_clipping: 0.0`` when the field is missing; the config is where DeepSpeed clips, and the
accumulator's ``max_grad_norm`` must agree with it (None for 0.0), checked at the first step.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import dist
from distaccum.backends.deepspeed import unsupported
from distaccum.plan import BatchPlan

INSTALL_HINT = 'pip install "distaccum[deepspeed]"'

_BATCH_FIELDS = (
    ("train_batch_size", "global_batch_size"),
    ("train_micro_batch_size_per_gpu", "micro_batch_size"),
    ("gradient_accumulation_steps", "accum_steps"),
)


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(
            f"distaccum's DeepSpeed integration needs the deepspeed package, which is not installed: {INSTALL_HINT}"
        ) from error
    return deepspeed


def load_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a fresh dict, from a JSON file path or a mapping (deep-copied, never modified).

    Keys starting with ``_`` (``"_comment"``) are dropped: DeepSpeed rejects unknown keys in some sections.

    Raises:
        ValueError: the file does not exist or is not a JSON object.
    """
    if isinstance(config, Mapping):
        loaded: Any = copy.deepcopy(dict(config))
    else:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"DeepSpeed config {str(path)!r} does not exist; pass a JSON file path or a dict")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config must be a JSON object, got {type(loaded).__name__}")
    return {key: value for key, value in loaded.items() if not str(key).startswith("_")}


def reconcile_config(config: Mapping[str, Any], plan: BatchPlan) -> dict[str, Any]:
    """The config with its batch fields checked against ``plan``, the missing ones filled, clipping explicit.

    ``train_batch_size`` must be ``plan.global_batch_size``, ``train_micro_batch_size_per_gpu`` must be
    ``plan.micro_batch_size`` and ``gradient_accumulation_steps`` must be ``plan.accum_steps``; a missing field
    or ``"auto"`` is filled from the plan. A missing ``gradient_clipping`` becomes ``0.0`` (DeepSpeed would
    silently clip at 1.0). ``zero_allow_untested_optimizer`` defaults to true so that torch optimizers work
    under ZeRO 1 to 3.

    Raises:
        ValueError: a batch field disagrees with the plan (the message prints both equations with numbers), or
            the config asks for what distaccum cannot drive exactly: a stage that is not 0 to 3, fp16/bf16 at
            stage 0, bf16 with fp32 gradient accumulation at stage 1 (each message gives the fix).

    Example:
        >>> plan = BatchPlan(global_batch_size=32, micro_batch_size=4, world_size=2)
        >>> reconcile_config({"train_batch_size": 32}, plan)["gradient_accumulation_steps"]
        4
    """
    result = dict(config)
    wrong: list[str] = []
    for ds_field, plan_field in _BATCH_FIELDS:
        expected = getattr(plan, plan_field)
        value = result.get(ds_field)
        if value is None or value == "auto":
            result[ds_field] = expected
        elif isinstance(value, bool) or not isinstance(value, int) or value != expected:
            wrong.append(f"{ds_field} {value!r} (the plan's {plan_field} is {expected})")
    if wrong:
        raise ValueError(
            "DeepSpeed config disagrees with the BatchPlan: "
            + "; ".join(wrong)
            + f". The plan is {plan}; DeepSpeed needs train_batch_size = gradient_accumulation_steps x "
            f"train_micro_batch_size_per_gpu x world_size, here {plan.global_batch_size} = {plan.accum_steps} x "
            f"{plan.micro_batch_size} x {plan.world_size}. Set the config's fields to these numbers or delete them "
            "(distaccum fills missing ones from the plan), or build the plan from the config's sizes."
        )
    clipping = result.get("gradient_clipping")
    if clipping is None:
        result["gradient_clipping"] = 0.0
    elif isinstance(clipping, bool) or not isinstance(clipping, int | float) or clipping < 0:
        raise ValueError(
            f"DeepSpeed config gradient_clipping must be a number >= 0 (0.0 = no clipping), got {clipping!r}"
        )
    result.setdefault("zero_allow_untested_optimizer", True)
    _refuse_unsupported(result)
    return result


def _refuse_unsupported(config: Mapping[str, Any]) -> None:
    # The same rules the backend applies to a built engine, here before DeepSpeed builds one.
    zero = config.get("zero_optimization") or {}

    def enabled(*sections: str) -> bool:
        return any((config.get(section) or {}).get("enabled") in (True, "true") for section in sections)

    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    refusal = unsupported(
        stage=int(zero.get("stage", 0)),
        fp16=enabled("fp16"),
        bf16=enabled("bf16", "bfloat16"),
        fp32_grad_accum=(config.get("data_types") or {}).get("grad_accum_dtype") in ("fp32", "float32"),
        offload=offload,
    )
    if refusal is not None:
        raise ValueError(refusal)


def _init_distributed(deepspeed: Any) -> None:
    if not dist.is_initialized():
        # DeepSpeed wants the rendezvous variables even for one process (else it asks for mpi4py): give a plain
        # `python train.py --deepspeed ...` a private single-rank group on a free port.
        if "WORLD_SIZE" not in os.environ or os.environ.get("WORLD_SIZE") == "1":
            for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(name, value)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
        device = dist.device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
    # With a group already there, DeepSpeed only wraps it; otherwise it creates it with our backend.
    deepspeed.init_distributed(dist_backend=dist.default_backend())


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    plan: BatchPlan,
    config: str | os.PathLike[str] | Mapping[str, Any],
) -> Any:
    """Build a ``DeepSpeedEngine`` whose config agrees with ``plan``; wrap it with ``Accumulator(engine, ...)``.

    Loads the config (path or dict), checks and fills its batch fields from the plan
    (:func:`reconcile_config`), makes clipping explicit, joins the process group (gloo on CPU, nccl with CUDA)
    and calls ``deepspeed.initialize``. Build the accumulator with ``max_grad_norm`` equal to the config's
    ``gradient_clipping`` (None for 0.0).

    Args:
        model: the plain model (on CPU, or on this rank's GPU).
        optimizer: a torch optimizer over ``model``'s parameters, or None when the config has an ``optimizer``.
        plan: the batch plan for the live world size.
        config: a DeepSpeed JSON config file path, or a dict (not modified).

    Returns:
        The ``DeepSpeedEngine``; its optimizer is ``engine.optimizer``.

    Raises:
        ImportError: deepspeed is not installed (the message has the pip command).
        ValueError: a config batch field disagrees with the plan (the message prints the equation), the config
            or the model is one distaccum cannot drive exactly (a PipelineModule, see :func:`reconcile_config`),
            or ``plan.world_size`` is not the live world size.

    Example (under ``torchrun --nproc_per_node 2`` or the ``deepspeed`` launcher)::

        plan = BatchPlan(global_batch_size=64, micro_batch_size=4)
        engine = initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), plan, "launch/deepspeed/zero2.json")
        acc = Accumulator(engine, engine.optimizer, plan)
    """
    deepspeed = _import_deepspeed()
    if not isinstance(plan, BatchPlan):
        raise TypeError(f"plan must be a distaccum.BatchPlan, got {type(plan).__name__}")
    if isinstance(model, deepspeed.pipe.PipelineModule):
        raise ValueError(
            "model is a DeepSpeed PipelineModule: its engine runs its own micro-batch schedule in "
            "engine.train_batch(), which distaccum cannot drive. Use a data-parallel model (no PipelineModule)."
        )
    full_config = reconcile_config(load_config(config), plan)
    _init_distributed(deepspeed)
    plan.check_world_size()
    if optimizer is None and "optimizer" not in full_config:
        raise ValueError(
            'no optimizer: pass a torch optimizer to initialize(), or give the config an "optimizer" section'
        )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=full_config)
    return engine
