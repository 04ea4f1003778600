"""Simulator-in-the-loop refinement on every scenario in scenarios/: prints one JSON object.

Per scenario: iterations run, whether and why it stopped, simulated makespan of iteration 0 and
of the best plan (and the ratio), the final predicted-vs-simulated gap, whether the best plan is
valid and never worse than iteration 0, and the wall time.

Then, on the scenarios with contention, the same per update mode (``loop.update``: edge, class,
both) to show which converges better.

    python bench/bench_loop.py [--time-limit S] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.core.errors import InputError  # noqa: E402
from engine.planners.validate import validate_plan  # noqa: E402
from engine.scenario.loader import load_scenario  # noqa: E402
from engine.study.loop import refine  # noqa: E402

UPDATE_STUDY = ("quickstart", "contention_2node", "moe_branchy")


def run(path: Path, time_limit_s: float, update: str | None = None) -> dict:
    sc = load_scenario(path)
    limit = min(float(sc.solver.time_limit_s), time_limit_s)
    t0 = time.perf_counter()
    res = refine(sc, solver_options={"time_limit_s": limit}, update=update)
    wall = time.perf_counter() - t0
    first, best, last = res.iterations[0], res.iterations[res.best_k], res.iterations[-1]
    return {
        "planner": sc.solver.planner, "time_limit_s": limit, "n_ops": len(sc.workload),
        "iterations": len(res.iterations), "converged": res.converged, "reason": res.reason,
        "first_simulated_us": first.simulated_us, "best_simulated_us": best.simulated_us, "best_k": res.best_k,
        "best_over_first": best.simulated_us / first.simulated_us, "final_gap": last.gap,
        "best_valid": not validate_plan(res.best_plan, sc.workload, sc.cluster, sc.comm, sc.memory_cap_bytes),
        "never_worse": best.simulated_us <= first.simulated_us, "wall_s": round(wall, 2),
        "per_iteration": [{"k": it.k, "predicted_us": it.predicted_us, "simulated_us": it.simulated_us,
                           "gap": it.gap, "solve_s": round(it.solve_s, 2)} for it in res.iterations],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--time-limit", type=float, default=20.0, help="cap on each MIP solve, seconds")
    ap.add_argument("--only", nargs="*", help="scenario names (file stems) to run")
    args = ap.parse_args()
    out = {"bench": "loop", "time_limit_cap_s": args.time_limit, "scenarios": {}}
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        if args.only and path.stem not in args.only:
            continue
        try:
            out["scenarios"][path.stem] = run(path, args.time_limit)
        except InputError as e:
            out["scenarios"][path.stem] = {"error": str(e)}
        print(f"{path.stem}: done", file=sys.stderr)
    out["update_modes"] = {}
    for name in UPDATE_STUDY:
        if args.only and name not in args.only:
            continue
        rows = {}
        for mode in ("edge", "class", "both"):
            r = run(ROOT / "scenarios" / f"{name}.yaml", args.time_limit, update=mode)
            rows[mode] = {k: r[k] for k in ("iterations", "converged", "best_over_first", "final_gap", "wall_s")}
        out["update_modes"][name] = rows
        print(f"{name}: update modes done", file=sys.stderr)
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
