"""The schedule study behind ``plansim compare``: known schedules, the heuristic and the MIP on one
scenario, each simulated.

* Known schedules run on the workload their layout needs for the scenario's model
  (:func:`engine.planners.schedules.library.schedule_workload`) in the *step-level* view
  (:func:`engine.planners.schedules.fusion.runtime_plan`): each step is one op, as a runtime executes it,
  with the scenario's F&B overlap time. This is the view the published formulas describe.
* On a ``transformer`` workload each known schedule runs on the model built for it
  (:func:`engine.planners.transformer_schedule.scenario_for_schedule`: its ``vpp``, stage placement
  and gradient edges) in the *op-level* view
  (:func:`engine.planners.transformer_schedule.plan_transformer`, what ``plansim simulate`` runs:
  every compute op, TP all-reduce and epilogue, and the step-end reductions and optimizer step).
  A schedule that needs a layout the model cannot take (``dualpipe``'s two directions, layers
  that do not split over ``pp x vpp``, a micro-batch count outside the schedule's rule) is
  skipped with the reason.
* The heuristic and the MIP plan the scenario's own workload (one op per pass). The MIP gets a
  memory cap (default: the smallest peak memory among the known schedules, or the scenario's
  cap; on a transformer it includes weights, gradients and optimizer states) and, as warm start,
  the best op-level plan of a known schedule that runs on the scenario's own layout and fits the
  cap (on a transformer: the schedules whose workload is the one built, e.g. gpipe and 1f1b).
* Every plan is simulated (:func:`simulator.simulate.simulate`, the scenario's simulator options,
  out-of-memory recorded rather than fatal) and reported by its *simulated* makespan, bubble
  (makespan - max compute-busy time) and peak memory per GPU (bytes); ``solve_s`` is the wall
  time to produce the plan (s).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from engine.core.errors import InputError
from engine.core.ir import Plan, Workload
from engine.planners.heuristic import plan_heuristic
from engine.planners.mip.plan import plan_mip
from engine.planners.schedules.fusion import runtime_plan
from engine.planners.schedules.library import SCHEDULE_NAMES, applicable, generate
from engine.planners.schedules.timing import schedule_plan
from engine.planners.transformer_schedule import (
    built_schedule,
    is_transformer,
    plan_transformer,
    scenario_for_schedule,
    spec_for_schedule,
)
from engine.planners.validate import peak_memory
from engine.scenario.simulation import simulate_scenario
from engine.workloads.transformer import spec_from_dict
from engine.workloads.transformer_costs import SPLIT_BACKWARD

Progress = Callable[[str], None]


def simulate_row(plan: Plan, workload: Workload, scenario, solve_s: float) -> tuple[dict[str, Any], Any]:
    """(the row ``plansim compare`` prints for a plan, the simulation result)."""
    res = simulate_scenario(scenario, plan, workload=workload, allow_oom=True)
    row = {"makespan_us": float(res.makespan_us), "bubble_us": float(res.bubble_us),
           "bubble_ratio": float(res.bubble_ratio), "peak_memory_bytes": int(res.peak_memory_bytes),
           "solve_s": round(float(solve_s), 3)}
    return row, res


def known_schedules(scenario, names=SCHEDULE_NAMES, progress: Progress | None = None) -> dict[str, Any]:
    """Per name: {"row", "plan", "workload", "sim"} for each applicable schedule, or a reason (str)."""
    out: dict[str, Any] = {}
    if is_transformer(scenario):
        return transformer_schedules(scenario, names, progress)
    if (scenario.workload.meta or {}).get("kind") != "pipeline":
        return {name: "the workload is not a pipeline or a transformer" for name in names}
    for name, found in applicable(scenario.workload, scenario.comm, names).items():
        if isinstance(found, str):
            out[name] = found
            continue
        wl, sched = found
        t0 = time.perf_counter()
        plan, fused = runtime_plan(sched, wl, scenario.comm, scenario.cluster.gpu_model)
        solve_s = time.perf_counter() - t0
        row, res = simulate_row(plan, fused, scenario, solve_s)
        out[name] = {"row": row, "plan": plan, "workload": fused, "sim": res}
        if progress:
            progress(f"{name}: makespan {row['makespan_us']:,.0f} us, bubble {row['bubble_us']:,.0f} us")
    return out


def transformer_schedules(scenario, names=SCHEDULE_NAMES, progress: Progress | None = None) -> dict[str, Any]:
    """Per name, {"row", "plan", "workload", "sim"} of the op-level plan of that schedule on the
    transformer model built for it (module docstring), or the reason it does not apply (str)."""
    out: dict[str, Any] = {}
    spec = spec_from_dict(scenario.raw["workload"])
    for name in names:
        t0 = time.perf_counter()
        try:
            sc = scenario_for_schedule(scenario, name)
            plan = plan_transformer(spec_for_schedule(spec, name), sc.workload, name, sc.cluster, sc.comm)
        except InputError as e:
            out[name] = e.reason
            continue
        row, res = simulate_row(plan, sc.workload, sc, time.perf_counter() - t0)
        out[name] = {"row": row, "plan": plan, "workload": sc.workload, "sim": res}
        if progress:
            progress(f"{name}: makespan {row['makespan_us']:,.0f} us, bubble {row['bubble_us']:,.0f} us")
    return out


def _own_layout_plans(scenario):
    """(name, op-level plan) of every known schedule that runs on the scenario's own workload."""
    wl = scenario.workload
    if is_transformer(scenario):
        spec = spec_from_dict(scenario.raw["workload"])
        built = spec_for_schedule(spec, built_schedule(wl))
        for name in SCHEDULE_NAMES:
            try:
                own = spec_for_schedule(spec, name)
            except InputError:
                continue
            same_graph = ((name in SPLIT_BACKWARD) == (built.parallelism.schedule in SPLIT_BACKWARD)
                          and own.parallelism.vpp == built.parallelism.vpp
                          and [own.stage_rank(v) for v in range(own.stages)] == wl.meta["stage_ranks"])
            if same_graph:
                try:
                    yield name, plan_transformer(own, wl, name, scenario.cluster, scenario.comm)
                except InputError:
                    continue
        return
    if (wl.meta or {}).get("kind") != "pipeline":
        return
    for name in SCHEDULE_NAMES:
        try:
            yield name, schedule_plan(generate(name, wl, scenario.comm), wl, scenario.comm, scenario.cluster.gpu_model)
        except InputError:
            continue


