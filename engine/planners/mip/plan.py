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

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.core.errors import InfeasibleError, InputError
from engine.core.ir import Placement, Plan, Workload
from engine.planners.mip.instance import Instance
from engine.planners.mip.model import DEFAULT_SPEEDUPS, Builder
from engine.planners.mip.solve import diagnose_static, run_solver
from engine.planners.mip.symmetry import (devices_interchangeable, relabel_devices, relabel_twins, restrict_devices,
                                 twin_arcs)
from engine.planners.mip.warm import Schedule, best_schedule, compact_safe, makespan, memory_ok

OBJECTIVES = ("makespan", "min_peak_memory", "weighted")
# With window MIPs (LNS) on, the full model gets the time limit but LNS_RESERVE of it, and stops
# early once its incumbent has stalled for STALL_SHARE of the limit (at least STALL_MIN_S).
LNS_RESERVE, STALL_SHARE, STALL_MIN_S = 0.25, 0.15, 3.0
GIB = 1 << 30
Progress = Callable[[float, float | None, float | None], None]


@dataclass
class Solution:
    """A solve's outcome on an instance: schedule, status and bounds (us)."""

    sched: Schedule
    status: str
    bound: float
    gap: float | None
    n_binaries: int = 0
    source: str = "solver"
    objective: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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
        from engine.planners.mip.nic import nic_tasks

        nic = nic_tasks(inst, workload, cluster) or None  # None: no transfer can cross nodes
    opts = dict(objective=objective, time_limit_s=float(time_limit_s), gap=float(gap), solver=solver,
                threads=int(threads), speedups=sp, progress=progress, makespan_bound=makespan_bound_us,
                memory_weight_us_per_gib=memory_weight_us_per_gib, solver_options=solver_options)

    from engine.planners.mip.coarsen import resolve_merge, solve_coarsened

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
            from engine.planners.mip.lns import improve

            before = makespan(inst, sol.sched)
            sol.sched, stats = improve(inst, sol.sched, deadline - time.perf_counter(), opts)
            span = makespan(inst, sol.sched)
            sol.meta.update(stats)
            sol.n_binaries = max(sol.n_binaries, stats["lns_max_binaries"])
            sol.gap = _gap(span, sol.bound)
            sol.status = "optimal" if sol.gap <= 1e-6 else "time_limit"
            if span < before - 1e-9:
                sol.source = "lns"
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
    if given is not None:
        extra.append(("given", schedule_from_plan(inst, given)))
    try:
        from engine.planners.heuristic import plan_heuristic
    except ImportError:
        plan_heuristic = None
    if plan_heuristic is not None:
        try:
            extra.append(("heuristic", schedule_from_plan(inst, plan_heuristic(workload, cluster, comm, memory_cap=memory_cap))))
        except InputError:
            pass  # the heuristic found no plan under the cap; the list schedules may
    if nic is not None:
        from engine.planners.mip.nic_sched import best_nic_schedule

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


