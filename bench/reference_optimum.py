"""An independent exact solve of small graph instances, to measure MIP plans against the optimum.

The MIP's own lower bound on flexible-placement graphs is the load bound (total work over the
GPUs): its big-M relaxation does not move it, so its gap overstates how far a plan is from the
optimum. This module states the same scheduling problem for OR-Tools' CP-SAT, which proves
optima of instances of this size in seconds, and reports the proven optimum (or its bound):

* one interval per op and eligible GPU, exactly one of them present (``x[i,d]``);
* no overlap per (GPU, stream): compute ops on the compute stream, comm ops on the comm stream;
* ``start[j] >= end[i]`` per edge (zero-byte edges only: the reference has no comm delays);
* minimise the makespan.

It refuses what it does not model (collectives, edges with bytes, memory) rather than
answer a different question. Times are integer microseconds (durations must be whole numbers of
``1/scale`` us). Needs ``pip install '.[reference]'`` (ortools); bench/bench_mip.py reports
``optimum_us`` when it is installed.

Usage: ``python bench/reference_optimum.py --nodes 50 --gpus 4 --eligible 2 [--time-limit 120]``
(a ``gen-graph`` layered instance, as in bench_mip.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.ir import Workload  # noqa: E402


def available() -> bool:
    """True when OR-Tools is importable."""
    try:
        import ortools.sat.python.cp_model  # noqa: F401
    except ImportError:
        return False
    return True


def _ticks(value_us: float, scale: int, what: str) -> int:
    t = round(value_us * scale)
    if abs(t - value_us * scale) > 1e-6:
        raise ValueError(f"{what}: {value_us} us is not a whole number of 1/{scale} us")
    return int(t)


def solve_reference(workload: Workload, cluster, time_limit_s: float = 120.0, workers: int = 2,
                    scale: int = 1) -> dict:
    """Prove the optimal makespan (us) of ``workload`` on ``cluster`` with CP-SAT.

    Returns ``{"status": "optimal"|"feasible"|"unknown", "makespan_us", "bound_us", "wall_s"}``
    (``makespan_us`` None when no schedule was found). A proven optimum is the same on every run;
    how fast it is proven depends on the machine.
    """
    from ortools.sat.python import cp_model

    if workload.memory_cap_bytes is not None or any(workload.static_memory_bytes.values()):
        raise ValueError("memory is not modelled by the reference")
    graph, n = workload.graph, cluster.n_gpus
    model = cp_model.CpModel()
    dur = {o: _ticks(graph.nodes[o]["op"].duration_on(cluster.gpu_model), scale, o) for o in graph.nodes}
    horizon = sum(dur.values())
    start, end = {}, {}
    per_stream: dict[tuple[int, str], list] = {}
    for o in workload.topological_order():
        op = graph.nodes[o]["op"]
        if op.collective is not None or op.memory_bytes:
            raise ValueError(f"{o}: collectives and memory are not modelled by the reference")
        start[o] = model.NewIntVar(0, horizon, f"s_{o}")
        end[o] = model.NewIntVar(0, horizon, f"e_{o}")
        chosen = []
        for d in workload.eligible(o, n):
            lit = model.NewBoolVar(f"x_{o}_{d}")
            per_stream.setdefault((d, op.kind), []).append(
                model.NewOptionalIntervalVar(start[o], dur[o], end[o], lit, f"i_{o}_{d}"))
            chosen.append(lit)
        model.AddExactlyOne(chosen)
    for u, v, nbytes in graph.edges(data="bytes"):
        if nbytes:
            raise ValueError(f"{u} -> {v}: edges with bytes are not modelled by the reference")
        model.Add(start[v] >= end[u])
    for intervals in per_stream.values():
        model.AddNoOverlap(intervals)
    cmax = model.NewIntVar(0, horizon, "cmax")
    model.AddMaxEquality(cmax, list(end.values()))
    model.Minimize(cmax)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(workers)
    status = solver.Solve(model)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    return {"status": {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible"}.get(status, "unknown"),
            "makespan_us": solver.ObjectiveValue() / scale if found else None,
            "bound_us": solver.BestObjectiveBound() / scale, "wall_s": round(solver.WallTime(), 3)}


def main(argv=None) -> None:
    from engine.workloads.graphgen import generate
    from engine.workloads.pipeline import graph_from_dict
    from hardware_profiles import build_cluster, load_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=50, help="ops in the gen-graph instance")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--eligible", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args(argv)
    wl = graph_from_dict(generate("layered", args.nodes, seed=args.seed, gpus=args.gpus, eligible=args.eligible))
    cluster = build_cluster(load_profile("h100-sxm"), max(1, -(-args.gpus // 8)))
    print(json.dumps(solve_reference(wl, cluster, args.time_limit), sort_keys=True))


if __name__ == "__main__":
    main()
