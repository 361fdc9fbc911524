"""What every ``tests/bench_*.py`` module shares: the target entries ``tests/bench.py`` reads.

A module's last stdout line is one JSON object; its ``"targets"`` list holds one entry per
target, made by :func:`target`::

    {"name": "rotation end to end / raw", "value": 0.63, "target": ">= 0.6", "met": true}

``make bench`` prints every entry next to its target and exits non-zero when one is missed.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Sequence
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


def target(name: str, value: float, op: str, bound: float, *, digits: int = 3) -> dict[str, Any]:
    """One target entry: ``value`` checked against ``op bound`` (``>=`` or ``<=``)."""
    if op not in _OPS:
        raise ValueError(f"unknown comparison {op!r}; expected one of {sorted(_OPS)}")
    return {"name": name, "value": round(value, digits), "target": f"{op} {bound:g}",
            "met": bool(_OPS[op](value, bound))}


def median(samples: Sequence[float]) -> float:
    """The median of a non-empty sample list."""
    if not samples:
        raise ValueError("median of no samples")
    return float(statistics.median(samples))
