"""The list-scheduling planner: valid plans on random DAGs, never below the lower bounds,
memory caps honoured (pipelines included), infeasible caps reported and proved infeasible
independently (a bound or an exhaustive search), deterministic."""

import json

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from engine.core.comm import CommModel
from engine.core.delay_table import DelayTable
from engine.core.errors import InfeasibleError
from engine.core.ir import Collective, Edge, Op, Placement, Plan, Workload
from engine.core.memory import INF, MemoryTimeline
from engine.planners.heuristic import plan_heuristic
from engine.planners.validate import compact, lower_bounds, peak_memory, validate_plan
from engine.workloads.pipeline import build_pipeline
from hardware_profiles import build_cluster, load_profile

try:
    from fakes import FakeCluster, PacketCluster
except ImportError:  # tests run as a package
    from tests.fakes import FakeCluster, PacketCluster

UNIT = {"F": 1000.0, "B": 1000.0, "W": 1000.0}


def plan_and_check(wl, cluster, comm=None, cap=None):
    """Plan, then assert the plan is valid and respects the lower bounds; returns the plan."""
    comm = comm or CommModel(cluster)
    plan = plan_heuristic(wl, cluster, comm, memory_cap=cap)
    assert validate_plan(plan, wl, cluster, comm, cap) == []
    assert (plan.planner, plan.status) == ("heuristic", "heuristic")
    lb = lower_bounds(wl, cluster)
    tol = 1e-6 * max(1.0, lb["lower_bound_us"])
    assert plan.makespan_us >= lb["critical_path_us"] - tol
    assert plan.makespan_us >= lb["load_us"] - tol
    assert plan.makespan_us == max(p.end for p in plan.placements.values())
    crossing = {(u, v) for u, v, b in wl.graph.edges(data="bytes")
                if b > 0 and plan.placements[u].device != plan.placements[v].device}
    assert {(t.src, t.dst) for t in plan.transfers} == crossing
    return plan


@st.composite
def random_dags(draw, memory="none", max_ops=24):
    """Layered or branchy DAGs of up to ``max_ops`` ops with flexible placement subsets, comm ops,
    a collective now and then, edge bytes and (``memory`` = "own" / "release") allocations.

    Ops that allocate last at least 1 us: the validator frees a zero-length op's allocation
    before making it (frees at t go first), so it never counts, while the heuristic counts it;
    with positive lengths both agree with the exhaustive check below."""
    n_gpus = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_ops))
    shape = draw(st.sampled_from(["layered", "branchy"]))
    layer = sorted(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))) if shape == "layered" else list(range(n))
    edges = {}
    for v in range(1, n):
        earlier = [u for u in range(v) if layer[u] < layer[v]]
        if shape == "layered":
            earlier = [u for u in earlier if layer[u] == layer[v] - 1] or earlier
        if earlier:
            for u in draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)):
                edges[(u, v)] = draw(st.sampled_from([0, 0, 400, 4000, 100_000]))
    ops = []
    for i in range(n):
        dur = float(draw(st.integers(0, 60)))
        kind = draw(st.sampled_from(["compute"] * 4 + ["comm"]))
        coll = None
        devices = draw(st.one_of(st.none(), st.sets(st.integers(0, n_gpus - 1), min_size=1).map(tuple)))
        if kind == "comm" and n_gpus > 1 and draw(st.booleans()):
            group = tuple(draw(st.permutations(range(n_gpus)))[:draw(st.integers(2, n_gpus))])
            coll, devices = Collective("all_reduce", group, 1 << 20), None
        mem, release = 0, ()
        if memory != "none" and draw(st.booleans()):
            mem = draw(st.sampled_from([10, 30, 60]))
            consumers = [f"o{v}" for (u, v) in edges if u == i]
            if memory == "release" and consumers:
                release = tuple(draw(st.lists(st.sampled_from(consumers), min_size=1, unique=True)))
            dur = max(dur, 1.0)
        ops.append(Op(f"o{i}", dur, kind=kind, devices=devices, memory_bytes=mem, release=release, collective=coll))
    static = {d: draw(st.sampled_from([0, 5])) for d in range(n_gpus)} if memory != "none" else {}
    wl = Workload("random", ops, [Edge(f"o{u}", f"o{v}", b) for (u, v), b in sorted(edges.items())], static)
    gpus_per_node = draw(st.sampled_from([1, 2, 4]))
    return wl, FakeCluster(n_gpus, gpus_per_node=gpus_per_node)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_random_dags_get_valid_plans_above_the_bounds(case):
    wl, cluster = case
    plan = plan_and_check(wl, cluster)
    comm = CommModel(cluster)
    tight = compact(plan, wl, comm)
    assert validate_plan(tight, wl, cluster, comm) == []
    assert tight.makespan_us <= plan.makespan_us + 1e-6 * max(1.0, plan.makespan_us)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags(memory="own"), st.integers(0, 40))
