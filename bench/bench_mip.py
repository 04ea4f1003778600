"""Benchmark of the MIP planner: prints one JSON object with a record per run.

Instances (docs/DESIGN.md / issue 3):

* ``pipe_p4_m8``, ``pipe_p8_m20``: unit pipelines (F = B = W = 1000 us), one direction; optima
  27 and 67 units; ``*_d2``: the same with two directions (DualPipe layout);
* ``graph_50``, ``graph_200``, ``graph_1000``: ``gen-graph`` layered graphs on 4, 8 and 16 GPUs,
  each op eligible on a random 2, 3 or 4 of them, zero-byte edges (1,000 ops: ``merge=auto``);
* ``*_mem``: the same with activations (1 GiB per F, or per graph op until its consumers end)
  under a cap that binds.

Each record: makespan, lower bound, gap, status, solve time, binaries, ops before / after
merging, and the heuristic's makespan. Unless ``--no-ablation``, the key instances run again
with each speed-up switched off (:data:`ABLATE`), also "cold" (no warm start) for p=4, m=8.

``graph_50`` also gets ``optimum_us`` and ``gap_to_optimum`` from an independent exact solve
(bench/reference_optimum.py, CP-SAT; needs ``pip install '.[reference]'``): the MIP's own bound
there is the load bound, which its relaxation does not raise. Without OR-Tools the record says so.

``nic_capacity``: the MIP with and without NIC capacity (:mod:`engine.planners.mip.nic`) on the
quickstart and contention_2node scenarios, predicted against simulated makespan.

Run: ``python bench/bench_mip.py [--quick] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_optimum import available as reference_available  # noqa: E402
from reference_optimum import solve_reference

from engine.core.comm import CommModel  # noqa: E402
from engine.core.errors import InputError, write_atomic  # noqa: E402
from engine.planners.heuristic import plan_heuristic  # noqa: E402
from engine.planners.mip.model import DEFAULT_SPEEDUPS  # noqa: E402
from engine.planners.mip.plan import plan_mip  # noqa: E402
from engine.planners.validate import peak_memory, validate_plan  # noqa: E402
from engine.workloads.graphgen import generate  # noqa: E402
from engine.workloads.pipeline import build_pipeline, graph_from_dict  # noqa: E402
from hardware_profiles import build_cluster, load_profile  # noqa: E402

GIB = 1 << 30
UNIT_US = 1000.0
ABLATION = ("tight_big_m", "symmetry", "dag_pairs", "load_cut", "warm_start", "lns")
COLD = ("tight_big_m", "symmetry", "dag_pairs", "load_cut", "lns", "all")
# instance -> (regime, time limit s, switches turned off one at a time). "warm": everything else
# on; "cold": the warm start off too (as in docs/DESIGN.md's trial); "all": every speed-up off.
ABLATE = {
    "pipe_p4_m8": [("warm", 30, ABLATION), ("cold", 30, COLD)],
    "pipe_p8_m20": [("warm", 60, ABLATION)],
    "graph_50": [("warm", 20, ABLATION)],
    "graph_200": [("warm", 30, ("lns",))],
}


def cluster_for(gpus: int):
    profile = load_profile("h100-sxm")
    return build_cluster(profile, max(1, -(-gpus // 8)))


def pipeline(p: int, m: int, directions: int = 1, act: int = 0):
    return build_pipeline(p, m, directions=directions, times_us={"F": UNIT_US, "B": UNIT_US, "W": UNIT_US},
                          activation_bytes=act, name=f"pipe_p{p}_m{m}_d{directions}")


def graph(n: int, gpus: int, eligible: int, seed: int = 1, mem: int = 0):
    return graph_from_dict(generate("layered", n, seed=seed, gpus=gpus, eligible=eligible, memory_bytes=mem))


def instances(quick: bool) -> list[dict]:
    """name, workload, GPUs, memory cap, time limit (s), merge."""
    out = [
        dict(name="pipe_p4_m8", wl=pipeline(4, 8), gpus=4, limit=30),
        dict(name="pipe_p8_m20", wl=pipeline(8, 20), gpus=8, limit=60),
        dict(name="pipe_p4_m8_d2", wl=pipeline(4, 8, 2), gpus=4, limit=30),
        dict(name="pipe_p8_m20_d2", wl=pipeline(8, 20, 2), gpus=8, limit=60),
        dict(name="pipe_p4_m8_mem", wl=pipeline(4, 8, act=GIB), gpus=4, cap=2 * GIB, limit=30),
        dict(name="pipe_p8_m20_mem", wl=pipeline(8, 20, act=GIB), gpus=8, cap=4 * GIB, limit=60),
        dict(name="pipe_p4_m8_d2_mem", wl=pipeline(4, 8, 2, act=GIB), gpus=4, cap=3 * GIB, limit=30),
        dict(name="graph_50", wl=graph(50, 4, 2), gpus=4, limit=60, reference_s=120),
        dict(name="graph_200", wl=graph(200, 8, 3), gpus=8, limit=60),
        dict(name="graph_1000", wl=graph(1000, 16, 4), gpus=16, limit=120, merge="auto"),
        dict(name="graph_50_mem", wl=graph(50, 4, 2, mem=GIB), gpus=4, cap="auto", limit=30),
        dict(name="graph_200_mem", wl=graph(200, 8, 3, mem=GIB), gpus=8, cap="auto", limit=60),
    ]
    if quick:
        for inst in out:
            inst["limit"] = min(inst["limit"], 10)
    return out


def binding_cap(wl, cluster, comm) -> int:
    """A cap 70% of the way from the largest single need to the heuristic's uncapped peak."""
    peak = max(peak_memory(plan_heuristic(wl, cluster, comm), wl).values())
    need = max(op.memory_bytes for op in wl.ops.values())
    return int(need + 0.7 * (peak - need))


