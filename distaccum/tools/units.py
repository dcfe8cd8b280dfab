"""Units on the command line: parameter counts (``7B``), link rates (``100Gbit``), latencies (``20us``), dtypes.

Shared by ``distaccum plan`` and the benchmark harness's ``--link-rate`` (``python -m examples.bench.harness``);
every parser raises ``ValueError`` with the value, the rule and an example, which the commands turn into a message
that names the flag.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

DTYPES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_COUNT = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
_RATE = re.compile(_NUMBER + r"\s*([kKmMgGtT]i?)?(bits?|bps|b|B|Bps|bytes?)?(?:/s)?")
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_params(text: str) -> int:
    """A parameter count from ``7e9``, ``7B``, ``125M``, ``16.8M``, ``350K``, ``1.5T``.

    Raises:
        ValueError: not a positive count.

    Example:
        >>> parse_params("16.8M")
        16800000
    """
    match = re.fullmatch(_NUMBER + r"\s*([kKmMbBgGtT]?)", text.strip())
    count = round(Decimal(match.group(1)) * _COUNT[match.group(2).upper()]) if match else 0
    if count < 1:
        raise ValueError(
            f"{text!r} is not a parameter count: it must be a positive number with an optional K, M, B or T "
            "suffix; write e.g. 7e9, 7B, 125M or 16.8M"
        )
    return count


def parse_bandwidth(text: str) -> float:
    """Bytes/s from a link speed: ``100Gbit``, ``400Gbps``, ``25GB`` (bytes/s), ``10Gibit``; a plain number is bits/s.

    Raises:
        ValueError: a prefix without a unit (``100G``: bits or bytes?), an unknown unit, or not > 0.

    Example:
        >>> parse_bandwidth("100Gbit")
        12500000000.0
    """
    match = _RATE.fullmatch(text.strip())
    value = 0.0
    if match and not (match.group(2) and not match.group(3)):  # "100G": bits or bytes?
        bits = 8 if match.group(3) in ("B", "Bps", "byte", "bytes") else 1
        value = float(match.group(1)) * _PREFIX[(match.group(2) or "").lower()] * bits / 8
    if not 0 < value < math.inf:
        raise ValueError(
            f"{text!r} is not a bandwidth: it must be a number > 0 with a unit, in bits ('100Gbit', '100Mbit', "
            "'400Gbps') or bytes per second ('25GB'); a plain number is bits/s"
        )
    return value


def parse_latency(text: str) -> float:
    """Seconds per collective from ``20us``, ``0.5ms``, ``2e-5`` (a plain number is seconds); 0 is allowed."""
    match = re.fullmatch(_NUMBER + r"\s*(s|ms|us|µs|ns)?", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a latency: it must be a number >= 0 of seconds, e.g. 20us, 0.5ms, 2e-5")
    return float(match.group(1)) * _TIME[match.group(2) or ""]


def parse_dtype(text: str) -> str:
    """The short name (``fp32``, ``bf16``, ``fp16``) of a reduce dtype given by either of its names."""
    name = text.strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{text!r} is not a gradient dtype: use fp32 (float32), bf16 (bfloat16) or fp16 (float16)")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def parse_positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{text!r} is not a positive number: it must be > 0, e.g. 224")
    return value


def parse_positive_int(text: str) -> int:
    """A whole number >= 1."""
    if not re.fullmatch(r"\s*\+?0*[1-9]\d*\s*", text):
        raise ValueError(f"{text!r} is not a positive whole number: it must be >= 1, e.g. 8")
    return int(text)
