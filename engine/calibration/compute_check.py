"""Confirm the closed-form iteration time with the simulator on a sample of measured runs.

For each sampled run: the transformer workload on the fitted profile, Megatron's 1F1B plan of it
(:mod:`engine.planners.pipeline_time`), the simulator's makespan (flow model), and the
closed form the fit used. Times in us.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from engine.calibration.compute_fit import run_spec
from engine.calibration.vtrain import VtrainRun
from engine.core.comm import CommModel
from engine.planners.pipeline_time import iteration_time_1f1b, one_f_one_b_order, semi_active_plan, send_time_us
from engine.workloads.transformer import build_transformer, simulator_collective_us, stage_times, step_end_times
from engine.workloads.transformer_costs import ComputeModel
from hardware_profiles import Cluster, build_cluster
from simulator.simulate import simulate

MAX_MICROBATCHES = 8  # keep the sampled simulations small


def closed_form_us(run: VtrainRun, cluster: Cluster) -> float:
    """The closed-form 1F1B iteration time of ``run`` on ``cluster`` (its profile's compute model)."""
    spec = run_spec(run)
    model = ComputeModel.from_profile(cluster.profile, spec.dtype)
    st = stage_times(spec, cluster, model, simulator_collective_us)
    end = step_end_times(spec, cluster, model, simulator_collective_us)
    return iteration_time_1f1b(st, end, spec.microbatches, send_time_us(spec, cluster, CommModel(cluster),
                                                                         st[0].cost.send_bytes))


def simulated_us(run: VtrainRun, cluster: Cluster) -> tuple[float, int]:
    """(simulated makespan of the 1F1B plan, op count) of ``run`` on ``cluster``."""
    spec = run_spec(run)
    wl = build_transformer(spec, cluster, name=f"vtrain-line{run.line}")
    plan = semi_active_plan(wl, one_f_one_b_order(spec, wl), cluster, CommModel(cluster))
    return simulate(plan, wl, cluster, timeline=False).makespan_us, len(wl)


def check_with_simulator(runs: Sequence[VtrainRun], profile: Any, nodes: int, k: int, seed: int = 0) -> list[dict]:
    """Closed form against the simulator on ``k`` runs sampled (seeded) among the small ones,
    one per (tp, pp) shape while shapes last."""
    shapes: dict[tuple[int, int], list[VtrainRun]] = {}
    for r in runs:
        if r.microbatches <= MAX_MICROBATCHES:
            shapes.setdefault((r.tp, r.pp), []).append(r)
    if not shapes or k <= 0:
        return []
    rng = np.random.default_rng(seed)
    keys = sorted(shapes)
    order = [keys[int(i)] for i in rng.permutation(len(keys))]  # one run per (tp, pp) shape first
    pick = [shapes[key][int(rng.integers(len(shapes[key])))] for key in order[:k]]
    cluster = build_cluster(profile, nodes)
    out = []
    for r in pick:
        closed = closed_form_us(r, cluster)
        sim, ops = simulated_us(r, cluster)
        out.append({"line": r.line, "shape": f"{r.tp}x{r.dp}x{r.pp}", "microbatches": r.microbatches, "ops": ops,
                    "closed_us": closed, "simulated_us": sim, "diff_pct": (closed - sim) / sim * 100.0})
    return out
