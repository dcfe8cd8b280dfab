"""A kill soak: ``examples/train.py`` on 2 ranks under ``torchrun --max-restarts``, checkpointing every step, while
a driver SIGKILLs a random rank at random moments (inside a window, at a boundary, during a checkpoint write).

The job must end with the weights of an uninterrupted run, every optimizer step taken exactly once in the final
state. The slow test runs a few kills; the long soak is a command::

    .venv/bin/python -m tests.helpers.kill_soak --kills 10 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.helpers.examples import EXAMPLES, SIZES
from tests.helpers.launchers import ROOT, free_port, kill_tree, user_env

STEP = re.compile(r"^step\s+(\d+)/", re.M)


def _workers(agent: psutil.Process) -> dict[int, psutil.Process]:
    found = {}
    for child in agent.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "train.py" in " ".join(child.cmdline()) and "RANK" in (env := child.environ()):
                found[int(env["RANK"])] = child
    return found


def soak(directory: Path, *, kills: int, steps: int, seed: int, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the job, deliver ``kills`` SIGKILLs, wait for it to finish; return what happened."""
    rng = random.Random(seed)
    log_path = directory / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--max-restarts", str(kills + 2), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += [EXAMPLES / "train.py", *SIZES, "--steps", str(steps), "--checkpoint-dir", directory / "ckpt"]
    command += ["--checkpoint-every", "1", "--save", directory / "weights.pt"]
    started = time.monotonic()
    deadline = started + timeout_s
    delivered: list[dict[str, Any]] = []

    def output() -> str:
        return log_path.read_text(errors="replace")

    def alive() -> bool:
        return process.poll() is None and time.monotonic() < deadline

    with log_path.open("w") as log:
        # To a file, not a pipe: the driver reads progress from it while the job runs and nothing can block.
        process = subprocess.Popen(
            [str(part) for part in command],
            cwd=ROOT,
            env=user_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        agent = psutil.Process(process.pid)
        try:
            while len(delivered) < kills and alive():
                target = len(STEP.findall(output())) + rng.randint(1, 4)  # progress of the current attempt
                while len(STEP.findall(output())) < target and alive():
                    time.sleep(0.002)
                mode = rng.choice(["window", "window", "save"])
                if mode == "save":  # kill in the middle of a checkpoint write
                    while not any((directory / "ckpt").glob(".tmp-*")) and alive():
                        pass
                else:
                    time.sleep(rng.uniform(0.0, 0.03))
                workers = _workers(agent)
                if not alive() or len(workers) < 2:
                    continue
                rank = rng.randrange(2)
                with contextlib.suppress(psutil.NoSuchProcess):
                    workers[rank].kill()
                    delivered.append({"rank": rank, "mode": mode, "after_s": round(time.monotonic() - started, 2)})
                # The next kill waits for torchrun to replace the killed worker.
                while alive() and workers[rank].pid in {worker.pid for worker in _workers(agent).values()}:
                    time.sleep(0.01)
            while alive():
                time.sleep(0.05)
            if process.poll() is None:
                raise TimeoutError(f"the soak did not finish in {timeout_s:.0f} s:\n{output()[-3000:]}")
        finally:
            if process.poll() is None:
                kill_tree(process.pid)
                process.wait()
    text = output()
    final = json.loads((sorted((directory / "ckpt").glob("step-*"))[-1] / "meta.json").read_text())
    return {
        "code": process.returncode,
        "kills": delivered,
        "resumes": [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", text)],
        "final_step": int(final["step"]),
        "seconds": round(time.monotonic() - started, 1),
        "output": text,
    }


def uninterrupted(directory: Path, *, steps: int) -> Path:
    """The same job without kills or checkpoints: the weights the soak must end with, bit for bit."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), EXAMPLES / "train.py", *SIZES, "--steps", str(steps)]
    command += ["--save", directory / "uninterrupted.pt"]
    done = subprocess.run([str(part) for part in command], cwd=ROOT, env=user_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return directory / "uninterrupted.pt"


if __name__ == "__main__":
    import tempfile

    import torch

    from tests.helpers.common import max_relative_error
    from tests.helpers.examples import reference_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distaccum-soak-") as tmp:
        report = soak(Path(tmp), kills=args.kills, steps=args.steps, seed=args.seed, timeout_s=3000)
        weights = torch.load(Path(tmp) / "weights.pt", weights_only=True)
        clean = torch.load(uninterrupted(Path(tmp), steps=args.steps), weights_only=True)
        identical = all(torch.equal(weights[k], clean[k]) for k in clean)
        error = max_relative_error(weights, reference_weights(args.steps))
    summary = {key: report[key] for key in ("code", "kills", "resumes", "final_step", "seconds")}
    summary.update(bit_identical_to_uninterrupted=identical, max_relative_error_vs_real_batch=error)
    print(json.dumps(summary, indent=1))
    sys.exit(0 if report["code"] == 0 and report["final_step"] == args.steps and identical else 1)
