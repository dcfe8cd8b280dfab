"""DeepSpeed engines in :mod:`distaccum.checkpoint`: the engine writes its own files into the checkpoint.

ZeRO shards the optimizer state (and at stage 3 the parameters) over ranks in layouts only DeepSpeed reads back.
So :func:`distaccum.checkpoint.save` has every rank call ``engine.save_checkpoint`` into the checkpoint's
temporary directory (``deepspeed/engine/``). distaccum's own ``state.pt`` (accumulator, scheduler, data
position) goes next to it, and the whole directory is sealed and renamed at once. A job killed mid-save thus never
sees a half checkpoint, and one ``latest`` names both halves. DeepSpeed's own ``latest`` file is not written.

DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs whatever a pickle names. Before it
does, :func:`check_files` scans every pickle for the globals it would import (``torch.serialization.
get_unsafe_globals_in_checkpoint``, which reads only the pickle, not the tensors). It refuses any global beyond
the plain data ``weights_only`` allows and DeepSpeed's own state classes (:data:`ENGINE_GLOBALS`).

Resuming on another world size would need DeepSpeed's universal checkpoint, which distaccum does not produce.
:func:`distaccum.checkpoint.load` refuses it and names the conversion tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ENGINE_DIR = "deepspeed"
"""The engine's folder inside a distaccum checkpoint."""
TAG = "engine"
"""DeepSpeed's tag (sub-folder) for the one engine checkpoint a distaccum checkpoint holds."""
ENGINE_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
"""DeepSpeed's own state classes that its checkpoints pickle (seen in ZeRO 0-3 checkpoints of DeepSpeed 0.19)."""


def save(engine: Any, temporary: Path) -> None:
    """Write ``engine``'s model and optimizer state (this rank's shards) under ``temporary``; collective."""
    engine.save_checkpoint(str(temporary / ENGINE_DIR), tag=TAG, client_state={}, save_latest=False)


def check_files(checkpoint: Path) -> None:
    """Refuse an engine folder whose pickles name anything but plain data and DeepSpeed's state classes.

    Raises:
        ValueError: a file names another global (unpickling it could run code); nothing was loaded.
    """
    folder = checkpoint / ENGINE_DIR
    files = sorted(path for path in folder.rglob("*.pt") if path.is_file())
    if not files:
        raise ValueError(f"checkpoint {checkpoint} has no DeepSpeed engine files under {folder}")
    for file in files:
        foreign = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - ENGINE_GLOBALS)
        if foreign:
            raise ValueError(
                f"checkpoint file {file} names {', '.join(foreign)}, which are neither tensors, plain data nor "
                "DeepSpeed's state classes; unpickling it could run code, so it was refused before DeepSpeed "
                "loaded it. Load only checkpoints you wrote."
            )


def load(engine: Any, checkpoint: Path) -> None:
    """Restore ``engine``'s model and optimizer from ``checkpoint`` (after :func:`check_files`); collective.

    Raises:
        ValueError: a file was refused by :func:`check_files`, or DeepSpeed found nothing to load.
    """
    check_files(checkpoint)
    loaded, _ = engine.load_checkpoint(
        str(checkpoint / ENGINE_DIR), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise ValueError(f"DeepSpeed loaded nothing from {checkpoint / ENGINE_DIR} (tag {TAG!r})")


def other_world_size_refusal(checkpoint: Path, saved: int, now: int) -> str:
    """The message for a DeepSpeed checkpoint resumed on another number of ranks."""
    folder = checkpoint / ENGINE_DIR
    return (
        f"checkpoint {checkpoint} holds a DeepSpeed engine saved by {saved} rank(s), and this job has {now}: "
        "ZeRO's optimizer shards (and at stage 3 the parameters) are laid out per rank. Resume on "
        f"{saved} rank(s), or convert the engine's files with DeepSpeed's `python -m "
        f"deepspeed.checkpoint.ds_to_universal --input_folder {folder / TAG} --output_folder "
        f"{folder / (TAG + '_universal')}` and load them with engine.load_checkpoint and "
        '"checkpoint": {"load_universal": true} in the DeepSpeed config (distaccum does not drive that path).'
    )