def warm_start_plan(scenario, cap: int | None) -> tuple[str | None, Plan | None]:
    """The best op-level plan, among known schedules that run on the scenario's own workload
    (:func:`_own_layout_plans`), whose peak memory fits ``cap`` (bytes per GPU): (name, plan), or
    (None, None)."""
    wl = scenario.workload
    best: tuple[float, str, Plan] | None = None
    for name, plan in _own_layout_plans(scenario):
        if cap is not None and max(peak_memory(plan, wl).values(), default=0) > cap:
            continue
        span = plan.makespan_us
        assert span is not None  # Plan.__post_init__ fills it in
        if best is None or span < best[0]:
            best = (span, name, plan)
    return (None, None) if best is None else (best[1], best[2])


def mip_cap(scenario, known: dict[str, Any], cap_from: str | None = None) -> int | None:
    """The MIP's per-GPU memory cap (bytes): ``cap_from`` (a schedule name whose peak to use, or
    a number of bytes), else the scenario's cap, else the smallest peak among known schedules
    (None when there is none, or it is 0: nothing to cap)."""
    if cap_from is not None:
        if str(cap_from).isdigit():
            return int(cap_from)
        entry = known.get(cap_from)
        if not isinstance(entry, dict):
            why = entry if isinstance(entry, str) else "not compared"
            raise InputError(None, "--mip-cap", f"schedule {cap_from!r} has no peak memory here ({why})")
        return entry["row"]["peak_memory_bytes"]
    if scenario.memory_cap_bytes is not None:
        return int(scenario.memory_cap_bytes)
    peaks = [e["row"]["peak_memory_bytes"] for e in known.values() if isinstance(e, dict)]
    return min(peaks) if peaks and min(peaks) > 0 else None


def compare(scenario, names=SCHEDULE_NAMES, *, heuristic: bool = True, mip: bool = True, cap_from: str | None = None,
            time_limit_s: float | None = None, threads: int | None = None, merge: str | int | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Run the study (module docstring). Returns ``{"schedules": {name: row}, "skipped": {name:
    reason}, "mip_memory_cap_bytes": cap, "entries": {name: {"plan", "workload", "sim"}}}``."""
    known = known_schedules(scenario, names, progress)
    entries = {n: e for n, e in known.items() if isinstance(e, dict)}
    skipped = {n: e for n, e in known.items() if isinstance(e, str)}
    cap = mip_cap(scenario, known, cap_from)
    wl = scenario.workload
    if heuristic:
        t0 = time.perf_counter()
        try:
            plan = plan_heuristic(wl, scenario.cluster, scenario.comm, memory_cap=cap)
            row, res = simulate_row(plan, wl, scenario, time.perf_counter() - t0)
            entries["heuristic"] = {"row": row, "plan": plan, "workload": wl, "sim": res}
        except InputError as e:
            skipped["heuristic"] = e.reason
    if mip:
        opts = scenario.solver
        warm_name, warm = warm_start_plan(scenario, cap)
        if progress:
            progress(f"mip: cap {cap} bytes per GPU, warm start {warm_name or 'its own (heuristic, list schedules)'}, "
                     f"time limit {time_limit_s or opts.time_limit_s} s")
        t0 = time.perf_counter()
        try:
            plan = plan_mip(wl, scenario.cluster, scenario.comm, time_limit_s=time_limit_s or opts.time_limit_s,
                            gap=opts.gap, solver=opts.name, threads=threads or opts.threads, warm_start=warm,
                            memory_cap=cap, merge=merge if merge is not None else opts.merge)
            plan.meta["compare_warm_start"] = warm_name
            row, res = simulate_row(plan, wl, scenario, time.perf_counter() - t0)
            entries["mip"] = {"row": row, "plan": plan, "workload": wl, "sim": res}
        except InputError as e:
            skipped["mip"] = e.reason
    return {"schedules": {n: e["row"] for n, e in entries.items()}, "skipped": dict(sorted(skipped.items())),
            "mip_memory_cap_bytes": cap, "entries": entries}
