"""Typed option sections of a scenario: what the solver, the simulator and the loop are told.

The scenario loader (:mod:`engine.scenario.loader`) reads each YAML section into one of these
frozen dataclasses, checking every key against the fields here: a field's default is the
scenario's default, its ``types`` metadata the YAML types accepted for it, its ``choices`` the
values allowed. Command-line overrides make a new instance with :func:`dataclasses.replace`.
Times in seconds (solver) or as a fraction (tolerances, gaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

NUMBER = (int, float)


def _opt(default: Any, types: tuple[type, ...], choices: tuple[Any, ...] | None = None,
         low: float | None = 0, high: float | None = None, low_open: bool = False) -> Any:
    """A field with its default, accepted YAML types, allowed values and numeric range
    (``low`` <= value <= ``high``; ``low < value`` with ``low_open``)."""
    return field(default=default, metadata={"types": types, "choices": choices, "range": (low, high, low_open)})


def range_problem(number_range: tuple[float | None, float | None, bool], value: float) -> str | None:
    """Why ``value`` is outside ``number_range`` (from a field's ``range`` metadata), or None.
    The one rule for the scenario file and the command line (NaN and infinities are outside)."""
    low, high, low_open = number_range
    if not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if low is not None and (value < low or (low_open and value == low)):
        return f"must be {'>' if low_open else '>='} {low:g}, got {value!r}"
    if high is not None and value > high:
        return f"must be <= {high:g}, got {value!r}"
    return None


@dataclass(frozen=True)
class SolverOptions:
    """How to plan: the planner (``heuristic``, ``mip``, ``schedule:<name>``) and the MIP's
    solver name, time limit (s), relative gap, threads, coarsening target, warm-start schedule
    name and NIC capacity switch."""

    planner: str = _opt("heuristic", (str,))
    name: str = _opt("highs", (str,))
    time_limit_s: float = _opt(30.0, NUMBER, low=0, high=1e6, low_open=True)
    gap: float = _opt(0.0, NUMBER, high=1.0)
    threads: int = _opt(2, (int,), low=1, high=1024)
    merge: str | int = _opt("none", (str, int))
    warm_start: str | None = _opt(None, (str,))
    nic_capacity: bool = _opt(False, (bool,))


@dataclass(frozen=True)
class SimulatorOptions:
    """How to simulate: ``flow`` (max-min fair flows) or ``alpha_beta`` (closed form), the
    log-sd of duration jitter, symmetry reduction, the comm-over-compute slowdown override and
    whether running out of memory is reported instead of raised."""

    mode: str = _opt("flow", (str,), ("flow", "alpha_beta"))
    jitter: float = _opt(0.0, NUMBER, high=1.0)
    symmetry: bool = _opt(True, (bool,))
    comm_compute_slowdown: float | None = _opt(None, NUMBER)
    allow_oom: bool = _opt(False, (bool,))


@dataclass(frozen=True)
class LoopOptions:
    """When the simulator-in-the-loop refinement stops and how it updates: relative tolerance
    between predicted and simulated makespan, patience (iterations without improvement),
    the iteration cap, the damping of each update and its mode (``edge``, ``class``, ``both``)."""

    tolerance: float = _opt(0.01, NUMBER, high=1.0)
    patience: int = _opt(2, (int,), high=1000)
    max_iters: int = _opt(6, (int,), low=1, high=1000)
    damping: float = _opt(0.5, NUMBER, high=1.0, low_open=True)
    update: str = _opt("both", (str,), ("edge", "class", "both"))
