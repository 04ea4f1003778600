"""Readers of measured traces: nccl-tests logs, vTrain CSVs, Kineto JSON (shared data + synthetic)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.calibration.kineto import OPS_CSV_COLUMNS, ops_csv, read_kineto
from engine.calibration.nccl_tests import bus_factor, read_nccl_tests
from engine.calibration.vtrain import read_ar_lut, read_ground_truth
from engine.core.errors import InputError

# The nccl-tests logs of ../shared/data/nccl-tests-h100 (a fixed list, so that a missing data folder
# still yields these tests, which then skip or, under CI=true, fail: see conftest.py).
NCCL_LOGS = ["multi_N10_G1.log", "multi_N10_G2.log", "multi_N10_G4.log", "multi_N10_G8.log",
             "pair_N2_G1_cnode3-002_cnode3-003.log", "pair_N2_G8_cnode3-002_cnode3-003.log",
             "single_N1_G4_cnode3-002.log", "single_N1_G8_cnode3-002.log", "smoke_N2_G1_cnode3-002_cnode3-003.log"]


@pytest.fixture(scope="module")
def nccl(data_dir):
    return data_dir / "nccl-tests-h100"


# ----- nccl-tests -------------------------------------------------------------------------------

def test_single_node_log_has_five_collectives_of_ten_sizes_on_eight_ranks(nccl):
    log = read_nccl_tests(nccl / "single_N1_G8_cnode3-002.log")
    assert [t.collective for t in log.tests] == ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"]
    assert all(len(t.rows) == 10 and t.ranks == 8 and t.nodes == 1 for t in log.tests)
    assert log.tests[0].gpu_name == "NVIDIA H100 80GB HBM3" and log.tests[0].avg_busbw_gbs == pytest.approx(437.957)
    first = log.tests[0].rows[0]
    assert (first.size, first.count, first.dtype, first.redop, first.root) == (33554432, 4194304, "double", "sum", -1)
    assert (first.out_of_place.time_us, first.out_of_place.algbw_gbs, first.out_of_place.busbw_gbs) == (182.87, 183.49, 321.10)
    assert first.in_place.time_us == 182.88 and first.in_place.wrong == "0"
    assert log.tests[3].rows[0].in_place.wrong == "N/A"


def test_the_list_of_shared_logs_is_complete(nccl):
    assert sorted(p.name for p in nccl.glob("*.log")) == NCCL_LOGS


@pytest.mark.parametrize("name", NCCL_LOGS)
def test_every_shared_row_obeys_the_bus_bandwidth_convention(nccl, name):
    """busbw = algbw x factor(collective, ranks) and algbw = size / time, within print rounding."""
    log = read_nccl_tests(nccl / name)
    assert log.rows and not log.skipped
    for r in log.rows:
        m = r.out_of_place
        assert m.busbw_gbs == pytest.approx(m.algbw_gbs * bus_factor(r.collective, r.ranks), rel=2e-3, abs=0.02)
        assert m.algbw_gbs == pytest.approx(r.size / m.time_us / 1e3, rel=2e-3, abs=0.02)


def test_ranks_and_nodes_come_from_the_header_or_are_recovered(nccl):
    multi = read_nccl_tests(nccl / "multi_N10_G8.log")
    assert {(t.ranks, t.nodes) for t in multi.tests} == {(80, 10)}
    # this log prints no Rank lines: 16 ranks from busbw/algbw, 2 nodes from the file name
    pair = read_nccl_tests(nccl / "pair_N2_G8_cnode3-002_cnode3-003.log")
    assert {(t.collective, t.ranks, t.nodes) for t in pair.tests} == {("all_to_all", 16, 2), ("send_recv", 16, 2)}


SYNTHETIC = """\
# nThread 1 nGpus 4 minBytes 1024 maxBytes 4096 step: 2(factor) warmup iters: 5 iters: 20 validation: 1
#
# Using devices
#   Rank  0 Pid  11 on   hostA device  0 [0x07] NVIDIA A100-SXM4-80GB
#   Rank  1 Pid  12 on   hostA device  1 [0x0b] NVIDIA A100-SXM4-80GB
#
#                                                     out-of-place                       in-place
#       size         count      type   redop     time   algbw   busbw  error     time   algbw   busbw  error
        1024           256     float     sum    10.00    0.10    0.10  0e+00    10.00    0.10    0.10  0e+00
