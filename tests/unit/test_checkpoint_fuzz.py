"""Fuzzing a checkpoint directory (issue 25): whatever bytes and files end up in the newest checkpoint, load runs no
code, never hangs, and either restores one checkpoint completely or raises ValueError having changed nothing.

Each example copies a directory of two checkpoints (step 2, then step 3; signed with a key or not) and applies one to
four mutations to the newer checkpoint and ``latest``: bytes flipped, overwritten, inserted or deleted; a file
truncated, extended, deleted, replaced by a symlink (inside or outside the directory, to /dev/zero, to a FIFO) or by a
FIFO; an unlisted file added; ``state.pt`` replaced by a pickle that would create a marker file, or by a torch file
with one entry rewritten; a ``meta.json`` field rewritten with any JSON value (manifest names like ``../x`` and
``/etc/passwd`` included); and the manifest resealed as an attacker would (sha256 and sizes recomputed). Then

1. no code runs: the marker file never appears;
2. no load runs past ``LOAD_LIMIT_S``;
3. load restores one checkpoint exactly (the older, the newer, or, unsigned, where no authenticity is promised,
   exactly what the tampered newer one holds), or raises ValueError and leaves the model, the optimizer and the
   accumulator as they were; never another exception, and never None ("nothing to resume") while checkpoints are
   there;
4. the older checkpoint, untouched, is always found: ValueError is not an answer when only the newer one changed.

A second property lets the mutations hit both checkpoints and checks 1-3.

CI runs 600 + 300 derandomized examples (about 10 s; the profile names of ``test_properties.py``, read from
``HYPOTHESIS_PROFILE``); the soak runs 5,000 + 2,000 random ones:
``HYPOTHESIS_PROFILE=soak .venv/bin/python -m pytest tests/unit/test_checkpoint_fuzz.py``
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import faulthandler
import json
import os
import pickle
import re
import shutil
import signal
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distaccum import Accumulator, BatchPlan, checkpoint
from tests.helpers import attacks
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer

SOAK = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "soak"
# Per test, not a profile of our own: test_properties.py registers the profiles, and re-registering them here
# would change its example counts too.
FUZZ = settings(
    max_examples=5000 if SOAK else 600,
    derandomize=not SOAK,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BOTH_EXAMPLES = 2000 if SOAK else 300
TEST_TIMEOUT_S = 3600 if SOAK else 120
LOAD_LIMIT_S = 5.0
MICRO = 4
OLDER_STEP = 2
NEWER_STEP = 3
OLDER = f"step-{OLDER_STEP:08d}"
NEWER = f"step-{NEWER_STEP:08d}"
KEY = b"fuzz-key"
NEWER_TARGETS = (f"{NEWER}/state.pt", f"{NEWER}/meta.json", "latest", NEWER)
ALL_TARGETS = (*NEWER_TARGETS, f"{OLDER}/state.pt", f"{OLDER}/meta.json", OLDER)
META_FIELDS = (
    "step",
    "serial",
    "micro_step",
    "plan",
    "sharded",
    "grads_world_size",
    "engine_world_size",
    "optimizer_empty",
    "format",
    "files",
    "sizes",
    "signature",
)
ODD_NAMES = (
    "../x",
    "/etc/passwd",
    "../step-00000002/state.pt",
    "sub/../state.pt",
    "./state.pt",
    "state.pt/",
    "//state.pt",
    "",
    "..",
    "meta.json",
    "latest",
    "state.pt",
    "state.pt\x00",
)
UNLISTED_NAMES = (
    "extra.pt",
    "state.pt.bak",
    "sub/extra.pt",
    ".hidden",
    "grads-rank00000.pt",
    "batchnorm-rank00000.pt",
    "sharded/.metadata",
)
STATE_PATHS = (
    ("model",),
    ("model", "0.weight"),
    ("optimizer",),
    ("optimizer", "state"),
    ("optimizer", "param_groups"),
    ("accumulator",),
    ("accumulator", "optimizer_steps"),
    ("accumulator", "plan"),
    ("accumulator", "micro_step"),
    ("data_state",),
    ("scheduler",),
    ("grad_scaler",),
)
SYMLINK_DESTINATIONS = ("older", "outside-copy", "/etc/passwd", "/dev/zero", "outside-fifo", "dangling", "meta.json")
PAYLOADS = ("os.system", "builtins.exec", "Path.touch")
BYTE_EDITS = ("overwrite", "insert", "delete-bytes")


class Hang(BaseException):
    """A load ran past LOAD_LIMIT_S (a BaseException: no ``except Exception`` in the library swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after ``seconds`` (SIGALRM interrupts a blocking open or read); if even that
    is stuck in C, dump every stack and exit. pytest-timeout's own SIGALRM timer is put back afterwards."""

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"checkpoint.load ran past {seconds} s")

    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(4 * seconds, exit=True)
    start = time.monotonic()
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - start), 1e-3))


