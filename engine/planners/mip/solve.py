"""Running the solver: warm-start values, HiGHS with callbacks, other Pyomo solvers, and the
infeasibility diagnosis that names the constraint family in one line.

Times in us, sizes in bytes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyomo.environ as pyo

from engine.core.errors import InfeasibleError, InputError
from engine.core.interrupt import DeadlineExceeded, cancel_on_interrupt, deadline
from engine.planners.mip.instance import Instance
from engine.planners.mip.model import Builder, ModelInfo
from engine.planners.mip.nic import NicBlocks, extract_sigma
from engine.planners.mip.nic import warm_values as nic_warm_values
from engine.planners.mip.nic_sched import NicSchedule
from engine.planners.mip.warm import Schedule

# Option names of other solvers for (time limit s, relative gap).
OTHER_SOLVER_OPTIONS = {
    "gurobi": ("TimeLimit", "MIPGap"), "gurobi_direct": ("TimeLimit", "MIPGap"),
    "cplex": ("timelimit", "mipgap"), "cplex_direct": ("timelimit", "mipgap"),
    "cbc": ("sec", "ratio"), "scip": ("limits/time", "limits/gap"), "glpk": ("tmlim", "mipgap"),
}


@dataclass
class RawResult:
    """What the solver returned: a schedule (or None), status, makespan bound (us), objective gap."""

    sched: Schedule | None
    status: str
    bound: float | None
    gap: float | None
    objective: float | None = None
    infeasible: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


# -- warm start ------------------------------------------------------------------------------------

def warm_values(builder: Builder, sched: Schedule, nic: NicBlocks | None = None) -> dict[int, float]:
    """Value of every model variable (by ``id``) in the plan ``sched``, the NIC blocks' too."""
    inst, m, info = builder.inst, builder.m, builder.info
    dev, start = sched
    n = len(inst)
    end = [start[i] + inst.dur[i][dev[i]] for i in range(n)]
    rank = {i: k for k, i in enumerate(inst.topo())}
    vals: dict[int, float] = {}
    for (i, d), v in m.x.items():
        vals[id(v)] = 1.0 if dev[i] == d else 0.0
    for i, v in m.s.items():
        vals[id(v)] = float(start[i])
    vals[id(m.cmax)] = max(end, default=0.0)
    for (i, j), v in m.y.items():
        vals[id(v)] = 1.0 if (start[i], end[i], rank[i]) < (start[j], end[j], rank[j]) else 0.0
    for (i, j), v in m.z.items():
        vals[id(v)] = 1.0 if (dev[i], dev[j]) in info.share[(i, j)] else 0.0
    started = lambda a, o: 1.0 if start[a] <= start[o] + 1e-9 else 0.0
    not_freed = lambda a, o: 1.0 if max(end[r] for r in inst.releasers(a)) > start[o] + 1e-9 else 0.0
    if hasattr(m, "st"):
        for (a, o), v in m.st.items():
            vals[id(v)] = started(a, o)
        for (a, o), v in m.rl.items():
            vals[id(v)] = not_freed(a, o)
        for (a, o, d), v in m.w.items():
            vals[id(v)] = max(0.0, started(a, o) + not_freed(a, o) + (1.0 if dev[a] == d else 0.0) - 2.0)
    if hasattr(m, "peak"):
        peak = max(inst.static.values(), default=0)
        allocs = [a for a in range(n) if inst.alloc[a] > 0]
        for o in allocs:
            live = sum(inst.alloc[a] for a in allocs if dev[a] == dev[o] and started(a, o) and not_freed(a, o))
            peak = max(peak, inst.static[dev[o]] + live)
        vals[id(m.peak)] = float(peak) / builder.mem_unit
    if nic is not None:
        vals.update(nic_warm_values(nic, sched))
    return vals


def extract(builder: Builder, nic: NicBlocks | None = None) -> Schedule:
    """Devices and starts from the loaded variable values."""
    inst, m = builder.inst, builder.m
    dev, start = [], []
    for i in range(len(inst)):
        if len(inst.devices[i]) == 1:
            dev.append(inst.devices[i][0])
        else:
            dev.append(max(inst.devices[i], key=lambda d: (pyo.value(m.x[i, d]) or 0.0, -d)))
        start.append(max(0.0, float(pyo.value(m.s[i]))))
    if nic is not None:  # keep the transfer starts (NIC capacity)
        return NicSchedule(dev, start, extract_sigma(nic, dev))
    return dev, start


# -- HiGHS -----------------------------------------------------------------------------------------