def test_memory_freed_at_own_end_always_fits_the_largest_op(case, slack):
    """With every allocation freed at its op's end, any cap that holds static + the largest
    allocation is feasible, and the planner must find a plan under it."""
    wl, cluster = case
    need = max(wl.static_memory_bytes.values(), default=0) + max((op.memory_bytes for op in wl.ops.values()), default=0)
    cap = need + slack
    plan = plan_and_check(wl, cluster, cap=cap)
    assert max(peak_memory(plan, wl).values(), default=0) <= cap


# -- infeasibility, checked independently of the heuristic --------------------------------------------

class SearchTooBig(Exception):
    """The exhaustive search met more states than its limit."""


def eligible_gpus(op, n_gpus):
    if op.collective is not None:
        return (op.collective.group[0],)
    return tuple(range(n_gpus)) if op.devices is None else tuple(d for d in op.devices if d < n_gpus)


def op_that_fits_nowhere(wl, n_gpus, cap):
    """A lower bound that proves infeasibility: some GPU's static memory exceeds the cap, or some
    op's allocation plus the static memory exceeds the cap on every GPU it may run on."""
    static = [wl.static_memory_bytes.get(d, 0) for d in range(n_gpus)]
    if any(s > cap for s in static):
        return "static"
    for op in wl.ops.values():
        if op.memory_bytes > 0 and all(static[d] + op.memory_bytes > cap for d in eligible_gpus(op, n_gpus)):
            return op.id
    return None


def serial_witness(wl, n_gpus, cap, limit=20_000):
    """Exhaustively: a list of (op, GPU), run one op at a time in that order, that keeps static +
    live allocations within ``cap`` on every GPU, or None if there is none (raises SearchTooBig
    past ``limit`` search states).

    Why one op at a time is enough: take any valid plan and sort its ops by (start, end); run
    serially in that order, an allocation is live at an op's start only if it was live there in
    the plan (its op started no later, and one of its release ops starts no earlier: with
    positive lengths for allocating ops it ends after that start), so memory only goes down.
    Run serially, ``a`` is live from its start until the last of ``a`` and its release ops ends;
    at op ``x``'s start that is: placed, and some release op not yet placed before ``x``."""
    ids = sorted(wl.ops)
    idx = {o: i for i, o in enumerate(ids)}
    ops = [wl.ops[o] for o in ids]
    n = len(ids)
    preds = [0] * n
    for u, v in wl.graph.edges:
        preds[idx[v]] |= 1 << idx[u]
    elig = [eligible_gpus(op, n_gpus) for op in ops]
    mem = [op.memory_bytes for op in ops]
    rel = [sum(1 << idx[r] for r in op.release) for op in ops]
    static = [wl.static_memory_bytes.get(d, 0) for d in range(n_gpus)]
    if any(s > cap for s in static) or any(not e for e in elig):
        return None
    full = (1 << n) - 1
    dead: set = set()
    path: list = []

    def search(placed, live):  # live: frozenset of (op index, GPU) whose release ops are not all placed
        if placed == full:
            return True
        if (placed, live) in dead:
            return False
        if len(dead) > limit:
            raise SearchTooBig
        for x in range(n):
            if placed >> x & 1 or preds[x] & ~placed:
                continue
            after = placed | 1 << x
            for d in elig[x] if mem[x] else elig[x][:1]:  # without memory the GPU does not matter
                if mem[x] and static[d] + mem[x] + sum(mem[a] for a, g in live if g == d) > cap:
                    continue
                nxt = frozenset((a, g) for a, g in live | ({(x, d)} if mem[x] else set()) if rel[a] & ~after)
                path.append((ids[x], d))
                if search(after, nxt):
                    return True
                path.pop()
        dead.add((placed, live))
        return False

    return list(path) if search(0, frozenset()) else None


