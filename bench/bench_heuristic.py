"""How fast the list-scheduling planner plans: ops per second on random layered graphs.

Graphs: ``engine.workloads.graphgen`` "layered" (about sqrt(n) layers, 1-3 inputs per op, 100-1000 us per
op, 1 MiB per edge, every op free to run on any GPU) of 1k, 10k and 100k ops, planned on one
8-GPU h100-sxm node. The time is ``plan_heuristic`` alone (best of a few runs for the small
sizes); building the graph and validating the plan are not timed. Prints one JSON object.

    python bench/bench_heuristic.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.comm import CommModel  # noqa: E402
from engine.planners.heuristic import plan_heuristic  # noqa: E402
from engine.planners.validate import lower_bounds, validate_plan  # noqa: E402
from engine.workloads.graphgen import generate  # noqa: E402
from engine.workloads.pipeline import graph_from_dict  # noqa: E402
from hardware_profiles import build_cluster, load_profile  # noqa: E402

SIZES = ((1_000, 5), (10_000, 3), (100_000, 1))  # (ops, timed runs)
VALIDATE_UP_TO = 10_000  # ops; validating 100k ops would double the bench time
EDGE_BYTES = 1 << 20
SEED = 0


def bench_size(n_ops: int, runs: int, cluster, comm) -> dict:
    workload = graph_from_dict(generate("layered", n_ops, seed=SEED, edge_bytes=EDGE_BYTES))
    best, plan = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        plan = plan_heuristic(workload, cluster, comm)
        best = min(best, time.perf_counter() - t0)
    row = {
        "ops": len(workload),
        "edges": workload.graph.number_of_edges(),
        "runs": runs,
        "wall_s": round(best, 4),
        "ops_per_s": round(len(workload) / best),
        "makespan_us": plan.makespan_us,
        "lower_bound_us": lower_bounds(workload, cluster)["lower_bound_us"],
    }
    if n_ops <= VALIDATE_UP_TO:
        row["violations"] = len(validate_plan(plan, workload, cluster, comm))
    return row


def main() -> None:
    cluster = build_cluster(load_profile("h100-sxm"), 1)
    comm = CommModel(cluster)
    rows = [bench_size(n, runs, cluster, comm) for n, runs in SIZES]
    print(json.dumps({
        "bench": "heuristic",
        "graph": f"layered, seed {SEED}, {EDGE_BYTES} bytes per edge, any GPU",
        "cluster": f"h100-sxm x1 ({cluster.n_gpus} GPUs)",
        "python": platform.python_version(),
        "sizes": rows,
    }, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
