"""IR: JSON round trips, and the Workload refuses cycles, unknown ids and negative sizes."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import InputError
from engine.core.ir import Collective, Edge, Op, Placement, Plan, Transfer, Workload, bubble_us
from engine.workloads.graphgen import GRAPH_KINDS, generate
from engine.workloads.pipeline import build_pipeline, graph_from_dict


def test_op_round_trip_keeps_every_field():
    op = Op("a", 12.5, kind="comm", devices=(3, 1), memory_bytes=7, release=("b",), stage=1, microbatch=2,
            chunk=0, phase="F", flops=3e9, duration_by_gpu=(("h100-sxm", 10.0),),
            collective=Collective("all_reduce", (0, 1), 1024, "ring"))
    back = Op.from_dict(json.loads(json.dumps(op.to_dict())))
    assert back == op
    assert back.devices == (1, 3)
    assert back.duration_on("h100-sxm") == 10.0 and back.duration_on("a100-sxm4-80gb") == 12.5


def test_workload_round_trip_pipeline():
    wl = build_pipeline(3, 4, 2 if False else 1, {"F": 2, "B": 3, "W": 1}, activation_bytes=5, send_bytes=9)
    wl.static_memory_bytes = {0: 100}
    back = Workload.from_dict(json.loads(json.dumps(wl.to_dict())))
    assert back.to_dict() == wl.to_dict()
    assert sorted(back.edges, key=lambda e: (e.src, e.dst)) == sorted(wl.edges, key=lambda e: (e.src, e.dst))


def test_plan_round_trip():
    plan = Plan("w", {"a": Placement(0, 0.0, 1.5), "b": Placement(1, 2.0, 3.0)}, "heuristic", status="heuristic",
                transfers=[Transfer("a", "b", 0, 1, 64, 1.5, 2.0)], lower_bound_us=2.5, mip_gap=0.1, meta={"x": 1})
    back = Plan.from_json(plan.to_json())
    assert back.to_json() == plan.to_json()
    assert back.makespan_us == 3.0 and back.order == {0: ["a"], 1: ["b"]}


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(GRAPH_KINDS), n=st.integers(1, 80), seed=st.integers(0, 10_000))
def test_generated_graph_round_trips(kind, n, seed):
    g = generate(kind, n, seed, gpus=4, eligible=2, edge_bytes=8, memory_bytes=16)
    wl = graph_from_dict(g)
    assert Workload.from_dict(json.loads(json.dumps(wl.to_dict()))).to_dict() == wl.to_dict()
    assert all(set(op.release) <= set(wl.graph.successors(op.id)) for op in wl.ops.values())


def test_cycle_is_refused_and_named():
    with pytest.raises(InputError, match="cycle: a -> b -> a"):
        Workload(ops=[Op("a", 1), Op("b", 1)], edges=[Edge("a", "b"), Edge("b", "a")])


@pytest.mark.parametrize("make, field", [
    (lambda: Workload(ops=[Op("a", 1)], edges=[Edge("a", "zz")]), "edges[a->zz].dst"),
    (lambda: Op("a", -1), "duration_us"),
    (lambda: Op("a", 1, memory_bytes=-4), "memory_bytes"),
    (lambda: Workload(ops=[Op("a", 1), Op("b", 1)], edges=[Edge("a", "b", -1)]), "bytes"),
    (lambda: Op("a", 1, devices=()), "devices"),
    (lambda: Workload(ops=[Op("a", 1), Op("a", 2)]), "duplicate"),
    (lambda: Workload(ops=[Op("a", 1, release=("nope",))]), "release"),
    (lambda: Collective("all_sum", (0, 1), 8), "collective.op"),
])
def test_bad_workloads_are_refused(make, field):
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_pipeline_structure():
    wl = build_pipeline(4, 8, 1, {"F": 1, "B": 1, "W": 1}, activation_bytes=3)
    assert len(wl) == 96 and len(wl.edges) == 8 * (3 + 3 + 4 + 1)
    assert wl.op("F2.s3").devices == (3,) and wl.op("F2.s0").release == ("W2.s0",)
    bi = build_pipeline(4, 8, 2, {"F": 1, "B": 1})
    assert bi.op("F0.s0").devices == (0,) and bi.op("F4.s0").devices == (3,)
    assert bi.op("F4.s0").release == ("B4.s0",) and "W0.s0" not in bi.ops


def test_bubble_is_makespan_minus_busiest_compute():
    wl = Workload(ops=[Op("a", 4), Op("b", 2), Op("c", 5, kind="comm")])
    plan = Plan("w", {"a": Placement(0, 0, 4), "b": Placement(1, 4, 6), "c": Placement(1, 0, 5)}, "x")
    assert bubble_us(plan, wl) == 6 - 4


def test_topological_indices_smallest_ready_first_and_cycles_refused():
    from engine.core.ir import topological_indices

    assert topological_indices(4, [(3, 0), (2, 1)]) == [2, 1, 3, 0]
    with pytest.raises(ValueError, match="cycle"):
        topological_indices(2, [(0, 1), (1, 0)])
