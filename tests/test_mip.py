"""The MIP planner: hand-computed optima, validity, memory caps, infeasibility, time limits.

Small instances, HiGHS with one thread, time limits of a few seconds.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.comm import CommModel
from engine.core.errors import InfeasibleError, InputError
from engine.planners.heuristic import plan_heuristic
from engine.core.ir import Edge, Op, Workload
from engine.planners.mip.plan import plan_mip
from engine.planners.mip.model import DEFAULT_SPEEDUPS
from engine.planners.validate import peak_memory, validate_plan
from engine.workloads.pipeline import build_pipeline
from fakes import FakeCluster

GIB = 1 << 30
FAST = dict(threads=1, time_limit_s=10)


def solve(wl, cluster, **kw):
    comm = CommModel(cluster)
    plan = plan_mip(wl, cluster, comm, **{**FAST, **kw})
    assert validate_plan(plan, wl, cluster, comm, kw.get("memory_cap")) == []
    return plan


def unit_pipeline(p, m, **kw):
    return build_pipeline(p, m, times_us={"F": 1.0, "B": 1.0, "W": 1.0}, **kw)


# -- hand-computed optima -------------------------------------------------------------------------

def test_two_independent_ops_run_in_parallel_or_in_series():
    ops = [Op("a", 3.0), Op("b", 5.0)]
    assert solve(Workload("par", ops), FakeCluster(2)).makespan_us == pytest.approx(5.0)
    pinned = [Op("a", 3.0, devices=(0,)), Op("b", 5.0, devices=(0,))]
    plan = solve(Workload("ser", pinned), FakeCluster(2))
    assert plan.makespan_us == pytest.approx(8.0)
    assert plan.status == "optimal" and plan.mip_gap == pytest.approx(0.0)


def test_communication_delay_counts_only_across_gpus():
    # NVLink in the fake: 1 us + bytes / 400 bytes/us -> 400 bytes take 2 us.
    pinned = Workload("x", [Op("a", 3.0, devices=(0,)), Op("b", 4.0, devices=(1,))], [Edge("a", "b", 400)])
    assert solve(pinned, FakeCluster(2)).makespan_us == pytest.approx(9.0)
    flexible = Workload("y", [Op("a", 3.0, devices=(0,)), Op("b", 4.0)], [Edge("a", "b", 400)])
    plan = solve(flexible, FakeCluster(2))
    assert plan.makespan_us == pytest.approx(7.0)
    assert plan.placements["b"].device == 0


def test_fork_join_pays_one_transfer():
    """a(2) -> b(4), c(4) -> d(2) on 2 GPUs, 2 us per cross-GPU edge: splitting b and c costs
    one transfer on the fork or the join side, so 2 + 2 + 4 + 2 = 10 beats 12 in series."""
    ops = [Op("a", 2.0), Op("b", 4.0), Op("c", 4.0), Op("d", 2.0)]
    edges = [Edge("a", "b", 400), Edge("a", "c", 400), Edge("b", "d", 400), Edge("c", "d", 400)]
    plan = solve(Workload("fj", ops, edges), FakeCluster(2))
    assert plan.makespan_us == pytest.approx(10.0)
    assert plan.status == "optimal"


@pytest.mark.parametrize("p,m", [(2, 3), (3, 4), (4, 8)])
def test_unit_pipeline_optimum_is_3m_plus_p_minus_1(p, m):
    plan = solve(unit_pipeline(p, m), FakeCluster(p))
    assert plan.makespan_us == pytest.approx(3 * m + p - 1)
    assert plan.status == "optimal"
    assert plan.lower_bound_us == pytest.approx(3 * m + p - 1)
    for key in ("n_binaries", "n_ops", "n_ops_after_merge"):
        assert key in plan.meta
    assert plan.meta["n_ops"] == 3 * p * m


def test_p4_m8_proves_27_without_any_speedup_but_the_warm_start():
    off = {k: False for k in DEFAULT_SPEEDUPS}
    plan = solve(unit_pipeline(4, 8), FakeCluster(4), speedups={**off, "warm_start": True, "load_cut": True})
    assert plan.makespan_us == pytest.approx(27.0)


# -- memory ---------------------------------------------------------------------------------------

def test_memory_cap_of_one_activation_serialises_micro_batches():
    """p=2, one activation per GPU: F(k+1) on stage 0 waits for W(k) there, which needs
    F, F, B, B, W -> 5 units per micro-batch: 4 micro-batches end at 20."""
    wl = unit_pipeline(2, 4, activation_bytes=GIB)
    cl = FakeCluster(2, memory_bytes=GIB)
    plan = solve(wl, cl)
    assert plan.makespan_us == pytest.approx(20.0)
    assert max(peak_memory(plan, wl).values()) <= GIB
    free = solve(wl, FakeCluster(2))
    assert free.makespan_us == pytest.approx(13.0)


def test_memory_cap_argument_and_peak_honoured():
    wl = unit_pipeline(3, 6, activation_bytes=GIB)
    cl = FakeCluster(3)
    plan = solve(wl, cl, memory_cap=2 * GIB)
    assert max(peak_memory(plan, wl).values()) <= 2 * GIB
    assert plan.makespan_us >= 3 * 6 + 3 - 1


def test_impossible_cap_names_the_gpu():
    wl = unit_pipeline(2, 2, activation_bytes=2 * GIB)
    with pytest.raises(InfeasibleError, match=r"memory on GPU \d"):
        solve(wl, FakeCluster(2, memory_bytes=GIB))


def test_static_memory_over_cap_is_infeasible():
    wl = Workload("s", [Op("a", 1.0)], static_memory_bytes={1: 3 * GIB})
    with pytest.raises(InfeasibleError, match="memory on GPU 1: static"):
        solve(wl, FakeCluster(2, memory_bytes=2 * GIB))


def test_dependencies_forcing_two_live_allocations_over_cap():
    # a's allocation lives until c ends; b (after a, before c) allocates too: both live at b.
    ops = [Op("a", 1.0, devices=(0,), memory_bytes=GIB, release=("c",)),
           Op("b", 1.0, devices=(0,), memory_bytes=GIB), Op("c", 1.0, devices=(0,))]
    wl = Workload("m", ops, [Edge("a", "b"), Edge("b", "c")])
    with pytest.raises(InfeasibleError, match="memory on GPU 0: when b starts"):
        solve(wl, FakeCluster(1, memory_bytes=GIB + GIB // 2))


def test_no_eligible_gpu_is_an_eligibility_error():
    wl = Workload("e", [Op("a", 1.0, devices=(5,))])
    with pytest.raises(InfeasibleError, match="eligibility: op a"):
        solve(wl, FakeCluster(2))


def test_min_peak_memory_with_a_loose_bound_keeps_one_activation():
    wl = unit_pipeline(2, 3, activation_bytes=GIB)
    plan = solve(wl, FakeCluster(2), objective="min_peak_memory", makespan_bound_us=100.0)
    assert max(peak_memory(plan, wl).values()) == GIB
    assert plan.makespan_us <= 100.0


def test_min_peak_memory_respects_the_makespan_bound():
    wl = unit_pipeline(2, 4, activation_bytes=GIB)
    fast = solve(wl, FakeCluster(2))
    lean = solve(wl, FakeCluster(2), objective="min_peak_memory", makespan_bound_us=fast.makespan_us)
    assert lean.makespan_us <= fast.makespan_us + 1e-6
    assert max(peak_memory(lean, wl).values()) <= max(peak_memory(fast, wl).values())
    with pytest.raises(InfeasibleError, match="below the lower bound"):
        solve(wl, FakeCluster(2), objective="min_peak_memory", makespan_bound_us=5.0)


def test_weighted_objective_trades_makespan_for_memory():
    wl = unit_pipeline(2, 4, activation_bytes=GIB)
    cheap = solve(wl, FakeCluster(2), objective="weighted", memory_weight_us_per_gib=1e-3)
    dear = solve(wl, FakeCluster(2), objective="weighted", memory_weight_us_per_gib=100.0)
    assert cheap.makespan_us == pytest.approx(13.0)
    assert max(peak_memory(dear, wl).values()) == GIB
    assert dear.makespan_us >= cheap.makespan_us


# -- solver behaviour -----------------------------------------------------------------------------

def layered(n, gpus, eligible, seed=1):
    from engine.workloads.graphgen import generate
    from engine.workloads.pipeline import graph_from_dict

    return graph_from_dict(generate("layered", n, seed=seed, gpus=gpus, eligible=eligible))


def test_time_limited_solve_returns_a_valid_plan_and_its_gap():
    wl = layered(40, 4, 2)
    cl = FakeCluster(4)
    plan = solve(wl, cl, time_limit_s=2.0, speedups={"lns": False})
    assert plan.status == "time_limit"
    assert 0 < plan.lower_bound_us < plan.makespan_us
    assert plan.mip_gap > 0
    assert plan.mip_gap == pytest.approx((plan.makespan_us - plan.lower_bound_us) / plan.makespan_us)
    assert plan.makespan_us <= plan_heuristic(wl, cl, CommModel(cl)).makespan_us + 1e-6


def test_relative_gap_stops_the_solve_early():
    wl = layered(40, 4, 2)
    plan = solve(wl, FakeCluster(4), time_limit_s=10.0, gap=0.5)
    assert plan.status == "feasible"
    assert plan.mip_gap <= 0.5
    assert plan.solve_s < 5.0


def test_warm_start_plan_is_taken_and_never_beaten_backwards():
    wl = unit_pipeline(3, 4)
    cl = FakeCluster(3)
    first = solve(wl, cl)
    again = solve(wl, cl, warm_start=first, speedups={"symmetry": False})
    assert again.meta["warm_start"] == "given"
    assert again.makespan_us <= first.makespan_us


def test_progress_callback_sees_incumbent_and_bound():
    seen = []
    solve(unit_pipeline(4, 8), FakeCluster(4), time_limit_s=3.0, speedups={"warm_start": False, "lns": False},
          progress=lambda t, inc, bnd: seen.append((t, inc, bnd)))
    assert seen
    assert all(t >= 0 for t, _, _ in seen)
    assert any(inc is not None for _, inc, _ in seen)


def test_unknown_objective_solver_and_switch_are_input_errors():
    wl = unit_pipeline(2, 2)
    with pytest.raises(InputError, match="objective"):
        solve(wl, FakeCluster(2), objective="fastest")
    with pytest.raises(InputError, match="not installed"):
        solve(wl, FakeCluster(2), solver="no-such-solver")
    with pytest.raises(InputError, match="unknown switch"):
        solve(wl, FakeCluster(2), speedups={"magic": True})


def test_collective_occupies_every_gpu_of_its_group():
    from engine.core.ir import Collective

    ops = [Op("ar", 5.0, kind="comm", collective=Collective("all_reduce", (0, 1), 1024)),
           Op("s1", 3.0, kind="comm", devices=(1,)), Op("c0", 4.0, devices=(0,))]
    plan = solve(Workload("coll", ops), FakeCluster(2))
    assert plan.makespan_us == pytest.approx(8.0)  # s1 cannot overlap the all-reduce on GPU 1


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=4, max_value=9), st.integers(min_value=2, max_value=3),
       st.integers(min_value=0, max_value=10_000), st.booleans())
def test_mip_never_worse_than_the_heuristic(n, gpus, seed, with_bytes):
    import random

    rng = random.Random(seed)
    ops = [Op(f"o{i}", float(rng.randint(1, 9)),
              devices=tuple(sorted(rng.sample(range(gpus), rng.randint(1, gpus))))) for i in range(n)]
    edges = [Edge(f"o{i}", f"o{j}", 400 * rng.randint(0, 1) if with_bytes else 0)
             for j in range(1, n) for i in range(j) if rng.random() < 0.3]
    wl = Workload("rand", ops, edges)
    cl = FakeCluster(gpus)
    plan = solve(wl, cl, time_limit_s=3.0)
    assert plan.makespan_us <= plan_heuristic(wl, cl, CommModel(cl)).makespan_us + 1e-6
    assert plan.lower_bound_us <= plan.makespan_us + 1e-6


# -- command line ---------------------------------------------------------------------------------

SCENARIO = """
name: tiny
workload: {{kind: pipeline, stages: 2, microbatches: 2, times_us: {{F: 1000, B: 1000, W: 1000}},
           activation_bytes: {act}}}
cluster: {{profile: h100-sxm, nodes: 1}}
memory: {{cap_gib: 1}}
solver: {{planner: mip, time_limit_s: 5, threads: 1}}
"""


def test_cli_plan_mip_json_and_impossible_cap(tmp_path):
    import json

    from click.testing import CliRunner

    from engine.cli import main

    ok = tmp_path / "ok.yaml"
    ok.write_text(SCENARIO.format(act=1 << 29))
    res = CliRunner().invoke(main, ["plan", str(ok), "--planner", "mip", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["makespan_us"] == pytest.approx(7000.0)
    for key in ("solver", "status", "mip_gap", "lower_bound_us", "solve_s", "n_ops", "n_ops_after_merge", "n_binaries"):
        assert key in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(SCENARIO.format(act=2 << 30))
    res = CliRunner().invoke(main, ["plan", str(bad), "--planner", "mip", "--json"])
    assert res.exit_code == 2
    assert "memory" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
