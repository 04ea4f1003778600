"""MIP regressions: feasible memory-capped instances must never come back "infeasible".

The bug: the memory block decided "allocation a is still live when o starts" from the windows
(``ES[r] + p[r] > LS[o]`` for a's releaser r) with no margin. ES/LS are float sums, so a free
that ends exactly when o starts (the only feasible order here) could round into "live", the
memory row became a constant over the cap and the model was infeasible. Small instances, one
HiGHS thread, time limits of a few seconds.
"""

from __future__ import annotations

import pytest
from fakes import FakeCluster
from oracles import exact_makespan

import engine.planners.mip.solution as mip
from engine.core.comm import CommModel
from engine.core.errors import InfeasibleError, InputError
from engine.core.ir import Edge, Op, Workload
from engine.planners.mip.instance import Instance
from engine.planners.mip.model import DEFAULT_SPEEDUPS, Builder
from engine.planners.mip.plan import plan_mip
from engine.planners.mip.solution import solve_instance
from engine.planners.mip.solve import RawResult
from engine.planners.validate import validate_plan
from engine.workloads.pipeline import build_pipeline

GIB = 1 << 30
# 0.1 + 0.1 + 0.5 = 0.7 but (0.1 + 0.1 + 0.5) - 0.5 = 0.19999999999999996 < 0.1 + 0.1 in floats
PA, PR, PO = 0.1, 0.1, 0.5


def tie_instance() -> Instance:
    """One GPU, cap of one allocation: a (allocates, freed by r) -> r, a -> o (allocates).
    Only a, r, o fits: o must start exactly when r frees a; makespan PA + PR + PO."""
    return Instance(ids=["a", "r", "o"], kind=["compute"] * 3, devices=[(0,)] * 3,
                    dur=[{0: PA}, {0: PR}, {0: PO}], alloc=[1, 0, 1], release=[(1,), (), ()], n_devices=1,
                    static={0: 0}, cap={0: 1}, edges={(0, 1): {}, (0, 2): {}})


def tie_workload() -> Workload:
    ops = [Op("a", PA, devices=(0,), memory_bytes=GIB, release=("r",)), Op("r", PR, devices=(0,)),
           Op("o", PO, devices=(0,), memory_bytes=GIB)]
    return Workload("tie", ops, [Edge("a", "r", 0), Edge("a", "o", 0)])


def test_a_free_ending_at_a_start_is_not_rounded_into_live():
    inst = tie_instance()
    b = Builder(inst, inst.serial_bound(), DEFAULT_SPEEDUPS)
    assert b.info.es[1] + PR > b.info.ls[2]  # the float tie the old test fell into
    started, live = b._live_status(0, 2)
    assert started is True and live is None  # undecided: the model's rl variable settles it


def test_tie_instance_without_warm_start_is_solved_to_its_optimum():
    sol = solve_instance(tie_instance(), None, time_limit_s=5, threads=1, speedups={"lns": False})
    dev, start = sol.sched
    assert start[2] == pytest.approx(start[1] + PR)  # o starts as r frees a
    assert max(s + d[0] for s, d in zip(start, [{0: PA}, {0: PR}, {0: PO}])) == pytest.approx(PA + PR + PO)
    assert sol.status == "optimal"


@pytest.mark.parametrize("speedups", [{"warm_start": False}, {}])
def test_plan_mip_tie_workload_gets_a_valid_plan(speedups):
    wl, cl = tie_workload(), FakeCluster(1)
    comm = CommModel(cl)
    plan = plan_mip(wl, cl, comm, time_limit_s=5, threads=1, memory_cap=GIB, speedups=speedups)
    assert validate_plan(plan, wl, cl, comm, GIB) == []
    assert plan.makespan_us == pytest.approx(PA + PR + PO) == exact_makespan(wl, cl, cap=GIB)
    assert (plan.status, plan.meta["source"]) == ("optimal", "solver")