@dataclass(frozen=True)
class Record:
    """The training state a checkpoint was saved from."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    accumulator: dict[str, Any]
    data_state: dict[str, Any]


class Template:
    """A directory with the two checkpoints, copied for every example (a plain class: hypothesis prints a dataclass
    field by field, and the records are 60 kB of tensors)."""

    def __init__(self, root: Path, signed: bool, records: dict[int, Record]) -> None:
        self.root = root
        self.signed = signed
        self.records = records

    def __repr__(self) -> str:
        return f"Template({'signed' if self.signed else 'unsigned'}, steps {sorted(self.records)})"


def _objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Accumulator]:
    model = make_model(seed=seed)
    optimizer = make_optimizer("sgd", model.parameters())
    return model, optimizer, Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO))


def _record(model: torch.nn.Module, optimizer: torch.optim.Optimizer, acc: Accumulator, step: int) -> Record:
    return Record(
        model=copy.deepcopy(model.state_dict()),
        optimizer=copy.deepcopy(optimizer.state_dict()),
        accumulator=copy.deepcopy(acc.state_dict()),
        data_state={"step": step},
    )


def _build(root: Path, signed: bool) -> Template:
    model, optimizer, acc = _objects(seed=0)
    inputs, targets = make_data(2 * NEWER_STEP, MICRO)
    records = {}
    for index, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
        step = (index + 1) // 2
        if acc.stepped and step in (OLDER_STEP, NEWER_STEP):
            data_state = {"step": step}
            key = KEY if signed else None
            checkpoint.save(root, model=model, optimizer=optimizer, accumulator=acc, data_state=data_state, key=key)
            records[step] = _record(model, optimizer, acc, step)
    assert sorted(path.name for path in root.iterdir()) == ["latest", OLDER, NEWER]
    return Template(root=root, signed=signed, records=records)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Template]:
    base = tmp_path_factory.mktemp("fuzz-templates")
    return {signed: _build(base / f"signed-{signed}", signed) for signed in (False, True)}


@dataclass(frozen=True)
class Mutation:
    """One change to the directory; ``target`` is relative to the checkpoint root."""

    kind: str
    target: str
    offset: int = 0
    data: bytes = b""
    value: Any = None


@dataclass(frozen=True)
class Scene:
    """One example's directories: the checkpoint root, the marker a payload would create, files outside the root."""

    root: Path
    marker: Path
    outside: Path


