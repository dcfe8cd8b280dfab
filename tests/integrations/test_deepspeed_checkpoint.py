"""DeepSpeed engines in distaccum checkpoints: the engine's own files and distaccum's state in one atomic checkpoint,
resumed exactly at ZeRO 0, 2 and 3; mid-window saves, another world size and foreign pickles refused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from distaccum import checkpoint_engine
from tests.helpers import ds_checkpoint_workers as workers
from tests.helpers.common import max_relative_error
from tests.helpers.spawn import run_ranks


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("ds-checkpoints")
    ranks = run_ranks(workers.resume_worker, str(directory), timeout_s=300)
    return {"directory": directory, "ranks": ranks}


@pytest.mark.slow
@pytest.mark.parametrize("stage", workers.STAGES)
def test_an_engine_saved_at_a_boundary_resumes_into_fresh_engines_with_the_uninterrupted_weights(resumed, stage):
    for run in resumed["ranks"]:
        result = run[stage]
        assert result["data"] == {"step": workers.SAVED_AT}
        assert result["steps"] == workers.STEPS  # the optimizer step count carried on from the checkpoint
        error = max_relative_error(result["resumed"], result["uninterrupted"])
        print(f"ZeRO {stage}: resumed vs uninterrupted max rel weight error {error:.1e}")
        assert error <= 1e-6
        # One checkpoint holds both halves: distaccum's state and the engine's own files (one per rank's shard).
        files = result["files"]
        name = f"step-{workers.SAVED_AT:08d}"
        assert f"{name}/state.pt" in files and f"{name}/meta.json" in files and "latest" in files
        engine_files = [f for f in files if f.startswith(f"{name}/deepspeed/engine/") and f.endswith(".pt")]
        assert len(engine_files) >= (1 if stage == 0 else 1 + workers.WORLD), files  # ZeRO: a shard per rank
        assert not any(f.endswith("/deepspeed/latest") for f in files)  # DeepSpeed's own pointer is not written


@pytest.mark.slow
@pytest.mark.parametrize("stage", workers.STAGES)
def test_a_mid_window_save_of_an_engine_is_refused_with_the_way_out(resumed, stage):
    for run in resumed["ranks"]:
        message = run[stage]["refusals"].get("mid_window", "")
        assert re.search(
            r"mid-window \(micro-step 1 of 3\) of a DeepSpeed engine.*right after an optimizer step", message
        )


@pytest.mark.slow
def test_an_engine_checkpoint_on_another_world_size_is_refused_naming_the_converter(resumed):
    (message,) = run_ranks(workers.other_world_size_worker, str(resumed["directory"]), world_size=1, timeout_s=120)
    assert "saved by 2 rank(s), and this job has 1" in message
    assert "deepspeed.checkpoint.ds_to_universal" in message and '"load_universal": true' in message


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless here, but a pickle may name any callable: os.system just as well


def test_a_foreign_pickle_in_the_engine_folder_is_refused_before_deepspeed_loads_it(tmp_path: Path):
    folder = tmp_path / checkpoint_engine.ENGINE_DIR / checkpoint_engine.TAG
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, folder / "mp_rank_00_model_states.pt")
    checkpoint_engine.check_files(tmp_path)  # tensors and plain data pass
    torch.save({"optimizer_state_dict": _RunsCode()}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    refused = r"optim_states\.pt was refused by torch\.load\(weights_only=True\) without running it: .*posix\.getcwd"
    with pytest.raises(ValueError, match=refused):
        checkpoint_engine.check_files(tmp_path)


def test_an_engine_checkpoint_without_engine_files_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="has no DeepSpeed engine files"):
        checkpoint_engine.check_files(tmp_path)