class _Console:
    """Pyomo captures fds 1/2 while HiGHS runs; progress output goes to copies of the real ones."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.out = os.fdopen(os.dup(sys.__stdout__.fileno()), "w", buffering=1)
        self.err = os.fdopen(os.dup(sys.__stderr__.fileno()), "w", buffering=1)
        return self

    def call(self, fn, *args):
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.out, self.err
        try:
            fn(*args)
        finally:
            self.out.flush()
            self.err.flush()
            sys.stdout, sys.stderr = saved

    def __exit__(self, *exc):
        self.out.close()
        self.err.close()


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) and abs(v) < 1e29 else None


# HiGHS logs the first when it keeps a MIP start, the second alone when presolve solves the model
WARM_ACCEPTED = re.compile(r"MIP start solution is feasible|Assessing feasibility of MIP solution[^\n]*: feasible")
_scheduler_threads: list[int] = []  # the thread count HiGHS's process-wide scheduler was started with


def _use_threads(threads: int) -> None:
    """HiGHS starts one scheduler per process with the first solve's thread count and refuses
    (no solve at all) a later solve that asks for another count: restart it when the count changes."""
    import highspy

    if _scheduler_threads and _scheduler_threads[0] != threads:
        highspy.Highs.resetGlobalScheduler(True)
    _scheduler_threads[:] = [threads]


def _run_highs(builder: Builder, warm: Schedule | None, time_limit_s: float, gap: float, threads: int,
               progress: Callable | None, options: dict[str, Any] | None = None,
               stall_s: float | None = None, nic: NicBlocks | None = None) -> RawResult:
    from pyomo.contrib.solver.common.factory import SolverFactory
    from pyomo.contrib.solver.common.results import SolutionStatus, TerminationCondition

    m, info = builder.m, builder.info
    t_in = time.perf_counter()
    _use_threads(int(threads))
    opt = SolverFactory("highs")
    try:  # loading the model into HiGHS is part of the time limit (it can take longer than the solve)
        with deadline(t_in + float(time_limit_s)):
            opt.set_instance(m)
    except DeadlineExceeded:
        return RawResult(None, "time_limit", None, None, meta={"stopped_in": "model load"})
    highs = opt._solver_model  # the highspy.Highs the interface wraps
    colmap = opt._pyomo_var_to_solver_var_map
    meta: dict[str, Any] = {}
    if warm is not None:
        import highspy
        import numpy as np

        vals = np.zeros(highs.getNumCol())
        for vid, v in warm_values(builder, warm, nic).items():
            col = colmap.get(vid)
            if col is not None:
                vals[col] = v
        sol = highspy.HighsSolution()
        sol.col_value = list(vals)
        sol.value_valid = True
        highs.setSolution(sol)
    tie_max = info.tie_weight * sum(info.ls)
    abs_gap = tie_max + 1e-7 * max(1.0, info.horizon) if builder.objective == "makespan" else 1e-9
    state = {"last": -1.0}
    console = _Console() if progress is not None else None
    if progress is not None:
        def on_solution(e):
            d = e.data_out
            console.call(progress, float(d.running_time), _finite(d.objective_function_value), _finite(d.mip_dual_bound))

        def on_tick(e):
            d = e.data_out
            if d.running_time - state["last"] >= 0.5:
                state["last"] = d.running_time
                console.call(progress, float(d.running_time), _finite(d.mip_primal_bound), _finite(d.mip_dual_bound))

        highs.cbMipImprovingSolution += on_solution
        highs.cbMipInterrupt += on_tick
    if builder.objective == "makespan" and builder.sp["load_cut"]:
        # stop as soon as the incumbent meets the proven lower bound (HiGHS may not see it yet)
        target = info.lower_bound + abs_gap

        def on_bound(e):
            if e.data_out.mip_primal_bound <= target:
                e.interrupt()

        highs.cbMipInterrupt += on_bound
    if stall_s is not None:
        # give up when the incumbent has not improved for stall_s seconds (window MIPs follow)
        seen = {"value": math.inf, "since": 0.0}

        def on_stall(e):
            d = e.data_out
            if d.mip_primal_bound < seen["value"] - 1e-9:
                seen["value"], seen["since"] = d.mip_primal_bound, d.running_time
            elif math.isfinite(seen["value"]) and d.running_time - seen["since"] > stall_s:
                e.interrupt()

        highs.cbMipInterrupt += on_stall
    if console is not None:
        console.__enter__()
    quiet = logging.getLogger("pyomo.contrib.solver")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # an interrupt (our stop at the lower bound) is "unhandled" there
    left_s = max(0.05, float(time_limit_s) - (time.perf_counter() - t_in))
    try:
        # Ctrl-C / SIGTERM ask HiGHS to stop (its user-interrupt callback); Interrupted follows
        with cancel_on_interrupt(highs.cancelSolve):
            res = opt.solve(m, time_limit=left_s, rel_gap=float(gap), abs_gap=abs_gap, threads=int(threads),
                            load_solutions=False, raise_exception_on_nonoptimal_result=False,
                            solver_options={"random_seed": 0, "mip_feasibility_tolerance": 1e-7,
                                            "mip_heuristic_effort": 0.3, **(options or {})})
    finally:
        quiet.setLevel(level)
        if console is not None:
            console.__exit__(None, None, None)
    meta["warm_start_accepted"] = bool(WARM_ACCEPTED.search(res.solver_log or ""))
    tc = res.termination_condition
    if tc in (TerminationCondition.provenInfeasible, TerminationCondition.infeasibleOrUnbounded):
        return RawResult(None, "infeasible", None, None, infeasible=True, meta=meta)
    has_sol = res.solution_status in (SolutionStatus.optimal, SolutionStatus.feasible)
    sched = None
    if has_sol:
        res.solution_loader.load_vars()
        sched = extract(builder, nic)
    status = {TerminationCondition.convergenceCriteriaSatisfied: "optimal",
              TerminationCondition.maxTimeLimit: "time_limit"}.get(tc, "feasible")
    inc, bnd = _finite(res.incumbent_objective), _finite(res.objective_bound)
    gap_obj = None if inc is None or bnd is None else max(0.0, (inc - bnd) / max(abs(inc), 1e-12))
    bound = None
    if builder.objective == "makespan" and bnd is not None:
        bound = bnd - tie_max
    return RawResult(sched, status, bound, gap_obj, inc, meta=meta)


def _run_other(builder: Builder, warm: Schedule | None, name: str, time_limit_s: float, gap: float,
               threads: int, extra: dict[str, Any] | None = None, nic: NicBlocks | None = None) -> RawResult:
    from pyomo.opt import TerminationCondition as TC

    m = builder.m
    try:
        opt = pyo.SolverFactory(name)
        available = opt is not None and opt.available(exception_flag=False)
    except Exception:  # noqa: BLE001 -- a broken plugin is "not available" to the user
        available = False
    if not available:
        raise InputError(None, "solver.name", f"solver {name!r} is not installed (HiGHS is: use --solver highs)")
    tl, gp = OTHER_SOLVER_OPTIONS.get(name, (None, None))
    options = {}
    if tl:
        options[tl] = float(time_limit_s)
    if gp:
        options[gp] = float(gap)
    options.update(extra or {})
    kwargs: dict[str, Any] = {"options": options, "load_solutions": False}
    if warm is not None:
        vals = warm_values(builder, warm, nic)
        for v in m.component_data_objects(pyo.Var):
            if id(v) in vals:
                v.set_value(vals[id(v)], skip_validation=True)
        if getattr(opt, "warm_start_capable", lambda: False)():
            kwargs["warmstart"] = True
    res = opt.solve(m, **kwargs)
    tc = res.solver.termination_condition
    if tc in (TC.infeasible, TC.infeasibleOrUnbounded):
        return RawResult(None, "infeasible", None, None, infeasible=True)
    sched = None
    if len(res.solution) > 0:
        m.solutions.load_from(res)
        sched = extract(builder, nic)
    status = "optimal" if tc == TC.optimal else ("time_limit" if tc == TC.maxTimeLimit else "feasible")
    bnd = _finite(res.problem.lower_bound) if res.problem.lower_bound is not None else None
    bound = bnd - builder.info.tie_weight * sum(builder.info.ls) if bnd is not None and builder.objective == "makespan" else None
    return RawResult(sched, status, bound, None)


def run_solver(model, info: ModelInfo, inst: Instance, warm: Schedule | None, builder: Builder, *, solver: str,
               time_limit_s: float, gap: float, threads: int, progress: Callable | None,
               solver_options: dict[str, Any] | None = None, stall_s: float | None = None,
               nic: NicBlocks | None = None) -> RawResult:
    """Solve ``builder``'s model (with its NIC blocks ``nic``, if any) with ``solver`` (HiGHS by default), warm-started from ``warm``;
    ``solver_options`` go to the solver as they are (e.g. HiGHS ``mip_heuristic_effort``).
    With ``stall_s``, HiGHS stops once its incumbent has not improved for that long."""
    if solver == "highs":
        return _run_highs(builder, warm, time_limit_s, gap, threads, progress, solver_options, stall_s, nic)
    return _run_other(builder, warm, solver, time_limit_s, gap, threads, solver_options, nic)


# -- infeasibility -----------------------------------------------------------------------------------

def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB" if n >= (1 << 20) else f"{n} bytes"


def diagnose_static(inst: Instance, workload) -> None:
    """Raise :class:`InfeasibleError` for inputs no plan can satisfy: no eligible GPU, a
    collective outside the cluster, static memory over the cap, an op that fits nowhere, or
    allocations the dependencies force to be live together over the cap."""
    n = inst.n_devices
    for i, o in enumerate(inst.ids):
        if not inst.devices[i]:
            op = workload.op(o)
            raise InfeasibleError(None, f"ops[{o}].devices",
                                  f"eligibility: op {o} may run on GPUs {list(op.devices or ())}, none of which "
                                  f"exists in the {n}-GPU cluster")
        occ = inst.occupies[i]
        if occ is not None and any(g >= n for g in occ):
            raise InfeasibleError(None, f"ops[{o}].collective.group",
                                  f"eligibility: collective {o} spans GPUs {list(occ)}, beyond the {n}-GPU cluster")
    for d in range(n):
        if inst.static[d] > inst.cap[d]:
            raise InfeasibleError(None, None, f"memory on GPU {d}: static {_gib(inst.static[d])} exceeds the "
                                  f"cap {_gib(inst.cap[d])}")
    for i, o in enumerate(inst.ids):
        if inst.alloc[i] and all(inst.static[d] + inst.alloc[i] > inst.cap[d] for d in inst.devices[i]):
            d = inst.devices[i][0]
            raise InfeasibleError(None, None, f"memory on GPU {d}: op {o} allocates {_gib(inst.alloc[i])} on top "
                                  f"of {_gib(inst.static[d])} static, over the cap {_gib(inst.cap[d])} "
                                  f"(and on every other GPU it may use)")
    # allocations on one fixed GPU that the dependencies keep live at an op's start
    by_dev: dict[int, list[int]] = {}
    for i in range(len(inst)):
        pinned = inst.fixed_device(i)
        if inst.alloc[i] and pinned is not None:
            by_dev.setdefault(pinned, []).append(i)
    for d, ops in sorted(by_dev.items()):
        for i in ops:
            live = [a for a in ops if a == i or (inst.ordered(a, i) and any(
                (r == i or inst.ordered(i, r)) and inst.pmin(r) > 0 for r in inst.releasers(a)))]
            used = inst.static[d] + sum(inst.alloc[a] for a in live)
            if used > inst.cap[d]:
                names = ", ".join(inst.ids[a] for a in live[:4]) + (", ..." if len(live) > 4 else "")
                raise InfeasibleError(None, None, f"memory on GPU {d}: when {inst.ids[i]} starts, {len(live)} "
                                      f"allocations ({names}) must be live: {_gib(used)} with static, over the cap "
                                      f"{_gib(inst.cap[d])}")


def diagnose_infeasible(inst: Instance, speedups: dict[str, bool], solver: str, threads: int,
                        time_limit_s: float) -> None:
    """After the solver proved the model infeasible: find the family (memory on which GPU) by
    re-solving with memory limited to one GPU at a time, and raise :class:`InfeasibleError`."""
    horizon = inst.serial_bound()
    limit = max(1.0, min(10.0, time_limit_s / 4))
    devices = sorted({d for i in range(len(inst)) if inst.alloc[i] for d in inst.devices[i]})
    for d in devices:
        only = inst.restricted()
        only.cap = {g: (inst.cap[g] if g == d else 1 << 62) for g in range(inst.n_devices)}
        b = Builder(only, horizon, {**speedups, "tight_big_m": False})
        b.build()
        res = run_solver(b.m, b.info, only, None, b, solver=solver, time_limit_s=limit, gap=1.0, threads=threads,
                         progress=None)
        if res.infeasible:
            raise InfeasibleError(None, None, f"memory on GPU {d}: no order of its ops keeps the resident bytes "
                                  f"under the cap {_gib(inst.cap[d])}")
    raise InfeasibleError(None, None, "memory: the caps cannot all be met at once (each GPU alone can be)"
                          if devices else "scheduling: the model has no feasible plan")