def run(spec: dict, off: tuple[str, ...] = (), limit: float | None = None) -> dict:
    wl, cluster = spec["wl"], cluster_for(spec["gpus"])
    comm = CommModel(cluster)
    cap = spec.get("cap")
    if cap == "auto":
        cap = binding_cap(wl, cluster, comm)
    rec = {"instance": spec["name"], "n_ops": len(wl), "gpus": spec["gpus"], "memory_cap_bytes": cap,
           "time_limit_s": limit or spec["limit"], "speedup_off": ",".join(off) or None}
    if "all" in off:
        off = tuple(DEFAULT_SPEEDUPS)
    try:
        heur = plan_heuristic(wl, cluster, comm, memory_cap=cap).makespan_us
    except InputError:
        heur = None
    t0 = time.perf_counter()
    try:
        plan = plan_mip(wl, cluster, comm, time_limit_s=rec["time_limit_s"], threads=2, memory_cap=cap,
                        merge=spec.get("merge", "none"), speedups={k: False for k in off})
    except InputError as err:
        rec.update({"error": str(err), "solve_s": time.perf_counter() - t0})
        return rec
    assert validate_plan(plan, wl, cluster, comm, cap) == []
    rec.update({
        "makespan_us": plan.makespan_us, "lower_bound_us": plan.lower_bound_us, "gap": plan.mip_gap,
        "status": plan.status, "solve_s": round(plan.solve_s, 3), "n_binaries": plan.meta.get("n_binaries"),
        "n_ops_after_merge": plan.meta.get("n_ops_after_merge"), "heuristic_makespan_us": heur,
        "warm_start": plan.meta.get("warm_start"), "source": plan.meta.get("source"),
        "peak_memory_bytes": max(peak_memory(plan, wl).values()),
    })
    if spec.get("reference_s") and not off:
        rec.update(reference_record(spec, wl, cluster, plan.makespan_us))
    if spec["name"].startswith("pipe"):
        rec["makespan_units"] = plan.makespan_us / UNIT_US
        rec["lower_bound_units"] = plan.lower_bound_us / UNIT_US
    return rec


def reference_record(spec: dict, wl, cluster, makespan_us: float) -> dict:
    """The exact solve's optimum and the MIP plan's distance from it (see module doc)."""
    if not reference_available():
        return {"reference": "not run: OR-Tools is not installed (pip install '.[reference]')"}
    ref = solve_reference(wl, cluster, time_limit_s=spec["reference_s"])
    out = {"reference": ref}
    if ref["status"] == "optimal":
        out["optimum_us"] = ref["makespan_us"]
        out["gap_to_optimum"] = round((makespan_us - ref["makespan_us"]) / ref["makespan_us"], 5)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="time limits of at most 10 s")
    ap.add_argument("--only", help="run instances whose name contains this")
    ap.add_argument("--no-ablation", action="store_true", help="skip the runs with a speed-up switched off")
    ap.add_argument("--ablation-only", action="store_true", help="only the runs with a speed-up switched off")
    ap.add_argument("--switches", help="comma-separated speed-ups to switch off (default: all of them)")
    ap.add_argument("-o", "--output", help="also write the JSON here")
    args = ap.parse_args(argv)
    specs = [s for s in instances(args.quick) if not args.only or args.only in s["name"]]
    records = []
    for spec in [] if args.ablation_only else specs:
        records.append(run(spec))
        print(json.dumps(records[-1], sort_keys=True), file=sys.stderr)
    if not args.no_ablation:
        only = tuple(args.switches.split(",")) if args.switches else None
        for spec in specs:
            for regime, limit, switches in ABLATE.get(spec["name"], ()):
                limit = min(limit, 10) if args.quick else limit
                base = () if regime == "warm" else ("warm_start",)
                for off in ("none",) + switches:
                    if only is not None and off not in only:
                        continue
                    if off == "none" and regime == "warm" and limit == spec["limit"] and not args.ablation_only:
                        continue  # the main run is the baseline
                    offs = base + (() if off == "none" else (off,))
                    records.append(run(spec, offs, limit))
                    print(json.dumps(records[-1], sort_keys=True), file=sys.stderr)
    text = json.dumps({"bench": "mip", "records": records, "nic_capacity": nic_capacity_runs(args)}, indent=1,
                      sort_keys=True)
    print(text)
    if args.output:
        write_atomic(args.output, text + "\n")


def nic_capacity_runs(args, threads: int = 2) -> list[dict] | None:
    """The MIP with and without NIC capacity on the two one-NIC-per-node scenarios (20 s, 10 s
    with --quick): predicted and simulated makespan (us), binaries, solve time (s). Skipped by
    --ablation-only and by an --only that does not name "nic"."""
    if args.ablation_only or (args.only and args.only not in "nic_capacity"):
        return None
    from engine.planners.mip.plan import plan_mip_scenario
    from engine.scenario.loader import load_scenario
    from engine.scenario.simulation import simulate_scenario

    out = []
    for name in ("quickstart", "contention_2node"):
        sc = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / f"{name}.yaml")
        for on in (False, True):
            plan = plan_mip_scenario(sc, replace(sc.solver, threads=threads, time_limit_s=10 if args.quick else 20,
                                                 nic_capacity=on))
            sim = simulate_scenario(sc, plan)
            out.append({"scenario": name, "nic_capacity": on, "predicted_makespan_us": plan.makespan_us,
                        "simulated_makespan_us": sim.makespan_us, "status": plan.status,
                        "n_binaries": plan.meta.get("n_binaries"), "nic_binaries": plan.meta.get("nic_binaries", 0),
                        "solve_s": round(plan.solve_s, 3)})
            print(json.dumps(out[-1], sort_keys=True), file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
