"""The checkpoint directory on disk: atomic publication, integrity, the newest intact checkpoint, safe loading.

What :mod:`distaccum.checkpoint` puts in a checkpoint is its business; this module makes sure that whatever
happens to the job or the disk, a load either gets a complete, intact checkpoint or says why it cannot:

* **Publication.** A checkpoint is written under ``.tmp-<name>``, gets a ``meta.json`` with the sha256 of every
  file and a serial number (one more than any checkpoint there), is renamed to ``<name>``, and only then named
  in ``latest`` (``os.replace``). Saving a step that exists already moves the old one aside first
  (``.replaced-<name>-<serial>``) and deletes it only after the new one is named: no moment without a complete
  checkpoint. Old checkpoints are pruned by serial, so a run that restarted at an earlier step never has its new
  checkpoints deleted in favour of the old run's later ones.
* **Choosing.** ``latest`` names the checkpoint to load; when it names nothing complete (a kill between two
  renames, a hand-edited directory), the complete checkpoint with the highest serial is used, with a warning.
  A checkpoint whose files do not match their sha256 (truncated, bit-flipped, missing) is skipped with a warning
  naming the file, in favour of the previous one; when none is intact, loading raises instead of starting over.
* **Safe loading.** Every file is read with ``torch.load(weights_only=True)``: tensors and plain data only. A
  file that holds anything else (a crafted pickle) is refused without running it. ``data_state`` must be plain
  data for the same reason, checked when it is saved. A sharded checkpoint's ``.metadata`` and non-tensor entries
  are read by :mod:`distaccum.checkpoint_sharded` (exact globals, ``weights_only``), only for a sharded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 3
"""2 adds ``files`` (sha256 per file) and ``serial`` to meta.json; format 1 still loads, unverified. 3: mid-window,
each rank's ``grads-rank<r>.pt`` also holds that rank's own open-window state (:func:`rank_window`)."""
LATEST = "latest"
META = "meta.json"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


@dataclass(frozen=True)
class Entry:
    """A complete checkpoint: its directory and its meta.json."""

    path: Path
    meta: dict[str, Any]

    @property
    def order(self) -> tuple[int, int, int]:
        return (int(self.meta.get("serial", 0)), int(self.meta["step"]), int(self.meta.get("micro_step", 0)))


def checkpoint_root(directory: str | os.PathLike[str]) -> Path:
    """``directory`` as the folder checkpoints live in (it may not exist yet).

    Raises:
        ValueError: it is a regular file, or one checkpoint inside such a folder (either would read as "no
            checkpoint here" and training would silently start over).
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"checkpoint directory {str(root)!r} is a regular file: distaccum.checkpoint expects the directory that "
            "checkpoint.save() writes into (it holds `latest` and the step-*/ checkpoints). Pass that directory, "
            "the same path as the run that saved it."
        )
    if (root / META).is_file():
        raise ValueError(
            f"checkpoint directory {str(root)!r} is one checkpoint (it has {META}), not the directory that holds "
            "them: distaccum.checkpoint picks the newest intact checkpoint itself. Pass its parent, "
            f"{str(root.parent)!r}."
        )
    return root


def check_fits(
    path: Path, model_state: dict[str, Any], module: Any, optimizer_state: dict[str, Any], optimizer: Any
) -> None:
    """Refuse a saved model or optimizer state that would not load into ``module`` / ``optimizer``, before
    anything is loaded (torch's own load copies every tensor that fits before it raises for the rest).

    Raises:
        ValueError: names the first tensor or parameter group that does not fit, and both shapes or counts.
    """
    live = module.state_dict()
    missing, unexpected = sorted(set(live) - set(model_state)), sorted(set(model_state) - set(live))
    wrong = [
        name
        for name, value in live.items()
        if isinstance(value, torch.Tensor)
        and isinstance(model_state.get(name), torch.Tensor)
        and model_state[name].shape != value.shape
    ]
    problem = None
    if wrong:
        name = wrong[0]
        saved, here = tuple(model_state[name].shape), tuple(live[name].shape)
        problem = f"{name} has shape {saved} there and {here} here ({len(wrong)} tensor(s) differ)"
    elif missing or unexpected:
        problem = f"tensors missing there: {missing[:3]}, unknown here: {unexpected[:3]}"
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


def rank_state(path: Path, meta: dict[str, Any], saved: dict[str, Any], world_size: int, rank: int) -> dict[str, Any]:
    """The accumulator state for ``rank``: rank 0's (``state.pt``), with this rank's own open window over it when
    the checkpoint is mid-window on this world size (another world size is refused by the accumulator).

    Raises:
        ValueError: a format-2 mid-window checkpoint of several ranks with ``num_items`` (see :func:`_old_window`).
    """
    if meta.get("grads_world_size") != world_size:
        return saved
    own = safe_load(path / f"grads-rank{rank:05d}.pt")
    if isinstance(own, dict):  # format 3: {"grads": [...], "window": this rank's accumulator state}
        state = {**saved, **own["window"], "grads": own["grads"]}
    else:
        _old_window(path, saved, world_size)
        state = {**saved, "grads": own}
    if (path / f"batchnorm-rank{rank:05d}.pt").exists():
        state["window_batch_norm"] = safe_load(path / f"batchnorm-rank{rank:05d}.pt")
    return state


