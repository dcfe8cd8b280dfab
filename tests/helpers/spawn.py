"""Run a function on N real processes joined in a gloo group, with a timeout instead of a hang.

Rendezvous goes through a file in a fresh temporary directory (no ports, no races). Each rank's return
value is saved with ``torch.save`` and handed back to the test in rank order. Ranks leave through
``distaccum.dist.shutdown`` after the function returned, the order that avoids gloo's exit-time abort.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 120.0


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, workdir: str, args: tuple[Any, ...]) -> None:
    import torch.distributed as torch_dist

    from distaccum import dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, f"{workdir}/result-{rank}.pt")
    except BaseException:
        Path(f"{workdir}/error-{rank}.txt").write_text(traceback.format_exc())
        dist.shutdown(barrier=False)
        raise
    dist.shutdown()


def run_ranks(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank.

    ``fn`` must be importable (defined at module level). Raises ``AssertionError`` with every failing rank's
    traceback, or ``TimeoutError`` (after killing the ranks) when they do not finish in ``timeout_s``.
    """
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="distaccum-spawn-") as workdir:
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, workdir, args), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
        alive = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        errors = {
            rank: Path(f"{workdir}/error-{rank}.txt").read_text()
            for rank in range(world_size)
            if Path(f"{workdir}/error-{rank}.txt").exists()
        }
        if errors:
            raise AssertionError("\n".join(f"--- rank {rank} failed:\n{text}" for rank, text in sorted(errors.items())))
        if alive:
            raise TimeoutError(f"ranks {alive} still running after {timeout_s:.0f} s; killed (a hang, not a pass)")
        codes = [process.exitcode for process in processes]
        if any(code != 0 for code in codes):
            raise AssertionError(f"rank exit codes {codes} (expected all 0)")
        return [torch.load(f"{workdir}/result-{rank}.pt", weights_only=False) for rank in range(world_size)]
