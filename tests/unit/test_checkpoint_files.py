"""Checkpoints on disk: a kill at any point of save, damaged files, crafted pickles and full disks never lose the
last intact checkpoint and never silently restart training from step 0."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distaccum import Accumulator, BatchPlan, checkpoint
from distaccum import checkpoint_files as files
from distaccum import checkpoint_sharded as sharded_files
from distaccum import checkpoint_trust as trust
from tests.helpers import attacks
from tests.helpers.common import loss_fn, make_data, make_model, make_optimizer

MICRO = 4


class Killed(BaseException):
    """The process died here: nothing after this point runs (BaseException: no `except Exception` catches it)."""


def trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Accumulator]:
    model = make_model()
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO))
    inputs, targets = make_data(2 * steps, MICRO)
    for x, y in zip(inputs, targets, strict=True):
        with acc.micro_step():
            acc.backward(loss_fn(model(x), y))
    return model, optimizer, acc


def save(directory: Path, steps: int) -> dict[str, torch.Tensor]:
    model, optimizer, acc = trained(steps)
    checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc, data_state={"step": steps}, keep=2)
    return {k: v.clone() for k, v in model.state_dict().items()}


def load(directory: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    model = make_model(seed=5)
    optimizer = make_optimizer("sgd", model.parameters())
    acc = Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO))
    data_state = checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc)
    return data_state, model.state_dict()


@contextlib.contextmanager
def kill_at(call: int, counter: list[int]) -> Iterator[None]:
    """Count every filesystem write of save(); at ``call`` (and ever after) the process is dead."""
    targets = [(os, "rename"), (os, "replace"), (shutil, "rmtree"), (torch, "save"), (Path, "write_text")]
    targets += [(Path, "mkdir"), (Path, "rename")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def wrap(original):
        def dying(*args, **kwargs):
            counter[0] += 1
            if counter[0] >= call:
                raise Killed
            return original(*args, **kwargs)

        return dying

    for owner, name, original in originals:
        setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def writes_in_one_save(tmp_path: Path, steps: int) -> int:
    counter = [0]
    with kill_at(10**9, counter):
        save(tmp_path / "count", steps)
    return counter[0]


@pytest.mark.parametrize("same_step", [False, True], ids=["next-step", "same-step-again"])
def test_a_kill_at_any_point_of_save_leaves_an_intact_checkpoint_to_resume(tmp_path: Path, same_step: bool) -> None:
    second = 2 if same_step else 3
    writes = writes_in_one_save(tmp_path, second)
    assert writes >= 6  # mkdir, torch.save, meta, renames, pointer, prune: every one is a kill point
    for call in range(1, writes + 1):
        directory = tmp_path / f"kill-{call}"
        save(directory, 2)
        with contextlib.suppress(Killed), kill_at(call, [0]):
            save(directory, second)
        data_state, weights = load(directory)
        assert data_state is not None, f"killed at write {call}: training would restart from step 0"
        assert data_state["step"] in (2, second), call
        expected = save_weights_of(data_state["step"])  # training is deterministic: the weights of that step
        assert all(torch.equal(weights[k], expected[k]) for k in expected), call


def save_weights_of(steps: int) -> dict[str, torch.Tensor]:
    model, _, _ = trained(steps)
    return model.state_dict()


def test_a_restarted_run_keeps_its_new_checkpoints_when_pruning(tmp_path: Path) -> None:
    for steps in (3, 4):
        save(tmp_path, steps)
    save(tmp_path, 2)  # a run that restarted earlier: its checkpoint is the newest, whatever its step number
    assert (tmp_path / "step-00000002").is_dir() and checkpoint.latest(tmp_path) == tmp_path / "step-00000002"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "missing-file", "latest-names-missing"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_intact_one(tmp_path: Path, damage: str) -> None:
    save(tmp_path, 2)
    good_weights = save_weights_of(2)
    save(tmp_path, 3)
    newest = tmp_path / "step-00000003"
    state = newest / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "flipped-byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "missing-file":
        state.unlink()
    else:
        shutil.rmtree(newest)
    expected = r"damaged \(state.pt" if damage != "latest-names-missing" else r"not a complete checkpoint"
    with pytest.warns(UserWarning, match=expected):
        data_state, weights = load(tmp_path)
    assert data_state == {"step": 2}
    assert all(torch.equal(weights[k], good_weights[k]) for k in good_weights)


def test_when_no_checkpoint_is_intact_load_refuses_to_start_over(tmp_path: Path) -> None:
    save(tmp_path, 2)
    (tmp_path / "step-00000002" / "state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(ValueError, match=r"no checkpoint .* is intact"):
        load(tmp_path)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    save(tmp_path, 2)
    marker = tmp_path / "pwned"
    final = tmp_path / "step-00000002"
    (final / "state.pt").write_bytes(attacks.torch_zip(pickle.dumps({"model": _Exploit(str(marker))})))
    attacks.reseal(final, "state.pt")  # an attacker who also fixes the sha256 and the size
    refused = r"state.pt holds objects other than tensors and plain data.*refused without loading them"
    with pytest.warns(UserWarning, match=refused), pytest.raises(ValueError, match=r"no checkpoint .* is intact"):
        load(tmp_path)  # the only checkpoint: refused, not started over
    assert not marker.exists(), "the pickle ran code"


def test_data_state_must_be_plain_data(tmp_path: Path) -> None:
    model, optimizer, acc = trained(2)
    with pytest.raises(ValueError, match=r"data_state\['sampler'\] is a Generator: a checkpoint holds only tensors"):
        checkpoint.save(
            tmp_path, model=model, optimizer=optimizer, accumulator=acc, data_state={"sampler": torch.Generator()}
        )
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "nothing may be written"


def test_a_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, 2)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:10])  # what reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 3)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]
    data_state, _ = load(tmp_path)
    assert data_state == {"step": 2}


def test_a_format_1_checkpoint_still_loads(tmp_path: Path) -> None:
    save(tmp_path, 2)
    meta_path = tmp_path / "step-00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("files", "sizes", "serial"):
        del meta[key]
    meta["format"] = 1
    meta_path.write_text(json.dumps(meta))
    data_state, weights = load(tmp_path)
    assert data_state == {"step": 2}
    assert all(torch.equal(weights[k], v) for k, v in save_weights_of(2).items())


def test_a_crafted_sharded_metadata_is_refused_before_dcp_unpickles_it(tmp_path: Path) -> None:
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)

    def sharded() -> tuple[torch.nn.Module, torch.optim.Optimizer, Accumulator]:
        model = fully_shard(make_model(), mesh=init_device_mesh("cpu", (1,)))
        optimizer = make_optimizer("sgd", model.parameters())
        return model, optimizer, Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO))

    model, optimizer, acc = sharded()
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc)
    final = directory / "step-00000000"
    sharded_files.read_metadata(final / "sharded")  # DCP's real metadata passes
    assert checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc) == {}
    marker = tmp_path / "pwned"
    with (final / "sharded" / ".metadata").open("wb") as file:
        pickle.dump(_Exploit(str(marker)), file)
    attacks.reseal(final, "sharded/.metadata")
    with pytest.raises(ValueError, match=r"\.metadata holds objects other than checkpoint metadata"):
        checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc)
    assert not marker.exists(), "the pickle ran code"


def _dotted_global_pickle(marker: Path) -> bytes:
    """Protocol 4: STACK_GLOBAL of a module the old allowlist admitted by prefix and the dotted name ``os.system``
    (resolved attribute by attribute from that module), called on ``touch marker`` (issue 25, attack 1)."""

    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data

    module, name, command = "torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(command) + b"\x85" + b"R" + b"."


def _one_rank_fsdp2(tmp_path: Path):
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not torch_dist.is_initialized():
        torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    model = fully_shard(make_model(), mesh=init_device_mesh("cpu", (1,)))
    optimizer = make_optimizer("adam", model.parameters())
    return model, optimizer, Accumulator(model, optimizer, BatchPlan(accum_steps=2, micro_batch_size=MICRO))


def _trained_fsdp2_checkpoint(tmp_path: Path) -> tuple[tuple, Path, Path]:
    model, optimizer, acc = _one_rank_fsdp2(tmp_path)
    x, y = make_data(1, MICRO)
    for _ in range(2):
        with acc.micro_step():
            acc.backward(loss_fn(model(x[0]), y[0]))
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc)
    return (model, optimizer, acc), directory, directory / "step-00000001"


def test_a_dotted_global_in_sharded_metadata_runs_nothing(tmp_path: Path) -> None:
    # Issue 25, attack 1: the allowlist admitted any global whose module started with torch.distributed.checkpoint.,
    # and the unpickler followed the dotted name from there to os.system: it ran on load.
    (model, optimizer, acc), directory, final = _trained_fsdp2_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (final / "sharded" / ".metadata").write_bytes(_dotted_global_pickle(marker))
    attacks.reseal(final, "sharded/.metadata")
    with pytest.raises(ValueError, match=r"\.metadata holds objects other than checkpoint metadata.*not allowed"):
        checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc)
    assert not marker.exists(), "the pickle ran code"


@pytest.mark.parametrize("slice_change", ["outside", "past-the-end", "transform"])
def test_a_sharded_metadata_pointing_outside_its_files_is_refused_before_anything_is_read(
    tmp_path: Path, slice_change: str
) -> None:
    # DCP reads each slice at the relative path, offset and length its .metadata names: an attacker's metadata could
    # make it read any file (a content oracle), past a file's end, or through a decompressing transform (a bomb).
    (model, optimizer, acc), directory, final = _trained_fsdp2_checkpoint(tmp_path)
    metadata = sharded_files.read_metadata(final / "sharded")
    info = next(iter(metadata.storage_data.values()))
    if slice_change == "outside":
        info.relative_path = "../../../../etc/passwd"
    elif slice_change == "past-the-end":
        info.length = 1 << 40
    else:
        info.transform_descriptors = ["zstd"]
    with (final / "sharded" / ".metadata").open("wb") as file:
        pickle.dump(metadata, file)
    attacks.reseal(final, "sharded/.metadata")
    before = [p.detach().clone() for p in model.parameters()]
    steps = acc.optimizer_steps
    expected = {"outside": "not a plain file name", "past-the-end": "bytes 0..", "transform": "a transform"}
    with pytest.raises(ValueError, match=re.escape(expected[slice_change])):
        checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc)
    assert acc.optimizer_steps == steps
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_sharded_checkpoint_meeting_a_plain_model_reads_nothing_of_its_shards(tmp_path: Path) -> None:
    # Issue 25, attack 1 as reported: a plain model, meta.json saying "sharded": the sharded check ran anyway.
    model, optimizer, acc = trained(1)
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc)
    final = next(directory.glob("step-*"))
    marker = tmp_path / "pwned"
    (final / "sharded").mkdir()
    (final / "sharded" / ".metadata").write_bytes(_dotted_global_pickle(marker))
    meta = json.loads((final / "meta.json").read_text())
    meta["sharded"] = True
    (final / "meta.json").write_text(json.dumps(meta))
    attacks.reseal(final, "sharded/.metadata")
    with pytest.raises(ValueError, match=r"holds a sharded \(FSDP\) model's state but model is a replicated"):
        checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc)
    assert not marker.exists(), "the pickle ran code"


def test_a_crafted_non_tensor_entry_of_a_sharded_checkpoint_runs_nothing(tmp_path: Path) -> None:
    # DCP loads the non-tensor entries (the optimizer's param groups) with torch.load(weights_only=False).
    _, directory, final = _trained_fsdp2_checkpoint(tmp_path)
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = sharded_files.read_metadata(final / "sharded")  # our own checkpoint's: safe to rewrite
    index = next(i for i, meta in metadata.state_dict_metadata.items() if i.endswith(".lr"))
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_Exploit(str(marker)), buffer)  # as DCP writes a non-tensor entry: torch.save's format
    payload = buffer.getvalue()
    storage = next(key for key in metadata.storage_data if key.fqn == index)
    data_file = final / "sharded" / metadata.storage_data[storage].relative_path
    offset = data_file.stat().st_size
    with data_file.open("ab") as file:
        file.write(payload)
    metadata.storage_data[storage] = _StorageInfo(data_file.name, offset, len(payload))
    with (final / "sharded" / ".metadata").open("wb") as file:
        pickle.dump(metadata, file)
    attacks.reseal(final, "sharded/.metadata")
    attacks.reseal(final, f"sharded/{data_file.name}")
    fresh = _one_rank_fsdp2(tmp_path)
    before = [p.detach().clone() for p in fresh[0].parameters()]
    # Refused before dcp.load (inside it, DCP raised a CheckpointException, a BaseException, after the model changed)
    with pytest.raises(ValueError, match=r"an entry that holds objects other than tensors.*refused without loading"):
        checkpoint.load(directory, model=fresh[0], optimizer=fresh[1], accumulator=fresh[2])
    assert not marker.exists(), "the pickle ran code"
    assert all(torch.equal(a, b) for a, b in zip(before, fresh[0].parameters(), strict=True))


@pytest.mark.parametrize(
    "planted",
    [{"serial": "x", "step": 9}, {"serial": 99, "step": -1}, [1, 2], {"serial": 99, "step": 9, "files": ["a"]}],
    ids=["serial-text", "negative-step", "a-list", "files-list"],
)
def test_a_malformed_meta_json_is_skipped_and_never_stops_load_or_save(tmp_path: Path, planted) -> None:
    # Issue 25, attack 7: one planted meta.json with "serial": "x" made both load and save of the intact run crash.
    model, optimizer, acc = trained(1)
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc)
    planted_dir = directory / "step-00000009"
    planted_dir.mkdir()
    (planted_dir / "meta.json").write_text(json.dumps(planted))
    with pytest.warns(UserWarning, match=r"step-00000009 is damaged \(meta.json: .*\); skipping it"):
        assert checkpoint.load(directory, model=model, optimizer=optimizer, accumulator=acc) == {}
    with pytest.warns(UserWarning, match=r"step-00000009 is damaged"):
        saved = checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc)
    assert saved.name == "step-00000001" and (saved / "meta.json").is_file()


def _format_2_mid_window(directory: Path) -> Path:
    """A mid-window checkpoint as distaccum wrote it before format 3: the gradients file holds the list only."""
    model, optimizer, acc = trained(1)
    x, y = make_data(1, MICRO, seed=7)
    with acc.micro_step():
        acc.backward(loss_fn(model(x[0]), y[0]), num_items=MICRO)
    path = checkpoint.save(directory, model=model, optimizer=optimizer, accumulator=acc, include_grads=True)
    grads_file = path / "grads-rank00000.pt"
    torch.save(torch.load(grads_file, weights_only=True)["grads"], grads_file)
    attacks.reseal(path, grads_file.name)
    meta = json.loads((path / files.META).read_text())
    meta["format"] = 2
    (path / files.META).write_text(json.dumps(meta))
    return path


def test_a_format_2_mid_window_checkpoint_of_one_rank_still_loads(tmp_path: Path) -> None:
    path = _format_2_mid_window(tmp_path)
    model = make_model(seed=5)
    acc = Accumulator(
        model, make_optimizer("sgd", model.parameters()), BatchPlan(accum_steps=2, micro_batch_size=MICRO)
    )
    checkpoint.load(tmp_path, model=model, optimizer=acc.optimizer, accumulator=acc)
    assert acc.micro_step_in_window == 1 and all(p.grad is not None for p in model.parameters())
    assert acc._window.items == MICRO and path.name == "step-00000001-micro-0001"


def test_a_format_2_mid_window_checkpoint_of_several_ranks_is_refused_with_num_items(tmp_path: Path) -> None:
    path = _format_2_mid_window(tmp_path)
    saved = trust.safe_load(path / "state.pt")["accumulator"]
    meta = {"grads_world_size": 2}
    with pytest.raises(ValueError, match=r"with num_items on 2 ranks by a distaccum that saved rank 0's window item"):
        files.rank_state(path, meta, saved, 2, 0)
    with pytest.warns(UserWarning, match=r"the weights resume exactly, but last_step.loss of this step counts rank 0"):
        files.rank_state(path, meta, {**saved, "window_mode": "mean"}, 2, 0)
