"""Collectives: the flow simulation agrees with the closed form, the algorithms move the bytes NCCL
moves, and the times match nccl-tests on H100 (shared/data/nccl-tests-h100): accuracy is asserted
on measurements the shipped profile's constants were not chosen from (see IN_SAMPLE)."""

import pytest

from engine.calibration.nccl_tests import PERF_NAMES, out_of_place_times
from engine.core.errors import InputError
from hardware_profiles import build_cluster, load_profile
from simulator.collectives import CollectivePlanner, bus_factor, collective_time
from simulator.simulate import simulate_collective

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
#
# Where the shipped h100-sxm constants came from (hardware_profiles/h100-sxm.yaml and its git log,
# hardware_profiles/README.md), i.e. which measurements are in-sample for the shipped profile:
#
# * node.nvlink_efficiency 0.8: "sendrecv on one node reaches ~367 GB/s of 450"; both one-node logs
#   show it (single_N1_G8 367.25, single_N1_G4 367.44 GB/s at 16 GiB).
# * comm.nvls_efficiency 0.84, comm.efficiency.intra.send_recv 0.93: "chosen by hand against
#   one-node nccl-tests": single_N1_G8 (the one-node log these tests and bench_sim compared; its
#   all_gather / reduce_scatter were inspected too: the whole log counts as in-sample).
# * node.nic_efficiency 0.9: "between all_gather (~48.7 of 50 GB/s per GPU) and alltoall (~40-43)
#   across nodes": the 10 x 1 all_gather peak (summary_multi-node.csv: 48.71) and the 2 x 1 pair
#   alltoall peaks (summary_pairwise.csv: 40.2-43.7).
# * comm.net_channels_per_nic 2: NCCL's default, not fitted (the p2p channel rule was written after
#   comparing with the 10-node sendrecv logs, so those are held out for constants only).
# * latencies, message overhead, PCIe and fabric efficiencies: defaults, not read off these logs.
#
# Everything else is held out: single_N1_G4 except sendrecv, the 10-node logs except 10 x 1
# all_gather, the pair logs except 2 x 1 alltoall, and the smoke log.

ALL = ("all_reduce", "all_gather", "reduce_scatter", "alltoall", "sendrecv")
G8_1N, G4_1N = "single_N1_G8_cnode3-002.log", "single_N1_G4_cnode3-002.log"
PAIR1, PAIR8 = "pair_N2_G1_cnode3-002_cnode3-003.log", "pair_N2_G8_cnode3-002_cnode3-003.log"
SMOKE = "smoke_N2_G1_cnode3-002_cnode3-003.log"
IN_SAMPLE = {(G8_1N, op) for op in ALL} | {(G4_1N, "sendrecv"), ("multi_N10_G1.log", "all_gather"),
                                           (PAIR1, "alltoall")}


def errors(profile, data_dir, log, nodes, g, ops, lo=256 << 20, hi=float("inf"), held_out=True):
    """Relative error (model - measured) / measured per (op, size), lo <= size < hi; with
    ``held_out`` the (log, op) pairs must not be ones the shipped constants were chosen from."""
    if held_out:
        assert not IN_SAMPLE & {(log, op) for op in ops}, "in-sample data in a held-out comparison"
    cl = build_cluster(profile, nodes)
    data = out_of_place_times(data_dir / "nccl-tests-h100" / log)
    out = {}
    for op in ops:
        for size, t in data[PERF_NAMES.get(op, op)]:
            if 0.99 * lo <= size < 0.99 * hi:  # nccl-tests rounds sizes down to a multiple of the ranks
                out[(op, size)] = (collective_time(cl, op, size, ranks(nodes, g)) - t) / t
    return out


def test_in_sample_one_node_x8_log_within_15_percent(h100, data_dir):
    """IN-SAMPLE, not evidence of accuracy: single_N1_G8 is the log nvls_efficiency 0.84,
    intra send_recv 0.93 and nvlink_efficiency 0.8 were chosen from. Guards that the hand-chosen
    constants still reproduce it (NCCL ran NVLS all_reduce there: busbw above the NVLink rate)."""
    errs = errors(h100, data_dir, G8_1N, 1, 8, ALL, held_out=False)
    assert len(errs) == 35
    assert max(abs(e) for e in errs.values()) < 0.16, errs


def test_in_sample_across_nodes_within_20_percent(h100, data_dir):
    """IN-SAMPLE: the 10 x 1 all_gather and the 2 x 1 alltoall nic_efficiency 0.9 was set between."""
    errs = errors(h100, data_dir, "multi_N10_G1.log", 10, 1, ["all_gather"], held_out=False)
    errs.update(errors(h100, data_dir, PAIR1, 2, 1, ["alltoall"], held_out=False))
    assert len(errs) == 10
    assert max(abs(e) for e in errs.values()) < 0.20, errs