def _regular(path: Path) -> bool:
    """A regular file, not a symlink: the only thing a mutation reads (a FIFO would block it)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:  # missing, or a symlink loop on the way
        return False


def _edit_bytes(path: Path, mutation: Mutation) -> None:
    if not _regular(path):
        return
    data = bytearray(path.read_bytes())
    where = mutation.offset % (len(data) + 1)
    if mutation.kind == "flip" and data:
        data[where % len(data)] ^= mutation.data[0]
    elif mutation.kind == "overwrite":
        data[where : where + len(mutation.data)] = mutation.data
    elif mutation.kind == "insert":
        data[where:where] = mutation.data
    elif mutation.kind == "delete-bytes":
        del data[where : where + max(1, len(mutation.data))]
    elif mutation.kind == "truncate":
        del data[where:]
    elif mutation.kind == "append":
        data += mutation.data
    path.write_bytes(bytes(data))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def _symlink(scene: Scene, path: Path, mutation: Mutation) -> None:
    relative = path.relative_to(scene.root)
    in_older = scene.root / OLDER / path.name if path.parent != scene.root else scene.root / OLDER
    destinations = {
        "older": in_older,  # the same file of the older checkpoint (for a folder or latest: the older folder)
        "outside-copy": scene.outside / relative,  # byte for byte the same file, outside the root
        "/etc/passwd": Path("/etc/passwd"),
        "/dev/zero": Path("/dev/zero"),
        "outside-fifo": scene.outside / "fifo",
        "dangling": scene.outside / "nothing-here",
        "meta.json": path.parent / "meta.json",
    }
    if not path.parent.is_dir():
        return
    _remove(path)
    path.symlink_to(destinations[mutation.value])


def _fifo(path: Path) -> None:
    if not path.parent.is_dir() or path.parent.is_symlink():
        return
    _remove(path)
    os.mkfifo(path)


def _unlisted(path: Path, mutation: Mutation) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    planted = path / mutation.value
    planted.parent.mkdir(parents=True, exist_ok=True)
    if not planted.exists():
        planted.write_bytes(mutation.data)


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _payload(scene: Scene, path: Path, mutation: Mutation) -> None:
    if not path.parent.is_dir() or path.parent.is_symlink():
        return
    name, nested = mutation.value
    exploit = {"os.system": _System, "builtins.exec": _Exec, "Path.touch": _Touch}[name](scene.marker)
    state = {"model": exploit, "data_state": {"step": NEWER_STEP}} if nested else exploit
    _remove(path)
    path.write_bytes(attacks.torch_zip(pickle.dumps(state, protocol=2)))


def _rewrite_state(path: Path, mutation: Mutation) -> None:
    """Rewrite (value given) or drop (None) one entry of a state.pt that torch still reads as plain data."""
    if not _regular(path):
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file any more: an attacker would write a fresh one, as the payload does
        return
    *parents, last = mutation.value[0]
    holder = state
    for part in parents:
        if not isinstance(holder, dict) or part not in holder:
            return
        holder = holder[part]
    if not isinstance(holder, dict):
        return
    if mutation.value[1] is None:
        holder.pop(last, None)
    else:
        holder[last] = mutation.value[1]
    torch.save(state, path)


def _meta(path: Path) -> dict[str, Any] | None:
    if not _regular(path):
        return None
    try:
        meta = json.loads(path.read_bytes())
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _rewrite_meta(path: Path, mutation: Mutation) -> None:
    meta = _meta(path)
    if meta is None:
        return
    field, value = mutation.value
    if mutation.kind == "meta-drop":
        meta.pop(field, None)
    elif mutation.kind == "meta-rename":  # the state.pt entry, digest and size kept, under another name
        for listing in ("files", "sizes"):
            if isinstance(meta.get(listing), dict) and "state.pt" in meta[listing]:
                meta[listing][field] = meta[listing].pop("state.pt")
    else:
        meta[field] = value
    path.write_text(json.dumps(meta))


def _replace_meta(path: Path, mutation: Mutation) -> None:
    if path.parent.is_dir() and not path.parent.is_symlink():
        _remove(path)
        path.write_text(json.dumps(mutation.value))


def _reseal(folder: Path) -> None:
    """What an attacker can do without the key: fix the manifest up for what the folder now holds."""
    if _meta(folder / "meta.json") is None or folder.is_symlink():
        return
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):  # a manifest too mangled to fix
        attacks.reseal(folder)


def apply(scene: Scene, mutation: Mutation) -> None:
    path = scene.root / mutation.target
    if path.parent != scene.root and path.parent.is_symlink():
        return  # writing through it would change the checkpoint it leads to, which this change does not target
    if mutation.kind in ("flip", *BYTE_EDITS, "truncate", "append"):
        _edit_bytes(path, mutation)
    elif mutation.kind == "delete":
        _remove(path)
    elif mutation.kind == "symlink":
        _symlink(scene, path, mutation)
    elif mutation.kind == "fifo":
        _fifo(path)
    elif mutation.kind == "unlisted":
        _unlisted(path, mutation)
    elif mutation.kind == "payload":
        _payload(scene, path, mutation)
    elif mutation.kind == "state-rewrite":
        _rewrite_state(path, mutation)
    elif mutation.kind in ("meta-field", "meta-drop", "meta-rename"):
        _rewrite_meta(path, mutation)
    elif mutation.kind == "meta-replace":
        _replace_meta(path, mutation)
    elif mutation.kind == "reseal":
        _reseal(path)
    else:
        raise AssertionError(mutation.kind)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
MANIFEST = st.dictionaries(
    st.sampled_from(ODD_NAMES) | st.text(max_size=6),
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64) | st.integers(-1, 10**7) | JSON,
    max_size=3,
)
SMALL_BYTES = st.binary(min_size=1, max_size=64)
FLIP_MASKS = st.integers(1, 255).map(lambda mask: bytes([mask]))  # the bits a flip changes


def _files_of(targets: tuple[str, ...], name: str) -> tuple[str, ...]:
    return tuple(target for target in targets if target.endswith(name))


def _folders_of(targets: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(target for target in targets if target in (OLDER, NEWER))


def mutations(targets: tuple[str, ...]) -> st.SearchStrategy[Mutation]:
    files = st.sampled_from(tuple(target for target in targets if target not in (OLDER, NEWER)))
    any_target = st.sampled_from(targets)
    states = st.sampled_from(_files_of(targets, "state.pt"))
    metas = st.sampled_from(_files_of(targets, "meta.json"))
    folders = st.sampled_from(_folders_of(targets))
    offsets = st.integers(0, 1 << 16)
    meta_value = st.tuples(st.sampled_from(META_FIELDS) | st.text(max_size=6), MANIFEST | JSON)
    state_value = st.tuples(st.sampled_from(STATE_PATHS), JSON)
    kinds = [
        st.builds(Mutation, st.just("flip"), files, offsets, FLIP_MASKS),
        st.builds(Mutation, st.sampled_from(BYTE_EDITS), files, offsets, SMALL_BYTES),
        st.builds(Mutation, st.just("truncate"), files, offsets),
        st.builds(Mutation, st.just("append"), files, data=SMALL_BYTES),
        st.builds(Mutation, st.just("delete"), any_target),
        st.builds(Mutation, st.just("symlink"), any_target, value=st.sampled_from(SYMLINK_DESTINATIONS)),
        st.builds(Mutation, st.just("fifo"), files),
        st.builds(Mutation, st.just("unlisted"), folders, data=SMALL_BYTES, value=st.sampled_from(UNLISTED_NAMES)),
        st.builds(Mutation, st.just("payload"), states, value=st.tuples(st.sampled_from(PAYLOADS), st.booleans())),
        st.builds(Mutation, st.just("state-rewrite"), states, value=state_value),
        st.builds(Mutation, st.just("state-rewrite"), states, value=st.tuples(st.sampled_from(STATE_PATHS), st.none())),
        st.builds(Mutation, st.just("meta-field"), metas, value=meta_value),
        st.builds(Mutation, st.just("meta-drop"), metas, value=st.tuples(st.sampled_from(META_FIELDS), st.none())),
        st.builds(Mutation, st.just("meta-rename"), metas, value=st.tuples(st.sampled_from(ODD_NAMES), st.none())),
        st.builds(Mutation, st.just("meta-replace"), metas, value=JSON),
        st.builds(Mutation, st.just("reseal"), folders),
    ]
    return st.one_of(kinds)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def same(left: Any, right: Any) -> bool:
    """Exact equality of nested state: tensors bit for bit, with their dtype and shape."""
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
            return False
        return left.dtype == right.dtype and left.shape == right.shape and torch.equal(_bits(left), _bits(right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same(left[key], right[key]) for key in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    return bool(left == right)


def _count(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _holds(model: torch.nn.Module, acc: Accumulator, data_state: Any, saved: Any) -> bool:
    """Whether the objects hold exactly what the torch file ``saved`` (a tampered state.pt) says."""
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        return False
    if not isinstance(saved.get("accumulator"), dict) or not same(data_state, saved.get("data_state")):
        return False
    if acc.optimizer_steps != _count(saved["accumulator"].get("optimizer_steps")):
        return False
    live = model.state_dict()
    written = saved["model"]
    if live.keys() != written.keys() or not all(isinstance(value, torch.Tensor) for value in written.values()):
        return False
    return all(same(live[name], written[name].to(live[name].dtype)) for name in live)


def _tampered(scene: Scene, folders: tuple[str, ...]) -> list[Any]:
    """What the mutated folders' state.pt files hold, read as the library reads them (after the marker check)."""
    held = []
    for folder in folders:
        path = scene.root / folder / "state.pt"
        if not _regular(path):
            continue
        with time_limit(LOAD_LIMIT_S), contextlib.suppress(Exception):
            held.append(torch.load(path, map_location="cpu", weights_only=True))
    return held


