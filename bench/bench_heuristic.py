"""How fast the list-scheduling planner plans: ops per second on random layered graphs.

Graphs: ``engine.workloads.graphgen`` "layered" (about sqrt(n) layers, 1-3 inputs per op, 100-1000 us per
op, 1 MiB per edge, every op free to run on any GPU) of 1k, 10k and 100k ops, planned on one
8-GPU h100-sxm node. The time is ``plan_heuristic`` alone (best of a few runs for the small
sizes); building the graph and validating the plans are not timed in ``wall_s``.

Every plan made (each run of each size, the 100k-op one included) goes through
``engine.planners.validate.validate_plan``. Per size: ``valid`` (every run's plan has no
violation), ``violations`` (their count, summed over the runs) and ``validate_s`` (the longest
validation of one plan); top level: ``all_valid``. Prints one JSON object, the first violations
of an invalid plan on stderr, and exits 1 if any plan is invalid.

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
EDGE_BYTES = 1 << 20
SEED = 0


def bench_size(n_ops: int, runs: int, cluster, comm) -> dict:
    workload = graph_from_dict(generate("layered", n_ops, seed=SEED, edge_bytes=EDGE_BYTES))
    best, plan = float("inf"), None
    violations, validate_s = 0, 0.0
    for run in range(runs):
        t0 = time.perf_counter()
        plan = plan_heuristic(workload, cluster, comm)
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        found = validate_plan(plan, workload, cluster, comm)
        validate_s = max(validate_s, time.perf_counter() - t0)
        violations += len(found)
        for line in found[:5]:
            print(f"bench_heuristic: {n_ops} ops, run {run}: {line}", file=sys.stderr)
    row = {
        "ops": len(workload),
        "edges": workload.graph.number_of_edges(),
        "runs": runs,
        "wall_s": round(best, 4),
        "ops_per_s": round(len(workload) / best),
        "makespan_us": plan.makespan_us,
        "lower_bound_us": lower_bounds(workload, cluster)["lower_bound_us"],
        "valid": violations == 0,
        "violations": violations,
        "validate_s": round(validate_s, 4),
    }
    return row


def main() -> int:
    cluster = build_cluster(load_profile("h100-sxm"), 1)
    comm = CommModel(cluster)
    rows = [bench_size(n, runs, cluster, comm) for n, runs in SIZES]
    all_valid = all(row["valid"] for row in rows)
    print(json.dumps({
        "all_valid": all_valid,
        "bench": "heuristic",
        "graph": f"layered, seed {SEED}, {EDGE_BYTES} bytes per edge, any GPU",
        "cluster": f"h100-sxm x1 ({cluster.n_gpus} GPUs)",
        "python": platform.python_version(),
        "sizes": rows,
    }, indent=1, sort_keys=True))
    return 0 if all_valid else 1


if __name__ == "__main__":
    sys.exit(main())
