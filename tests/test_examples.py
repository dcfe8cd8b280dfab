"""The examples, launched as a user launches them, end with the weights of one process on the real global batch.

The launcher helpers here (``launch``, ``user_env``, ``free_port``, ``reference_weights``) serve the other
launcher tests too (test_launch_files, test_accelerate, test_envcheck).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.common import max_relative_error
from tests.launchers import free_port, kill_tree

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LAUNCH_TIMEOUT_S = 240.0
TOLERANCE = 1e-6
# Shared by the launcher tests: 32 = accum 4 x micro 8 x 1 rank = accum 2 x micro 8 x 2 ranks.
GLOBAL_BATCH, MICRO_BATCH, STEPS, LR = 32, 8, 4, 0.05
SIZES = ["--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", str(MICRO_BATCH), "--lr", str(LR)]


def load_task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_task", EXAMPLES / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_weights(steps: int, lr_decay: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """One process, the real global batch of examples/task.py, the examples' optimizer (and schedule)."""
    task = load_task()
    model = task.make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    scheduler = None if lr_decay is None else torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    for step in range(steps):
        inputs, targets = task.global_batch(step, GLOBAL_BATCH, seed)
        optimizer.zero_grad()
        task.loss_fn(model(inputs), targets).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user in an activated venv: its bin/ first on PATH, no rank variables inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_", "PYTEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def start(command: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a launcher in its own process group (so that a hang can be killed with all its workers)."""
    return subprocess.Popen(
        [str(part) for part in command],
        cwd=ROOT,
        env=env or user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    """Wait for ``process``; kill its whole group and fail when it exceeds ``timeout_s`` (a hang is a failure)."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} still running after {timeout_s:.0f} s (killed):\n{output[-4000:]}")
    return process.returncode, output


def launch(
    command: Sequence[str | os.PathLike[str]], env: dict[str, str] | None = None, *, expect_success: bool = True
) -> str:
    """Run a launcher to completion; return its combined output. Fails with the output on a wrong exit code."""
    code, output = finish(start(command, env))
    if expect_success:
        assert code == 0, f"{command} exited {code}:\n{output[-6000:]}"
    else:
        assert code != 0, f"{command} succeeded but should have failed:\n{output[-6000:]}"
    return output


def assert_matches_reference(path: Path, expected: dict[str, torch.Tensor]) -> float:
    weights = torch.load(path, weights_only=True)
    assert sorted(weights) == sorted(expected), "saved names must be plain (no module./wrapper prefixes)"
    error = max_relative_error(weights, expected)
    assert error <= TOLERANCE, f"{path.name}: max relative weight error {error:.3g} > {TOLERANCE}"
    return error


# ------------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python examples/train.py` once for the module: 1 process, accum_steps 4."""
    path = tmp_path_factory.mktemp("python") / "weights.pt"
    output = launch([sys.executable, EXAMPLES / "train.py", *SIZES, "--steps", str(STEPS), "--save", path])
    assert "accum_steps 4 x micro_batch_size 8 x world_size 1" in output
    assert "launcher=python" in output and "backend=plain" in output
    return path


def test_train_one_process_equals_real_batch(one_process_weights: Path) -> None:
    assert_matches_reference(one_process_weights, reference_weights(STEPS))


def test_train_differs_from_reference_with_other_steps(one_process_weights: Path) -> None:
    # The comparison can fail: one step more or less is far outside the tolerance.
    weights = torch.load(one_process_weights, weights_only=True)
    assert max_relative_error(weights, reference_weights(STEPS - 1)) > 1e3 * TOLERANCE


def test_plain_torch_twin_and_distaccum_twin_end_equal(tmp_path: Path) -> None:
    # The twins run side by side (2 cores): the hand-written loop and the Accumulator give the same weights.
    runs = {
        name: start([sys.executable, EXAMPLES / f"{name}.py", *SIZES, "--steps", str(STEPS), "--save", tmp_path / name])
        for name in ("plain_torch", "with_distaccum")
    }
    expected = reference_weights(STEPS)
    for name, process in runs.items():
        code, output = finish(process)
        assert code == 0, output
        assert_matches_reference(tmp_path / name, expected)
    plain = torch.load(tmp_path / "plain_torch", weights_only=True)
    assert max_relative_error(torch.load(tmp_path / "with_distaccum", weights_only=True), plain) <= TOLERANCE


def test_twins_differ_only_in_the_accumulation() -> None:
    # The pair exists for its diff: same task calls, same flags; only the twin with distaccum imports it.
    plain = (EXAMPLES / "plain_torch.py").read_text()
    ours = (EXAMPLES / "with_distaccum.py").read_text()
    flags = re.compile(r'add_argument\("(--[\w-]+)"')
    assert flags.findall(plain) == flags.findall(ours)
    assert "distaccum" not in plain.split('"""', 2)[2]
    assert "acc.micro_step()" in ours and "no_sync()" in plain and "no_sync" not in ours


@pytest.mark.slow
def test_train_under_accelerate_launch_two_cpu_processes(tmp_path: Path, one_process_weights: Path) -> None:
    # train.py has no Accelerate code: accelerate launch's torchrun environment is enough (2 ranks, accum 2).
    path = tmp_path / "weights.pt"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    output = launch(
        [*command, EXAMPLES / "train.py", *SIZES, "--steps", str(STEPS), "--save", path],
        user_env(ACCELERATE_USE_CPU="1"),
    )
    assert "accum_steps 2 x micro_batch_size 8 x world_size 2" in output
    assert "launcher=accelerate" in output and "backend=ddp" in output
    assert_matches_reference(path, reference_weights(STEPS))
    # 2 ranks x accum 2 and 1 rank x accum 4 at the same global batch: the same weights.
    assert max_relative_error(torch.load(path), torch.load(one_process_weights)) <= TOLERANCE


def test_example_docstrings_list_launch_commands_that_exist() -> None:
    for name, launchers in {
        "train.py": ("python examples/train.py", "torchrun", "--nnodes 2", "accelerate launch", "deepspeed", "sbatch"),
        "accelerate_train.py": ("accelerate launch", "ACCELERATE_USE_CPU=1"),
        "plain_torch.py": ("python examples/plain_torch.py", "torchrun"),
        "with_distaccum.py": ("python examples/with_distaccum.py", "torchrun"),
    }.items():
        doc = (EXAMPLES / name).read_text().split('"""')[1]
        for launcher in launchers:
            assert launcher in doc, f"examples/{name} docstring lacks a `{launcher}` command"
        for referenced in re.findall(r"(?:launch|examples)/[\w./-]+\.(?:py|sh|sbatch|yaml|json)", doc):
            assert (ROOT / referenced).is_file(), f"examples/{name} docstring names missing file {referenced}"
