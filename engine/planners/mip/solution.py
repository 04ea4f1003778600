"""One solve of an instance's whole model: build it, hand HiGHS the warm start, read the result back.

:func:`solve_instance` is what :func:`engine.planners.mip.plan.plan_mip`, the coarsened pipeline
(:mod:`engine.planners.mip.coarsen`) and the window MIPs (:mod:`engine.planners.mip.lns`) call; the
:class:`Solution` it returns is semi-active and never worse than the warm start for the makespan
objective. Times in us.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.core.errors import InfeasibleError, InputError
from engine.core.interrupt import DeadlineExceeded, deadline
from engine.core.memory import peak_resident
from engine.planners.mip.instance import Instance
from engine.planners.mip.model import DEFAULT_SPEEDUPS, Builder
from engine.planners.mip.nic import NicBlocks
from engine.planners.mip.nic_sched import nic_compact, twins_consistent
from engine.planners.mip.nic_tasks import NicTasks
from engine.planners.mip.solve import diagnose_infeasible, run_solver
from engine.planners.mip.symmetry import (
    devices_interchangeable,
    relabel_devices,
    relabel_twins,
    restrict_devices,
    twin_arcs,
)
from engine.planners.mip.warm import Schedule, compact_safe, makespan, memory_ok, resident_events

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


def solve_instance(inst: Instance, warm: Schedule | None, *, objective: str = "makespan", time_limit_s: float = 30,
                   gap: float = 0.0, solver: str = "highs", threads: int = 2, speedups: dict[str, bool] | None = None,
                   progress: Progress | None = None, makespan_bound: float | None = None,
                   memory_weight_us_per_gib: float | None = None,
                   solver_options: dict[str, Any] | None = None, stall_s: float | None = None,
                   nic: NicTasks | None = None) -> Solution:
    """Build and solve the model of ``inst`` within ``time_limit_s`` (building included); the
    schedule is semi-active, never worse than ``warm`` for the makespan objective. With ``nic``
    (:class:`engine.planners.mip.nic.NicTasks`) transfers hold NICs, and ``warm`` and the result are
    :class:`engine.planners.mip.nic_sched.NicSchedule` (semi-active under the NIC orders too). Raises
    :class:`InfeasibleError` when proven infeasible, :class:`InputError` (field
    ``solver.time_limit_s``) when the time ran out with no plan at all."""
    t_start = time.perf_counter()
    sp = {**DEFAULT_SPEEDUPS, **(speedups or {})}
    if nic is not None:
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
                horizon += weight * max(peak_at_starts(inst, known).values(), default=0)
        else:
            horizon = serial
    try:  # building the model counts against the time limit
        with deadline(t_start + time_limit_s):
            builder, nic_blocks = build_model(model_inst, horizon, sp, objective,
                                              makespan_bound if objective == "min_peak_memory" else None, weight, nic)
    except DeadlineExceeded:
        if warm is None:
            raise InputError(None, "solver.time_limit_s", f"building the MIP of {len(inst)} ops took longer than the "
                             f"{time_limit_s:g} s time limit and no plan is known: raise the limit or coarsen "
                             "(--merge auto)") from None
        lb = model_inst.lower_bound()
        return Solution(warm, "time_limit", lb, relative_gap(makespan(inst, warm), lb), 0, "warm_start",
                        meta={"stopped_in": "model build"})
    res = run_solver(builder.m, builder.info, model_inst, warm_m if sp["warm_start"] else None, builder, solver=solver,
                     time_limit_s=max(0.05, time_limit_s - (time.perf_counter() - t_start)), gap=gap,
                     threads=threads, progress=progress,
                     solver_options=solver_options, stall_s=stall_s, nic=nic_blocks)
    info = builder.info
    if res.infeasible:
        if warm is None:
            diagnose_infeasible(model_inst, sp, solver, threads, time_limit_s)
        # ``warm`` is a valid plan, so "infeasible" is the solver's numerics: keep the plan
        res.meta["model_infeasible"] = True
    if res.sched is None:
        if warm is not None and (sp["warm_start"] or res.infeasible):
            return Solution(warm, "time_limit", max(lb, res.bound or 0.0), relative_gap(makespan(inst, warm), max(lb, res.bound or 0.0)),
                            info.n_binaries, "warm_start", meta=res.meta)
        raise InputError(None, "solver.time_limit_s", f"no plan found within the time limit ({time_limit_s:g} s; "
                         "not proven infeasible: raise the time limit or relax the memory cap)")
    if nic is None:
        sched = compact_safe(model_inst, res.sched)
    else:  # the solver's times satisfy the model, compaction under its orders only improves them
        sched = nic_compact(model_inst, nic, res.sched) or res.sched
    span = makespan(inst, sched)
    bound = max(lb, res.bound if res.bound is not None else 0.0)
    if integral(model_inst) and (nic is None or nic.integral()):
        bound = float(math.ceil(bound - 1e-6))
    bound = min(bound, span)
    status = res.status
    g = relative_gap(span, bound) if objective == "makespan" else res.gap
    if objective == "makespan" and g is not None and g <= 1e-6:
        status = "optimal"
    elif status == "optimal" and objective == "makespan" and g is not None and \
            g * span > info.tie_weight * sum(info.ls) + 1e-6 * span:
        status = "feasible"  # within the requested gap, not proven optimal
    return Solution(sched, status, bound, g, info.n_binaries, "solver", res.objective,
                    meta={**res.meta, "solver_status": res.status, **(nic_blocks.stats if nic_blocks is not None else {})})


def build_model(inst: Instance, horizon: float, speedups: dict[str, bool], objective: str = "makespan",
                makespan_bound: float | None = None, memory_weight: float = 0.0,
                nic: NicTasks | None = None) -> tuple[Builder, NicBlocks | None]:
    """The model of ``inst``: the builder's blocks, and with ``nic`` the NIC-capacity blocks
    composed on top (their task arcs' precedence rows are theirs, not the builder's)."""
    builder = Builder(inst, horizon, speedups, objective, makespan_bound, memory_weight,
                      frozenset(nic.uses) if nic is not None else frozenset())
    builder.build()
    return builder, (NicBlocks(builder, nic).add() if nic is not None else None)


def relative_gap(span: float, bound: float) -> float:
    return max(0.0, (span - bound) / span) if span > 0 else 0.0


def integral(inst: Instance) -> bool:
    """True if every duration and delay is a whole number of us (then so is every semi-active makespan)."""
    vals = [t for d in inst.dur for t in d.values()] + [t for e in inst.edges.values() for t in e.values()]
    return all(abs(v - round(v)) < 1e-9 for v in vals)


def peak_at_starts(inst: Instance, sched: Schedule) -> dict[int, int]:
    """Per GPU, the most bytes resident at any op start."""
    out = dict(inst.static)
    for d, events in resident_events(inst, sched).items():
        out[d] = peak_resident(inst.static[d], events)
    return out
