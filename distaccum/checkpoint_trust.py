"""The checkpoint directory as a trust boundary: what is read from it, how much, and whether it is ours.

The threat model (the README and :mod:`distaccum.checkpoint` link here). Someone else may control what a
checkpoint directory holds: a crafted file, a swapped folder, a symlink, a FIFO. Whatever it holds,
:func:`distaccum.checkpoint.load` promises

* **no code runs**: every file is read by torch's ``weights_only`` unpickler (tensors and plain data), with an
  explicit list of exact classes where a format needs one (DCP's metadata, DeepSpeed's state classes), never a
  full unpickler;
* **no file outside the checkpoint is read**: no symlink is followed anywhere inside a checkpoint, manifest names
  are plain relative names, and only regular files are opened (a FIFO or device is never opened);
* **bounded memory and time**: every file's size is checked against its manifest before it is read, a torch file
  must be an uncompressed zip whose records fit in the file (no zip bomb, no record shared by two tensors), and
  ``latest`` and ``meta.json`` are read up to a small limit;
* **a clear refusal or a fallback**: a checkpoint that breaks any rule is skipped with a warning that names the
  path, for the previous intact one; when none is intact, loading raises rather than starting over;
* **the directory is ours**: like ssh with ``~/.ssh``, a checkpoint root owned by another user or writable by
  others is refused (group-writable is warned about), as is a file inside a checkpoint owned by another user.

What it does not promise without a key: **authenticity**. The sha256 of each file sits in the same directory as
the files, so it catches corruption, not tampering: whoever can write the directory can change weights and
recompute the hashes. With ``key=`` (or the environment variable :data:`KEY_VARIABLE`), ``save`` signs the
manifest with HMAC-SHA256 and ``load`` skips every checkpoint that is unsigned or whose signature does not match.
Even then an older signed checkpoint of the same key can be put back (a rollback) and is loaded: keep the key
per run if that matters. A checkpoint is also not private: anyone who can read it can read the weights.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

KEY_VARIABLE = "DISTACCUM_CHECKPOINT_KEY"
"""The environment variable :func:`key_bytes` reads when no ``key=`` is given: its text (UTF-8) is the key."""
MAX_POINTER_BYTES = 4096
"""What ``latest`` may hold: one checkpoint name."""
MAX_META_BYTES = 1 << 20
"""What a ``meta.json`` may hold: a plan, a few counts and one line per file."""
_NAME_PART = re.compile(r"[A-Za-z0-9_.-]+")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class Untrusted(ValueError):
    """A checkpoint file or folder that breaks a rule of the threat model (the message names it and the rule)."""


def key_bytes(key: bytes | str | None) -> bytes | None:
    """The signing key: ``key``, else the environment variable :data:`KEY_VARIABLE`, else None (no signing)."""
    if key is None:
        key = os.environ.get(KEY_VARIABLE) or None
    if isinstance(key, str):
        key = key.encode()
    if key is not None and not key:
        raise ValueError("checkpoint key is empty: pass key=None for no signature, or a secret of some length")
    return key


def signature(meta: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of ``meta`` (without its own ``signature`` field) in a canonical JSON form."""
    unsigned = {field: value for field, value in meta.items() if field != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def signature_problem(meta: dict[str, Any], key: bytes | None) -> str | None:
    """Why ``meta`` is not signed with ``key`` (None: it is, or no key is asked for)."""
    if key is None:
        return None
    signed = meta.get("signature")
    if not isinstance(signed, str):
        return "it is not signed (saved without the key), and a key was given"
    if not hmac.compare_digest(signed, signature(meta, key)):
        return "its signature does not match (tampered with, or signed with another key)"
    return None


def check_root(root: Path) -> None:
    """Refuse a checkpoint root another user controls (owner, or write permission for others); warn when the
    group may write it. A root that does not exist yet is fine: :func:`distaccum.checkpoint.save` creates it.

    Raises:
        ValueError: names the root, its owner or mode, and the fix.
    """
    if not hasattr(os, "geteuid"):
        return  # no POSIX owners here
    try:
        found = root.stat()  # the root itself may be a symlink: the user named it
    except FileNotFoundError:
        return
    me = os.geteuid()
    if found.st_uid != me:
        raise ValueError(
            f"checkpoint directory {str(root)!r} is owned by uid {found.st_uid}, and this process runs as uid {me}: "
            "its owner could plant files that this run then loads. Use a directory you own "
            f"(`chown {me} {root}`, or a fresh one)."
        )
    if found.st_mode & stat.S_IWOTH:
        raise ValueError(
            f"checkpoint directory {str(root)!r} is writable by every user (mode {stat.filemode(found.st_mode)}): "
            f"anyone could plant files that this run then loads. Restrict it: `chmod o-w {root}`."
        )
    if found.st_mode & stat.S_IWGRP:
        warnings.warn(
            f"checkpoint directory {str(root)!r} is writable by its group (mode {stat.filemode(found.st_mode)}): "
            f"group members can change what this run loads (no code runs, but weights can). `chmod g-w {root}` "
            "if they should not; pass key= to refuse checkpoints you did not sign.",
            stacklevel=4,
        )


def plain_name(name: Any) -> bool:
    """Whether ``name`` is a relative name inside a checkpoint: parts of letters, digits and ``._-``, no ``..``."""
    if not isinstance(name, str) or not name or len(name) > 512:
        return False
    return all(_NAME_PART.fullmatch(part) and part not in (".", "..") for part in name.split("/"))


def read_bounded(path: Path, limit: int) -> str:
    """The text of the regular file ``path`` (not a symlink, FIFO or device), at most ``limit`` bytes.

    Raises:
        FileNotFoundError: there is none.
        Untrusted: it is not a regular file, is larger, or is not UTF-8.
    """
    descriptor = _open_regular(path)
    with os.fdopen(descriptor, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Untrusted(f"{path.name} is larger than {limit} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise Untrusted(f"{path.name} is not UTF-8 text") from None


def sha256(path: Path) -> str:
    """The sha256 of the regular file ``path``, read without following a symlink or opening a FIFO."""
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_regular(path: Path) -> int:
    """An open descriptor of ``path`` if it is a regular file (O_NOFOLLOW, O_NONBLOCK: a FIFO never blocks)."""
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise Untrusted(f"{path.name} cannot be opened as a regular file ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise Untrusted(f"{path.name} is not a regular file")
    return descriptor


def inventory(folder: Path) -> tuple[dict[str, int], list[str]]:
    """Every regular file under ``folder`` (relative name -> size) and what breaks the rules: a symlink, anything
    but files and folders, an entry owned by another user. Nothing is followed or opened."""
    sizes: dict[str, int] = {}
    problems: list[str] = []
    me = os.geteuid() if hasattr(os, "geteuid") else None
    top = folder.lstat()
    if not stat.S_ISDIR(top.st_mode):
        return sizes, [f"{folder.name} is a {_kind(top.st_mode)}, not a folder (refused: it could lead outside)"]
    pending = [folder]
    while pending:
        current = pending.pop()
        for entry in sorted(os.scandir(current), key=lambda item: item.name):
            found = entry.stat(follow_symlinks=False)
            name = Path(entry.path).relative_to(folder).as_posix()
            if me is not None and found.st_uid != me:
                problems.append(f"{name} is owned by uid {found.st_uid}, not this user ({me})")
            elif stat.S_ISDIR(found.st_mode):
                pending.append(Path(entry.path))
            elif stat.S_ISREG(found.st_mode):
                sizes[name] = found.st_size
            else:
                problems.append(f"{name} is a {_kind(found.st_mode)} (only regular files and folders are read)")
    return sizes, problems


def _kind(mode: int) -> str:
    kinds = {stat.S_ISLNK: "symlink", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket", stat.S_ISREG: "regular file"}
    return next((label for test, label in kinds.items() if test(mode)), "device or other special file")


def check_torch_file(path: Path) -> None:
    """Refuse a file ``torch.load`` would allocate more for than the file holds (see :func:`check_torch_stream`).

    Raises:
        Untrusted: names the file and the rule.
    """
    with os.fdopen(_open_regular(path), "rb") as file:
        check_torch_stream(file, os.fstat(file.fileno()).st_size, path.name)


def check_torch_stream(stream: IO[bytes], size: int, label: str) -> None:
    """Refuse ``stream`` (``size`` bytes) unless it is torch's zip format with every record stored uncompressed
    and all records together no larger than the stream: a zip bomb allocates gigabytes from a kilobyte, and the
    legacy format sizes its storages from the pickle alone. Reads only the zip's directory.

    Raises:
        Untrusted: names ``label`` and the rule.
    """
    start = stream.tell()
    header = stream.read(4)
    stream.seek(start)
    if header != b"PK\x03\x04":  # what torch.load itself tests to take the zip path: a legacy file with a zip
        raise Untrusted(f"{label} is not a torch zip file (torch.save writes one)")  # appended passes ZipFile
    try:
        records = zipfile.ZipFile(stream).infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise Untrusted(f"{label} is not a torch zip file (torch.save writes one)") from None
    compressed = [record.filename for record in records if record.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise Untrusted(f"{label} has compressed records ({compressed[0]}); torch.save stores them uncompressed")
    claimed = sum(max(record.file_size, record.compress_size) for record in records)
    if claimed > size:
        raise Untrusted(f"{label} has records of {claimed} bytes in all, more than its {size}")


class FileSlice(io.RawIOBase):
    """Bytes ``offset`` to ``offset + length`` of an open binary ``file``, as a seekable file of its own (for
    :func:`check_torch_stream` of one DCP slice; DCP's own view seeks wrongly from the end)."""

    def __init__(self, file: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self.file, self.offset, self.length = file, offset, length
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.length}[whence]
        self.position = min(max(base + offset, 0), self.length)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.length - self.position)
        self.file.seek(self.offset + self.position)
        data = self.file.read(wanted)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def sync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (before the rename that publishes it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to the disk."""
    for current, _, names in os.walk(folder):
        for name in names:
            sync_file(Path(current) / name)
        sync_file(Path(current))  # a folder's entries (the names of its files) are data too


def safe_load(path: Path) -> Any:
    """``torch.load`` of tensors and plain data only.

    Raises:
        ValueError: the file holds other objects (whose unpickling could run code; they were not loaded), breaks a
            rule of :func:`check_torch_file`, is missing, or is damaged in a way torch's reader trips over.
    """
    try:
        check_torch_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Untrusted as error:
        raise ValueError(f"checkpoint file {path} was refused without loading it: {error}") from None
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint file {path} holds objects other than tensors and plain data, which could run code when "
            "loaded; it was refused without loading them. Load only checkpoints you wrote, and keep data_state "
            f"to numbers, strings, lists, dicts and tensors. ({refusal_reason(error)})"
        ) from None
    except (OSError, RuntimeError, EOFError, TypeError, KeyError, IndexError, AttributeError) as error:
        # torch's zip reader and weights_only rebuilders on bytes that passed the sha256 (resealed by someone)
        raise ValueError(
            f"checkpoint file {path} is damaged: torch.load failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
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


def refusal_reason(error: Exception) -> str:
    """The unpickler's own first sentence on why it refused a file, without torch's advice to unpickle it in full."""
    # torch wraps the unpickler's message in its advice: before it (marked), after a blank line, or first.
    text = str(error).split("\n\nCheck the documentation of torch.load", 1)[0]
    for marker in ("WeightsUnpickler error: ", "\n\n"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    lines = text.removeprefix("Weights only load failed. ").strip().splitlines()
    if not lines:
        return type(error).__name__
    return lines[0].split(". ", 1)[0].rstrip(".")
