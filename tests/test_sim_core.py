"""simulate(): exactness against the planners' contention-free model, SM sharing, memory and OOM,
jitter determinism, symmetry reduction, bad input, and the pipeline bubble formulas."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.comm import CommModel
from engine.core.errors import InputError
from engine.core.ir import Collective, Edge, Op, Placement, Plan, Workload
from engine.planners.heuristic import plan_heuristic
from engine.planners.validate import compact, peak_memory, validate_plan
from engine.workloads.graphgen import generate
from engine.workloads.pipeline import build_pipeline, graph_from_dict
from hardware_profiles import build_cluster, load_profile
from simulator.gpu import SimulationOOM
from simulator.simulate import simulate
from simulator.synthetic import training_step
from simulator.trace import trace_json

GIB = 1 << 30


@pytest.fixture(scope="module")
def two_nodes():
    return build_cluster(load_profile("h100-sxm"), 2)


def heuristic_plan(wl, cl):
    comm = CommModel(cl)
    plan = compact(plan_heuristic(wl, cl, comm), wl, comm)
    assert validate_plan(plan, wl, cl, comm) == []
    return plan


def check_matches_plan(res, plan, rel=1e-9):
    scale = max(1.0, plan.makespan_us)
    assert res.makespan_us == pytest.approx(plan.makespan_us, rel=rel)
    for o, p in plan.placements.items():
        d, s, e = res.op_times[o]
        assert d == p.device
        assert abs(s - p.start) <= rel * scale and abs(e - p.end) <= rel * scale


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["layered", "random", "moe"]), n=st.integers(4, 40), seed=st.integers(0, 10**6),
       edge_mib=st.sampled_from([0, 1, 64, 512]), eligible=st.integers(1, 4))
def test_simulated_makespan_equals_the_plan_without_contention(two_nodes, kind, n, seed, edge_mib, eligible):
    cl = two_nodes
    wl = graph_from_dict(generate(kind, n, seed, gpus=cl.n_gpus, eligible=eligible, edge_bytes=edge_mib << 20))
    plan = heuristic_plan(wl, cl)
    # alpha-beta: every transfer takes exactly the planner's contention-free delay
    check_matches_plan(simulate(plan, wl, cl, mode="alpha_beta"), plan)
    # flows: never faster than the plan; exactly the plan when no link ever carried two flows
    res = simulate(plan, wl, cl)
    assert res.makespan_us >= plan.makespan_us * (1 - 1e-9)
    for o, p in plan.placements.items():  # contention only delays: no op starts before its plan time
        assert res.op_times[o][1] >= p.start - 1e-9 * max(1.0, plan.makespan_us)
    if all(l["peak_flows"] <= 1 for l in res.links.values()):
        check_matches_plan(res, plan)
        for e in res.edges.values():
            assert e["observed_us"] == pytest.approx(e["modelled_us"], rel=1e-9)


def test_a_chain_across_gpus_and_nodes_is_exact_in_flow_mode(two_nodes):
    gpus = [0, 3, 9, 12, 1]
    ops = [Op(f"o{i}", 100.0 + i, devices=(g,)) for i, g in enumerate(gpus)]
    edges = [Edge(f"o{i}", f"o{i + 1}", (i + 1) * (37 << 20) + 11) for i in range(len(gpus) - 1)]
    wl = Workload("chain", ops, edges)
    plan = heuristic_plan(wl, two_nodes)
    res = simulate(plan, wl, two_nodes)
    check_matches_plan(res, plan)
    assert len(res.edges) == 4 and {l["link_class"] for l in res.links.values()} == {"nvlink", "pcie", "nic"}
    for key, e in res.edges.items():
        assert e["observed_us"] == pytest.approx(e["modelled_us"], rel=1e-12)


def test_comm_slows_compute_by_the_profile_share_exactly(two_nodes):
    # compute A (100 us) and comm C (40 us) start together on GPU 0: at speed 0.5 for 40 us A does
    # 20 us of work; the remaining 80 us run at full speed: A ends at 120
    wl = Workload("sm", [Op("A", 100.0, devices=(0,)), Op("C", 40.0, kind="comm", devices=(0,)),
                         Op("D", 30.0, devices=(0,))], [Edge("A", "D", 0)])
    plan = Plan("sm", {"A": Placement(0, 0, 100), "C": Placement(0, 0, 40), "D": Placement(0, 100, 130)}, "t")
    res = simulate(plan, wl, two_nodes, comm_compute_slowdown=0.5)
    assert res.op_times["A"][2] == pytest.approx(120.0)
    assert res.op_times["D"][1:] == pytest.approx((120.0, 150.0))
    assert res.devices[0]["busy_us"] == pytest.approx(150.0)
    assert simulate(plan, wl, two_nodes).op_times["A"][2] == pytest.approx(100.0)  # profile default: 0


def test_a_collective_slows_compute_on_every_gpu_of_its_group(two_nodes):
    coll = Op("AR", 0.0, kind="comm", collective=Collective("all_reduce", (0, 1), GIB))
    wl = Workload("sm2", [coll, Op("B", 10_000.0, devices=(1,))])
    plan = Plan("sm2", {"AR": Placement(0, 0, 1), "B": Placement(1, 0, 10_000)}, "t")
    t_ar = simulate(plan, wl, two_nodes).op_times["AR"][2]
    res = simulate(plan, wl, two_nodes, comm_compute_slowdown=0.25)
    assert res.op_times["AR"][2] == pytest.approx(t_ar)
    assert res.op_times["B"][2] == pytest.approx(t_ar + (10_000.0 - 0.75 * t_ar))


def pipeline(p=4, m=8, act=GIB, cap=None):
    wl = build_pipeline(p, m, 1, {"F": 100.0, "B": 200.0}, activation_bytes=act, send_bytes=16 << 20)
    wl.memory_cap_bytes = cap
    return wl


def one_f_one_b_plan(wl, cl, p, m):
    order = {}
    for s in range(p):
        warm = min(p - s - 1, m)
        seq = [("F", k) for k in range(warm)]
        for k in range(m - warm):
            seq += [("F", warm + k), ("B", k)]
        seq += [("B", k) for k in range(m - warm, m)]
        order[s] = [f"{ph}{k}.s{s}" for ph, k in seq]
    pl = {}
    for s, ids in order.items():
        t = 0.0
        for o in ids:  # placeholder starts in order; compact() makes them semi-active
            pl[o] = Placement(s, t, t + wl.op(o).duration_us)
            t = pl[o].end
    plan = compact(Plan(wl.name, pl, "1f1b", order=order), wl, CommModel(cl))
    assert validate_plan(plan, wl, cl, CommModel(cl)) == []
    return plan


def test_peak_memory_matches_the_validator_and_oom_stops_the_run(two_nodes):
    wl = pipeline()
    plan = one_f_one_b_plan(wl, two_nodes, 4, 8)
    res = simulate(plan, wl, two_nodes, mode="alpha_beta")
    peaks = peak_memory(plan, wl)
    assert {d: v["peak_memory_bytes"] for d, v in res.devices.items() if d in peaks} == peaks
    assert res.devices[0]["peak_memory_bytes"] == 4 * GIB  # 1F1B: p activations on the first stage
    capped = pipeline(cap=3 * GIB + GIB // 2)
    with pytest.raises(SimulationOOM, match=r"out of memory on GPU 0 at .* op F3\.s0 .*0\.500 GiB over"):
        simulate(plan, capped, two_nodes)
    res = simulate(plan, capped, two_nodes, allow_oom=True)
    assert res.oom and res.oom_events[0]["device"] == 0 and res.oom_events[0]["op"] == "F3.s0"
    assert res.oom_events[0]["bytes_over"] == GIB // 2
    assert res.oom_events[0]["time_us"] == pytest.approx(res.op_times["F3.s0"][1])


def test_same_seed_same_bytes_and_jitter_moves_times(two_nodes, tmp_path):
    wl = pipeline()
    plan = one_f_one_b_plan(wl, two_nodes, 4, 8)
    a = simulate(plan, wl, two_nodes, seed=7, jitter=0.05)
    b = simulate(plan, wl, two_nodes, seed=7, jitter=0.05)
    c = simulate(plan, wl, two_nodes, seed=8, jitter=0.05)
    assert a.to_json() == b.to_json() and trace_json(a, wl, two_nodes) == trace_json(b, wl, two_nodes)
    assert a.to_json() != c.to_json()
    assert not a.symmetry["enabled"]
    dur = [e - s for o, (_d, s, e) in a.op_times.items() if o.startswith("F")]
    assert min(dur) < 100.0 < max(dur) and all(50 < d < 200 for d in dur)
    assert simulate(plan, wl, two_nodes, jitter=0.0).makespan_us == pytest.approx(plan.makespan_us, rel=1e-9)


def test_1f1b_bubble_formula_and_the_generated_schedules(two_nodes):
    from engine.planners.schedules.library import generate as gen_schedule
    from engine.planners.schedules.timing import schedule_plan

    p, m = 4, 8
    wl = build_pipeline(p, m, 1, {"F": 10.0, "B": 20.0})
    comm = CommModel(two_nodes)
    plan = schedule_plan(gen_schedule("1f1b", wl, comm), wl, comm)
    res = simulate(plan, wl, two_nodes)
    assert res.bubble_us == pytest.approx((p - 1) * (10.0 + 20.0))
    wl_w = build_pipeline(p, m, 1, {"F": 10.0, "B": 10.0, "W": 10.0})
    plan = schedule_plan(gen_schedule("zb-h1", wl_w, comm), wl_w, comm)
    assert simulate(plan, wl_w, two_nodes).bubble_us == pytest.approx((p - 1) * (10.0 + 10.0 + 10.0 - 2 * 10.0))


def test_symmetry_reduction_gives_the_full_simulation(two_nodes):
    wl, plan = training_step(4, 2, 2, 4, times_us={"F": 300.0, "B": 600.0}, send_bytes=256 << 20,
                             tp_bytes=128 << 20, grad_bytes=GIB, activation_bytes=GIB)
    full = simulate(plan, wl, two_nodes, symmetry=False)
    sym = simulate(plan, wl, two_nodes)
    assert sym.symmetry["enabled"] and sym.symmetry["classes"] < len(wl) // 4
    assert sym.events < full.events / 3
    assert sym.makespan_us == pytest.approx(full.makespan_us, rel=1e-12)
    for o, (d, s, e) in full.op_times.items():
        assert sym.op_times[o] == pytest.approx((d, s, e), rel=1e-12, abs=1e-9)
    assert sym.links.keys() == full.links.keys()
    for k, v in full.links.items():
        assert sym.links[k]["bytes"] == v["bytes"]
    assert sym.edges.keys() == full.edges.keys()
    assert sym.devices.keys() == full.devices.keys()
    for d, v in full.devices.items():
        assert sym.devices[d]["peak_memory_bytes"] == v["peak_memory_bytes"]
        assert sym.devices[d]["busy_us"] == pytest.approx(v["busy_us"], rel=1e-12)
    # there is contention to agree on: PP sends share the NICs with the DP all-reduce
    assert max(e["observed_us"] - e["modelled_us"] for e in full.edges.values()) > 1.0


def test_bad_input_is_one_input_error(two_nodes):
    wl = pipeline()
    plan = one_f_one_b_plan(wl, two_nodes, 4, 8)
    with pytest.raises(InputError, match=r"op 'B8.s0' of workload 'pipeline' is not placed"):
        simulate(plan, build_pipeline(4, 10, 1, {"F": 1.0, "B": 1.0}), two_nodes)
    with pytest.raises(InputError, match=r"op 'B6.s0' is not in workload .*a plan for another scenario"):
        simulate(plan, build_pipeline(4, 6, 1, {"F": 1.0, "B": 1.0}), two_nodes)
    small = build_cluster(load_profile("h100-sxm"), 1)
    far = Plan(wl.name, {o: Placement(p.device + 6, p.start, p.end) for o, p in plan.placements.items()}, "t")
    with pytest.raises(InputError, match=r"placements\[B0.s2\].device: GPU 8 is not in the cluster \(GPUs 0\.\.7\)"):
        simulate(far, wl, small)
    # B0 before F0 on the last stage: the order contradicts F0 -> B0
    order = {d: list(ids) for d, ids in plan.order.items()}
    i, j = order[3].index("F0.s3"), order[3].index("B0.s3")
    order[3][i], order[3][j] = order[3][j], order[3][i]
    bad = Plan(wl.name, plan.placements, "t", order=order)
    with pytest.raises(InputError, match="deadlocks .*B0.s3 -\\(GPU 3 compute order\\)-> F0.s3"):
        simulate(bad, wl, two_nodes)
    coll = Workload("c", [Op("AR", 0.0, kind="comm", collective=Collective("all_reduce", (0, 99), GIB))])
    with pytest.raises(InputError, match="GPU 99 is not in the cluster"):
        simulate(Plan("c", {"AR": Placement(0, 0, 1)}, "t"), coll, two_nodes)
    with pytest.raises(InputError, match="mode"):
        simulate(plan, wl, two_nodes, mode="packet")
