"""One test body over hardware: CUDA cases are skipped, through one helper, where there is no GPU."""

from __future__ import annotations

import pytest
import torch


def requires_cuda(count: int = 1) -> pytest.MarkDecorator:
    """The one place CUDA cases are skipped: on machines with fewer than ``count`` GPUs."""
    return pytest.mark.skipif(
        torch.cuda.device_count() < count, reason=f"needs {count} CUDA GPU(s); this machine has none or fewer"
    )


def hardware_params() -> list[object]:
    """Parametrize one test body over devices: CPU always, CUDA where present (skipped, not faked, elsewhere)."""
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda()])]
