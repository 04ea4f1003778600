"""Collectives: the flow simulation agrees with the closed form, the algorithms move the bytes NCCL
moves, and the times match nccl-tests on H100 (shared/data/nccl-tests-h100)."""

from pathlib import Path

import pytest

from engine.core.errors import InputError
from hardware_profiles import build_cluster, load_profile
from simulator.collectives import CollectivePlanner, bus_factor, collective_time
from simulator.simulate import simulate_collective
from engine.calibration.nccl_tests import PERF_NAMES, out_of_place_times

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nccl-tests-h100"
GIB = 1 << 30


@pytest.fixture(scope="module")
def h100():
    return load_profile("h100-sxm")


def ranks(nodes, g, per=8):
    return [n * per + k for n in range(nodes) for k in range(g)]


CASES = [("all_reduce", "ring"), ("all_reduce", "tree"), ("all_gather", "ring"), ("reduce_scatter", "ring"),
         ("broadcast", "ring"), ("all_to_all", "direct"), ("send_recv", "direct")]


@pytest.mark.parametrize("nodes,g", [(1, 8), (2, 8), (3, 2), (2, 1)])
@pytest.mark.parametrize("op,algo", CASES)
def test_flow_mode_equals_closed_form_without_contention(h100, nodes, g, op, algo):
    cl = build_cluster(h100, nodes)
    r = ranks(nodes, g)
    nbytes = 3 * GIB + 12345
    closed = collective_time(cl, op, nbytes, r, algo)
    assert simulate_collective(cl, op, nbytes, r, algo, "flow") == pytest.approx(closed, rel=1e-9)
    assert simulate_collective(cl, op, nbytes, r, algo, "alpha_beta") == pytest.approx(closed, rel=1e-12)


def test_nvls_in_one_node_and_its_closed_form(h100):
    cl = build_cluster(h100, 1)
    p = CollectivePlanner(cl).plan("all_reduce", 8 * GIB, range(8))
    assert p.algo == "nvls"
    nv = cl.class_bandwidth("nvlink")
    # every GPU sends and receives size (n+1)/n through its NVLink; 2 hops each way of latency
    nv *= cl.profile.comm.nvls_efficiency
    want = cl.profile.comm.message_overhead_us + 4 * cl.class_latency_us("nvlink") + 8 * GIB * 9 / 8 / nv
    assert p.time_us(CollectivePlanner(cl).bandwidth) == pytest.approx(want, rel=1e-12)
    assert simulate_collective(cl, "all_reduce", 8 * GIB, range(8)) == pytest.approx(want, rel=1e-9)
    with pytest.raises(InputError, match="one node"):
        collective_time(build_cluster(h100, 2), "all_reduce", GIB, range(16), "nvls")


def test_ring_moves_the_bytes_nccl_moves(h100):
    cl = build_cluster(h100, 1)
    n, size = 8, 8 * GIB
    nv, lat = cl.class_bandwidth("nvlink"), 2 * cl.class_latency_us("nvlink")
    over = cl.profile.comm.message_overhead_us
    # all_gather: n-1 steps of size/n on every GPU's link; all_reduce (ring): 2(n-1) steps
    assert collective_time(cl, "all_gather", size, range(n)) == pytest.approx(over + (n - 1) * (lat + size / n / nv))
    assert collective_time(cl, "all_reduce", size, range(n), "ring") == pytest.approx(
        over + 2 * (n - 1) * (lat + size / n / nv))
    # across nodes, one ring per GPU of a node: each NIC carries one channel
    cl2 = build_cluster(h100, 2)
    plan = CollectivePlanner(cl2).plan("all_gather", size, range(16))
    ph = plan.phases[0]
    nic_weights = {l: w for l, w in zip(ph.links, ph.weights) if l[0].startswith("nic") and l[1].startswith("leaf")}
    assert len(nic_weights) == 16 and set(nic_weights.values()) == {1.0}


def test_all_to_all_across_two_nodes_is_nic_bound(h100):
    cl = build_cluster(h100, 2)
    size = 4 * GIB
    t = simulate_collective(cl, "all_to_all", size, range(16))
    # each GPU sends half its buffer (8 peers of 16) to the other node through its own NIC
    nic = cl.class_bandwidth("nic")
    assert nic < cl.class_bandwidth("pcie") and nic < cl.class_bandwidth("nvlink") / 7
    latency = cl.transfer_time(0, 8, 1) - 1 / nic
    assert t == pytest.approx(latency + (size / 2) / nic, rel=1e-9)
    # inside one node it is NVLink-bound: 7 peers' shares of size/8 on every GPU's NVLink
    nv = cl.class_bandwidth("nvlink")
    intra = cl.transfer_time(0, 1, 1) - 1 / nv + 7 * (size / 8) / nv
    assert simulate_collective(cl, "all_to_all", size, range(8)) == pytest.approx(intra, rel=1e-9)


