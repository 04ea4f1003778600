"""Coarsening: chain and micro-batch merges, edge contraction, expansion, the merged solve."""

from __future__ import annotations

import random

import pytest
from fakes import FakeCluster
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.comm import CommModel
from engine.core.errors import InputError
from engine.core.ir import Edge, Op, Workload
from engine.planners.mip.coarsen import coarsen, count_pairs, expand, resolve_merge
from engine.planners.mip.instance import Instance
from engine.planners.mip.plan import plan_mip
from engine.planners.mip.warm import best_schedule, makespan, memory_ok, semi_active
from engine.planners.validate import validate_plan
from engine.workloads.pipeline import build_pipeline

GIB = 1 << 30


def instance(wl, cluster, cap=None):
    return Instance.from_workload(wl, cluster, CommModel(cluster), cap)


def test_chain_on_one_gpu_becomes_one_op_with_summed_duration():
    ops = [Op(f"c{i}", float(i + 1), devices=(0,)) for i in range(4)] + [Op("x", 5.0, devices=(1,))]
    edges = [Edge("c0", "c1"), Edge("c1", "c2"), Edge("c2", "c3"), Edge("c3", "x", 400)]
    inst = instance(Workload("chain", ops, edges), FakeCluster(2))
    co = coarsen(inst, 2)
    assert len(co.inst) == 2
    chain = next(k for k, ms in enumerate(co.members) if len(ms) == 4)
    assert [inst.ids[i] for i in co.members[chain]] == ["c0", "c1", "c2", "c3"]
    assert co.inst.dur[chain] == {0: 10.0}
    # the cross-GPU delay of c3 -> x survives: 1 us + 400 / 400
    (edge,) = co.inst.edges.values()
    assert edge == {(0, 1): 2.0}


def test_expand_runs_members_back_to_back():
    ops = [Op("a", 2.0, devices=(0,)), Op("b", 3.0, devices=(0,))]
    inst = instance(Workload("ab", ops, [Edge("a", "b")]), FakeCluster(1))
    co = coarsen(inst, 1)
    dev, start = expand(co, inst, ([0], [7.0]))
    assert dev == [0, 0] and start == [7.0, 9.0]


def test_microbatch_groups_halve_a_pipeline():
    wl = build_pipeline(2, 8, times_us={"F": 1.0, "B": 1.0, "W": 1.0}, activation_bytes=GIB)
    inst = instance(wl, FakeCluster(2))
    co = coarsen(inst, len(inst) // 2)
    assert len(co.inst) == len(inst) // 2
    assert all(len(ms) == 2 for ms in co.members)
    # F of a group allocates both activations and is freed by the group's W
    f = next(k for k, t in enumerate(co.inst.tags) if t.get("phase") == "F" and t.get("stage") == 0)
    assert co.inst.alloc[f] == 2 * GIB
    (rel,) = co.inst.release[f]
    assert co.inst.tags[rel]["phase"] == "W"


def test_edge_contraction_keeps_the_coarse_graph_acyclic_and_memory_conservative():
    from engine.workloads.graphgen import generate
    from engine.workloads.pipeline import graph_from_dict

    wl = graph_from_dict(generate("layered", 60, seed=3, gpus=3, memory_bytes=1 << 20))
    inst = instance(wl, FakeCluster(3), cap=1 << 40)
    co = coarsen(inst, 20)
    assert len(co.inst) <= 25
    co.inst.topo()  # raises on a cycle
    of = {i: k for k, ms in enumerate(co.members) for i in ms}
    for i, j in inst.edges:
        if of[i] == of[j]:
            ms = co.members[of[i]]
            assert ms.index(i) < ms.index(j)
        else:
            assert (of[i], of[j]) in co.inst.edges
    assert sum(co.inst.alloc) == sum(inst.alloc)
    name, sched = best_schedule(co.inst)
    fine = expand(co, inst, sched)
    assert memory_ok(inst, fine)
    assert makespan(inst, fine) == pytest.approx(makespan(co.inst, sched))


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=3, max_value=25), st.integers(min_value=1, max_value=12), st.integers(0, 10_000))
def test_expanded_coarse_schedules_are_feasible(n, target, seed):
    rng = random.Random(seed)
    ops = [Op(f"o{i}", float(rng.randint(1, 5)), devices=tuple(sorted(rng.sample(range(3), rng.randint(1, 3)))),
              memory_bytes=rng.choice([0, 1 << 20])) for i in range(n)]
    edges = [Edge(f"o{i}", f"o{j}", rng.choice([0, 800])) for j in range(1, n) for i in range(j) if rng.random() < 0.25]
    wl = Workload("r", ops, edges)
    cl = FakeCluster(3)
    inst = instance(wl, cl, cap=1 << 40)
    co = coarsen(inst, target)
    _, sched = best_schedule(co.inst)
    dev, start = semi_active(inst, *expand(co, inst, sched))
    from engine.core.ir import Placement, Plan

    plan = Plan("r", {inst.ids[i]: Placement(dev[i], start[i], start[i] + inst.dur[i][dev[i]]) for i in range(n)}, "t")
    assert validate_plan(plan, wl, cl, CommModel(cl), 1 << 40) == []


