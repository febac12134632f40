"""Fault injection: named points in the engine where a test makes the code raise on purpose.

Tests of failure containment set a plan per point (in-process: `FAULTS.inject(...)`; in a server
started as a subprocess: the environment variable TIDEMIND_INJECT_FAULTS, read once at import):

    TIDEMIND_INJECT_FAULTS="execute=3"             the 3rd time the point is reached, and only then
    TIDEMIND_INJECT_FAULTS="execute=3+,recovery=1" the 3rd time and every time after; ","-separated

Points: "execute" (an engine step, before the executor runs it), "output" (turning one request's
new token into its output: detokenizing, stop words), "recovery" (cleaning up after a failed step).
With no plan a check is one dictionary lookup.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Tuple

POINTS = ("execute", "output", "recovery")


class InjectedFault(RuntimeError):
    """Raised at a fault point by plan (never in normal operation)."""


class FaultPoints:
    def __init__(self):
        self._plans: Dict[str, Tuple[int, bool]] = {}  # point -> (hit number, and every later hit)
        self._hits: Dict[str, int] = {}
        self._lock = threading.Lock()

    def inject(self, point: str, at: int = 1, and_after: bool = False) -> None:
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; points: {', '.join(POINTS)}")
        with self._lock:
            self._plans[point] = (at, and_after)
            self._hits[point] = 0

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._hits.clear()

    def configure(self, spec: str) -> None:
        """Plans from a TIDEMIND_INJECT_FAULTS string (see the module docstring)."""
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, when = item.partition("=")
            and_after = when.endswith("+")
            try:
                at = int(when.rstrip("+") or 1)
            except ValueError:
                raise ValueError(f"TIDEMIND_INJECT_FAULTS: {item!r} is not point=N or point=N+") from None
            self.inject(point, at, and_after)

    def check(self, point: str) -> None:
        if not self._plans:
            return
        with self._lock:
            plan = self._plans.get(point)
            if plan is None:
                return
            self._hits[point] += 1
            hit = self._hits[point]
        at, and_after = plan
        if hit == at or (and_after and hit > at):
            raise InjectedFault(f"injected fault at {point!r} (hit {hit})")


FAULTS = FaultPoints()
FAULTS.configure(os.environ.get("TIDEMIND_INJECT_FAULTS", ""))
