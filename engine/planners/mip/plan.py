"""The MIP planner: :func:`plan_mip` solves the flexible job-shop model with Pyomo + HiGHS.

Flow: workload -> :class:`engine.planners.mip.instance.Instance` -> checks that catch hopeless inputs
(eligibility, memory) -> optional coarsening (:mod:`engine.planners.mip.coarsen`) -> warm start (the best of
the given plan, the heuristic and a few list schedules) -> model (:mod:`engine.planners.mip.model`) with
the horizon set to the warm start's makespan -> HiGHS with a time limit and gap -> if the
makespan is not proven optimal, window MIPs (:mod:`engine.planners.mip.lns`) for the rest of the time ->
the plan, made semi-active by :func:`engine.planners.validate.compact` and checked by
:func:`engine.planners.validate.validate_plan`. The returned plan is never worse than the warm start.
(When compaction would move an allocation before a free on another GPU, the plan keeps the
solver's order of frees: see :func:`engine.planners.mip.warm.compact_safe`.)

HiGHS is driven through ``pyomo.contrib.solver``'s ``highs`` interface (``SolverFactory``
from ``pyomo.contrib.solver.common.factory``); that interface has no warm-start argument, so the
incumbent is handed to the ``highspy.Highs`` object it wraps (``setSolution``) after the model
is loaded. Progress comes from HiGHS callbacks. Other solvers go through ``pyo.SolverFactory``.
"""

from __future__ import annotations

import time
from typing import Any

from engine.core.errors import InputError
from engine.core.ir import Placement, Plan, Workload
from engine.core.options import SolverOptions
from engine.planners.heuristic import plan_heuristic
from engine.planners.mip.coarsen import resolve_merge, solve_coarsened
from engine.planners.mip.instance import Instance
from engine.planners.mip.lns import improve
from engine.planners.mip.model import DEFAULT_SPEEDUPS
from engine.planners.mip.nic_sched import best_nic_schedule, plan_transfers
from engine.planners.mip.nic_tasks import nic_tasks
from engine.planners.mip.solution import Progress, Solution, relative_gap, solve_instance
from engine.planners.mip.solve import diagnose_static
from engine.planners.mip.warm import Schedule, best_schedule, makespan
from engine.planners.schedules import generate, schedule_plan
from engine.planners.validate import compact, make_transfers, validate_plan