def test_memory_capped_pipeline_without_warm_start_is_solved_to_its_optimum():
    """2 stages x 4 micro-batches, activations of 1 GiB, cap 2 GiB (1F1B fits): with no warm
    start and no heuristic incumbent in the model, HiGHS proves the brute force's 18.6 us
    (17.2 us uncapped: the cap costs 1.4 us)."""
    wl = build_pipeline(2, 4, times_us={"F": 1.1, "B": 2.2, "W": 0.7}, activation_bytes=GIB)
    cl = FakeCluster(2)
    comm = CommModel(cl)
    try:
        plan = plan_mip(wl, cl, comm, time_limit_s=10, threads=1, memory_cap=2 * GIB, warm_start=None,
                        speedups={"warm_start": False})
    except InfeasibleError as err:  # pragma: no cover - the regression
        pytest.fail(f"feasible instance reported infeasible: {err}")
    assert validate_plan(plan, wl, cl, comm, 2 * GIB) == []
    assert exact_makespan(wl, cl, cap=2 * GIB) == pytest.approx(18.6)
    assert (plan.status, plan.makespan_us) == ("optimal", pytest.approx(18.6, rel=1e-6))


def _fake_solver(result: RawResult):
    def run(*args, **kwargs):
        return result
    return run


def test_time_limit_with_no_incumbent_is_not_infeasible(monkeypatch):
    monkeypatch.setattr(mip, "run_solver", _fake_solver(RawResult(None, "time_limit", 0.0, None)))
    with pytest.raises(InputError, match="no plan found within the time limit") as err:
        solve_instance(tie_instance(), None, time_limit_s=1, threads=1)
    assert not isinstance(err.value, InfeasibleError)
    warm = ([0, 0, 0], [0.0, PA, PA + PR])
    sol = solve_instance(tie_instance(), warm, time_limit_s=1, threads=1)
    assert (sol.status, sol.source, sol.sched) == ("time_limit", "warm_start", warm)


def test_solver_infeasible_despite_a_valid_warm_start_keeps_the_plan(monkeypatch):
    monkeypatch.setattr(mip, "run_solver", _fake_solver(RawResult(None, "infeasible", None, None, infeasible=True)))
    warm = ([0, 0, 0], [0.0, PA, PA + PR])
    sol = solve_instance(tie_instance(), warm, time_limit_s=1, threads=1, speedups={"warm_start": False})
    assert sol.sched == warm and sol.source == "warm_start" and sol.meta["model_infeasible"]
    with pytest.raises(InfeasibleError):  # no plan in hand: the diagnosis runs (and names memory)
        solve_instance(tie_instance(), None, time_limit_s=1, threads=1)


def test_a_solve_with_another_thread_count_still_solves():
    """HiGHS keeps one scheduler per process, started with the first solve's thread count, and
    refuses a later solve with another count: the solver then returned nothing and the plan was
    the warm start, labelled ``time_limit``. Each solve must reach the solver and prove 27."""
    wl = build_pipeline(4, 8, times_us={"F": 1000.0, "B": 1000.0, "W": 1000.0})
    cluster = FakeCluster(4)
    comm = CommModel(cluster)
    for threads in (2, 1, 2):
        plan = plan_mip(wl, cluster, comm, time_limit_s=20, threads=threads)
        assert (plan.status, plan.makespan_us, plan.meta["source"]) == ("optimal", 27000.0, "solver"), threads


def test_a_dropped_relabelled_warm_start_still_bounds_the_horizon(monkeypatch):
    """Symmetry breaking relabels the warm start's twin micro-batches and compacts it; if that
    image breaks a memory cap it is dropped as a MIP start. The horizon (and so every big-M and
    time window) must still be the warm start's makespan, not the serial bound (~9x larger):
    relabelling keeps makespan and memory, so the optimum of the restricted model is no later."""
    from engine.planners.mip.warm import best_schedule, makespan

    wl = build_pipeline(4, 8, times_us={"F": 1000.0, "B": 1000.0, "W": 1000.0})
    cluster = FakeCluster(4)
    inst = Instance.from_workload(wl, cluster, CommModel(cluster), None)
    _name, warm = best_schedule(inst)
    horizons = []
    real = mip.Builder

    def spy(model_inst, horizon, *args, **kwargs):
        horizons.append(horizon)
        return real(model_inst, horizon, *args, **kwargs)

    monkeypatch.setattr(mip, "memory_ok", lambda *_: False)  # the relabelled image is dropped
    monkeypatch.setattr(mip, "Builder", spy)
    sol = solve_instance(inst, warm, time_limit_s=20, threads=1)
    assert horizons == [makespan(inst, warm)] and horizons[0] < inst.serial_bound() / 2
    assert makespan(inst, sol.sched) == 27000.0
    assert (sol.status, sol.source) == ("optimal", "solver")  # HiGHS proved it, with no MIP start
