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

Nothing of a sharded checkpoint goes through a full unpickler. DCP reads its ``.metadata`` with a bare
``pickle.load`` and the non-tensor entries (the optimizer's param groups) with ``torch.load(weights_only=False)``:
distaccum hands ``dcp.load`` a reader whose metadata it has unpickled itself, once, admitting exact (module, name)
pairs of DCP's metadata classes and torch's dtypes (:func:`read_metadata`: no dotted name, no module prefix), and a
planner that loads those entries with ``weights_only=True`` (:func:`loading`). Before that, every slice the
metadata points at is checked (:func:`check_slices`): a plain file name inside the folder, within its file, no
transform (DCP's compression extensions), and a torch zip that fits in its slice.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distaccum import checkpoint_trust as trust
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


_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS = frozenset(
    {
        *(
            (f"{_DCP}.metadata", name)
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a layout's name back to torch.strided & co.
        ("pathlib", "PosixPath"),  # the checkpoint_id DCP records
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)
"""What a ``.metadata`` pickle may name, exactly (and torch's dtypes, layouts and memory formats by their name)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Dotted names are resolved attribute by attribute from the module (protocol 4+): refused outright, so that
        # no allowed module leads anywhere it imported.
        simple = "." not in name
        torch_value = getattr(torch, name, None) if module == "torch" and simple else None
        kinds = torch.dtype | torch.layout | torch.memory_format
        if not simple or not (isinstance(torch_value, kinds) or (module, name) in METADATA_GLOBALS):
            raise pickle.UnpicklingError(f"global '{module}' '{name}' is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def read_metadata(directory: Path) -> Any:
    """The ``.metadata`` of a DCP checkpoint, unpickled with :data:`METADATA_GLOBALS` only.

    Raises:
        ValueError: the file names another global (nothing was run), or does not hold DCP metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = directory / ".metadata"
    try:
        with path.open("rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint file {path} holds objects other than checkpoint metadata, which could run code when "
            f"loaded; it was refused without loading them. ({error})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"checkpoint file {path} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def loading(directory: Path) -> tuple[Any, Any]:
    """A storage reader and a load planner for ``dcp.load`` of ``directory`` that never unpickle in full: the
    reader returns :func:`read_metadata`'s, the planner reads non-tensor entries with ``weights_only=True``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_metadata(directory)
    check_slices(directory, metadata)

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)  # DCP's own planner: weights_only=False
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return CheckedReader(str(directory)), WeightsOnlyPlanner()


def check_slices(directory: Path, metadata: Any) -> None:
    """Refuse a ``.metadata`` whose slices lead outside ``directory`` or past their file's end, ask for a transform
    (decompression), or hold anything but a torch zip that fits in the slice (a zip bomb). Reads each tensor slice's
    zip directory, and loads each non-tensor entry (the optimizer's param groups: small) with ``weights_only``, so
    that a crafted one is refused here, before anything is loaded, not inside ``dcp.load`` after the model changed.

    Raises:
        ValueError: names the slice's file, its offset and the rule.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    where = f"checkpoint file {directory / '.metadata'}"
    slices = getattr(metadata, "storage_data", None)
    if not isinstance(slices, dict) or not all(isinstance(info, _StorageInfo) for info in slices.values()):
        raise ValueError(f"{where} has no map of storage slices; refused, nothing was read")
    entries = getattr(metadata, "state_dict_metadata", None) or {}
    for index, info in slices.items():
        here = f"{where} points at {info.relative_path!r}"
        _check_slice_bounds(directory, here, info)
        _check_slice_bytes(directory, here, info, entries, index)


def _check_slice_bounds(directory: Path, here: str, info: Any) -> None:
    """Refuse a slice (a ``_StorageInfo``) outside ``directory``, with a transform, or of no byte range."""
    name = info.relative_path
    offset = info.offset
    length = info.length
    if not trust.plain_name(name):
        raise ValueError(f"{here}: not a plain file name inside {directory}; refused, nothing was read")
    if info.transform_descriptors:
        raise ValueError(f"{here}: a transform ({info.transform_descriptors}), which distaccum never writes")
    if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
        raise ValueError(f"{here}: offset {offset!r} and length {length!r} are not byte counts")


def _check_slice_bytes(directory: Path, here: str, info: Any, entries: Any, index: Any) -> None:
    """After :func:`_check_slice_bounds`: refuse a slice past its file's end, or that is not a torch zip fitting in
    it; load a non-tensor entry's slice (its ``.metadata`` entry in ``entries`` is bytes) with ``weights_only``."""
    name = info.relative_path
    offset = info.offset
    length = info.length
    with (directory / name).open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if offset + length > size:
            raise ValueError(f"{here}: bytes {offset}..{offset + length} of a {size}-byte file")
        try:
            part = io.BufferedReader(trust.FileSlice(file, offset, length))
            trust.check_torch_stream(part, length, f"{name} at byte {offset}")
            if _holds_bytes(entries, index):
                part.seek(0)
                torch.load(part, weights_only=True)
        except trust.Untrusted as error:
            raise ValueError(f"{here}: {error}; refused before torch.load read it") from None
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{here}: an entry that holds objects other than tensors and plain data, which could run code "
                f"when loaded; it was refused without loading them. ({trust.refusal_reason(error)})"
            ) from None


def _holds_bytes(entries: Any, index: Any) -> bool:
    """Whether the slice at ``index`` holds a non-tensor entry of ``entries`` (pickled by ``torch.save``)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return isinstance(entries.get(getattr(index, "fqn", None)), BytesStorageMetadata)


def check_fits(directory: Path, model_state: dict[str, Any]) -> None:
    """Refuse a DCP checkpoint whose model tensors do not have this model's (global) shapes, before any load.

    Raises:
        ValueError: names the first tensor that is missing there or has another shape.
    """
    saved = read_metadata(directory).state_dict_metadata
    for name, value in model_state.items():
        entry = saved.get(f"model.{name}")
        size = getattr(entry, "size", None)
        if isinstance(value, torch.Tensor) and (entry is None or (size is not None and tuple(size) != value.shape)):
            there = "missing" if entry is None else f"shape {tuple(size or ())}"
            raise ValueError(
                f"checkpoint {directory.parent} does not fit this model: {name} is {there} there and has shape "
                f"{tuple(value.shape)} here. A checkpoint loads into the model built as for the run that saved it; "
                "nothing was loaded. Build it as that run did."
            )
