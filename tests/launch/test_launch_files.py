"""Every file in launch/ is exercised: CPU-runnable ones run through the real launcher, GPU/Slurm ones are validated
(shell syntax, dry-run commands parsed by torchrun's and Accelerate's own argument parsers, YAML loaded by
Accelerate's config loader, knobs applied from the environment)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.common import max_relative_error
from tests.helpers.examples import EXAMPLES, SIZES, STEPS, TOLERANCE, assert_matches_reference, reference_weights
from tests.helpers.launchers import ROOT, finish, free_port, launch, start, user_env

LAUNCH = ROOT / "launch"
# Where each launch/ file is exercised. The DeepSpeed configs and their README belong to the DeepSpeed tests
# (tests/integrations/test_deepspeed.py); dev.sh is what CI runs.
EXERCISED = {
    "README.md": "test_launch_readme_maps_every_file",
    "soak_combinations.sh": (
        "tests/unit/test_combinations.py::test_the_soak_script_runs_the_sampled_tests_with_its_knobs"
    ),
    "torchrun.sh": "test_torchrun_sh_two_processes_then_resume",
    "torchrun_multinode.sh": "test_torchrun_multinode_sh_two_nodes_on_loopback",
    "slurm.sbatch": "test_slurm_sbatch_dry_run",
    "accelerate.sh": "test_accelerate_sh_single_process_yaml, "
    "tests/integrations/test_accelerate.py::test_prepared_model_on_two_ranks_equals_real_batch",
    "env_check.sh": "tests/tools/test_envcheck.py::test_env_check_sh_under_torchrun",
    "accelerate/single_process.yaml": "test_accelerate_sh_single_process_yaml",
    "accelerate/multi_cpu.yaml": (
        "tests/integrations/test_accelerate.py::test_prepared_model_on_two_ranks_equals_real_batch"
    ),
    "accelerate/multi_gpu.yaml": "test_accelerate_yamls_load_with_accelerate",
    "accelerate/multi_node.yaml": "test_accelerate_yamls_load_with_accelerate",
    "gpu_check.sh": "test_gpu_check_sh_dry_run_names_every_step",
}
OWNED_ELSEWHERE = ("dev.sh", "deepspeed/", "accelerate/deepspeed.yaml")


def launch_files() -> list[str]:
    return sorted(str(path.relative_to(LAUNCH)) for path in LAUNCH.rglob("*") if path.is_file())


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    """The command a launch script would run, as an argv list (DRY_RUN=1)."""
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=user_env(DRY_RUN="1", **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def parse_torchrun(argv: list[str]) -> object:
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def test_every_launch_file_is_exercised() -> None:
    unowned = [name for name in launch_files() if not name.startswith(OWNED_ELSEWHERE) and name not in EXERCISED]
    assert not unowned, f"launch/ files without a test: {unowned}; add one and list it in EXERCISED"
    assert all((LAUNCH / name).is_file() for name in EXERCISED)
    for name, where in EXERCISED.items():  # the registry names tests that exist
        for module, test in re.findall(r"(?:(tests/[\w/]+\.py)::)?(test_\w+)", where):
            assert f"def {test}(" in (ROOT / (module or "tests/launch/test_launch_files.py")).read_text(), (name, test)


def test_launch_readme_maps_every_file() -> None:
    readme = (LAUNCH / "README.md").read_text()
    missing = [name for name in launch_files() if name != "README.md" and name not in readme]
    assert not missing, f"launch/README.md does not mention {missing}"


def test_shell_scripts_parse_and_are_executable() -> None:
    scripts = [LAUNCH / name for name in launch_files() if name.endswith((".sh", ".sbatch"))]
    assert len(scripts) >= 5
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
        assert script.read_text().startswith("#!/usr/bin/env bash\n")


def test_torchrun_sh_dry_run_applies_knobs() -> None:
    argv = dry_run("torchrun.sh", "--steps", "3")
    assert argv[0] == "torchrun"
    args = parse_torchrun(argv[1:])
    assert args.standalone and args.nproc_per_node == "2"  # no GPU here: 2 CPU processes
    assert args.training_script == str(EXAMPLES / "train.py") and args.training_script_args == ["--steps", "3"]
    argv = dry_run(
        "torchrun.sh", "env", NPROC_PER_NODE="4", MODULE="distaccum", TORCHRUN="python -m torch.distributed.run"
    )
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    args = parse_torchrun(argv[3:])
    assert args.nproc_per_node == "4" and args.module and args.training_script == "distaccum"


def test_torchrun_multinode_sh_dry_run_applies_knobs() -> None:
    env = {"NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456", "NNODES": "4"}
    args = parse_torchrun(dry_run("torchrun_multinode.sh", "--lr", "0.1", **env)[1:])
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("4", 1, "10.1.2.3", 23456)
    assert args.training_script_args == ["--lr", "0.1"]
    args = parse_torchrun(dry_run("torchrun_multinode.sh", RDZV_BACKEND="c10d", RDZV_ID="job7", **env)[1:])
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "10.1.2.3:23456", "job7")
    missing = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_multinode.sh")], env=user_env(), capture_output=True, text=True, timeout=30
    )
    assert missing.returncode != 0 and "set NODE_RANK" in missing.stderr


@pytest.mark.slow
def test_torchrun_sh_two_processes_then_resume(tmp_path: Path) -> None:
    # One script, two launches: 2 steps with checkpoints, then the same command with --steps 4 resumes from
    # them. The resumed run must end where an uninterrupted one-process real-batch run ends.
    checkpoints, weights = tmp_path / "ckpt", tmp_path / "weights.pt"
    first = launch(
        [
            "bash",
            LAUNCH / "torchrun.sh",
            *SIZES,
            "--steps",
            "2",
            "--checkpoint-dir",
            checkpoints,
            "--checkpoint-every",
            "1",
        ]
    )
    assert "accum_steps 2 x micro_batch_size 8 x world_size 2" in first and "backend=ddp" in first
    assert (checkpoints / "latest").read_text().strip() == "step-00000002"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    second = launch(
        [
            "bash",
            LAUNCH / "torchrun.sh",
            *SIZES,
            "--steps",
            str(STEPS),
            "--checkpoint-dir",
            checkpoints,
            "--save",
            weights,
        ]
    )
    assert "resumed from" in second and "at step 2" in second
    assert f"step    1/{STEPS}" not in second and f"step    3/{STEPS}" in second  # it did not start over
    assert_matches_reference(weights, reference_weights(STEPS))
    assert (checkpoints / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert not list(checkpoints.glob(".tmp*"))


@pytest.mark.slow
def test_torchrun_multinode_sh_two_nodes_on_loopback(tmp_path: Path) -> None:
    port = str(free_port())
    nodes = [
        start(
            [
                "bash",
                LAUNCH / "torchrun_multinode.sh",
                *SIZES,
                "--steps",
                str(STEPS),
                "--save",
                tmp_path / "weights.pt",
            ],
            user_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="1"),
        )
        for rank in (0, 1)
    ]
    outputs = [finish(node) for node in nodes]
    for code, output in outputs:
        assert code == 0, output
    assert "accum_steps 2 x micro_batch_size 8 x world_size 2" in outputs[0][1]  # rank 0 is on node 0
    assert "saved weights" in outputs[0][1] and "saved weights" not in outputs[1][1]
    assert_matches_reference(tmp_path / "weights.pt", reference_weights(STEPS))


def test_slurm_sbatch_dry_run() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    headers = dict(line[len("#SBATCH --") :].split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH"))
    assert headers["ntasks-per-node"] == "1"  # one torchrun per node: it starts the per-GPU processes
    assert {"nodes", "gpus-per-node", "time", "job-name"} <= headers.keys()
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "4", "MASTER_ADDR": "node-a"}
    argv = dry_run("slurm.sbatch", "--global-batch-size", "96", **slurm, SLURM_SUBMIT_DIR=str(ROOT))
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"] and argv[2] == "torchrun"
    args = parse_torchrun(argv[3:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("3", "4", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id) == ("node-a:29500", "4242")
    assert args.training_script == "examples/train.py" and args.training_script_args == ["--global-batch-size", "96"]
    argv = dry_run("slurm.sbatch", **slurm, NPROC_PER_NODE="2", MASTER_PORT="31000", SRUN="srun", SCRIPT="x.py")
    args = parse_torchrun(argv[2:])
    assert argv[0] == "srun" and (args.nproc_per_node, args.rdzv_endpoint) == ("2", "node-a:31000")
    outside = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch")], env=user_env(), capture_output=True, text=True, timeout=30
    )
    assert outside.returncode != 0 and "run this with sbatch" in outside.stderr


def test_accelerate_sh_dry_run_applies_knobs() -> None:
    from accelerate.commands.launch import launch_command_parser

    argv = dry_run("accelerate.sh", "--steps", "2")
    # No GPU here: the script picks the multi-process CPU config and exports ACCELERATE_USE_CPU=1.
    assert argv[0] == "ACCELERATE_USE_CPU=1" and argv[1:3] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert args.config_file == str(LAUNCH / "accelerate" / "multi_cpu.yaml")
    assert args.training_script == str(EXAMPLES / "accelerate_train.py") and args.training_script_args == [
        "--steps",
        "2",
    ]
    knobs = {
        "CONFIG": str(LAUNCH / "accelerate" / "multi_node.yaml"),
        "NUM_PROCESSES": "16",
        "NUM_MACHINES": "2",
        "MACHINE_RANK": "1",
        "MAIN_PROCESS_IP": "10.0.0.9",
        "MAIN_PROCESS_PORT": "29700",
        "SCRIPT": "examples/train.py",
    }
    args = launch_command_parser().parse_args(dry_run("accelerate.sh", **knobs)[3:])
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert (args.main_process_ip, args.main_process_port, args.training_script) == (
        "10.0.0.9",
        29700,
        "examples/train.py",
    )


def test_accelerate_yamls_load_with_accelerate() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "single_process.yaml": (DistributedType.NO, 1, 1),
        "multi_cpu.yaml": (DistributedType.MULTI_GPU, 2, 1),
        "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
        "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2),
    }
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(LAUNCH / "accelerate" / name))
        assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines), name
        assert config.machine_rank == 0
    assert load_config_from_file(str(LAUNCH / "accelerate" / "multi_node.yaml")).main_process_ip
    # The CPU config only works with the variable; its comment must say so (the silent no-averaging trap).
    assert "ACCELERATE_USE_CPU=1 IS REQUIRED" in (LAUNCH / "accelerate" / "multi_cpu.yaml").read_text()


@pytest.mark.slow
def test_accelerate_sh_single_process_yaml(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    output = launch(
        ["bash", LAUNCH / "accelerate.sh", *SIZES, "--steps", str(STEPS), "--save", path],
        user_env(CONFIG=str(LAUNCH / "accelerate" / "single_process.yaml"), MAIN_PROCESS_PORT=str(free_port())),
    )
    assert "accum_steps 4 x micro_batch_size 8 x world_size 1" in output and "backend=plain" in output
    assert_matches_reference(path, reference_weights(STEPS, lr_decay=0.9))
    assert max_relative_error(torch.load(path), reference_weights(STEPS)) > 1e3 * TOLERANCE  # the decay matters


def test_launch_scripts_refuse_bad_knobs() -> None:
    bad = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_multinode.sh")],
        env=user_env(NODE_RANK="0", MASTER_ADDR="127.0.0.1", RDZV_BACKEND="etcd", DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "RDZV_BACKEND must be static or c10d, got 'etcd'" in bad.stderr


def test_gpu_check_sh_dry_run_names_every_step(tmp_path: Path) -> None:
    # The GPU check runs only where a GPU is lent; here it must at least parse, plan every step and refuse
    # to start without its output folder.
    result = subprocess.run(
        ["bash", str(LAUNCH / "gpu_check.sh"), str(tmp_path / "out")],
        env={**user_env(), "DRY_RUN": "1", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"^== ([\w-]+):", result.stdout, re.M)
    assert steps == [
        "install",
        "env",
        "cuda-tests",
        "one-process",
        "two-ranks",
        "nccl-one-rank",
        "compare",
        "overhead",
        "bench",
    ]
    for path in re.findall(r"(?:examples|tests)/[\w/]+\.py", result.stdout):
        assert (ROOT / path).is_file(), path
    modules = re.findall(r" -m (examples(?:\.\w+)+)", result.stdout)  # the bench harness, run from the checkout
    assert modules and all((ROOT / module.replace(".", "/") / "__main__.py").is_file() for module in modules), modules
    assert "DISTACCUM_BACKEND=gloo" in result.stdout and "--no-deps --no-build-isolation" in result.stdout
    missing = subprocess.run(["bash", str(LAUNCH / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "usage: bash launch/gpu_check.sh OUT_DIR" in missing.stderr