def _old_window(path: Path, saved: dict[str, Any], world_size: int) -> None:
    """A format-2 mid-window checkpoint holds rank 0's window arithmetic for every rank: refused where it sets the
    weights (``num_items``), warned where it sets only the step's reported loss."""
    if world_size == 1:
        return  # rank 0's is the only one
    if saved.get("window_mode") == "items":
        raise ValueError(
            f"checkpoint {path} was taken mid-window (micro-step {saved['micro_step']}) with num_items on "
            f"{world_size} ranks by a distaccum that saved rank 0's window item count for every rank (format 2): "
            "resumed, the step's gradient would be weighted by a wrong global count. Resume from the checkpoint "
            "before it (move this one away; save(keep=2) kept it), or from a boundary checkpoint."
        )
    warnings.warn(
        f"checkpoint {path} was taken mid-window (micro-step {saved['micro_step']}) on {world_size} ranks by a "
        "distaccum that saved rank 0's window loss for every rank (format 2): the weights resume exactly, but "
        "last_step.loss of this step counts rank 0's loss so far on every rank, and a window another rank alone "
        "discarded is not discarded",
        stacklevel=4,
    )


def complete(root: Path) -> list[Entry]:
    """Every complete checkpoint in ``root`` (one with a readable, well-formed meta.json), oldest first; one whose
    meta.json is malformed is skipped with a warning (it must not stop ``load`` or ``save`` of the others)."""
    entries = []
    for path in root.glob("*step-*") if root.is_dir() else []:
        if path.name.startswith(("step-", ".replaced-step-")):
            try:
                meta = json.loads((path / META).read_text())
            except (OSError, ValueError):
                continue  # a checkpoint killed before its meta.json was written is not one
            problem = _malformed(meta)
            if problem is not None:
                warnings.warn(f"checkpoint {path} is damaged ({META}: {problem}); skipping it", stacklevel=3)
                continue
            entries.append(Entry(path, meta))
    return sorted(entries, key=lambda entry: entry.order)


def _malformed(meta: Any) -> str | None:
    """What is wrong with the shape of a meta.json (None: the fields distaccum reads have their types)."""
    if not isinstance(meta, dict):
        return f"a {type(meta).__name__}, not an object"
    for field in ("step", "serial", "micro_step"):
        value = meta.get(field, None if field == "step" else 0)  # step is always written; the others since format 2
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{field} is {value!r}, not a count"
    if not isinstance(meta.get("plan", {}), dict):
        return "plan is not an object"
    listed = meta.get("files", {})
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        return "files is not a mapping of file names to sha256 digests"
    return None


def candidates(root: Path) -> list[Entry]:
    """Complete checkpoints in the order to try them: the one ``latest`` names, then the rest newest first."""
    entries = complete(root)
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    first = [entry for entry in entries if entry.path.name == named]
    if named is not None and not first and entries:
        warnings.warn(
            f"{root / LATEST} names {named!r}, which is not a complete checkpoint (a job killed while saving?); "
            f"using the newest complete one, {entries[-1].path.name}",
            stacklevel=3,
        )
    return first + [entry for entry in reversed(entries) if entry not in first]


def damage(entry: Entry) -> list[str]:
    """What is wrong with ``entry``'s files against the sha256 in its meta.json (format 1: nothing checked)."""
    problems = []
    for name, digest in entry.meta.get("files", {}).items():
        file = entry.path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(file) != digest:
            problems.append(f"{name} does not match its sha256 (truncated or corrupted)")
    return problems


def first_intact(found: list[Entry], directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The first intact checkpoint of ``found`` (each damaged one skipped with a warning): its path and meta.

    Raises:
        ValueError: none is intact (refusing to start over silently).
    """
    for entry in found:
        problems = damage(entry)
        if not problems:
            return entry.path, entry.meta
        warnings.warn(
            f"checkpoint {entry.path} is damaged ({'; '.join(problems)}); trying the previous one", stacklevel=3
        )
    raise ValueError(
        f"no checkpoint in {directory} is intact ({len(found)} found, all damaged; see the warnings): refusing "
        "to start over silently. Restore the directory from a backup, or remove it to train from scratch."
    )


def publish(root: Path, temporary: Path, name: str, meta: dict[str, Any], keep: int) -> Path:
    """Seal ``temporary`` (hashes, serial, meta.json), make it ``root/name``, name it in ``latest``, prune."""
    existing = complete(root)
    serial = 1 + max((entry.order[0] for entry in existing), default=0)
    files = sorted(path for path in temporary.rglob("*") if path.is_file())
    sealed = {**meta, "format": FORMAT_VERSION, "serial": serial}
    sealed["files"] = {str(path.relative_to(temporary)): _sha256(path) for path in files}
    (temporary / META).write_text(json.dumps(sealed, indent=1) + "\n")
    final = root / name
    replaced = root / f".replaced-{name}-{serial}"
    if final.exists():  # the same step saved again: keep the old one complete until the new one is named
        os.rename(final, replaced)
    os.rename(temporary, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    shutil.rmtree(replaced, ignore_errors=True)
    for old in complete(root)[:-keep]:
        if old.path != final:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def safe_load(path: Path) -> Any:
    """``torch.load`` of tensors and plain data only.

    Raises:
        ValueError: the file holds other objects (whose unpickling could run code); they were not loaded.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint file {path} holds objects other than tensors and plain data, which could run code when "
            "loaded; it was refused without loading them. Load only checkpoints you wrote, and keep data_state "
            f"to numbers, strings, lists, dicts and tensors. ({str(error).splitlines()[0]})"
        ) from None


def check_plain(value: Any, where: str = "data_state") -> None:
    """Refuse anything but tensors and plain data (what :func:`safe_load` can read back).

    Raises:
        ValueError: names the first offending entry and its type.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise ValueError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN):
        raise ValueError(
            f"{where} is a {type(value).__name__}: a checkpoint holds only tensors and plain data (numbers, strings, "
            "lists, dicts), which load without running code. Save what it needs to be rebuilt, e.g. its "
            "state_dict() or a step count."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