def serial_plan(wl, cluster, comm, order):
    """The plan that runs ``order`` ((op, GPU) pairs) one op at a time, each as early as its
    inputs and the previous op allow."""
    t, pl, by_gpu = 0.0, {}, {}
    for o, d in order:
        s = t
        for u in wl.graph.predecessors(o):
            s = max(s, pl[u].end + comm.delay(u, o, pl[u].device, d, wl.graph.edges[u, o]["bytes"]))
        t = s + wl.ops[o].duration_on(cluster.gpu_model)
        pl[o] = Placement(d, s, t)
        by_gpu.setdefault(d, []).append(o)
    return Plan(wl.name, pl, "serial", "serial", makespan_us=t, order=by_gpu)


class FalseInfeasibility(AssertionError):
    """The heuristic reported a cap infeasible for which a valid plan exists."""


def test_exhaustive_search_on_hand_cases():
    cluster = FakeCluster(1)
    comm = CommModel(cluster)
    # a frees when its consumer c ends: b must not run between them
    wl = Workload("hand", [Op("a", 1.0, memory_bytes=60, release=("c",)), Op("b", 1.0, memory_bytes=60),
                           Op("c", 1.0)], [Edge("a", "c", 0)])
    order = serial_witness(wl, 1, 60)
    pos = {o: k for k, (o, _) in enumerate(order)}
    assert not pos["a"] < pos["b"] < pos["c"]
    assert validate_plan(serial_plan(wl, cluster, comm, order), wl, cluster, comm, 60) == []
    # b now needs a's output: both allocations overlap in every plan
    wl.add_edge("a", "b", 0)
    wl.add_edge("b", "c", 0)
    assert serial_witness(wl, 1, 119) is None and serial_witness(wl, 1, 120) is not None
    assert op_that_fits_nowhere(wl, 1, 119) is None and op_that_fits_nowhere(wl, 1, 59) == "a"
    # two GPUs: a and b go on different ones
    assert serial_witness(wl, 2, 60) is not None


FALSE_CLAIMS: list[str] = []  # InfeasibleErrors for which the exhaustive search found a valid plan


# Examples: 150 (measured over seeds 0-9: ~80 % get a plan, ~8 % proved infeasible by the
# largest-op bound, ~7 % by the exhaustive search, <1 % rejected by assume (search past 20,000
# states), 1-5 % false infeasibility claims, see below); ~5 s on one core.
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags(memory="release", max_ops=16), st.integers(-30, 150))
def check_released_memory(case, extra):
    wl, cluster = case
    comm = CommModel(cluster)
    biggest = max((op.memory_bytes for op in wl.ops.values()), default=0)
    cap = max(wl.static_memory_bytes.values(), default=0) + max(0, biggest + extra)
    try:
        plan = plan_and_check(wl, cluster, comm, cap=cap)
    except InfeasibleError as err:
        assert "no memory for" in str(err) and "bytes over" in str(err), err
        if op_that_fits_nowhere(wl, cluster.n_gpus, cap) is not None:
            event("infeasible: largest-op bound")
            return
        try:
            order = serial_witness(wl, cluster.n_gpus, cap)
        except SearchTooBig:
            event("rejected: search too big")
            assume(False)
        if order is None:
            event("infeasible: exhaustive search")
            return
        event("false infeasibility claim")
        witness = serial_plan(wl, cluster, comm, order)
        assert validate_plan(witness, wl, cluster, comm, cap) == []  # the witness is a real plan
        FALSE_CLAIMS.append(f"{err} -- yet this order fits under the cap {cap} on {cluster.n_gpus} GPUs: {order}")
        return
    event("feasible: plan")
    assert max(peak_memory(plan, wl).values(), default=0) <= cap
    # the search agrees that a plan exists (a check of the checker)
    try:
        order = serial_witness(wl, cluster.n_gpus, cap)
    except SearchTooBig:
        return
    assert order is not None
    assert validate_plan(serial_plan(wl, cluster, comm, order), wl, cluster, comm, cap) == []


