"""The checkpoint directory on disk: atomic publication, integrity, the newest intact checkpoint, safe loading.

What :mod:`distaccum.checkpoint` puts in a checkpoint is its business; this module makes sure that whatever
happens to the job or the disk, a load either gets a complete, intact checkpoint or says why it cannot:

* **Publication.** A checkpoint is written under ``.tmp-<name>``, gets a ``meta.json`` with the sha256 and size
  of every file and a serial number (one more than any checkpoint there), is flushed to the disk (``fsync`` of
  every file and folder), renamed to ``<name>``, and only then named in ``latest`` (``os.replace``, flushed too);
  the next save removes what a killed one left (``.tmp-*``). Saving a step that exists already moves the old one
  aside first (``.replaced-<name>-<serial>``) and deletes it only after the new one is named: no moment without a
  complete checkpoint. Old checkpoints are pruned by serial, so a run that restarted at an earlier step never has
  its new checkpoints deleted in favour of the old run's later ones.
* **Choosing.** ``latest`` names the checkpoint to load; when it names nothing complete (a kill between two
  renames, a hand-edited directory), the complete checkpoint with the highest serial is used, with a warning.
  A checkpoint whose files do not match their sha256 (truncated, bit-flipped, missing) is skipped with a warning
  naming the file, in favour of the previous one; when none is intact, loading raises instead of starting over.
* **Safe loading.** Before a file is read, its checkpoint must pass :func:`damage`: the manifest lists every file
  under a plain relative name with its size and sha256, nothing else is there, nothing is a symlink, a FIFO or
  another user's, and every torch file is an uncompressed zip that fits in itself. Files are then read with
  ``torch.load(weights_only=True)`` (:func:`distaccum.checkpoint_trust.safe_load`): tensors and plain data only.
  ``data_state`` must be plain data for the same reason, checked when it is saved. A sharded checkpoint's
  ``.metadata`` and non-tensor entries are read by :mod:`distaccum.checkpoint_sharded` (exact globals,
  ``weights_only``), only for a sharded model. The threat model: :mod:`distaccum.checkpoint_trust`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distaccum import checkpoint_trust as trust

FORMAT_VERSION = 4
"""2 adds ``files`` (sha256 per file) and ``serial`` to meta.json; format 1 still loads, unverified. 3: mid-window,
each rank's ``grads-rank<r>.pt`` also holds that rank's own open-window state (:func:`rank_state`). 4 adds
``sizes`` (bytes per file, checked before a file is read) and, with a key, ``signature``."""
LATEST = "latest"
META = "meta.json"
STATE = "state.pt"


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
            checkpoint here" and training would silently start over), or another user controls it
            (:func:`distaccum.checkpoint_trust.check_root`).
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
    trust.check_root(root)
    return root


def rank_state(path: Path, meta: dict[str, Any], saved: dict[str, Any], world_size: int, rank: int) -> dict[str, Any]:
    """The accumulator state for ``rank``: rank 0's (``state.pt``), with this rank's own open window over it when
    the checkpoint is mid-window on this world size (another world size is refused by the accumulator).

    Raises:
        ValueError: a format-2 mid-window checkpoint of several ranks with ``num_items`` (see :func:`_old_window`).
    """
    if meta.get("grads_world_size") != world_size:
        return saved
    own = trust.safe_load(path / f"grads-rank{rank:05d}.pt")
    if isinstance(own, dict):  # format 3: {"grads": [...], "window": this rank's accumulator state}
        state = {**saved, **own["window"], "grads": own["grads"]}
    else:
        _old_window(path, saved, world_size)
        state = {**saved, "grads": own}
    if (path / f"batchnorm-rank{rank:05d}.pt").exists():
        state["window_batch_norm"] = trust.safe_load(path / f"batchnorm-rank{rank:05d}.pt")
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
    """Every complete checkpoint in ``root`` (one with a readable, well-formed meta.json), oldest first; one that is
    a symlink or whose meta.json is malformed is skipped with a warning (it must not stop ``load`` or ``save``)."""
    entries = []
    for path in sorted(root.glob("*step-*")) if root.is_dir() else []:
        if not path.name.startswith(("step-", ".replaced-step-")):
            continue
        if path.is_symlink():
            warnings.warn(f"checkpoint {path} is a symlink (it could lead outside {root}); skipping it", stacklevel=3)
            continue
        try:
            meta = json.loads(trust.read_bounded(path / META, trust.MAX_META_BYTES))
        except trust.Untrusted as error:
            warnings.warn(f"checkpoint {path} is damaged ({META}: {error}); skipping it", stacklevel=3)
            continue
        except (OSError, ValueError) as error:  # save writes meta.json before the rename: this is damage
            warnings.warn(f"checkpoint {path} is damaged ({META}: {error}); skipping it", stacklevel=3)
            continue
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
    return _first_problem(meta, _META_CHECKS)


def _first_problem(value: dict[str, Any], checks: tuple[Callable[[dict[str, Any]], str | None], ...]) -> str | None:
    """The problem the first of ``checks`` finds in ``value`` (None: none finds one). Each check may rely on the
    ones before it having passed."""
    for check in checks:
        problem = check(value)
        if problem is not None:
            return problem
    return None


def _counts_problem(meta: dict[str, Any]) -> str | None:
    # step is always written; the others since format 2
    for field, absent in (("step", None), ("serial", 0), ("micro_step", 0)):
        value = meta.get(field, absent)
        if not _is_count(value):
            return f"{field} is {value!r}, not a count"
    return None


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _plan_problem(meta: dict[str, Any]) -> str | None:
    if not isinstance(meta.get("plan", {}), dict):
        return "plan is not an object"
    return None


def _files_problem(meta: dict[str, Any]) -> str | None:
    listed = meta.get("files", {})
    if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        return "files is not a mapping of file names to sha256 digests"
    outside = [name for name in listed if not trust.plain_name(name) or name == META]
    if outside:
        return f"files names {outside[0]!r}, not a plain relative name inside the checkpoint"
    return None


def _sizes_problem(meta: dict[str, Any]) -> str | None:
    """After :func:`_files_problem`: ``files`` is a mapping."""
    listed = meta.get("files", {})
    sizes = meta.get("sizes", {name: 0 for name in listed})  # since format 4
    counts = isinstance(sizes, dict) and all(type(v) is int and v >= 0 for v in sizes.values())
    if not counts or set(sizes) != set(listed):
        return "sizes is not a byte count for each of its files"
    return None


def _signature_field_problem(meta: dict[str, Any]) -> str | None:
    if not isinstance(meta.get("signature", ""), str):
        return "signature is not a text"
    return None


_META_CHECKS = (_counts_problem, _plan_problem, _files_problem, _sizes_problem, _signature_field_problem)
"""What :func:`_malformed` checks of a meta.json, in this order."""


def candidates(root: Path) -> list[Entry]:
    """Complete checkpoints in the order to try them: the one ``latest`` names, then the rest newest first."""
    entries = complete(root)
    if not entries:
        _refuse_an_emptied_directory(root)
    named = _pointer(root)
    first = [entry for entry in entries if entry.path.name == named]
    if named is not None and not first and entries:
        warnings.warn(
            f"{root / LATEST} names {named!r}, which is not a complete checkpoint (a job killed while saving?); "
            f"using the newest complete one, {entries[-1].path.name}",
            stacklevel=3,
        )
    return first + [entry for entry in reversed(entries) if entry not in first]


def _refuse_an_emptied_directory(root: Path) -> None:
    """Raise when ``root`` once held a checkpoint but holds none intact now: a step-* folder is there, or ``latest``
    is (written only after a checkpoint was published). A first save killed before it published starts fresh."""
    if any(root.glob("step-*")):
        held = f"each step-* folder lacks a readable {META}; see the warnings"
    elif os.path.lexists(root / LATEST):
        held = f"{LATEST} is there but no step-* folder is: deleted?"
    else:
        return
    raise ValueError(
        f"no checkpoint in {root} is intact ({held}): refusing to start over silently. "
        "Restore the directory from a backup, or remove it to train from scratch."
    )


def _pointer(root: Path) -> str | None:
    """The name ``latest`` holds (None: there is none, or it is not a small regular file, with a warning)."""
    try:
        return trust.read_bounded(root / LATEST, trust.MAX_POINTER_BYTES).strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except trust.Untrusted as error:
        warnings.warn(f"{root / LATEST} is ignored: {error}", stacklevel=4)
        return None


def damage(entry: Entry, key: bytes | None = None) -> list[str]:
    """What is wrong with ``entry`` against its meta.json: a signature that does not verify with ``key``, a file
    that is missing, unlisted, not a regular file, of another size or sha256, a torch file that would allocate
    more than it holds. Nothing is followed or unpickled. Format 1 (no manifest): only the kinds of file."""
    signed = trust.signature_problem(entry.meta, key)
    if signed is not None:
        return [signed]
    present, problems = trust.inventory(entry.path)
    listed: dict[str, str] = entry.meta.get("files", {})
    sizes: dict[str, int] = entry.meta.get("sizes", {})
    if "files" in entry.meta:
        problems += [f"{name} is not in its manifest" for name in sorted(set(present) - set(listed) - {META})]
    for name, digest in listed.items():
        if name not in present:
            problems.append(f"{name} is missing")
        elif name in sizes and present[name] != sizes[name]:
            problems.append(f"{name} has {present[name]} bytes, its manifest says {sizes[name]}")
        elif trust.sha256(entry.path / name) != digest:
            problems.append(f"{name} does not match its sha256 (truncated or corrupted)")
        elif name.endswith(".pt"):
            problems += _torch_file_problems(entry.path / name)
    return problems


def _torch_file_problems(path: Path) -> list[str]:
    try:
        trust.check_torch_file(path)
    except trust.Untrusted as error:
        return [str(error)]
    return []


def first_intact(
    found: list[Entry], directory: str | os.PathLike[str], key: bytes | None = None, *, read_state: bool = False
) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """The first intact checkpoint of ``found`` (each damaged one skipped with a warning): its path, its meta and,
    with ``read_state``, its ``state.pt`` read (``weights_only``). With ``read_state`` a checkpoint whose files are
    intact but whose state is not (refused by the unpickler, damaged past torch's reader, fields missing: resealed
    by someone) counts as damaged too.

    Raises:
        ValueError: none is intact (refusing to start over silently).
    """
    for entry in found:
        problems = damage(entry, key)
        state = None
        if not problems and read_state:
            try:
                state = trust.safe_load(entry.path / STATE)
                problem = _shape_problem(state)
            except ValueError as error:
                problem = str(error)
            problems = [] if problem is None else [problem]
        if not problems:
            return entry.path, entry.meta, state
        warnings.warn(
            f"checkpoint {entry.path} is damaged ({'; '.join(problems)}); trying the previous one", stacklevel=3
        )
    signed = " or signed with another key" if key is not None else ""
    raise ValueError(
        f"no checkpoint in {directory} is intact ({len(found)} found, all damaged{signed}; see the warnings): "
        "refusing to start over silently. Restore the directory from a backup, or remove it to train from scratch."
    )


def _shape_problem(state: Any) -> str | None:
    """What is missing from a ``state.pt`` that save wrote (None: every field distaccum reads has its type)."""
    if not isinstance(state, dict):
        return f"{STATE} holds a {type(state).__name__}, not a dict"
    return _first_problem(state, _STATE_CHECKS)


_STATE_DICTS = ("model", "optimizer", "accumulator", "scheduler", "grad_scaler")
"""The fields of a ``state.pt`` that hold a dict, or None where the run had none (all but the accumulator)."""


def _fields_problem(state: dict[str, Any]) -> str | None:
    for field in _STATE_DICTS:
        value = state.get(field, ...)
        if not (isinstance(value, dict) or (value is None and field != "accumulator")):
            return f"{STATE} field {field} is {type(value).__name__ if value is not ... else 'missing'}"
    if not isinstance(state.get("data_state"), dict):
        return f"{STATE} field data_state is not a dict"
    return None


def _accumulator_problem(state: dict[str, Any]) -> str | None:
    """After :func:`_fields_problem`: the accumulator's state is a dict."""
    accumulator = state["accumulator"]
    counts = [accumulator.get(field) for field in ("optimizer_steps", "micro_step")]
    if not isinstance(accumulator.get("plan"), dict) or not all(type(count) is int for count in counts):
        return f"{STATE} accumulator state lacks its plan or step counts"
    return None


