"""Optional dependencies of the survey (scikit-learn, matplotlib, tqdm), imported only when a feature needs them."""

from __future__ import annotations

import importlib
from typing import Any


def require(module: str, extra: str) -> Any:
    """Import ``module``, or raise ``ImportError`` naming ``pip install 'distaccum[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the survey needs {module} for this; install it with: pip install 'distaccum[{extra}]'"
        ) from error