def test_memory_released_by_consumers_is_valid_or_proved_infeasible():
    """The cap is the worst static memory plus the largest allocation plus ``extra`` bytes (from
    30 under to 150 over): most caps are feasible, some not. A plan must be valid under the cap;
    an InfeasibleError must be true, proved by the largest-op bound or the exhaustive search.

    Known engine bug: the heuristic sometimes reports a feasible cap infeasible (it paints itself
    into a corner; see test_known_false_infeasibility). Such claims are collected, not raised
    (raising would make hypothesis shrink them for minutes), and make this test xfail with the
    first instance; every other failure fails it. Once the bug is fixed the test passes."""
    FALSE_CLAIMS.clear()
    check_released_memory()
    if FALSE_CLAIMS:
        pytest.xfail(f"known engine bug, {len(FALSE_CLAIMS)} false infeasibility claim(s); first: {FALSE_CLAIMS[0]}")


def known_false_infeasibility():
    """Three GPUs (static 0 / 5 / 5 bytes), cap 94. a and b (60 bytes each) are freed when c
    ends; e (30) when b ends; f (30, GPUs 1-2 only) when a and b end. A plan exists: a on GPU 0,
    b on GPU 1, c, then d, e on GPU 0 and f on GPU 1. The heuristic puts f on GPU 1 and e on GPU 2
    (the pool of room reserved for a and b ignores that both need GPU 0's room), a on GPU 0, and
    then b fits nowhere."""
    ops = [Op("a", 1.0, memory_bytes=60, release=("c",)), Op("b", 1.0, memory_bytes=60, release=("c",)),
           Op("c", 1.0), Op("d", 1.0), Op("e", 19.0, memory_bytes=30, release=("b",)),
           Op("f", 35.0, devices=(1, 2), memory_bytes=30, release=("b", "a"))]
    wl = Workload("false-infeasible", ops, [Edge("a", "c", 0), Edge("b", "c", 0), Edge("d", "f", 0)],
                  {0: 0, 1: 5, 2: 5})
    return wl, FakeCluster(3), 94


def test_known_false_infeasibility_has_a_valid_plan():
    wl, cluster, cap = known_false_infeasibility()
    comm = CommModel(cluster)
    order = serial_witness(wl, 3, cap)
    assert order is not None
    assert validate_plan(serial_plan(wl, cluster, comm, order), wl, cluster, comm, cap) == []
    assert serial_witness(wl, 3, cap - 1) is not None and serial_witness(wl, 3, 59) is None


@pytest.mark.xfail(raises=InfeasibleError, strict=True,
                   reason="engine bug: the heuristic reports a feasible cap infeasible (known_false_infeasibility)")
def test_known_false_infeasibility():
    wl, cluster, cap = known_false_infeasibility()
    plan_and_check(wl, cluster, cap=cap)


def test_memory_timeline_earliest_start():
    mem = MemoryTimeline(caps=[100], static=[10])
    mem.add(0, 0.0, 60)   # [0, 10)
    mem.add(0, 10.0, -60)
    mem.add(0, 20.0, 30)  # open from 20
    mem.open[0] += 30
    assert mem.used(0) == 40
    assert mem.earliest(0, 60, 0.0) == 10.0  # 10 + 60 + 60 > 100 before 10; 10 + 30 + 60 after 20
    assert mem.earliest(0, 60, 15.0) == 15.0
    assert mem.earliest(0, 30, 0.0) == 0.0
    assert mem.earliest(0, 61, 0.0) == INF  # the open 30 bytes never leave
    mem.add(0, 10.0, 5)  # an open allocation at 10: with the free there, a net -55
    mem.open[0] += 5
    assert mem.deltas[0] == [60, -55, 30]
    assert mem.earliest(0, 55, 0.0) == 10.0 and mem.earliest(0, 56, 0.0) == INF


def test_insertion_fills_an_idle_gap():
    # y waits for x (other GPU); z, ready at 0 but of low rank, is placed last and fills y's gap.
    wl = Workload("gap", [Op("x", 10.0, devices=(1,)), Op("y", 10.0, devices=(0,)), Op("z", 5.0, devices=(0,))],
                  [Edge("x", "y", 0)])
    plan = plan_and_check(wl, FakeCluster(2))
    assert [plan.placements[o].start for o in ("x", "y", "z")] == [0.0, 10.0, 0.0]
    assert plan.makespan_us == 20.0


