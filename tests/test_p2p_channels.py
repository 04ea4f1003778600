"""NCCL p2p channels per peer (simulator.p2p_channels): the channel-count rule, the per-connection
cap in the closed form, the flow model and the calibration model, and sendrecv across 10 nodes
against nccl-tests on H100 (shared/data/nccl-tests-h100)."""

import json
import math

import pytest
import simpy
from click.testing import CliRunner

from engine.calibration.collective_model import CollectiveModel, CollectivePoint
from engine.calibration.nccl_tests import out_of_place_times
from engine.cli import main
from engine.core.ir import Collective, Op, Placement, Plan, Workload
from hardware_profiles import build_cluster, load_profile, override_profile
from simulator.collectives import CollectivePlanner, collective_time
from simulator.network import Network
from simulator.p2p_channels import connection_cap, nics_per_node, peer_channels, pow2_up
from simulator.simulate import simulate, simulate_collective

GIB = 1 << 30
H100 = load_profile("h100-sxm")
OFF = load_profile("h100-sxm", overrides={"comm.net_channels_per_nic": 0})


def ranks(nodes, g, per=8):
    return [n * per + k for n in range(nodes) for k in range(g)]


def nic_eff(profile=H100):
    return profile.node.nic_bytes_per_us * profile.node.nic_efficiency


# -- the rule ----------------------------------------------------------------------------------------

def test_pow2_up():
    assert [pow2_up(x) for x in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]


@pytest.mark.parametrize("nodes,g,nics,k", [
    (2, 1, 1, 2),    # node pair: 2 channels, a whole NIC
    (2, 8, 8, 2),    # 16 ranks on 2 x 8: budget 16, 2 x 16 <= 64
    (10, 1, 1, 1),   # 10 ranks: budget 2, 2 x 10 > 8
    (10, 2, 2, 1),
    (10, 4, 4, 1),
    (10, 8, 8, 1),   # 80 ranks: budget 16, 2 x 80 > 64
    (4, 1, 1, 2),    # 2 x 4 = 8 = 4 x 2: not above, stays 2
    (5, 1, 1, 1),    # 2 x 5 > 8
])
def test_channels_per_peer_of_the_nccl_tests_cases(nodes, g, nics, k):
    cl = build_cluster(H100, nodes)
    r = ranks(nodes, g)
    assert nics_per_node(cl, r) == nics
    assert peer_channels(len(r), 2 * nics, 2) == k
    assert connection_cap(cl, r) == k * nic_eff() / 2


def test_no_cap_inside_a_node_or_when_off():
    assert connection_cap(build_cluster(H100, 1), range(8)) == math.inf
    assert connection_cap(build_cluster(OFF, 10), ranks(10, 1)) == math.inf
    # fewer NICs than GPUs: the NICs a node drives, not its GPUs, set the channel budget
    two_nics = build_cluster(load_profile("h100-sxm", overrides={"node.nics": 2}), 2)
    assert nics_per_node(two_nics, ranks(2, 8)) == 2
    assert peer_channels(16, 4, 2) == 1  # budget 4: 2 x 16 > 16


def test_more_channels_per_nic_do_not_turn_the_cap_off_zero_does():
    # c channels fill a NIC; halving stops at one channel (NIC / c), so a larger c caps large groups more
    share = {}
    for c in (2, 4, 64):
        prof = load_profile("h100-sxm", overrides={"comm.net_channels_per_nic": c})
        for nodes, g in ((2, 1), (2, 8), (10, 1), (10, 8)):
            share[c, nodes, g] = connection_cap(build_cluster(prof, nodes), ranks(nodes, g)) / nic_eff()
    assert all(share[c, 2, g] == 1.0 for c in (2, 4, 64) for g in (1, 8))
    assert [share[c, 10, 1] for c in (2, 4, 64)] == [0.5, 0.25, 0.25]
    assert [share[c, 10, 8] for c in (2, 4, 64)] == [0.5, 0.25, 0.25]


# -- closed form, flow model, CLI ----------------------------------------------------------------------

def test_send_recv_across_ten_nodes_moves_half_a_nic():
    cl = build_cluster(H100, 10)
    t = collective_time(cl, "send_recv", GIB, ranks(10, 1))
    latency = cl.transfer_time(0, 8, 1) - 1 / nic_eff()  # route hops + message overhead
    assert t == pytest.approx(latency + GIB / (0.5 * nic_eff()), rel=1e-12)
    # the cap binds: the flow model agrees exactly
    for g in (1, 8):
        r = ranks(10, g)
        assert simulate_collective(cl, "send_recv", GIB + 7, r) == pytest.approx(
            collective_time(cl, "send_recv", GIB + 7, r), rel=1e-12)
        assert simulate_collective(cl, "send_recv", GIB + 7, r, mode="alpha_beta") == pytest.approx(
            collective_time(cl, "send_recv", GIB + 7, r), rel=1e-12)


