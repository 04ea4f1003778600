"""The one semi-active timer (engine.core.timing) and the timers built on it agree."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.comm import CommModel
from engine.core.timing import OrderCycle, earliest_times
from engine.planners.heuristic import plan_heuristic
from engine.planners.mip.instance import Instance
from engine.planners.mip.warm import semi_active
from engine.planners.validate import compact
from engine.workloads.graphgen import generate
from engine.workloads.pipeline import graph_from_dict

try:
    from fakes import FakeCluster
except ImportError:  # pragma: no cover
    from tests.fakes import FakeCluster


def test_longest_path_by_hand():
    # 0 -(3)-> 1 -(2)-> 3 and 0 -(1)-> 2 -(5)-> 3: node 3 waits for the longer path, 1 + 5 = 6
    assert earliest_times(4, [(0, 1, 3.0), (1, 3, 2.0), (0, 2, 1.0), (2, 3, 5.0)]) == [0.0, 3.0, 1.0, 6.0]


def test_a_node_without_arcs_starts_at_zero_and_lags_add_up_along_a_chain():
    assert earliest_times(3, [(0, 1, 2.5), (1, 2, 2.5)]) == [0.0, 2.5, 5.0]
    assert earliest_times(2, []) == [0.0, 0.0]


def test_a_cycle_names_the_nodes_that_can_never_start():
    with pytest.raises(OrderCycle) as err:
        earliest_times(4, [(0, 1, 1.0), (1, 2, 1.0), (2, 1, 1.0), (2, 3, 1.0)])
    assert err.value.stuck == [1, 2, 3]
    with pytest.raises(OrderCycle) as err:  # an op that waits for itself
        earliest_times(3, [(0, 1, 1.0), (2, 2, 0.0)])
    assert err.value.stuck == [2]


# 40 examples, ~3 s: random branchy graphs with bytes on 3 GPUs, planned by the heuristic
@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["layered", "moe", "random"]))
def test_plan_compaction_and_the_mip_index_timer_give_the_same_starts(seed, kind):
    """validate.compact (op ids) and mip.warm.semi_active (instance indices) time the same
    placement and stream order; the heuristic's plan is already semi-active, so both reproduce it."""
    cluster = FakeCluster(3)
    comm = CommModel(cluster)
    wl = graph_from_dict(generate(kind, 24, seed=seed, gpus=3, eligible=2))
    plan = plan_heuristic(wl, cluster, comm)
    compacted = compact(plan, wl, comm)
    inst = Instance.from_workload(wl, cluster, comm)
    dev = [plan.placements[o].device for o in inst.ids]
    start = [plan.placements[o].start for o in inst.ids]
    _, again = semi_active(inst, dev, start)
    for k, o in enumerate(inst.ids):
        assert again[k] == pytest.approx(compacted.placements[o].start, abs=1e-6)
        assert compacted.placements[o].start <= plan.placements[o].start + 1e-6