def test_easy_cases_are_optimal():
    cluster = FakeCluster(4)
    independent = Workload("bag", [Op(f"o{i}", 10.0) for i in range(8)], [])
    assert plan_and_check(independent, cluster).makespan_us == 20.0
    chain = Workload("chain", [Op(f"o{i}", 10.0) for i in range(5)],
                     [Edge(f"o{i}", f"o{i + 1}", 1_000_000) for i in range(4)])
    plan = plan_and_check(chain, cluster)
    assert plan.makespan_us == 50.0 and plan.transfers == []  # big tensors keep the chain on one GPU


def test_durations_follow_the_gpu_model():
    wl = Workload("models", [Op("a", 10.0, duration_by_gpu=(("fake-gpu", 4.0), ("other", 7.0))), Op("b", 10.0)],
                  [Edge("a", "b", 0)])
    plan = plan_and_check(wl, FakeCluster(2))
    assert (plan.placements["a"].end, plan.placements["b"].end) == (4.0, 14.0)


def test_pipeline_p4_m8_beats_or_matches_1f1b():
    wl = build_pipeline(4, 8, times_us=UNIT)
    plan = plan_and_check(wl, FakeCluster(4))
    # 1F1B: m(F+B+W) + (p-1)(F+B) = 24000 + 6000; the bound is m(F+B+W) = 24000
    assert 24000.0 <= plan.makespan_us <= 30000.0
    assert plan.meta["memory_checked"] is False


@pytest.mark.parametrize("cap_acts", [1, 2, 3, 4])
def test_pipeline_honours_a_cap_of_k_activations(cap_acts):
    act = 1 << 20
    wl = build_pipeline(4, 8, times_us=UNIT, activation_bytes=act, send_bytes=4096)
    cluster = FakeCluster(4)
    plan = plan_and_check(wl, cluster, cap=cap_acts * act)
    assert plan.meta["memory_checked"] is True
    peaks = peak_memory(plan, wl)
    assert max(peaks.values()) <= cap_acts * act
    assert peaks[0] == cap_acts * act  # stage 0 runs as many micro-batches ahead as it may
    # one activation: every stage finishes a micro-batch (F, B, W) before starting the next
    if cap_acts == 1:
        assert plan.makespan_us >= 8 * (4 * 1000 + 4 * 1000 + 1000)


def test_pipeline_cap_with_workload_field_and_static_memory():
    act = 1000
    wl = build_pipeline(4, 8, times_us=UNIT, activation_bytes=act)
    wl.memory_cap_bytes = 2 * act + 500
    wl.static_memory_bytes = {d: 500 for d in range(4)}
    plan = plan_and_check(wl, FakeCluster(4))
    assert max(peak_memory(plan, wl).values()) == 2 * act + 500


def test_bidirectional_and_interleaved_pipelines_under_caps():
    act = 100
    cluster = FakeCluster(4)
    dual = build_pipeline(4, 8, directions=2, times_us=UNIT, activation_bytes=act, send_bytes=1000)
    for k in (1, 2, 5):
        plan = plan_and_check(dual, cluster, cap=k * act)
        assert max(peak_memory(plan, dual).values()) <= k * act
    # stages 0 and 2 share GPU 0: freeing stage 0's activation needs stage 2's on the same GPU
    inter = build_pipeline(4, 8, times_us=UNIT, activation_bytes=act, stage_devices=[0, 1, 0, 1])
    for k in (2, 3):
        plan = plan_and_check(inter, cluster, cap=k * act)
        assert max(peak_memory(plan, inter).values()) <= k * act


def test_impossible_caps_raise():
    wl = build_pipeline(4, 8, times_us=UNIT, activation_bytes=100)
    with pytest.raises(InfeasibleError, match=r"F0\.s0.*GPU 0.*1 bytes over"):
        plan_heuristic(wl, FakeCluster(4), CommModel(FakeCluster(4)), memory_cap=99)
    # interleaved stages need two activations on one GPU before the first can be freed
    inter = build_pipeline(4, 8, times_us=UNIT, activation_bytes=100, stage_devices=[0, 1, 0, 1])
    with pytest.raises(InfeasibleError, match="no memory for F0.s2"):
        plan_heuristic(inter, FakeCluster(4), CommModel(FakeCluster(4)), memory_cap=100)
    wl.static_memory_bytes = {1: 1000}
    with pytest.raises(InfeasibleError, match=r"GPU 1 static memory 1000 bytes exceeds the cap 500"):
        plan_heuristic(wl, FakeCluster(4), CommModel(FakeCluster(4)), memory_cap=500)