def test_resolve_merge():
    inst = instance(build_pipeline(2, 2, times_us={"F": 1.0, "B": 1.0}), FakeCluster(2))
    assert resolve_merge("none", inst) is None
    assert resolve_merge("auto", inst) is None  # small: nothing to gain
    assert resolve_merge("5", inst) == 5
    assert resolve_merge(7, inst) == 7
    for bad in ("lots", "0", -3):
        with pytest.raises(InputError, match="merge"):
            resolve_merge(bad, inst)


def test_count_pairs_by_hand():
    # a -> b on GPU 0 (ordered: no pair), c on GPU 0 unordered with both: 2 pairs; d alone on GPU 1
    ops = [Op("a", 1.0, devices=(0,)), Op("b", 1.0, devices=(0,)), Op("c", 1.0, devices=(0,)),
           Op("d", 1.0, devices=(1,))]
    inst = instance(Workload("p", ops, [Edge("a", "b")]), FakeCluster(2))
    assert count_pairs(inst) == 2


def test_merged_solve_reports_ops_before_and_after_and_validates():
    from engine.workloads.graphgen import generate
    from engine.workloads.pipeline import graph_from_dict

    wl = graph_from_dict(generate("layered", 80, seed=2, gpus=4, eligible=2))
    cl = FakeCluster(4)
    comm = CommModel(cl)
    plan = plan_mip(wl, cl, comm, merge=30, time_limit_s=6, threads=1)
    assert plan.meta["n_ops"] == 80
    assert plan.meta["n_ops_after_merge"] <= 40
    assert validate_plan(plan, wl, cl, comm) == []
    assert plan.lower_bound_us <= plan.makespan_us


def test_merged_pipeline_keeps_the_optimum_when_groups_fit():
    wl = build_pipeline(2, 8, times_us={"F": 1.0, "B": 1.0, "W": 1.0})
    cl = FakeCluster(2)
    plan = plan_mip(wl, cl, CommModel(cl), merge=24, time_limit_s=6, threads=1)
    assert plan.meta["n_ops_after_merge"] == 24
    assert plan.makespan_us == pytest.approx(3 * 8 + 1)


# -- bounds and the window MIPs that polish -------------------------------------------------------

@pytest.mark.parametrize("p,m,cap,want", [(2, 4, 1, 20.0), (8, 20, 4, 85.0), (4, 8, 2, 36.0)])
def test_memory_area_bound_by_hand(p, m, cap, want):
    """Stage 0 holds at most ``cap`` activations, each for F..F, B..B and W: 2p + 1 units, so
    Cmax >= m (2p + 1) / cap (p=2, m=4, cap=1: 20, which is also the optimum)."""
    wl = build_pipeline(p, m, times_us={"F": 1.0, "B": 1.0, "W": 1.0}, activation_bytes=GIB)
    inst = instance(wl, FakeCluster(p, memory_bytes=cap * GIB))
    assert inst.memory_bound() == pytest.approx(want)
    assert inst.lower_bound() == pytest.approx(max(want, 3 * m + p - 1))


def test_window_mips_never_make_a_plan_worse_and_fix_a_poor_one():
    from engine.planners.mip.lns import improve, slack
    from engine.planners.mip.warm import parallel_schedule, priority_rules
    from engine.workloads.graphgen import generate
    from engine.workloads.pipeline import graph_from_dict

    wl = graph_from_dict(generate("layered", 30, seed=5, gpus=3, eligible=2))
    cl = FakeCluster(3)
    inst = instance(wl, cl)
    rules = priority_rules(inst)
    reversed_head = parallel_schedule(inst, [(-k[0], k[1], k[2]) for k in rules["head"]])
    assert reversed_head is not None
    poor = semi_active(inst, *reversed_head)
    assert min(slack(inst, poor)) == pytest.approx(0.0)
    better, stats = improve(inst, poor, 4.0, {"threads": 1, "speedups": {}})
    assert stats["lns_rounds"] >= 1
    assert makespan(inst, better) < makespan(inst, poor)
    assert makespan(inst, better) >= inst.lower_bound() - 1e-6