def solve_instance(inst: Instance, warm: Schedule | None, *, objective: str = "makespan", time_limit_s: float = 30,
                   gap: float = 0.0, solver: str = "highs", threads: int = 2, speedups: dict[str, bool] | None = None,
                   progress: Progress | None = None, makespan_bound: float | None = None,
                   memory_weight_us_per_gib: float | None = None,
                   solver_options: dict[str, Any] | None = None, stall_s: float | None = None,
                   nic=None) -> Solution:
    """Build and solve the model of ``inst`` within ``time_limit_s`` (building included); the
    schedule is semi-active, never worse than ``warm`` for the makespan objective. With ``nic``
    (:class:`engine.planners.mip.nic.NicTasks`) transfers hold NICs, and ``warm`` and the result are
    :class:`engine.planners.mip.nic_sched.NicSchedule` (semi-active under the NIC orders too). Raises
    :class:`InfeasibleError` when proven infeasible, :class:`InputError` (field
    ``solver.time_limit_s``) when the time ran out with no plan at all."""
    t_start = time.perf_counter()
    sp = {**DEFAULT_SPEEDUPS, **(speedups or {})}
    if nic is not None:
        from engine.planners.mip.nic_sched import nic_compact, twins_consistent

        if warm is not None and not hasattr(warm, "sigma"):  # a schedule without transfer times
            warm = nic_compact(inst, nic, warm)
    model_inst, warm_m = inst, warm
    if sp["symmetry"]:
        arcs = twin_arcs(inst)
        if arcs and nic is not None and not twins_consistent(inst, nic):
            arcs = []
        if arcs:
            model_inst = inst.restricted(order_arcs=arcs)
            warm_m = relabel_twins(inst, warm) if warm is not None else None
        elif devices_interchangeable(inst) and nic is None:
            model_inst = restrict_devices(inst)
            warm_m = relabel_devices(inst, warm) if warm is not None else None
        if warm_m is not None and nic is not None:
            warm_m = warm_m if warm_m is warm else nic_compact(model_inst, nic, warm_m)
        elif warm_m is not None:
            warm_m = compact_safe(model_inst, warm_m)
            if not memory_ok(model_inst, warm_m):
                warm_m = None
    serial = model_inst.serial_bound() + (nic.serial_extra() if nic is not None else 0.0)
    warm_span = makespan(inst, warm) if warm is not None else None
    lb = model_inst.lower_bound()
    if objective == "min_peak_memory":
        bound = makespan_bound if makespan_bound is not None else warm_span
        if bound is None:
            bound = serial
        if bound < lb - 1e-9:
            raise InfeasibleError(None, "objective.makespan_bound_us",
                                  f"the makespan bound {bound:g} us is below the lower bound {lb:g} us")
        horizon, weight = bound, 0.0
    else:
        weight = 0.0
        if objective == "weighted":
            cap_gib = max(inst.cap.values()) / GIB
            per_gib = memory_weight_us_per_gib if memory_weight_us_per_gib is not None else \
                (warm_span or serial) / max(cap_gib, 1e-9)
            weight = per_gib / GIB
        # the best known plan bounds the optimum, also when its relabelled image was dropped as a
        # MIP start (relabelling twins or devices keeps makespan and memory; only compaction may not)
        known = warm_m if warm_m is not None else warm
        if known is not None and sp["warm_start"]:
            horizon = makespan(inst, known)
            if objective == "weighted":
                horizon += weight * max(_peak(inst, known).values(), default=0)
        else:
            horizon = serial
    builder = Builder(model_inst, horizon, sp, objective, makespan_bound if objective == "min_peak_memory" else None,
                      weight, nic)
    model, info = builder.build()
    res = run_solver(model, info, model_inst, warm_m if sp["warm_start"] else None, builder, solver=solver,
                     time_limit_s=max(0.5, time_limit_s - (time.perf_counter() - t_start)), gap=gap,
                     threads=threads, progress=progress,
                     solver_options=solver_options, stall_s=stall_s)
    if res.infeasible:
        if warm is None:
            from engine.planners.mip.solve import diagnose_infeasible

            diagnose_infeasible(model_inst, sp, solver, threads, time_limit_s)
        # ``warm`` is a valid plan, so "infeasible" is the solver's numerics: keep the plan
        res.meta["model_infeasible"] = True
    if res.sched is None:
        if warm is not None and (sp["warm_start"] or res.infeasible):
            return Solution(warm, "time_limit", max(lb, res.bound or 0.0), _gap(makespan(inst, warm), max(lb, res.bound or 0.0)),
                            info.n_binaries, "warm_start", meta=res.meta)
        raise InputError(None, "solver.time_limit_s", f"no plan found within the time limit ({time_limit_s:g} s; "
                         "not proven infeasible: raise the time limit or relax the memory cap)")
    if nic is None:
        sched = compact_safe(model_inst, res.sched)
    else:  # the solver's times satisfy the model, compaction under its orders only improves them
        sched = nic_compact(model_inst, nic, res.sched) or res.sched
    span = makespan(inst, sched)
    bound = max(lb, res.bound if res.bound is not None else 0.0)
    if _integral(model_inst) and (nic is None or nic.integral()):
        bound = float(math.ceil(bound - 1e-6))
    bound = min(bound, span)
    status = res.status
    g = _gap(span, bound) if objective == "makespan" else res.gap
    if objective == "makespan" and g is not None and g <= 1e-6:
        status = "optimal"
    elif status == "optimal" and objective == "makespan" and g is not None and \
            g * span > info.tie_weight * sum(info.ls) + 1e-6 * span:
        status = "feasible"  # within the requested gap, not proven optimal
    return Solution(sched, status, bound, g, info.n_binaries, "solver", res.objective,
                    meta={**res.meta, "solver_status": res.status, **getattr(builder, "nic_stats", {})})


