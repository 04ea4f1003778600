"""Max-min fair sharing of links (simulator.network) and contention seen through simulate()."""

import pytest
import simpy

from hardware_profiles import build_cluster, load_profile
from simulator.network import Network
from simulator.simulate import simulate_transfers


def run_flows(caps, flows):
    """flows: (start_time, links, weights, nbytes). Returns completion times in order."""
    env = simpy.Environment()
    net = Network(env, [(f"u{i}", f"v{i}") for i in range(len(caps))], caps)
    done = [None] * len(flows)

    def starter(i, t0, links, weights, nbytes):
        yield env.timeout(t0)
        net.start(links, weights, nbytes, lambda: done.__setitem__(i, env.now))

    for i, f in enumerate(flows):
        env.process(starter(i, *f))
    env.run()
    return done, net


def test_max_min_fair_shares_by_progressive_filling():
    # link 0: 10 B/us, link 1: 4 B/us. B and C share link 1 (2 each); A takes the rest of link 0 (8).
    done, net = run_flows([10.0, 4.0], [(0, [0], [1], 100.0), (0, [0, 1], [1, 1], 20.0), (0, [1], [1], 20.0)])
    assert done[1] == pytest.approx(10.0) and done[2] == pytest.approx(10.0)
    # A moved 80 bytes by t=10, then has link 0 alone: 20 more bytes at 10 B/us
    assert done[0] == pytest.approx(12.0)
    assert net.bytes[0] == pytest.approx(120.0) and net.bytes[1] == pytest.approx(40.0)
    assert net.peak_subflows[0] == 2 and net.peak_subflows[1] == 2


def test_rates_are_recomputed_when_a_flow_starts_and_ends():
    # A (100 B) alone at 10 B/us; B (20 B) joins at t=5: both 5 B/us until B ends at t=9; A's last 30 B at 10.
    done, _ = run_flows([10.0], [(0, [0], [1], 100.0), (5, [0], [1], 20.0)])
    assert done[1] == pytest.approx(9.0)
    assert done[0] == pytest.approx(12.0)


def test_a_bundle_loads_a_link_once_per_subflow():
    # two sub-flows on link 0 (weight 2) alone: 5 B/us each; with a single flow beside: 10/3 each
    done, _ = run_flows([10.0], [(0, [0], [2], 50.0)])
    assert done[0] == pytest.approx(10.0)
    done, _ = run_flows([10.0], [(0, [0], [2], 10.0), (0, [0], [1], 100.0)])
    assert done[0] == pytest.approx(3.0)  # 10 B at 10/3 B/us


def test_unrelated_flows_leave_a_flow_exactly_on_time():
    # B comes and goes on another link: A's completion is exactly bytes / bandwidth, no float drift
    nbytes, cap = 123456789.0, 360000.0
    done, _ = run_flows([cap, 7.0], [(0, [0], [1], nbytes), (1.0, [1], [1], 3.0), (2.5, [1], [1], 5.0)])
    assert done[0] == nbytes / cap


def test_two_flows_through_one_nic_each_get_half_its_bandwidth():
    # 4 NICs per node: GPUs 0 and 1 send through nic0.0, GPUs 8 and 9 receive through nic1.0
    cl = build_cluster(load_profile("h100-sxm", overrides={"node.nics": 4}), 2)
    nic = cl.class_bandwidth("nic")
    nbytes = 1 << 30
    alone = simulate_transfers(cl, [(0, 8)], nbytes)
    both = simulate_transfers(cl, [(0, 8), (1, 9)], nbytes)
    t_alone = alone.edges[("s0", "d0")]["observed_us"]
    assert t_alone == pytest.approx(cl.transfer_time(0, 8, nbytes), rel=1e-12)
    latency = t_alone - nbytes / nic
    for e in both.edges.values():
        assert e["observed_us"] == pytest.approx(latency + nbytes / (nic / 2), rel=1e-9)
        assert e["modelled_us"] == pytest.approx(t_alone, rel=1e-12)
    assert both.links["nic0.0->leaf0"]["utilization"] == pytest.approx(2 * nbytes / (nic * both.makespan_us))
    # GPUs on different NICs do not share: each transfer is as fast as alone
    apart = simulate_transfers(cl, [(0, 8), (2, 10)], nbytes)
    assert apart.makespan_us == pytest.approx(alone.makespan_us, rel=1e-12)


def test_oversubscribed_spine_halves_cross_leaf_throughput():
    def makespan(oversub):
        cl = build_cluster(load_profile("h100-sxm", overrides={
            "fabric.nodes_per_leaf": 1, "fabric.spines": 1, "fabric.oversubscription": oversub}), 2)
        res = simulate_transfers(cl, [(g, 8 + g) for g in range(8)], 1 << 30)
        return res.makespan_us - (cl.transfer_time(0, 8, 1 << 30) - (1 << 30) / cl.class_bandwidth("nic"))

    full, half = makespan(1.0), makespan(2.0)
    # non-blocking: the 8 NICs fill the one spine link exactly; 2:1: the spine link halves every flow
    assert half / full == pytest.approx(2.0, rel=1e-9)