@dataclass(frozen=True)
class Outcome:
    """What a load did: the step it restored (None: a tampered checkpoint's own state), or the ValueError."""

    step: int | None
    error: ValueError | None


def _mutated_copy(
    template: Template, scratch: Path, changes: list[Mutation], reseal: bool
) -> tuple[Scene, tuple[str, ...]]:
    """A copy of ``template`` with ``changes`` applied (then, with ``reseal``, the manifest of every checkpoint they
    touched fixed up, as an attacker would), and the checkpoints they touched."""
    scene = Scene(root=scratch / "run", marker=scratch / "MARKER", outside=scratch / "outside")
    shutil.copytree(template.root, scene.root, symlinks=True)
    shutil.copytree(template.root, scene.outside, symlinks=True)
    os.mkfifo(scene.outside / "fifo")
    for change in changes:
        apply(scene, change)
    touched = tuple(sorted({change.target.split("/")[0] for change in changes} & {OLDER, NEWER}))
    for folder in touched if reseal else ():
        _reseal(scene.root / folder)
    return scene, touched


def _bounded_load(
    scene: Scene, template: Template, model: torch.nn.Module, optimizer: torch.optim.Optimizer, acc: Accumulator
) -> tuple[dict[str, Any] | None, ValueError | None]:
    """checkpoint.load under LOAD_LIMIT_S, its warnings (expected: every skip warns) ignored; any exception but
    ValueError propagates and fails the example."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with time_limit(LOAD_LIMIT_S):
                key = KEY if template.signed else None
                data_state = checkpoint.load(scene.root, model=model, optimizer=optimizer, accumulator=acc, key=key)
        except ValueError as refusal:
            return None, refusal
    return data_state, None


def fuzz_load(template: Template, changes: list[Mutation], reseal: bool) -> Outcome:
    """Load a copy of ``template`` mutated by ``changes`` and check properties 1-3; return what the load did."""
    with tempfile.TemporaryDirectory() as scratch:
        scene, touched = _mutated_copy(template, Path(scratch), changes, reseal)
        model, optimizer, acc = _objects(seed=5)
        before = _record(model, optimizer, acc, step=-1)
        data_state, error = _bounded_load(scene, template, model, optimizer, acc)
        assert not scene.marker.exists(), "the checkpoint ran code: the marker file was created"
        after = _record(model, optimizer, acc, step=-1)
        if error is not None:
            assert same(after.model, before.model), f"ValueError after the model was changed: {error}"
            assert same(after.optimizer, before.optimizer), f"ValueError after the optimizer was changed: {error}"
            assert same(after.accumulator, before.accumulator), f"ValueError after the accumulator changed: {error}"
            return Outcome(step=None, error=error)
        assert data_state is not None, "load found no checkpoint and returned None: training would start over"
        for step, record in template.records.items():
            exact = same(after.model, record.model) and same(after.optimizer, record.optimizer)
            if exact and same(after.accumulator, record.accumulator) and data_state == record.data_state:
                return Outcome(step=step, error=None)
        tampered = [] if template.signed else _tampered(scene, touched)
        assert any(_holds(model, acc, data_state, saved) for saved in tampered), (
            f"load returned {data_state!r} and optimizer_steps {acc.optimizer_steps}, but the objects hold neither "
            "checkpoint exactly (a partial restore, or a tampered checkpoint loaded despite its signature)"
        )
        return Outcome(step=None, error=None)


RUN_MISMATCH = re.compile(
    r"does not fit this model and optimizer|holds a sharded|holds a replicated|holds (a|no) DeepSpeed engine"
    r"|has (no|a) (scheduler|grad_scaler) state|has an empty grad_scaler state|saved by \d+ rank"
    r"|batch|plan|schedule|mid-window"
)
"""The refusals of a checkpoint that belongs to another kind of run (distaccum.checkpoint_fit, the plan checks)."""


@pytest.mark.timeout(TEST_TIMEOUT_S)
@FUZZ
@given(signed=st.booleans(), changes=st.lists(mutations(NEWER_TARGETS), min_size=1, max_size=4), reseal=st.booleans())
def test_a_mutated_newest_checkpoint_loads_an_intact_one(
    templates: dict[bool, Template], signed: bool, changes: list[Mutation], reseal: bool
) -> None:
    outcome = fuzz_load(templates[signed], changes, reseal)
    # Unsigned, anyone who can write the directory can make the newest checkpoint look like another run's (its kind in
    # meta.json, its tensors' names and shapes in a resealed state.pt): load then refuses it as it refuses a user's
    # wrong model, naming the mismatch, and changes nothing (checked above). Signed, it falls back.
    mismatch = outcome.error is not None and not signed and RUN_MISMATCH.search(str(outcome.error)) is not None
    assert outcome.error is None or mismatch, f"load raised although {OLDER} is intact: ValueError({outcome.error})"


@pytest.mark.timeout(TEST_TIMEOUT_S)
@settings(FUZZ, max_examples=BOTH_EXAMPLES)
@given(signed=st.booleans(), changes=st.lists(mutations(ALL_TARGETS), min_size=1, max_size=4), reseal=st.booleans())
def test_mutated_checkpoints_load_one_completely_or_refuse_untouched(
    templates: dict[bool, Template], signed: bool, changes: list[Mutation], reseal: bool
) -> None:
    fuzz_load(templates[signed], changes, reseal)