OBJECTIVES = ("makespan", "min_peak_memory", "weighted")
# With window MIPs (LNS) on, the full model gets the time limit but LNS_RESERVE of it, and stops
# early once its incumbent has stalled for STALL_SHARE of the limit (at least STALL_MIN_S).
LNS_RESERVE, STALL_SHARE, STALL_MIN_S = 0.25, 0.15, 3.0
def plan_mip(workload: Workload, cluster, comm, *, objective: str = "makespan", time_limit_s: float = 30,
             gap: float = 0.0, solver: str = "highs", threads: int = 2, warm_start: Plan | None = None,
             memory_cap: int | None = None, merge: str | int = "none", speedups: dict[str, bool] | None = None,
             progress: Progress | None = None, makespan_bound_us: float | None = None,
             memory_weight_us_per_gib: float | None = None, solver_options: dict[str, Any] | None = None,
             nic_capacity: bool = False) -> Plan:
    """Plan ``workload`` on ``cluster`` by MIP (times in us).

    ``objective``: ``makespan``; ``min_peak_memory`` (the largest per-GPU peak, bytes, subject to
    makespan <= ``makespan_bound_us``, default the warm start's makespan); ``weighted``
    (makespan + ``memory_weight_us_per_gib`` x peak GiB; default weight: the warm start's
    makespan per GiB of cap, so both terms count alike). ``merge``: ``"none"``, ``"auto"`` or a
    target op count for coarsening. ``speedups``: switches (see
    :data:`engine.planners.mip.model.DEFAULT_SPEEDUPS`) to measure what each buys. ``progress(elapsed_s,
    incumbent, bound)`` is called while the solver runs. ``nic_capacity``: transfers across
    nodes become tasks that cannot overlap on one NIC direction (:mod:`engine.planners.mip.nic`; the full
    model only: no coarsening, no window MIPs); the plan's ``transfers`` then carry the model's
    transfer starts. Raises :class:`InfeasibleError` (one line naming the constraint family)
    when no plan exists.
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise InputError(None, "objective.kind", f"unknown objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    sp = {**DEFAULT_SPEEDUPS, **(speedups or {})}
    unknown = set(sp) - set(DEFAULT_SPEEDUPS)
    if unknown:
        raise InputError(None, "speedups", f"unknown switch {sorted(unknown)[0]!r}; known: {', '.join(DEFAULT_SPEEDUPS)}")
    inst = Instance.from_workload(workload, cluster, comm, memory_cap)
    diagnose_static(inst, workload)
    nic = None
    if nic_capacity:
        nic = nic_tasks(inst, workload, cluster) or None  # None: no transfer can cross nodes
    opts: dict[str, Any] = dict(objective=objective, time_limit_s=float(time_limit_s), gap=float(gap), solver=solver,
                threads=int(threads), speedups=sp, progress=progress, makespan_bound=makespan_bound_us,
                memory_weight_us_per_gib=memory_weight_us_per_gib, solver_options=solver_options)

    target = resolve_merge(merge, inst)
    if objective != "makespan":
        target = None  # coarsening and its polish serve the makespan objective only
    if nic is not None and target is not None and target < len(inst):
        raise InputError(None, "solver.merge", "coarsening does not model NIC capacity: use merge none with nic_capacity")
    warm_name, warm = choose_warm_start(inst, workload, cluster, comm, warm_start, memory_cap, nic)
    deadline = t0 + float(time_limit_s)
    lns = sp["lns"] and objective == "makespan" and nic is None
    if target is not None and target < len(inst):
        sol, n_after = solve_coarsened(inst, target, warm, opts, deadline)
    else:
        left = deadline - time.perf_counter()
        first = left * (1 - LNS_RESERVE) if lns else left
        stall = max(STALL_MIN_S, STALL_SHARE * left) if lns else None
        sol, n_after = solve_instance(inst, warm, **{**opts, "time_limit_s": max(0.5, first), "stall_s": stall},
                                      nic=nic), len(inst)
        stopped_at_gap = sol.gap is not None and sol.gap <= gap
        if lns and sol.status != "optimal" and not stopped_at_gap and deadline - time.perf_counter() > 1.0:
            before = makespan(inst, sol.sched)
            sol.sched, stats = improve(inst, sol.sched, deadline - time.perf_counter(), opts)
            span = makespan(inst, sol.sched)
            sol.meta.update(stats)
            sol.n_binaries = max(sol.n_binaries, stats["lns_max_binaries"])
            sol.gap = relative_gap(span, sol.bound)
            sol.status = "optimal" if sol.gap <= 1e-6 else "time_limit"
            if span < before - 1e-9:
                sol.source = "lns"
    if sol.status == "feasible" and not (gap > 0 and sol.gap is not None and sol.gap <= gap):
        sol.status = "time_limit"  # the limit (or the stall stop before the window MIPs) ended it, not the gap
    if warm is not None and sol.source != "warm_start" and objective == "makespan" and sp["warm_start"]:
        if makespan(inst, sol.sched) > makespan(inst, warm) + 1e-9:
            sol.sched, sol.source = warm, "warm_start"
    plan = build_plan(workload, inst, sol, cluster, comm, memory_cap, objective, nic)
    plan.meta.update({"solver": solver, "n_binaries": sol.n_binaries, "n_ops": len(inst), "n_ops_after_merge": n_after,
                      "objective": objective, "warm_start": warm_name, "source": sol.source,
                      "nic_capacity": bool(nic_capacity),
                      "speedups": {k: bool(v) for k, v in sorted(sp.items())}, **sol.meta})
    plan.solve_s = time.perf_counter() - t0
    return plan


def choose_warm_start(inst: Instance, workload: Workload, cluster, comm, given: Plan | None,
                      memory_cap: int | None, nic=None) -> tuple[str | None, Schedule | None]:
    """The best memory-feasible warm start: the given plan, the heuristic's, list schedules
    (with ``nic``, each made NIC-feasible and compared by its makespan under NIC capacity)."""
    extra: list[tuple[str, Schedule]] = []
    best: tuple[str, Schedule] | None
    if given is not None:
        extra.append(("given", schedule_from_plan(inst, given)))
    try:
        extra.append(("heuristic", schedule_from_plan(inst, plan_heuristic(workload, cluster, comm, memory_cap=memory_cap))))
    except InputError:
        pass  # the heuristic found no plan under the cap; the list schedules may
    if nic is not None:
        best = best_nic_schedule(inst, nic, extra)
    else:
        best = best_schedule(inst, extra)
    return (None, None) if best is None else best


def schedule_from_plan(inst: Instance, plan: Plan) -> Schedule:
    """A plan's devices and starts indexed like ``inst`` (ops missing from the plan: error)."""
    try:
        return ([plan.placements[o].device for o in inst.ids], [plan.placements[o].start for o in inst.ids])
    except KeyError as e:
        raise InputError(None, "warm_start", f"the warm-start plan does not place op {e.args[0]}") from None


