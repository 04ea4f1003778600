"""The DualPipe study: known schedules vs the MIP, every figure simulated. Prints one JSON object.

Targets (issue 5):
* ``dualpipe_pp8_mb20``: the MIP plan's simulated bubble <= 50% of DualPipe's, with peak
  activation memory per GPU <= DualPipe's, in under 5 minutes of solving;
* one direction, p = 8, m = 20: MIP bubble <= ZB-H1's at ZB-H1's memory, and <= 1F1B's at 1F1B's.

Also: the README tables (every schedule's bubble and peak memory on these scenarios, on the
H800 F&B-overlap variant and on a branchy MoE graph where no expert schedule applies), the
op-level timing of each known schedule's order (its ops started as soon as inputs allow, which
is what the MIP's model allows too), and an ablation: the MIP on dualpipe_pp8_mb20 without a
known schedule as warm start.

Usage: python bench/bench_schedules.py [--time-limit 300] [--ablation-time 120] [--threads 1] [--only SECTION]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.planners.schedules.library import SCHEDULE_NAMES, applicable  # noqa: E402
from engine.planners.schedules.timing import schedule_plan  # noqa: E402
from engine.scenario.loader import load_scenario, scenario_from_dict  # noqa: E402
from engine.study.compare import compare, simulate_row  # noqa: E402
from engine.workloads.graphgen import generate as generate_graph  # noqa: E402

GIB = 1 << 30


def table(result: dict) -> dict:
    """{name: {bubble_us, bubble_ratio, makespan_us, peak_memory_gib, solve_s}} in display order."""
    order = list(SCHEDULE_NAMES) + ["heuristic", "mip"]
    rows = {}
    for name in order:
        r = result["schedules"].get(name)
        if r is not None:
            rows[name] = {"makespan_us": r["makespan_us"], "bubble_us": r["bubble_us"],
                          "bubble_ratio": round(r["bubble_ratio"], 4), "peak_memory_gib": r["peak_memory_bytes"] / GIB,
                          "solve_s": r["solve_s"]}
    return rows


def op_level(scenario) -> dict:
    """Each known schedule's order timed op by op (op-level view), simulated."""
    out = {}
    for name, found in applicable(scenario.workload, scenario.comm).items():
        if isinstance(found, str):
            continue
        wl, sched = found
        plan = schedule_plan(sched, wl, scenario.comm, scenario.cluster.gpu_model)
        row, _ = simulate_row(plan, wl, scenario, 0.0)
        out[name] = {"makespan_us": row["makespan_us"], "bubble_us": row["bubble_us"],
                     "peak_memory_gib": row["peak_memory_bytes"] / GIB}
    return out


def mip_entry(result: dict) -> dict:
    e = result["entries"].get("mip")
    if e is None:
        return {"error": result["skipped"].get("mip")}
    p = e["plan"]
    return {"status": p.status, "lower_bound_us": p.lower_bound_us, "mip_gap": p.mip_gap,
            "warm_start": p.meta.get("compare_warm_start") or p.meta.get("warm_start"), "source": p.meta.get("source"),
            "n_binaries": p.meta.get("n_binaries")}


def dualpipe_study(args) -> dict:
    sc = load_scenario(ROOT / "scenarios" / "dualpipe_pp8_mb20.yaml")
    res = compare(sc, cap_from="dualpipe", time_limit_s=args.time_limit, threads=args.threads)
    dp, mip = res["schedules"]["dualpipe"], res["schedules"].get("mip")
    target = None
    if mip is not None:
        target = {"dualpipe_bubble_us": dp["bubble_us"], "mip_bubble_us": mip["bubble_us"],
                  "ratio": mip["bubble_us"] / dp["bubble_us"], "dualpipe_peak_gib": dp["peak_memory_bytes"] / GIB,
                  "mip_peak_gib": mip["peak_memory_bytes"] / GIB, "mip_solve_s": mip["solve_s"],
                  "met": mip["bubble_us"] <= 0.5 * dp["bubble_us"] + 1e-6
                  and mip["peak_memory_bytes"] <= dp["peak_memory_bytes"] and mip["solve_s"] <= 300}
    return {"table": table(res), "op_level": op_level(sc), "mip": mip_entry(res), "target": target,
            "skipped": res["skipped"], "mip_memory_cap_gib": res["mip_memory_cap_bytes"] / GIB}


