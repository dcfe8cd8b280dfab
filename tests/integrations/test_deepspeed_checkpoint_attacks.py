"""Crafted DeepSpeed engine files (issue 25, attacks 2 and 3) are refused and run nothing, on a real engine.

Attack 2: ``deepspeed/engine`` swapped for a symlink to a folder outside the checkpoint whose model states run
``exec`` when unpickled in full. Attack 3: an optimizer shard whose pickle names only globals ``weights_only``
allows (``collections.Counter``, ``builtins.set``) but BUILDs ``Counter.most_common = set`` for the whole process.
Each runs twice: through ``checkpoint_engine.load`` as it is, and with its file check switched off, so that the
forced ``weights_only`` loads inside DeepSpeed's ``load_checkpoint`` are shown to hold on their own.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import types
from pathlib import Path

import pytest
import torch

from distaccum import checkpoint_engine
from tests.helpers import ds_checkpoint_workers as workers
from tests.helpers.spawn import run_ranks

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIMIZER_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
CHECKS = ("checked", "unchecked")
# GLOBAL collections.Counter, then BUILD (None, {"most_common": set}): a full unpickler runs
# setattr(Counter, "most_common", set); every global named is one weights_only allows.
COUNTER_REWRITE = (
    b"ccollections\nCounter\n"
    + b"N}X"
    + len(b"most_common").to_bytes(4, "little")
    + b"most_common"
    + b"cbuiltins\nset\n"
    + b"s\x86b"
)


class _Opcodes:
    """A value that the splicing pickler writes as these raw pickle opcodes (one object on the stack)."""

    def __init__(self, opcodes: bytes) -> None:
        self.opcodes = opcodes


class _SplicingPickler(pickle._Pickler):
    """torch.save's pickler, writing an :class:`_Opcodes` as is (the Python pickler, for its ``write``)."""

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Opcodes):
            self.write(obj.opcodes)
            return
        super().save(obj, save_persistent_id)


class _Writes:
    """Unpickled in full, creates the file ``marker``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))  # os.system would do just as well


def _add_to(file: Path, **entries) -> None:
    """Rewrite the torch file ``file`` (one DeepSpeed wrote) with ``entries`` added to its top-level dict."""
    # Read in full: the file DeepSpeed just wrote in this test (the fixture must not rest on the code it tests).
    state = torch.load(file, weights_only=False)
    state.update(entries)
    splicing = types.SimpleNamespace(Pickler=_SplicingPickler, __name__="pickle")
    torch.save(state, file, pickle_module=splicing)


def _saved_engine(stage: int, where: Path):
    """A fresh engine, and an engine checkpoint of the same model saved under ``where``."""
    engine, _ = workers.build(stage)
    checkpoint_engine.save(engine, where)
    del engine
    engine, _ = workers.build(stage)  # load into a fresh engine, as ZeRO 3 requires
    return engine


def _load(engine, where: Path, check: str) -> str:
    """``checkpoint_engine.load``'s refusal, or "loaded"; "unchecked" switches its file check off first."""
    if check == "unchecked":
        checkpoint_engine.check_files = lambda checkpoint: None  # this process only: the forced loads alone
    try:
        checkpoint_engine.load(engine, where)
    except ValueError as error:
        return str(error)
    return "loaded"


def symlinked_folder_worker(rank: int, world_size: int, directory: str, check: str) -> dict:
    """Attack 2 at ZeRO 0: ``deepspeed/engine`` points outside the checkpoint, at a model file that runs code."""
    where = Path(directory, "checkpoint")
    marker = Path(directory, "code-ran")
    engine = _saved_engine(0, where)
    folder = where / checkpoint_engine.ENGINE_DIR
    outside = Path(directory, "outside")
    shutil.copytree(folder / checkpoint_engine.TAG, outside)
    _add_to(outside / MODEL_FILE, payload=_Writes(str(marker)))
    (folder / checkpoint_engine.TAG).rename(folder / "genuine")  # a scan of the folder still finds real files
    (folder / checkpoint_engine.TAG).symlink_to(outside, target_is_directory=True)
    outcome = _load(engine, where, check)
    return {
        "outcome": outcome,
        "code_ran": marker.exists(),
        "torch_load_restored": torch.load is torch.serialization.load,
    }


