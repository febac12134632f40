"""Fault injection: named points in the engine where a test makes the code fail on purpose.

Tests of failure containment set a plan per point (in-process: `FAULTS.inject(...)`; in a server
started as a subprocess, or a tensor-parallel worker process, which inherits it: the environment
variable TIDEMIND_INJECT_FAULTS, read once at import):

    TIDEMIND_INJECT_FAULTS="execute=3"             the 3rd time the point is reached, and only then
    TIDEMIND_INJECT_FAULTS="execute=3+,recovery=1" the 3rd time and every time after; ","-separated
    TIDEMIND_INJECT_FAULTS="rank1.step=2:hang"     tensor-parallel rank 1 hangs in its 2nd step
    TIDEMIND_INJECT_FAULTS="rank0.step=4:exit"     rank 0's process exits (code 1) in its 4th step

Points: "execute" (an engine step, before the executor runs it), "output" (turning one request's
new token into its output: detokenizing, stop words), "recovery" (cleaning up after a failed step),
"rank<N>.step" (tensor-parallel rank N's worker, before it runs a step). Actions: raise (the
default: InjectedFault), hang (sleep until killed), exit (the process ends at once, as if killed).
With no plan a check is one dictionary lookup.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Dict, Tuple

POINTS = ("execute", "output", "recovery")
RANK_POINT = re.compile(r"rank\d+\.step")
ACTIONS = ("raise", "hang", "exit")


class InjectedFault(RuntimeError):
    """Raised at a fault point by plan (never in normal operation)."""


class FaultPoints:
    def __init__(self):
        # point -> (hit number, and every later hit, action)
        self._plans: Dict[str, Tuple[int, bool, str]] = {}
        self._hits: Dict[str, int] = {}
        self._lock = threading.Lock()

    def inject(self, point: str, at: int = 1, and_after: bool = False, action: str = "raise") -> None:
        if point not in POINTS and not RANK_POINT.fullmatch(point):
            raise ValueError(f"unknown fault point {point!r}; points: {', '.join(POINTS)}, rank<N>.step")
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; actions: {', '.join(ACTIONS)}")
        with self._lock:
            self._plans[point] = (at, and_after, action)
            self._hits[point] = 0

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._hits.clear()

    def configure(self, spec: str) -> None:
        """Plans from a TIDEMIND_INJECT_FAULTS string (see the module docstring)."""
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, when = item.partition("=")
            when, _, action = when.partition(":")
            and_after = when.endswith("+")
            try:
                at = int(when.rstrip("+") or 1)
            except ValueError:
                raise ValueError(f"TIDEMIND_INJECT_FAULTS: {item!r} is not point=N[+][:action]") from None
            self.inject(point, at, and_after, action or "raise")

    def check(self, point: str) -> None:
        if not self._plans:
            return
        with self._lock:
            plan = self._plans.get(point)
            if plan is None:
                return
            self._hits[point] += 1
            hit = self._hits[point]
        at, and_after, action = plan
        if hit == at or (and_after and hit > at):
            if action == "hang":
                while True:  # until the process is killed: what a stuck device or deadlock looks like
                    time.sleep(3600)
            if action == "exit":
                os._exit(1)
            raise InjectedFault(f"injected fault at {point!r} (hit {hit})")


FAULTS = FaultPoints()
FAULTS.configure(os.environ.get("TIDEMIND_INJECT_FAULTS", ""))