def build_plan(workload: Workload, inst: Instance, sol: Solution, cluster, comm, memory_cap: int | None,
               objective: str = "makespan", nic=None) -> Plan:
    """The plan of a solution: semi-active (``engine.planners.validate.compact``) and validated. With
    ``nic`` the solution is already semi-active under its NIC orders (plain compaction would
    drop the NIC waits): its times are kept and its transfers start at the model's ``sigma``."""
    dev, start = sol.sched
    rank = {i: k for k, i in enumerate(inst.topo())}
    placements = {inst.ids[i]: Placement(int(dev[i]), float(start[i]), float(start[i] + inst.dur[i][dev[i]]))
                  for i in range(len(inst))}
    order: dict[int, list[str]] = {}
    for i in sorted(range(len(inst)), key=lambda i: (start[i], start[i] + inst.dur[i][dev[i]], rank[i])):
        order.setdefault(int(dev[i]), []).append(inst.ids[i])
    raw = Plan(workload=workload.name, placements=placements, planner="mip", status=sol.status,
               order=dict(sorted(order.items())), lower_bound_us=sol.bound, mip_gap=sol.gap)
    if nic is not None:
        raw.transfers = plan_transfers(workload, inst, sol.sched, comm)
        plan = raw
    else:
        plan = compact(raw, workload, comm)
    problems = validate_plan(plan, workload, cluster, comm, memory_cap)
    if nic is None and problems and not validate_plan(raw, workload, cluster, comm, memory_cap):
        # compaction can move an allocation before a free on another stream; keep the solver's times
        raw.transfers = make_transfers(raw.placements, workload, comm.delay)
        plan, problems = raw, []
    assert not problems, f"MIP produced an invalid plan: {problems[0]}"
    span = plan.makespan_us
    assert span is not None  # Plan.__post_init__ fills it in
    lower = min(sol.bound, span)
    plan.lower_bound_us = lower
    plan.mip_gap = relative_gap(span, lower) if objective == "makespan" else sol.gap
    return plan


def plan_mip_scenario(scenario, options: SolverOptions, warm_start: Plan | None = None,
                      progress: Progress | None = None) -> Plan:
    """:func:`plan_mip` with a scenario's objective and solver options; the warm start is
    ``warm_start``, else the schedule ``options.warm_start`` names (e.g. ``zb-h1``), else chosen
    by :func:`choose_warm_start`. ``objective.lambda`` is in us per GiB of peak memory (0 = the
    default weight of :func:`plan_mip`)."""
    wl, comm = scenario.workload, scenario.comm
    warm = warm_start
    if warm is None and options.warm_start:
        warm = schedule_plan(generate(options.warm_start, wl, comm), wl, comm, scenario.cluster.gpu_model)
    obj = scenario.objective or {}
    return plan_mip(wl, scenario.cluster, comm, objective=obj.get("kind", "makespan"),
                    time_limit_s=options.time_limit_s, gap=options.gap, solver=options.name, threads=options.threads,
                    warm_start=warm, memory_cap=scenario.memory_cap_bytes, merge=options.merge, progress=progress,
                    makespan_bound_us=obj.get("makespan_bound_us"), memory_weight_us_per_gib=obj.get("lambda") or None,
                    nic_capacity=options.nic_capacity)