def counter_rewrite_worker(rank: int, world_size: int, directory: str, check: str) -> dict:
    """Attack 3 at ZeRO 2: the optimizer shard rewrites ``Counter.most_common`` using allowed names only."""
    where = Path(directory, "checkpoint")
    engine = _saved_engine(2, where)
    folder = where / checkpoint_engine.ENGINE_DIR / checkpoint_engine.TAG
    _add_to(folder / MODEL_FILE, global_steps=7)  # plain data: shows whether DeepSpeed loaded the model file
    _add_to(folder / OPTIMIZER_FILE, payload=_Opcodes(COUNTER_REWRITE))
    most_common = collections.Counter.most_common
    outcome = _load(engine, where, check)
    return {
        "outcome": outcome,
        "counter_intact": collections.Counter.most_common is most_common,
        "global_steps": engine.global_steps,
    }


@pytest.mark.parametrize("check", CHECKS)
def test_an_engine_folder_symlinked_to_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path: Path, check):
    (result,) = run_ranks(symlinked_folder_worker, str(tmp_path), check, world_size=1, timeout_s=120)
    assert not result["code_ran"]
    assert result["torch_load_restored"]
    if check == "checked":
        assert "deepspeed/engine is a symbolic link" in result["outcome"], result["outcome"]
    else:  # DeepSpeed opened the file through the link: the forced weights_only load refused it
        refused = f"deepspeed/engine/{MODEL_FILE} was refused by torch.load(weights_only=True) without running it"
        assert refused in result["outcome"], result["outcome"]
        assert "GLOBAL exec was not an allowed global" in result["outcome"]
    assert "Load only checkpoints you wrote" in result["outcome"]


@pytest.mark.parametrize("check", CHECKS)
def test_an_optimizer_shard_of_allowed_names_that_rewrites_counter_is_refused_and_counter_is_intact(
    tmp_path: Path, check
):
    (result,) = run_ranks(counter_rewrite_worker, str(tmp_path), check, world_size=1, timeout_s=120)
    assert result["counter_intact"]
    refused = f"{OPTIMIZER_FILE} was refused by torch.load(weights_only=True) without running it: Can only build"
    assert refused in result["outcome"], result["outcome"]
    assert "Load only checkpoints you wrote" in result["outcome"]
    # The check refuses before DeepSpeed changes the engine; without it, DeepSpeed had loaded the model file.
    assert result["global_steps"] == (0 if check == "checked" else 7)


def test_a_symlinked_engine_file_is_refused_without_being_read(tmp_path: Path):
    folder = tmp_path / checkpoint_engine.ENGINE_DIR / checkpoint_engine.TAG
    folder.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"payload": _Writes(str(marker))}, tmp_path / "outside.pt")
    (folder / MODEL_FILE).symlink_to(tmp_path / "outside.pt")
    with pytest.raises(ValueError, match=rf"{MODEL_FILE} is a symbolic link or not a regular file.*refused unread"):
        checkpoint_engine.check_files(tmp_path)
    assert not marker.exists()