def _optimizer_problem(state: dict[str, Any]) -> str | None:
    """After :func:`_fields_problem`: the optimizer's state is a dict or None."""
    optimizer = state["optimizer"]
    if optimizer is None:
        return None
    groups = optimizer.get("param_groups")
    if not isinstance(optimizer.get("state"), dict) or not isinstance(groups, list):
        return f"{STATE} optimizer state lacks its state or param_groups"
    if not all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups):
        return f"{STATE} optimizer param_groups are not groups of params"
    if not all(type(param) is int for group in groups for param in group["params"]):
        return f"{STATE} optimizer param_groups name parameters by something other than their index"
    ids = {param for group in groups for param in group["params"]}
    if not all(isinstance(value, dict) and name in ids for name, value in optimizer["state"].items()):
        return f"{STATE} optimizer state names parameters its param_groups do not hold"
    return None


_STATE_CHECKS = (_fields_problem, _accumulator_problem, _optimizer_problem)
"""What :func:`_shape_problem` checks of a ``state.pt``, in this order."""


def remove_leftovers(root: Path) -> None:
    """Delete what saves killed midway left behind (``.tmp-*`` folders, a ``.latest.tmp``): never a checkpoint.
    A symlink is not followed (rmtree refuses one)."""
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)


def publish(root: Path, temporary: Path, name: str, meta: dict[str, Any], *, keep: int, key: bytes | None) -> Path:
    """Seal ``temporary`` (hashes, sizes, serial, a signature with ``key``, meta.json), flush it to the disk, make
    it ``root/name``, name it in ``latest``, prune. Every rename comes after the data it publishes is on disk."""
    existing = complete(root)
    serial = 1 + max((entry.order[0] for entry in existing), default=0)
    written = sorted(path for path in temporary.rglob("*") if path.is_file())
    names = [str(path.relative_to(temporary).as_posix()) for path in written]
    sealed = {**meta, "format": FORMAT_VERSION, "serial": serial}
    sealed["files"] = {name: trust.sha256(temporary / name) for name in names}
    sealed["sizes"] = {name: (temporary / name).stat().st_size for name in names}
    if key is not None:
        sealed["signature"] = trust.signature(sealed, key)
    (temporary / META).write_text(json.dumps(sealed, indent=1) + "\n")
    trust.sync_tree(temporary)
    final = root / name
    replaced = root / f".replaced-{name}-{serial}"
    if final.exists():  # the same step saved again: keep the old one complete until the new one is named
        os.rename(final, replaced)
    os.rename(temporary, final)
    trust.sync_file(root)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    trust.sync_file(pointer)
    os.replace(pointer, root / LATEST)
    trust.sync_file(root)
    shutil.rmtree(replaced, ignore_errors=True)
    for old in complete(root)[:-keep]:
        if old.path != final:
            shutil.rmtree(old.path, ignore_errors=True)
    return final
