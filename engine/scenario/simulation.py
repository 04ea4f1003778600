"""A plan of a scenario, run in the simulator with the scenario's simulator options and seed.

The one place a scenario's options become :func:`simulator.simulate.simulate` arguments: the
``simulate`` command, the loop, what-if sweeps, ``compare`` and the benchmarks all call it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from engine.core.ir import Plan, Workload
from simulator.result import SimResult
from simulator.simulate import simulate


def simulate_scenario(scenario: Any, plan: Plan, *, workload: Workload | None = None, seed: int | None = None,
                      timeline: bool = False, **overrides: Any) -> SimResult:
    """Simulate ``plan`` of ``scenario``'s workload (or of ``workload``, a view of it such as
    the step-level one) on its cluster. ``overrides`` replace fields of the scenario's
    :class:`engine.core.options.SimulatorOptions` (``None`` keeps the scenario's value);
    ``seed`` defaults to the scenario's; ``timeline`` keeps the series a Chrome trace needs."""
    opts = replace(scenario.simulator, **{k: v for k, v in overrides.items() if v is not None})
    return simulate(plan, workload if workload is not None else scenario.workload, scenario.cluster,
                    seed=scenario.seed if seed is None else seed, jitter=opts.jitter, mode=opts.mode,
                    allow_oom=opts.allow_oom, symmetry=opts.symmetry,
                    comm_compute_slowdown=opts.comm_compute_slowdown, timeline=timeline)