def test_no_eligible_gpu_raises():
    wl = Workload("far", [Op("a", 1.0, devices=(6, 7))], [])
    with pytest.raises(InfeasibleError, match=r"ops\[a\].*not in this cluster of 4 GPUs"):
        plan_heuristic(wl, FakeCluster(4), CommModel(FakeCluster(4)))
    coll = Workload("coll", [Op("ar", 1.0, kind="comm", collective=Collective("all_reduce", (2, 5), 8))], [])
    with pytest.raises(InfeasibleError, match="collective group"):
        plan_heuristic(coll, FakeCluster(4), CommModel(FakeCluster(4)))


def test_collectives_wait_for_every_group_gpu():
    ops = [Op("s1", 30.0, kind="comm", devices=(1,)), Op("s2", 50.0, kind="comm", devices=(2,)),
           Op("ar", 10.0, kind="comm", collective=Collective("all_reduce", (1, 2), 1 << 20)),
           Op("k", 40.0, devices=(1,))]
    plan = plan_and_check(Workload("coll", ops, []), FakeCluster(4))
    # s1 and s2 rank higher (longer); ar fits only once both comm streams are free
    assert plan.placements["ar"].device == 1
    assert plan.placements["ar"].start == 50.0
    assert plan.placements["k"].start == 0.0


def test_deterministic_and_independent_of_insertion_order():
    wl = build_pipeline(4, 8, directions=2, times_us={"F": 700, "B": 900, "W": 400}, activation_bytes=10,
                        send_bytes=1 << 20)
    cluster = FakeCluster(4, gpus_per_node=2)
    a = plan_heuristic(wl, cluster, CommModel(cluster), memory_cap=30).to_json()
    b = plan_heuristic(wl, cluster, CommModel(cluster), memory_cap=30).to_json()
    shuffled = Workload.from_dict(json.loads(json.dumps(wl.to_dict())))
    c = plan_heuristic(shuffled, cluster, CommModel(cluster), memory_cap=30).to_json()
    assert a == b == c


def test_observed_edge_contention_factors_are_used():
    wl = Workload("pair", [Op("a", 10.0, devices=(0,)), Op("b", 10.0, devices=(1,))], [Edge("a", "b", 400)])
    cluster = FakeCluster(2)
    plain = CommModel(cluster).delay("a", "b", 0, 1, 400)
    comm = CommModel(cluster, edge_scale={("a", "b"): 3.0})
    plan = plan_and_check(wl, cluster, comm)
    assert plan.placements["b"].start == pytest.approx(10.0 + 3.0 * plain)
    assert plan.transfers[0].end == pytest.approx(10.0 + 3.0 * plain)


def test_non_affine_transfer_times_fall_back_to_the_model():
    cluster = PacketCluster(4, gpus_per_node=2)
    table = DelayTable(CommModel(cluster), 4)
    assert not table.affine
    assert table.route(0, 1, 1) == table.route(0, 1, 4096) == 1.0 + 4096 / 400.0
    assert DelayTable(CommModel(FakeCluster(4)), 4).affine
    wl = Workload("pk", [Op(f"o{i}", 5.0) for i in range(6)],
                  [Edge("o0", f"o{i}", 5000) for i in range(1, 6)])
    plan_and_check(wl, cluster)


def test_with_a_real_h100_cluster():
    from engine.workloads.graphgen import generate
    from engine.workloads.pipeline import graph_from_dict

    for nodes in (1, 2):
        cluster = build_cluster(load_profile("h100-sxm"), nodes)
        wl = graph_from_dict(generate("layered", 300, seed=nodes, edge_bytes=64 << 20, memory_bytes=1 << 30))
        plan = plan_and_check(wl, cluster)
        assert any(t.src_device // 8 != t.dst_device // 8 for t in plan.transfers) == (nodes == 2)
    pipe = build_pipeline(8, 16, times_us=UNIT, activation_bytes=10 << 30, send_bytes=32 << 20)
    cluster = build_cluster(load_profile("h100-sxm"), 1)
    cap = cluster.memory_cap_bytes(0)
    plan = plan_and_check(pipe, cluster)
    assert max(peak_memory(plan, pipe).values()) <= cap