def _gap(span: float, bound: float) -> float:
    return max(0.0, (span - bound) / span) if span > 0 else 0.0


def _integral(inst: Instance) -> bool:
    """True if every duration and delay is a whole number of us (then so is every semi-active makespan)."""
    vals = [t for d in inst.dur for t in d.values()] + [t for e in inst.edges.values() for t in e.values()]
    return all(abs(v - round(v)) < 1e-9 for v in vals)


def _peak(inst: Instance, sched: Schedule) -> dict[int, int]:
    """Per GPU, the most bytes resident at any op start."""
    dev, start = sched
    end = [start[i] + inst.dur[i][dev[i]] for i in range(len(inst))]
    out = dict(inst.static)
    allocs = [a for a in range(len(inst)) if inst.alloc[a] > 0]
    for o in allocs:
        t, d = start[o], dev[o]
        live = sum(inst.alloc[a] for a in allocs if dev[a] == d and start[a] <= t + 1e-9
                   and max(end[r] for r in inst.releasers(a)) > t + 1e-9)
        out[d] = max(out[d], inst.static[d] + live)
    return out


def build_plan(workload: Workload, inst: Instance, sol: Solution, cluster, comm, memory_cap: int | None,
               objective: str = "makespan", nic=None) -> Plan:
    """The plan of a solution: semi-active (``engine.planners.validate.compact``) and validated. With
    ``nic`` the solution is already semi-active under its NIC orders (plain compaction would
    drop the NIC waits): its times are kept and its transfers start at the model's ``sigma``."""
    from engine.planners.validate import compact, make_transfers, validate_plan

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
        from engine.planners.mip.nic_sched import plan_transfers

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
    plan.lower_bound_us = min(sol.bound, plan.makespan_us)
    plan.mip_gap = _gap(plan.makespan_us, plan.lower_bound_us) if objective == "makespan" else sol.gap
    return plan


def stderr_progress() -> Progress:
    """A progress display for people: one self-overwriting stderr line (elapsed, incumbent, bound)."""
    import click

    def show(elapsed: float, incumbent: float | None, bound: float | None) -> None:
        inc = f"{incumbent:,.1f}" if incumbent is not None else "-"
        bnd = f"{bound:,.1f}" if bound is not None else "-"
        gap = f"{100 * (incumbent - bound) / incumbent:.2f}%" if incumbent and bound is not None else "-"
        click.echo(f"\r  MIP {elapsed:6.1f} s   incumbent {inc}   bound {bnd}   gap {gap}   ", err=True, nl=False)

    return show


def plan_mip_scenario(scenario, options: dict[str, Any]) -> Plan:
    """:func:`plan_mip` with a scenario's objective and ``solver`` options (``name``,
    ``time_limit_s``, ``gap``, ``threads``, ``merge``, ``warm_start`` = a schedule name such as
    ``zb-h1`` or a :class:`Plan`, ``progress`` = a callback or ``"stderr"``, ``nic_capacity``).
    ``objective.lambda``
    is in us per GiB of peak memory (0 = the default weight of :func:`plan_mip`)."""
    wl, comm = scenario.workload, scenario.comm
    warm = options.get("warm_start") if isinstance(options.get("warm_start"), Plan) else None
    if options.get("warm_start") and warm is None:
        from engine.planners.schedules import generate, schedule_plan

        warm = schedule_plan(generate(options["warm_start"], wl, comm), wl, comm, scenario.cluster.gpu_model)
    progress = options.get("progress")
    if progress == "stderr":
        progress = stderr_progress()
    obj = scenario.objective or {}
    lam = obj.get("lambda") or None
    try:
        return plan_mip(wl, scenario.cluster, comm, objective=obj.get("kind", "makespan"),
                        time_limit_s=options.get("time_limit_s", 30), gap=options.get("gap", 0.0),
                        solver=options.get("name", "highs"), threads=options.get("threads", 2), warm_start=warm,
                        memory_cap=scenario.memory_cap_bytes, merge=options.get("merge", "none"), progress=progress,
                        makespan_bound_us=obj.get("makespan_bound_us"), memory_weight_us_per_gib=lam,
                        nic_capacity=bool(options.get("nic_capacity", False)))
    finally:
        if progress is not None and options.get("progress") == "stderr":
            import click

            click.echo("", err=True)
