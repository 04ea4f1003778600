"""Planner dispatch: name -> function(scenario, options) -> Plan, and the validator gate.

Every plan that leaves :func:`plan_scenario` has passed :func:`engine.planners.validate.validate_plan`;
a plan that fails it is a bug in a planner and raises :class:`PlanInvalidError`, never output.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from engine.core.errors import InputError
from engine.core.ir import Plan
from engine.core.options import SolverOptions
from engine.planners.heuristic import plan_heuristic
from engine.planners.mip.plan import plan_mip_scenario
from engine.planners.schedules.library import schedule_planner
from engine.planners.transformer_schedule import transformer_schedule_plan
from engine.planners.validate import validate_plan


class PlanInvalidError(RuntimeError):
    """A planner produced a plan the independent validator rejects (a bug, not bad input)."""


Progress = Callable[[float, float | None, float | None], None]
Planner = Callable[[Any, SolverOptions, Plan | None, Progress | None], Plan]


def _heuristic(scenario, options: SolverOptions, warm: Plan | None, progress: Progress | None) -> Plan:
    return plan_heuristic(scenario.workload, scenario.cluster, scenario.comm, memory_cap=scenario.memory_cap_bytes)


def _schedule(scenario, options: SolverOptions, warm: Plan | None, progress: Progress | None) -> Plan:
    if (scenario.workload.meta or {}).get("kind") == "transformer":
        return transformer_schedule_plan(scenario, options.planner.split(":", 1)[1])
    return schedule_planner(scenario, options)


def _mip(scenario, options: SolverOptions, warm: Plan | None, progress: Progress | None) -> Plan:
    return plan_mip_scenario(scenario, options, warm, progress)


# name -> planner(scenario, options, warm-start plan, progress callback). Options are the
# scenario's ``solver`` section with any command-line overrides applied.
PLANNERS: dict[str, Planner] = {
    "heuristic": _heuristic,
    "schedule:": _schedule,
    "mip": _mip,
}


def named_schedule_planner(scenario) -> str | None:
    """A transformer workload's named schedule as a planner (``schedule:<parallelism.schedule>``),
    else None: what ``simulate``, ``loop`` and ``whatif`` run unless ``--planner`` asks otherwise."""
    meta = scenario.workload.meta or {}
    if meta.get("kind") == "transformer":
        return f"schedule:{meta['parallelism']['schedule']}"
    return None


def default_simulation_planner(scenario) -> str:
    """What ``plansim simulate`` plans with when no plan is given: a transformer workload's named
    schedule (``parallelism.schedule``), else the heuristic."""
    return named_schedule_planner(scenario) or "heuristic"


def planner_names() -> list[str]:
    return sorted(PLANNERS)


def plan_scenario(scenario, planner: str | None = None, *, warm_plan: Plan | None = None,
                  progress: Progress | None = None, **overrides: Any) -> Plan:
    """Plan ``scenario`` with ``planner`` (default: the scenario's ``solver.planner``).

    ``overrides`` replace fields of the scenario's :class:`SolverOptions` (``None`` keeps the
    scenario's value); ``warm_plan`` is a plan the MIP starts from; ``progress(elapsed_s,
    incumbent_us, bound_us)`` is called while the MIP solves."""
    options = replace(scenario.solver, **{k: v for k, v in overrides.items() if v is not None})
    name = planner or options.planner
    key = name.split(":", 1)[0] + ":" if ":" in name else name
    fn = PLANNERS.get(key)
    if fn is None:
        raise InputError(scenario.path, "solver.planner", f"unknown planner {name!r}; one of {', '.join(planner_names())}")
    plan = fn(scenario, replace(options, planner=name), warm_plan, progress)
    violations = validate_plan(plan, scenario.workload, scenario.cluster, scenario.comm, scenario.memory_cap_bytes)
    if violations:
        raise PlanInvalidError(f"planner {name} produced an invalid plan ({len(violations)} violations): {violations[0]}")
    return plan