def test_tuned_cap_flow_model_equals_closed_form():
    # calibrated shares: efficiency scales the bytes, the full-node share scales the cap (10 x 8 fills nodes)
    prof = load_profile("h100-sxm", overrides={"comm.efficiency.full_node.send_recv": 0.6,
                                               "comm.efficiency.inter.send_recv": 1.1,
                                               "comm.latency.inter.send_recv": 30.0})
    cl, plain = build_cluster(prof, 10), build_cluster(H100, 10)
    for g, share in ((4, 1.0), (8, 0.6)):
        r = ranks(10, g)
        t = collective_time(cl, "send_recv", GIB, r)
        assert simulate_collective(cl, "send_recv", GIB, r) == pytest.approx(t, rel=1e-12)
        latency = plain.transfer_time(0, 8, 1) - 1 / nic_eff() + 30.0
        assert t == pytest.approx(latency + GIB / 1.1 / (0.5 * nic_eff() * share), rel=1e-12)


def test_cli_send_recv_busbw_is_half_the_nic_across_ten_nodes():
    res = CliRunner().invoke(main, ["collective", "--profile", "h100-sxm", "--nodes", "10", "--gpus-per-node", "1",
                                    "--op", "send_recv", "--bytes", "1GiB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    cl = build_cluster(H100, 10)
    latency = cl.transfer_time(0, 8, 1) - 1 / nic_eff()
    assert out["time_us"] == pytest.approx(latency + GIB / (0.5 * nic_eff()), rel=1e-12)
    half_nic_gbs = 0.5 * nic_eff() / 1e3  # 22.5 GB/s
    assert out["busbw_gbs"] == pytest.approx(half_nic_gbs, rel=5e-4)  # latency: ~8 us of ~47,700
    assert out["busbw_gbs"] < half_nic_gbs


def test_off_reproduces_the_uncapped_model():
    for nodes, g in ((2, 1), (10, 1), (10, 4), (10, 8)):
        cl_off, cl = build_cluster(OFF, nodes), build_cluster(H100, nodes)
        r = ranks(nodes, g)
        latency = cl_off.transfer_time(0, 8, 1) - 1 / nic_eff()
        # uncapped, a ring shift across nodes is NIC-bound: size / NIC rate
        assert collective_time(cl_off, "send_recv", GIB, r) == pytest.approx(latency + GIB / nic_eff(), rel=1e-12)
        assert simulate_collective(cl_off, "send_recv", GIB, r) == collective_time(cl_off, "send_recv", GIB, r)
        plan = CollectivePlanner(cl_off).plan("send_recv", GIB, r)
        assert plan.phases[0].conns == () and plan.phases[0].conn_rate == math.inf
        for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
            assert collective_time(cl_off, op, GIB, r) == collective_time(cl, op, GIB, r)


# -- the flow model: caps that are not link shares -----------------------------------------------------

def run_capped(nic, flows):
    """flows: (connection (src, dst), cap, nbytes), all starting at 0 through one NIC link of
    ``nic`` B/us. Returns completion times and the network."""
    env = simpy.Environment()
    net = Network(env, [("nic", "leaf")], [nic])
    done = [None] * len(flows)
    for i, ((a, b), cap, nbytes) in enumerate(flows):
        cid = net.connection(a, b, cap)
        net.start((0, cid), (1.0, 1.0), nbytes, lambda i=i: done.__setitem__(i, env.now))
    env.run()
    return done, net


def test_two_capped_connections_through_one_nic():
    # NIC 10 B/us, caps 4: room for both, each moves at its cap (100 B in 25 us)
    done, net = run_capped(10.0, [((0, 8), 4.0, 100.0), ((1, 9), 4.0, 100.0)])
    assert done == [25.0, 25.0]
    # caps 6: the NIC is short (12 > 10), a fair share of 5 each
    done, _ = run_capped(10.0, [((0, 8), 6.0, 100.0), ((1, 9), 6.0, 100.0)])
    assert done == [pytest.approx(20.0), pytest.approx(20.0)]
    # caps 3 and 9: max-min fair, 3 and the other 7; at 100/3 us the second gets 9 for its rest
    done, _ = run_capped(10.0, [((0, 8), 3.0, 100.0), ((1, 9), 9.0, 300.0)])
    t1 = 100.0 / 3.0
    assert done[0] == pytest.approx(t1)
    assert done[1] == pytest.approx(t1 + (300.0 - 7.0 * t1) / 9.0)
    # the private links carry no bytes of the cluster's links and are not named
    assert net.names == [("nic", "leaf")] and len(net.bytes) == 1 and net.bytes[0] == pytest.approx(200.0)


def test_transfers_on_one_connection_share_its_cap():
    # same GPUs, same cap: one connection, 2 B/us each although the NIC has room for 8
    done, _ = run_capped(10.0, [((0, 8), 4.0, 100.0), ((0, 8), 4.0, 100.0)])
    assert done == [pytest.approx(50.0), pytest.approx(50.0)]


def two_send_recvs(profile, nbytes):
    """Two 10-rank send_recv collectives at once, GPU 0 and GPU 1 of every node, on one NIC per node."""
    cl = build_cluster(profile, 10)
    groups = [tuple(ranks(10, 1)), tuple(g + 1 for g in ranks(10, 1))]
    ops = [Op(f"sr{i}", 0.0, kind="comm", collective=Collective("send_recv", grp, nbytes, "auto"))
           for i, grp in enumerate(groups)]
    wl = Workload("two-sendrecv", ops)
    plan = Plan(wl.name, {f"sr{i}": Placement(grp[0], 0.0, 0.0) for i, grp in enumerate(groups)}, "two")
    return cl, groups, simulate(plan, wl, cl, symmetry=False)


def test_concurrent_capped_collectives_fill_a_shared_nic_and_links_show_only_real_links():
    one_nic = {"node.nics": 1}
    capped = load_profile("h100-sxm", overrides=one_nic)
    cl, groups, res = two_send_recvs(capped, GIB)
    alone = collective_time(cl, "send_recv", GIB, groups[0])
    # each gets half a NIC (1 channel of 2): two of them exactly fill the shared NIC
    assert res.makespan_us == pytest.approx(alone, rel=1e-12)
    names = {f"{u}->{v}" for u, v in cl.topology.edges}
    assert set(res.links) <= names and set(res.link_series) <= names
    assert res.links["nic0.0->leaf0"]["utilization"] == pytest.approx(GIB * 2 / (nic_eff() * res.makespan_us))
    # uncapped, each would take the whole NIC alone and half of it together
    cl_off, _g, res_off = two_send_recvs(override_profile(capped, {"comm.net_channels_per_nic": 0}), GIB)
    alone_off = collective_time(cl_off, "send_recv", GIB, groups[0])
    latency = cl_off.transfer_time(0, 8, 1) - 1 / nic_eff()
    assert res_off.makespan_us == pytest.approx(latency + 2 * (alone_off - latency), rel=1e-12)


# -- calibration model --------------------------------------------------------------------------------

def test_calibration_model_keeps_the_cap_and_its_nic_efficiency():
    shapes = [(10, 1), (10, 4), (10, 8), (2, 1), (2, 8)]
    points = []
    for nodes, g in shapes:
        r = tuple(ranks(nodes, g))
        points += [CollectivePoint("send_recv", s, r, nodes, 1.0, f"send_recv {nodes}x{g}") for s in (1 << 24, GIB)]
    model = CollectiveModel(H100, points)
    p = model.base.copy()
    p.eff["nic"], p.eta[("send_recv", "inter")], p.full["send_recv"] = 0.8, 1.1, 0.6
    tuned = override_profile(H100, p.overrides())
    ref = [collective_time(build_cluster(tuned, q.nodes), q.op, q.size, q.ranks) for q in points]
    assert model.times(p) == pytest.approx(ref, rel=1e-12)
    assert set(model.bottlenecks(p)) == {"nic"}


# -- against measurement ------------------------------------------------------------------------------

@pytest.mark.parametrize("log,nodes,g", [("multi_N10_G1.log", 10, 1), ("multi_N10_G2.log", 10, 2),
                                         ("multi_N10_G4.log", 10, 4),
                                         ("pair_N2_G1_cnode3-002_cnode3-003.log", 2, 1),
                                         ("pair_N2_G8_cnode3-002_cnode3-003.log", 2, 8)])
def test_sendrecv_within_20_percent_of_nccl_tests(data_dir, log, nodes, g):
    cl_capped, cl_off = build_cluster(H100, nodes), build_cluster(OFF, nodes)
    errs, errs_off = [], []
    for size, t in out_of_place_times(data_dir / "nccl-tests-h100" / log)["send_recv"]:
        if size >= 0.99 * (256 << 20):
            errs.append((collective_time(cl_capped, "send_recv", size, ranks(nodes, g)) - t) / t)
            errs_off.append((collective_time(cl_off, "send_recv", size, ranks(nodes, g)) - t) / t)
    assert len(errs) >= 3  # pair logs: 4, 8, 16 GiB
    assert max(abs(e) for e in errs) < 0.20, errs
    if nodes == 10:  # uncapped the model was 40 % too fast here
        assert min(errs_off) < -0.35