def ablation(args) -> dict:
    """The MIP on dualpipe_pp8_mb20 at DualPipe's memory with only its own warm starts."""
    from engine.planners.mip.plan import plan_mip
    from engine.planners.validate import peak_memory

    sc = load_scenario(ROOT / "scenarios" / "dualpipe_pp8_mb20.yaml")
    t0 = time.perf_counter()
    plan = plan_mip(sc.workload, sc.cluster, sc.comm, time_limit_s=args.ablation_time, threads=args.threads,
                    memory_cap=9 * GIB)
    row, _ = simulate_row(plan, sc.workload, sc, time.perf_counter() - t0)
    return {"time_limit_s": args.ablation_time, "bubble_us": row["bubble_us"], "makespan_us": row["makespan_us"],
            "lower_bound_us": plan.lower_bound_us, "status": plan.status, "warm_start": plan.meta.get("warm_start"),
            "peak_memory_gib": max(peak_memory(plan, sc.workload).values()) / GIB, "solve_s": row["solve_s"]}


def one_direction(args) -> dict:
    raw = load_scenario(ROOT / "scenarios" / "dualpipe_pp8_mb20.yaml").raw
    raw = {**raw, "name": "pipeline_pp8_mb20", "workload": {**raw["workload"], "directions": 1}}
    sc = scenario_from_dict(raw)
    out = {}
    for ref in ("zb-h1", "1f1b"):
        res = compare(sc, cap_from=ref, time_limit_s=args.time_limit, threads=args.threads,
                      heuristic=ref == "zb-h1")
        s = res["schedules"]
        mip = s.get("mip")
        out[ref] = {"table": table(res), "mip": mip_entry(res),
                    "target": None if mip is None else {
                        f"{ref}_bubble_us": s[ref]["bubble_us"], "mip_bubble_us": mip["bubble_us"],
                        "cap_gib": res["mip_memory_cap_bytes"] / GIB, "mip_peak_gib": mip["peak_memory_bytes"] / GIB,
                        "met": mip["bubble_us"] <= s[ref]["bubble_us"] + 1e-6
                        and mip["peak_memory_bytes"] <= s[ref]["peak_memory_bytes"]}}
    out["op_level"] = op_level(sc)
    return out


def h800_overlap(args) -> dict:
    sc = load_scenario(ROOT / "scenarios" / "dualpipe_pp8_mb20_h800_overlap.yaml")
    res = compare(sc, cap_from="dualpipe", time_limit_s=args.other_time, threads=args.threads)
    return {"table": table(res), "op_level": op_level(sc), "mip": mip_entry(res), "skipped": res["skipped"]}


def moe_graph(args) -> dict:
    graph = generate_graph("moe", 56, seed=0, edge_bytes=32 << 20, memory_bytes=1 << 30)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moe.json"
        path.write_text(json.dumps(graph))
        raw = {"name": "moe", "workload": {"kind": "graph", "path": str(path)},
               "cluster": {"profile": "h100-sxm", "nodes": 1}}
        sc = scenario_from_dict(raw, Path(tmp) / "moe.yaml")
        res = compare(sc, time_limit_s=args.other_time, threads=args.threads)
    return {"ops": len(graph["ops"]), "table": table(res), "mip": mip_entry(res),
            "skipped": {k: v for k, v in res["skipped"].items() if k in ("heuristic", "mip")},
            "known_schedules": "none apply (not a pipeline)"}


SECTIONS = {"dualpipe_pp8_mb20": dualpipe_study, "pipeline_pp8_mb20": one_direction,
            "dualpipe_pp8_mb20_h800_overlap": h800_overlap, "moe_graph": moe_graph,
            "ablation_no_schedule_warm_start": ablation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=300.0, help="MIP time limit for the targets (s)")
    ap.add_argument("--ablation-time", type=float, default=120.0, help="MIP time limit without a schedule warm start (s)")
    ap.add_argument("--other-time", type=float, default=60.0, help="MIP time limit for the H800 and MoE tables (s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=sorted(SECTIONS), action="append", help="Run only these sections")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = {}
    for name in args.only or list(SECTIONS):
        try:
            out[name] = SECTIONS[name](args)
        except Exception as e:  # a failing planner is a finding to report, not a reason to lose the rest
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    dp, one = out.get("dualpipe_pp8_mb20", {}), out.get("pipeline_pp8_mb20", {})
    out["targets_met"] = {
        "dualpipe_half_bubble": (dp.get("target") or {}).get("met", False),
        "one_direction_vs_zb_h1": ((one.get("zb-h1") or {}).get("target") or {}).get("met", False),
        "one_direction_vs_1f1b": ((one.get("1f1b") or {}).get("target") or {}).get("met", False),
    }
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
