"""Stage 4a: choose how to run a recurrence. Entry point: `choose`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    kind: str    # sequential | elementwise_scan | chunked | chunked_delta | dense_scan | maxplus
    reason: str  # one line, for humans


def choose(rec, analysis) -> Plan:
    return Plan("sequential", "the reference loop over time")


def pick_backend(requested: str, rec, analysis, plan, available: dict) -> str:
    """The backend to use: `requested`, or the best legal one for "auto"."""
    from .errors import RnncError
    if requested == "auto":
        return "sequential"
    if requested not in available:
        raise RnncError(f"unknown backend {requested!r} (available: auto, {', '.join(available)})")
    return requested