hostA:11:11 [0] NCCL WARN Cuda failure 'out of memory'
        2048           512     float     sum    20.00    0.10    0.10  0e+00    20.
        4096
# Out of bounds values : 0 OK
# Collective test starting: all_gather_perf
# nThread 1 nGpus 1 minBytes 1024 maxBytes 1024 step: 2(factor) warmup iters: 5 iters: 20 agg iters: 1 validation: 1 graph: 0
#  Rank  0 Group  0 Pid  21 on hostA device  0 [0000:07:00] NVIDIA A100-SXM4-80GB
#  Rank  1 Group  0 Pid  22 on hostB device  0 [0000:07:00] NVIDIA A100-SXM4-80GB
#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong
        1024           128     float    none      -1     5.00    0.20    0.10       0     5.00    0.20    0.10       0
"""


def test_synthetic_log_tolerates_old_columns_warnings_and_truncated_rows(tmp_path):
    path = tmp_path / "all_reduce_perf.log"
    path.write_text(SYNTHETIC)
    log = read_nccl_tests(path)
    ar, ag = log.tests
    assert ar.collective == "all_reduce" and ar.ranks == 2 and ar.nodes == 1  # old layout: no root column
    assert [r.size for r in ar.rows] == [1024, 2048]
    assert ar.rows[0].root is None and ar.rows[0].in_place.time_us == 10.0
    assert ar.rows[1].in_place is None  # cut inside the in-place half: the out-of-place half stays
    assert ag.collective == "all_gather" and ag.ranks == 2 and ag.nodes == 2 and ag.rows[0].root == -1
    reasons = {reason for _, reason in log.skipped}
    assert any("truncated" in r for r in reasons) and any("not a result row" in r for r in reasons)


def test_log_without_result_rows_names_the_file(tmp_path):
    path = tmp_path / "empty.log"
    path.write_text("# nccl-tests version 2.17.8\n# Collective test starting: all_reduce_perf\nsome warning\n")
    with pytest.raises(InputError, match="empty.log.*no nccl-tests result rows"):
        read_nccl_tests(path)
    with pytest.raises(InputError, match="file not found"):
        read_nccl_tests(tmp_path / "missing.log")


# ----- vTrain -----------------------------------------------------------------------------------

def test_allreduce_lut_rows_are_in_microseconds(data_dir):
    rows = read_ar_lut(data_dir / "vtrain-a100" / "AR_GPU8_1M_1024M_LUT.csv")
    assert len(rows) == 1024 and {r.gpus for r in rows} == {8}
    assert rows[0].size == 1 << 20 and rows[0].time_us == pytest.approx(92.79) and rows[0].busbw_gbs == 19.78
    assert rows[-1].size == 1 << 30 and rows[-1].time_us_in_place == pytest.approx(8196.4)
    assert [r.size for r in rows] == [(i + 1) << 20 for i in range(1024)]


def test_ground_truth_reads_bom_and_crlf(data_dir):
    runs = read_ground_truth(data_dir / "vtrain-a100" / "ground_truth_single.csv")
    assert len(runs) == 1440
    r = runs[0]
    assert (r.gpus, r.global_batch, r.micro_batch, r.hidden, r.heads, r.layers, r.seq_len, r.tp, r.dp, r.pp) == \
        (2, 16, 8, 1024, 16, 24, 1024, 1, 1, 2)
    assert r.iter_us == pytest.approx(372160.408) and r.microbatches == 2
    assert all(x.tp * x.dp * x.pp == x.gpus for x in runs)


def test_csv_missing_columns_are_named(tmp_path):
    lut = tmp_path / "AR_GPU4_x.csv"
    lut.write_text("size(B),count,type,busbw(GB/s)\n1024,256,float,1.0\n")
    with pytest.raises(InputError, match=r"AR_GPU4_x.csv.*missing column\(s\) time\(ns\)"):
        read_ar_lut(lut)
    gt = tmp_path / "gt.csv"
    gt.write_bytes("\ufeff# GPUs,global batch,micro batch,hidden size\r\n2,16,8,1024\r\n".encode("utf-8"))
    with pytest.raises(InputError, match="gt.csv.*'attention heads'.*'iteration time \\(ms\\)'"):
        read_ground_truth(gt)


# ----- Kineto -----------------------------------------------------------------------------------

@pytest.mark.needs_data("kineto-a100-ddp")
def test_every_nccl_kernel_of_the_shared_trace_is_found_with_its_size(data_dir):
    path = data_dir / "kineto-a100-ddp" / "nccl_data.json"
    raw = json.loads(path.read_text())["traceEvents"]
    expected = [e for e in raw if e.get("cat") == "kernel" and e["name"].startswith("nccl")]
    trace = read_kineto(path)
    nccl = trace.nccl()
    assert len(nccl) == len(expected) == 21
    assert all(k.msg_bytes and k.group_size == 2 and k.stream == 40 for k in nccl)
    by_ext = {k.external_id: k for k in nccl}
    big = by_ext[2099]  # 2,049,000 float32 elements
    assert (big.collective, big.in_nelems, big.dtype, big.msg_bytes) == ("all_reduce", 2049000, "Float", 8196000)
    assert (big.algorithm, big.protocol) == ("RING", "LL")
    assert trace.world_size == 2 and trace.rank == 0
    assert sum(1 for e in raw if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")) == \
        len(trace.kernels)


def test_kineto_gzip_list_form_and_csv(tmp_path):
    events = [{"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL(x)", "ts": 10.0, "dur": 5.0,
               "args": {"stream": 3, "device": 1, "Collective name": "_allgather_base", "In msg nelems": 4,
                        "Out msg nelems": 16, "dtype": "BFloat16", "Group size": 4, "External id": 7}},
              {"ph": "X", "cat": "kernel", "name": "sm90_gemm", "ts": 1.0, "dur": 2.0, "args": {"stream": 7, "device": 1}},
              {"ph": "X", "cat": "cpu_op", "name": "c10d::allgather", "ts": 9.0, "dur": 1.0, "args": {"External id": 7}}]
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(json.dumps(events).encode()))
    trace = read_kineto(path)
    assert [k.name for k in trace.kernels] == ["ncclDevKernel_AllGather_RING_LL(x)", "sm90_gemm"]  # stream 3 first
    ag = trace.nccl()[0]
    assert (ag.collective, ag.msg_bytes, ag.op) == ("all_gather", 32, "c10d::allgather")
    lines = ops_csv(trace).splitlines()
    assert lines[0].split(",") == list(OPS_CSV_COLUMNS) and len(lines) == 3
    assert lines[1].split(",")[4] == "comm" and lines[2].split(",")[4] == "compute"


def test_trace_without_trace_events_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"schemaVersion": 1}')
    with pytest.raises(InputError, match="bad.json: traceEvents: missing"):
        read_kineto(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        read_kineto(path)


# ----- missing data (tests/conftest.py) ---------------------------------------------------------

@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_data_skips_locally_and_fails_under_ci(tmp_path, ci):
    """With the data folder absent a data test (fixture or marker) is skipped, but under CI=true
    it fails with a message that names the folder."""
    here = Path(__file__)
    tests = [f"{here}::test_ground_truth_reads_bom_and_crlf",  # data_dir fixture
             f"{here}::test_every_nccl_kernel_of_the_shared_trace_is_found_with_its_size",  # marker + fixture
             f"{here}::test_every_shared_row_obeys_the_bus_bandwidth_convention"]  # 9 parametrized
    env = {**os.environ, "PLANSIM_DATA": str(tmp_path / "absent"), "CI": ci}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests],
                         env=env, capture_output=True, text=True, cwd=here.parents[1], timeout=120)
    last = res.stdout.strip().splitlines()[-1]
    if ci:
        assert res.returncode == 1 and "11 errors" in last and "passed" not in last, res.stdout
        assert f"measured data not found: {tmp_path / 'absent'}" in res.stdout and "CI=true" in res.stdout
    else:
        assert res.returncode == 0 and "11 skipped" in last and "passed" not in last, res.stdout