def test_torch_load_asked_for_a_full_unpickler_during_an_engine_load_is_refused_and_restored_after(tmp_path: Path):
    marker = tmp_path / "code-ran"
    torch.save({"payload": _Writes(str(marker))}, tmp_path / "crafted.pt")
    engine = types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace())
    checkpoint_engine.engine_classes()  # deepspeed imported first: importing it registers torch's own safe globals
    safe = set(torch.serialization.get_safe_globals())
    with pytest.raises(ValueError, match=r"crafted\.pt was refused .* GLOBAL exec "):
        with checkpoint_engine.weights_only_loads(engine):
            torch.load(tmp_path / "crafted.pt", weights_only=False)
    with pytest.raises(ValueError, match=r"crafted\.pt was refused"):
        with checkpoint_engine.weights_only_loads(engine):
            engine.checkpoint_engine.load(str(tmp_path / "crafted.pt"), map_location="cpu")
    assert not marker.exists()
    assert torch.load is torch.serialization.load and vars(engine.checkpoint_engine) == {}
    assert set(torch.serialization.get_safe_globals()) == safe  # what the loads added is gone again


def test_every_deepspeed_state_class_rebuilds_under_weights_only(tmp_path: Path):
    # DynamicLossScaler only appears in fp16 checkpoints, which DeepSpeed cannot make on CPU: built here directly.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    dynamic = DynamicLossScaler(2.0**16, 1000, 1.0, 2, False, dtype=torch.float16)
    state = {
        "loss_scaler": LossScaler(4.0),
        "dynamic": dynamic,
        "zero_stage": ZeroStageEnum.gradients,
        "address": fragment_address(numel=3, start=5),
    }
    torch.save(state, tmp_path / "state.pt")
    for mmap in (False, True):
        loaded = checkpoint_engine.read_plain(tmp_path / "state.pt", mmap=mmap)
        assert vars(loaded["loss_scaler"]) == {"cur_scale": 4.0, "dynamic": False}
        assert type(loaded["dynamic"]) is DynamicLossScaler and vars(loaded["dynamic"]) == vars(dynamic)
        assert loaded["zero_stage"] is ZeroStageEnum.gradients
        assert loaded["address"] == fragment_address(numel=3, start=5)


def through_checkpoint_load_worker(rank: int, world_size: int, directory: str) -> dict:
    """Attack 3 end to end: a distaccum checkpoint of a ZeRO 2 engine one step in, its optimizer shard crafted and
    the manifest resealed (as anyone who can write the directory can), loaded by ``distaccum.checkpoint.load``."""
    from distaccum import checkpoint
    from tests.helpers import attacks
    from tests.helpers.common import loss_fn, make_data

    root = Path(directory, "run")
    engine, acc = workers.build(2)
    inputs, targets = make_data(8, workers.MICRO_BATCH)
    for x, y in zip(inputs, targets, strict=True):
        with acc.micro_step():
            acc.backward(loss_fn(engine(x), y))
        if acc.stepped:
            break
    final = checkpoint.save(root, model=engine, optimizer=engine.optimizer, accumulator=acc)
    folder = final / checkpoint_engine.ENGINE_DIR / checkpoint_engine.TAG
    _add_to(folder / OPTIMIZER_FILE, payload=_Opcodes(COUNTER_REWRITE))
    attacks.reseal(final)
    del engine, acc
    engine, acc = workers.build(2)
    most_common = collections.Counter.most_common
    try:
        checkpoint.load(root, model=engine, optimizer=engine.optimizer, accumulator=acc)
        outcome = "loaded"
    except ValueError as error:
        outcome = str(error)
    return {
        "outcome": outcome,
        "counter_intact": collections.Counter.most_common is most_common,
        "optimizer_steps": acc.optimizer_steps,
        "global_steps": engine.global_steps,
    }


def test_a_crafted_engine_shard_is_refused_by_checkpoint_load_before_anything_changes(tmp_path: Path):
    (result,) = run_ranks(through_checkpoint_load_worker, str(tmp_path), world_size=1, timeout_s=120)
    assert result["counter_intact"]
    assert f"{OPTIMIZER_FILE} was refused by torch.load(weights_only=True)" in result["outcome"], result["outcome"]
    assert result["optimizer_steps"] == 0 and result["global_steps"] == 0  # neither the accumulator nor the engine
