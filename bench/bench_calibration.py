"""Calibration against the measured data in ../shared/data; prints one JSON object.

* nccl-tests on H100 (one node: 4 and 8 GPUs; ten nodes: 1, 2, 4, 8 GPUs each): fit on every
  other message size of every curve, report the error on the other half (target: MAPE <= 5%),
  per collective and per curve, and the bus-bandwidth shape checks: rises with size, NVLS above
  ring on one node, NIC-bound across nodes.
* vTrain all-reduce tables on A100: fit on the 8-GPU table only, predict 2, 4 and 8 GPUs
  (target: MAPE <= 5% each).
* vTrain Megatron iteration times (1,440 runs, one A100 node): fit the compute model on a
  random 50% (seeds 0, 1, 2), report the held-out MAPE (target <= 10%) and Spearman (>= 0.9);
  confirm the closed form with the simulator on sampled runs.
* Kineto: every NCCL kernel of the shared trace found with its message size.

Run: ``python bench/bench_calibration.py`` (about 20 s on one core).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from engine.calibration.collective_fit import alternate_split, fit_collectives, points_from_lut, points_from_nccl  # noqa: E402
from engine.calibration.collective_model import CollectiveModel, mape  # noqa: E402
from engine.calibration.compute_check import check_with_simulator  # noqa: E402
from engine.calibration.compute_fit import IterationModel, fit_compute, random_split  # noqa: E402
from engine.calibration.kineto import read_kineto  # noqa: E402
from engine.calibration.nccl_tests import bus_factor, read_nccl_tests  # noqa: E402
from engine.calibration.vtrain import read_ar_lut, read_ground_truth  # noqa: E402
from hardware_profiles import build_cluster, load_profile, override_profile  # noqa: E402

NCCL_FILES = ["single_N1_G4_cnode3-002.log", "single_N1_G8_cnode3-002.log"] + [f"multi_N10_G{g}.log" for g in (1, 2, 4, 8)]


def _busbw(p, t_us: float) -> float:
    """GB/s as nccl-tests prints it."""
    return p.size / t_us / 1e3 * bus_factor(p.op, len(p.ranks))


def bench_nccl() -> dict:
    profile = load_profile("h100-sxm")
    points, _ = points_from_nccl([read_nccl_tests(DATA / "nccl-tests-h100" / f) for f in NCCL_FILES], profile.node.gpus)
    train = alternate_split(points)
    t0 = time.perf_counter()
    fit = fit_collectives(profile, points, train)
    fit_s = time.perf_counter() - t0
    meas = np.array([p.time_us for p in points])
    test = ~train
    per_op = {}
    for op in sorted({p.op for p in points}):
        idx = [i for i, p in enumerate(points) if p.op == op and test[i]]
        per_op[op] = {"before": mape(fit.before[idx], meas[idx]), "after": mape(fit.after[idx], meas[idx])}
    no_sr = [i for i, p in enumerate(points) if p.op != "send_recv" and test[i]]

    # shape checks on the fitted model
    fitted = override_profile(profile, fit.params.overrides())
    curves: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        curves.setdefault(p.label, []).append(i)
    rises = {}
    for label, idx in curves.items():
        idx = sorted(idx, key=lambda i: points[i].size)
        bw = [_busbw(points[i], fit.after[i]) for i in idx]
        rises[label] = bool(all(b2 >= b1 * (1 - 1e-9) for b1, b2 in zip(bw, bw[1:])))
    nvls = {}
    for n in (4, 8):
        big = max((p for p in points if p.op == "all_reduce" and p.nodes == 1 and len(p.ranks) == n), key=lambda p: p.size)
        ring = CollectiveModel(fitted, [type(big)(**{**big.__dict__, "algo": "ring"})])
        nv = CollectiveModel(fitted, [big])
        nvls[f"1x{n}"] = {"nvls_busbw_gbs": _busbw(big, nv.times(nv.base)[0]),
                          "ring_busbw_gbs": _busbw(big, ring.times(ring.base)[0]),
                          "measured_busbw_gbs": _busbw(big, big.time_us)}
        nvls[f"1x{n}"]["nvls_above_ring"] = bool(nvls[f"1x{n}"]["nvls_busbw_gbs"] > nvls[f"1x{n}"]["ring_busbw_gbs"])
    model = CollectiveModel(profile, points)
    necks = model.bottlenecks(fit.params)
    nic_gbs = profile.node.nic_bytes_per_us / 1e3
    inter = [i for i, p in enumerate(points) if p.nodes > 1]
    nic_bound = {
        "inter_node_points": len(inter),
        "bottleneck_classes": {c: sum(1 for i in inter if necks[i] == c) for c in sorted({necks[i] for i in inter})},
        "measured_busbw_per_nic_max_gbs": max(_busbw(points[i], meas[i]) / (len(points[i].ranks) // points[i].nodes)
                                              for i in inter if points[i].op != "all_to_all"),
        "nic_line_rate_gbs": nic_gbs,
    }
    return {
        "files": NCCL_FILES, "points": len(points), "fitted_on": int(train.sum()), "held_out": int(test.sum()),
        "fit_seconds": round(fit_s, 2), "converged": fit.converged,
        "mape_held_out_before": fit.mape("before", "test"), "mape_held_out_after": fit.mape("after", "test"),
        "mape_fitted_on_after": fit.mape("after", "train"),
        "mape_held_out_after_without_send_recv": mape(fit.after[no_sr], meas[no_sr]),
        "target_mape": 5.0, "per_collective_held_out": per_op, "per_curve": fit.per_curve(),
        "parameters": {k: v for k, v in fit.params.overrides().items() if not k.startswith("comm.efficiency.")
                       or v != 1.0},
        "shape": {"busbw_rises_with_size": rises, "all_rise": all(rises.values()), "nvls_vs_ring": nvls,
                  "nic_bound": nic_bound},
    }


def bench_lut() -> tuple[dict, object]:
    profile = load_profile("a100-sxm4-80gb")
    tables = {g: points_from_lut(read_ar_lut(DATA / "vtrain-a100" / f"AR_GPU{g}_1M_1024M_LUT.csv")) for g in (2, 4, 8)}
    start = CollectiveModel(profile, tables[8][:1]).base.copy()
    start.passes = 1.0  # prior: one pass over the input and output buffers (one group size cannot identify it)
    fit = fit_collectives(profile, tables[8], start=start)
    fitted = override_profile(profile, fit.params.overrides())
    out = {"fitted_on": "AR_GPU8 (1,024 sizes)", "converged": fit.converged, "target_mape": 5.0,
           "parameters": {k: fit.params.overrides()[k] for k in ("node.nvlink_efficiency", "comm.message_overhead_us",
                                                                 "comm.buffer_passes")}}
    for g, pts in tables.items():
        m0, m1 = CollectiveModel(profile, pts), CollectiveModel(fitted, pts)
        meas = [p.time_us for p in pts]
        out[f"gpus_{g}"] = {"mape_before": mape(m0.times(m0.base), meas), "mape_after": mape(m1.times(m1.base), meas)}
    return out, fitted


def bench_vtrain(profile) -> dict:
    runs = read_ground_truth(DATA / "vtrain-a100" / "ground_truth_single.csv")
    t0 = time.perf_counter()
    model = IterationModel(runs, build_cluster(profile, 1))
    build_s = time.perf_counter() - t0
    seeds = {}
    fit0 = None
    for seed in (0, 1, 2):
        t0 = time.perf_counter()
        fit = fit_compute(model, random_split(len(runs), 0.5, seed))
        seeds[seed] = {"converged": fit.converged, "mape_held_out": fit.mape("after", "test"),
                       "spearman_held_out": fit.spearman("after", "test"), "mape_fitted_on": fit.mape("after", "train"),
                       "mape_before": fit.mape("before", "test"), "fit_seconds": round(time.perf_counter() - t0, 2),
                       "parameters": dict(zip(("compute_efficiency", "gemm_half_gflop", "memory_efficiency",
                                               "kernel_overhead_us"), fit.params))}
        fit0 = fit0 or fit
    fitted = override_profile(profile, fit0.overrides(profile))
    t0 = time.perf_counter()
    checks = check_with_simulator(runs, fitted, 1, 4, seed=0)
    return {"runs": len(runs), "build_seconds": round(build_s, 2), "by_seed": seeds, "target_mape": 10.0,
            "target_spearman": 0.9, "simulator_check": checks,
            "simulator_check_max_abs_diff_pct": max((abs(c["diff_pct"]) for c in checks), default=None),
            "simulator_check_seconds": round(time.perf_counter() - t0, 2)}


def bench_kineto() -> dict:
    path = DATA / "kineto-a100-ddp" / "nccl_data.json"
    trace = read_kineto(path)
    raw = json.loads(path.read_text())["traceEvents"]
    expected = [e for e in raw if e.get("cat") == "kernel" and str(e.get("name", "")).startswith("nccl")]
    found = trace.nccl()
    return {"gpu_activities": len(trace.kernels), "nccl_kernels_in_trace": len(expected), "nccl_kernels_found": len(found),
            "with_message_size": sum(1 for k in found if k.msg_bytes is not None),
            "collectives": {c: sum(1 for k in found if k.collective == c) for c in sorted({k.collective for k in found})},
            "all_found_with_size": len(found) == len(expected) and all(k.msg_bytes for k in found)}


def main() -> None:
    if not DATA.is_dir():
        print(json.dumps({"skipped": f"no measured data at {DATA}"}))
        return
    t0 = time.perf_counter()
    lut, a100_fitted = bench_lut()
    out = {"nccl_tests_h100": bench_nccl(), "allreduce_lut_a100": lut, "vtrain_iteration_a100": bench_vtrain(a100_fitted),
           "kineto": bench_kineto()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1, sort_keys=True, default=float))


if __name__ == "__main__":
    main()