def test_held_out_one_node_x4_within_15_percent_from_512_MiB(h100, data_dir):
    """HELD OUT: the 4-GPU log (no constant was chosen from its all_reduce / all_gather /
    reduce_scatter / alltoall; NVLS all_reduce with the 0.84 read off 8 GPUs). 512 MiB .. 16 GiB:
    within 15% (worst: reduce_scatter 512 MiB, -13.7%); at 256 MiB the rings and alltoall run
    faster in the model by up to 16%, so 256 MiB is held to 17%."""
    ops = ["all_reduce", "all_gather", "reduce_scatter", "alltoall"]
    errs = errors(h100, data_dir, G4_1N, 1, 4, ops, lo=512 << 20)
    assert len(errs) == 24
    assert max(abs(e) for e in errs.values()) < 0.15, errs
    small = errors(h100, data_dir, G4_1N, 1, 4, ops, hi=512 << 20)
    assert len(small) == 4 and max(abs(e) for e in small.values()) < 0.17, small


def test_nvls_and_send_recv_efficiencies_slow_only_their_collectives():
    base = build_cluster(load_profile("h100-sxm", overrides={"comm.nvls_efficiency": 1.0,
                                                             "comm.efficiency.intra.send_recv": 1.0}), 1)
    shipped = build_cluster(load_profile("h100-sxm"), 1)
    ag = [collective_time(c, "all_gather", 4 * GIB, range(8)) for c in (base, shipped)]
    assert ag[0] == ag[1]
    # NVLS moves size (n+1)/n through each NVLink at nvls_efficiency x the link rate; send/recv
    # moves size at send_recv x the link rate
    nv, comm = base.class_bandwidth("nvlink"), shipped.profile.comm
    ar = [collective_time(c, "all_reduce", 4 * GIB, range(8), "nvls") for c in (base, shipped)]
    assert ar[1] - ar[0] == pytest.approx(4 * GIB * 9 / 8 / nv * (1 / comm.nvls_efficiency - 1), rel=1e-9)
    sr = [collective_time(c, "send_recv", 4 * GIB, range(8)) for c in (base, shipped)]
    assert sr[1] - sr[0] == pytest.approx(4 * GIB / nv * (1 / comm.intra_send_recv_efficiency - 1), rel=1e-9)


# sizes per collective: 10-node logs 7 from 256 MiB (4 from 2 GiB), pair logs 3 (4 .. 16 GiB),
# the smoke log 2 (256 and 512 MiB)
@pytest.mark.parametrize("log,nodes,g,ops,lo,sizes", [
    ("multi_N10_G1.log", 10, 1, ["all_reduce", "reduce_scatter", "alltoall", "sendrecv"], 256 << 20, 7),
    ("multi_N10_G2.log", 10, 2, list(ALL), 256 << 20, 7),
    ("multi_N10_G4.log", 10, 4, list(ALL), 256 << 20, 7),
    ("multi_N10_G8.log", 10, 8, ["all_reduce", "alltoall"], 256 << 20, 7),
    # 80-rank all_gather / reduce_scatter: within 20% from 2 GiB only (below: the known miss below)
    ("multi_N10_G8.log", 10, 8, ["all_gather", "reduce_scatter"], 2 << 30, 4),
    (PAIR1, 2, 1, ["sendrecv"], 256 << 20, 3),
    (PAIR8, 2, 8, ["alltoall", "sendrecv"], 256 << 20, 3),
    (SMOKE, 2, 1, ["all_reduce", "sendrecv"], 256 << 20, 2),
])
def test_held_out_multi_node_within_20_percent(h100, data_dir, log, nodes, g, ops, lo, sizes):
    """HELD OUT (no constant was chosen from these points), from 256 MiB (or the stated lo) to 16 GiB."""
    errs = errors(h100, data_dir, log, nodes, g, ops, lo)
    assert len(errs) == len(ops) * sizes
    assert max(abs(e) for e in errs.values()) < 0.20, errs


def test_known_misses_at_ten_by_eight_are_the_model_running_fast(h100, data_dir):
    """Outside the model, kept visible: at 10 x 8 GPUs (80 ranks) all_gather / reduce_scatter at
    256 MiB .. 1 GiB run slower than the NIC-bound rings (model -16% .. -46%; NCCL uses fewer
    channels there) and sendrecv measures 15.2 GB/s per rank, below one channel (model -32%).
    Pinned so that a change in either direction is noticed."""
    small = errors(h100, data_dir, "multi_N10_G8.log", 10, 8, ["all_gather", "reduce_scatter"], hi=2 << 30)
    assert len(small) == 6
    assert all(-0.50 < e < -0.15 for e in small.values()), small
    assert max(abs(e) for e in small.values()) > 0.40  # the 256 MiB points
    sr = errors(h100, data_dir, "multi_N10_G8.log", 10, 8, ["sendrecv"])
    assert len(sr) == 7 and all(-0.35 < e < -0.30 for e in sr.values()), sr
