"""DeepSpeed engines in :mod:`distaccum.checkpoint`: the engine writes its own files into the checkpoint.

ZeRO shards the optimizer state (and at stage 3 the parameters) over ranks in layouts only DeepSpeed reads back.
So :func:`distaccum.checkpoint.save` has every rank call ``engine.save_checkpoint`` into the checkpoint's
temporary directory (``deepspeed/engine/``). distaccum's own ``state.pt`` (accumulator, scheduler, data
position) goes next to it, and the whole directory is sealed and renamed at once. A job killed mid-save thus never
sees a half checkpoint, and one ``latest`` names both halves. DeepSpeed's own ``latest`` file is not written.

Nothing in an engine folder is ever read by a full unpickler. DeepSpeed reads its files with
``torch.load(weights_only=False)``, which runs whatever a pickle names. Scanning the pickles for the names they
import first is not enough: a scan misses what it does not walk (a folder swapped for a symlink), and a pickle of
allowed names can still call them or set attributes with BUILD (``setattr(collections.Counter, "most_common",
set)`` rewrites ``Counter`` for the whole process) when a full unpickler runs it. Names are only safe together with
the opcode rules of torch's ``weights_only`` unpickler. So :func:`load` does two things:

1. :func:`check_files` reads every engine file with ``torch.load(weights_only=True)`` (memory-mapped, so only the
   pickle is read) and refuses a symbolic link or a non-regular file anywhere in the folder, without following it.
   Every rank checks every rank's files, so a crafted shard is refused on all ranks together, before DeepSpeed
   changes anything.
2. :func:`weights_only_loads` runs ``engine.load_checkpoint`` with every ``torch.load`` and the engine's
   ``checkpoint_engine.load`` replaced by a ``weights_only=True`` read onto the CPU. Safety rests on this step: it
   holds for whatever file DeepSpeed opens, whether or not the check saw it.

Both allow, beyond tensors and plain data, the exact classes of :func:`engine_classes` and nothing else.

Resuming on another world size would need DeepSpeed's universal checkpoint, which distaccum does not produce.
:func:`distaccum.checkpoint.load` refuses it and names the conversion tool.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from distaccum import checkpoint_trust as trust

ENGINE_DIR = "deepspeed"
"""The engine's folder inside a distaccum checkpoint."""
TAG = "engine"
"""DeepSpeed's tag (sub-folder) for the one engine checkpoint a distaccum checkpoint holds."""


def engine_classes() -> list[type]:
    """DeepSpeed's own state classes that its ZeRO checkpoints pickle, the only classes a load may rebuild.

    Found by saving ZeRO 0-3 engines (fp32 and bf16, CPU, DeepSpeed 0.19.8) and listing what each file names:

    * ``LossScaler``: ZeRO 1-3 optimizer files hold the optimizer's loss scaler (a static one unless fp16);
    * ``DynamicLossScaler``: the same scaler under fp16 with dynamic loss scaling (``CreateLossScaler``; not
      producible on CPU, its rebuild is tested on its own);
    * ``ZeroStageEnum``: ZeRO 1-3 optimizer files record their stage (an ``int`` enum);
    * ``fragment_address``: ZeRO 1-2 optimizer files map each parameter to its slice of the flat partition.

    ZeRO 0 files (a plain torch optimizer's state) need none. ``weights_only`` rebuilds each from plain data: the
    enum by calling the class on its value (REDUCE), the others by ``__new__`` and an update of the instance's
    ``__dict__`` (NEWOBJ, BUILD). None of their constructors does more than set attributes, and a crafted file can
    at most give such an instance odd attributes (of values weights_only allows): it can neither call anything
    else nor change a class.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def save(engine: Any, temporary: Path) -> None:
    """Write ``engine``'s model and optimizer state (this rank's shards) under ``temporary``; collective."""
    engine.save_checkpoint(str(temporary / ENGINE_DIR), tag=TAG, client_state={}, save_latest=False)


def read_plain(file: Any, *, mmap: bool = False) -> Any:
    """``torch.load`` ``file`` with ``weights_only=True`` onto the CPU, allowing :func:`engine_classes` too.

    Args:
        file: a path or an open binary file, as DeepSpeed hands it to ``torch.load``.
        mmap: map the tensors' bytes instead of reading them (a path to a torch zip file only).

    Returns:
        What the file holds: tensors, plain data and DeepSpeed's state classes.

    Raises:
        ValueError: the weights_only unpickler refused the file (it names something else, or builds anything
            beyond those classes) or could not read it; nothing in it ran.
        OSError: the file could not be opened (passed on unchanged).
    """
    registered = torch.serialization.get_safe_globals()
    # Only what is not registered yet: leaving the context removes what it added, so a user's own entry stays.
    missing: list[Any] = [cls for cls in engine_classes() if cls not in registered]
    try:
        with torch.serialization.safe_globals(missing):
            # torch.serialization.load is torch.load itself; weights_only_loads replaces only the name torch.load.
            return torch.serialization.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as error:
        raise ValueError(
            f"checkpoint file {file} was refused by torch.load(weights_only=True) without running it: "
            f"{trust.refusal_reason(error)}. A DeepSpeed engine file holds only tensors, plain data and DeepSpeed's "
            "state classes, so this one is not what save wrote. Load only checkpoints you wrote."
        ) from None


def _forced_load(file: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` and ``checkpoint_engine.load`` during an engine's load: the caller's options are ignored."""
    return read_plain(file)


@contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Within: ``owner.name`` is ``value``; afterwards, what ``owner`` itself held (an attribute, or none)."""
    found = vars(owner)
    had_own = name in found
    previous = found.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


@contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """Within: every ``torch.load`` in the process and ``engine.checkpoint_engine.load`` read with :func:`read_plain`.

    DeepSpeed 0.19's ``load_checkpoint`` reads every file through ``engine.checkpoint_engine.load`` (the model
    states through its ``SDLoader``, the ZeRO optimizer shards, MoE experts), which for its torch engines calls
    ``torch.load(path, map_location=..., weights_only=False)``; its universal-checkpoint and fp32-recovery paths
    call ``torch.load(..., weights_only=False)`` directly. Replacing both names covers every one of them, and
    whatever checkpoint engine the config picked. The caller's ``weights_only``, ``map_location`` (on the paths
    distaccum takes DeepSpeed asks for the CPU anyway), ``mmap`` and ``pickle_module`` are ignored.

    ``torch.load`` is replaced process-wide: another thread loading a file meanwhile gets the same rules. Both
    names are restored on leaving, also after an error.

    Example::

        >>> from types import SimpleNamespace
        >>> engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())
        >>> with weights_only_loads(engine):
        ...     torch.load is not torch.serialization.load
        True
        >>> torch.load is torch.serialization.load, vars(engine.checkpoint_engine)
        (True, {})
    """
    loader = engine.checkpoint_engine  # None without an optimizer (ZeRO 3 inference): then torch.load alone
    own = nullcontext() if loader is None else _replaced(loader, "load", _forced_load)
    with _replaced(torch, "load", _forced_load), own:
        yield


def _refuse_non_regular(path: Path) -> None:
    """Refuse ``path`` if it is a symbolic link or neither a folder nor a regular file; never follows a link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return  # nothing there: check_files then finds no engine files
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ValueError(
            f"checkpoint entry {path} is a symbolic link or not a regular file, which DeepSpeed's save never "
            "writes; it was refused unread (a link could point DeepSpeed's load at files outside the checkpoint). "
            "Load only checkpoints you wrote."
        )


def check_files(checkpoint: Path) -> None:
    """Read every engine file with ``weights_only=True`` and refuse links, before DeepSpeed loads anything.

    Raises:
        ValueError: the folder holds no ``.pt`` file, a symbolic link or a non-regular file, or a file the
            weights_only unpickler refuses (see :func:`read_plain`); nothing ran and nothing was loaded.
    """
    folder = checkpoint / ENGINE_DIR
    _refuse_non_regular(folder)
    files = []
    for parent, folders, names in os.walk(folder, followlinks=False):
        for name in sorted(folders) + sorted(names):
            _refuse_non_regular(Path(parent, name))
        files += [Path(parent, name) for name in sorted(names) if name.endswith(".pt")]
    if not files:
        raise ValueError(f"checkpoint {checkpoint} has no DeepSpeed engine files under {folder}")
    for file in files:
        # Memory-mapped: the tensors' bytes are not read, only the pickle is parsed. A legacy (non-zip) file
        # cannot be mapped and is read whole.
        read_plain(file, mmap=zipfile.is_zipfile(file))


def load(engine: Any, checkpoint: Path) -> None:
    """Restore ``engine``'s model and optimizer from ``checkpoint``; collective.

    :func:`check_files` first, then ``engine.load_checkpoint`` inside :func:`weights_only_loads`.

    Raises:
        ValueError: a file was refused (see :func:`check_files`), or DeepSpeed found nothing to load. A refusal
            by :func:`check_files` leaves the engine as it was. A file refused only during DeepSpeed's own load
            (one swapped in after the check) leaves what DeepSpeed had loaded by then: at ZeRO 1-3 the model's
            weights, the engine's step counts and the learning-rate scheduler come from the checkpoint while the
            optimizer state does not. Rebuild the engine then.
    """
    check_files(checkpoint)
    with weights_only_loads(engine):
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