def test_bus_factors_follow_nccl_tests():
    assert bus_factor("all_reduce", 8) == pytest.approx(1.75)
    assert bus_factor("all_gather", 8) == bus_factor("reduce_scatter", 8) == bus_factor("all_to_all", 8) == 0.875
    assert bus_factor("send_recv", 8) == 1.0


def test_bad_collectives_are_input_errors(h100):
    cl = build_cluster(h100, 1)
    with pytest.raises(InputError, match="unknown collective"):
        collective_time(cl, "gather", GIB, range(8))
    with pytest.raises(InputError, match="no algorithm"):
        collective_time(cl, "all_gather", GIB, range(8), "tree")
    with pytest.raises(InputError, match="not in the cluster"):
        collective_time(cl, "all_gather", GIB, [0, 9])


# -- against measurement ---------------------------------------------------------------------------

def errors(profile, log, nodes, g, ops, lo=256 << 20):
    """Relative error (model - measured) / measured per (op, size) with size >= lo."""
    cl = build_cluster(profile, nodes)
    data = out_of_place_times(DATA / log)
    out = {}
    for op in ops:
        for size, t in data[PERF_NAMES.get(op, op)]:
            if size >= 0.99 * lo:  # nccl-tests rounds sizes down to a multiple of the ranks
                out[(op, size)] = (collective_time(cl, op, size, ranks(nodes, g)) - t) / t
    return out


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data/nccl-tests-h100 absent")


@needs_data
def test_one_node_within_15_percent_where_the_default_profile_is_right(h100):
    # all_gather and reduce_scatter (ring) and sendrecv from 512 MiB: default NVLink efficiency 0.8
    errs = errors(h100, "single_N1_G8_cnode3-002.log", 1, 8, ["all_gather", "reduce_scatter"])
    errs.update(errors(h100, "single_N1_G8_cnode3-002.log", 1, 8, ["sendrecv"], lo=512 << 20))
    assert len(errs) == 20
    assert max(abs(e) for e in errs.values()) < 0.15, errs


@needs_data
def test_one_node_within_15_percent_with_the_shipped_profile():
    # NCCL ran NVLS all_reduce here (busbw above the NVLink rate): the shipped h100-sxm profile
    # carries comm.nvls_efficiency 0.84 and comm.efficiency.intra.send_recv 0.93 for that
    errs = errors(load_profile("h100-sxm"), "single_N1_G8_cnode3-002.log", 1, 8,
                  ["all_gather", "reduce_scatter", "all_reduce", "sendrecv"])
    assert len(errs) == 28
    assert max(abs(e) for e in errs.values()) < 0.15, errs


def test_nvls_and_send_recv_efficiencies_slow_only_their_collectives():
    base = build_cluster(load_profile("h100-sxm", overrides={"comm.nvls_efficiency": 1.0,
                                                             "comm.efficiency.intra.send_recv": 1.0}), 1)
    shipped = build_cluster(load_profile("h100-sxm"), 1)
    ag = [collective_time(c, "all_gather", 4 * GIB, range(8)) for c in (base, shipped)]
    assert ag[0] == ag[1]
    ar = [collective_time(c, "all_reduce", 4 * GIB, range(8), "nvls") for c in (base, shipped)]
    assert ar[1] > ar[0]


@needs_data
@pytest.mark.parametrize("log,nodes,g,ops,lo", [
    ("multi_N10_G1.log", 10, 1, ["all_reduce", "all_gather", "reduce_scatter", "alltoall"], 256 << 20),
    ("multi_N10_G2.log", 10, 2, ["all_reduce", "all_gather", "reduce_scatter", "alltoall"], 256 << 20),
    ("multi_N10_G4.log", 10, 4, ["all_reduce", "all_gather", "reduce_scatter", "alltoall"], 256 << 20),
    ("multi_N10_G8.log", 10, 8, ["all_reduce", "alltoall"], 256 << 20),
    # 80-rank all_gather / reduce_scatter below 2 GiB run slower than the NIC-bound rings (-16 % to
    # -46 % at 256 MiB..1 GiB; NCCL uses fewer channels there): compared from 2 GiB
    ("multi_N10_G8.log", 10, 8, ["all_gather", "reduce_scatter"], 2 << 30),
    ("pair_N2_G1_cnode3-002_cnode3-003.log", 2, 1, ["alltoall", "sendrecv"], 256 << 20),
    ("pair_N2_G8_cnode3-002_cnode3-003.log", 2, 8, ["alltoall", "sendrecv"], 256 << 20),
    ("smoke_N2_G1_cnode3-002_cnode3-003.log", 2, 1, ["all_reduce", "sendrecv"], 256 << 20),
])
def test_multi_node_within_20_percent(h100, log, nodes, g, ops, lo):
    errs = errors(h100, log, nodes, g, ops, lo)
    assert errs
    assert max(abs(e) for e in errs.values()) < 0.20, errs
