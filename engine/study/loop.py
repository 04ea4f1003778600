"""Simulator-in-the-loop refinement: plan, simulate, feed observed delays back, plan again.

Iteration ``k = 0`` plans with the profile's contention-free communication model and simulates
the plan. Each later iteration takes, from the previous simulation, the observed delay of every
cross-GPU edge (arrival at the consumer's GPU minus the producer's end, us) and updates the
model's communication parameters with damping ``a``:

* ``class``: per link class ``c`` (the bottleneck class of the route: nvlink, nic, spine),
  ``scale_c <- scale_c + a (sum observed_c / sum modelled_c - scale_c)`` over edges of class c;
* ``edge``: per edge ``e``, ``scale_e <- scale_e + a (observed_e / (modelled_e * scale_c) - scale_e)``
  (a contention factor that follows the edge when a re-solve moves it to other GPUs);
* ``both``: the class scale first, then the edge's residual factor.

``modelled`` is the contention-free ``Cluster.transfer_time`` of the edge's route. Damping
guards against two plans chasing each other; when the re-solve returned the same schedule (same
GPU per op, same order per GPU) there is nothing to chase and the observed values are taken
whole. The planner then solves again, warm-started from the best plan so far re-timed under the
new model, and the new plan is simulated. The loop stops when ``|predicted - simulated| / simulated <= tolerance``,
when the simulated makespan has not improved for ``patience`` iterations, or after
``max_iters`` iterations. It returns the best simulated plan, so it is never worse than the
first one; an iteration that agrees and ties the best is returned instead. ``converged`` says
whether the returned plan's predicted and simulated makespan agree within ``tolerance``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.core.cluster import ClusterView
from engine.core.comm import CommModel
from engine.core.ir import Plan
from engine.core.options import LoopOptions
from engine.planners.registry import named_schedule_planner, plan_scenario
from engine.planners.validate import compact
from engine.scenario.loader import Scenario
from engine.scenario.simulation import simulate_scenario
from simulator.result import SimResult

UPDATE_MODES = next(f.metadata["choices"] for f in dataclasses.fields(LoopOptions) if f.name == "update")


@dataclass
class Iteration:
    """One plan-then-simulate round (times in us, wall times in s)."""

    k: int
    predicted_us: float
    simulated_us: float
    bubble_us: float
    peak_memory_bytes: int
    solve_s: float
    sim_s: float
    status: str
    moved: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gap(self) -> float:
        """Relative gap between predicted and simulated makespan."""
        return abs(self.predicted_us - self.simulated_us) / self.simulated_us if self.simulated_us > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "predicted_us": self.predicted_us, "simulated_us": self.simulated_us,
                "gap": self.gap, "bubble_us": self.bubble_us, "peak_memory_bytes": self.peak_memory_bytes,
                "solve_s": self.solve_s, "sim_s": self.sim_s, "status": self.status, "moved": self.moved}


@dataclass
class LoopResult:
    iterations: list[Iteration]
    best_k: int
    best_plan: Plan
    best_sim: SimResult
    converged: bool
    reason: str
    comm: CommModel

    def to_dict(self, plan_path: str | None = None) -> dict[str, Any]:
        best = self.iterations[self.best_k]
        return {"iterations": [it.to_dict() for it in self.iterations],
                "best": {"k": self.best_k, "simulated_us": best.simulated_us, "predicted_us": best.predicted_us,
                         "bubble_us": best.bubble_us, "plan_path": plan_path},
                "converged": self.converged, "reason": self.reason, "comm_model": self.comm.to_dict()}


def refine(scenario: Scenario, *, planner: str | None = None, progress: Callable[[Iteration], None] | None = None,
           solver_options: dict[str, Any] | None = None, **loop_options: Any) -> LoopResult:
    """Run the loop on ``scenario`` (module docstring). ``loop_options`` override the scenario's
    ``loop`` section (tolerance, patience, max_iters, damping, update); ``solver_options`` its
    ``solver`` section; ``planner`` its planner. ``progress`` is called after every iteration."""
    opts = dataclasses.replace(scenario.loop, **{k: v for k, v in loop_options.items() if v is not None})
    if opts.update not in UPDATE_MODES:
        raise ValueError(f"loop.update must be one of {UPDATE_MODES}")
    wl, cluster = scenario.workload, scenario.cluster
    comm = CommModel(cluster)
    iterations: list[Iteration] = []
    best: tuple[int, Plan, SimResult] | None = None
    warm: Plan | None = None
    since_best = 0
    prev_plan: Plan | None = None
    reason, converged = "", False
    for k in range(max(1, int(opts.max_iters))):
        t0 = time.perf_counter()
        plan = _solve(scenario, comm, planner, warm, solver_options or {})
        solve_s = time.perf_counter() - t0
        sim = simulate_scenario(scenario, plan)
        assert plan.makespan_us is not None  # Plan.__post_init__ fills it in
        it = Iteration(k, float(plan.makespan_us), sim.makespan_us, sim.bubble_us, sim.peak_memory_bytes,
                       solve_s, sim.sim_wall_s, plan.status)
        iterations.append(it)
        if best is None or sim.makespan_us < best[2].makespan_us * (1 - 1e-9):
            best, since_best = (k, plan, sim), 0
        else:
            since_best += 1
        if it.gap <= opts.tolerance:
            if best[0] != k and sim.makespan_us <= best[2].makespan_us * (1 + 1e-9):
                best = (k, plan, sim)  # as fast as the best so far and its prediction holds: return this one
            # ``converged`` describes the plan returned (the best), not merely the last one
            converged = iterations[best[0]].gap <= opts.tolerance
            reason = f"predicted and simulated makespan within {opts.tolerance:.2%}"
            if not converged:
                reason = (f"iteration {k}: {reason}, but the best plan (iteration {best[0]}) is "
                          f"{iterations[best[0]].gap:.2%} off its prediction")
        elif since_best >= opts.patience:
            reason = f"no improvement for {opts.patience} iterations"
        elif k + 1 >= opts.max_iters:
            reason = f"reached max_iters ({opts.max_iters})"
        else:
            same = prev_plan is not None and _same_schedule(plan, prev_plan)
            it.moved = update_comm(comm, sim, cluster, 1.0 if same else opts.damping, opts.update)
            warm = compact(best[1], wl, comm)
        prev_plan = plan
        if progress is not None:
            progress(it)
        if reason:
            break
    assert best is not None
    return LoopResult(iterations, best[0], best[1], best[2], converged, reason, comm)


def _same_schedule(a: Plan, b: Plan) -> bool:
    """Same GPU per op and same order per GPU."""
    return a.order == b.order and all(p.device == b.placements[o].device for o, p in a.placements.items())


def _solve(scenario: Scenario, comm: CommModel, planner: str | None, warm: Plan | None, solver_options: dict[str, Any]) -> Plan:
    sc = dataclasses.replace(scenario, comm=comm)
    # a transformer runs its named schedule unless a planner is asked for
    return plan_scenario(sc, planner or named_schedule_planner(scenario), warm_plan=warm, **solver_options)


def update_comm(comm: CommModel, sim: SimResult, cluster: ClusterView, damping: float, mode: str, top: int = 5) -> list[dict[str, Any]]:
    """Move ``comm``'s scales toward what ``sim`` observed (module docstring); return the ``top``
    edges whose modelled delay moved most, as ``{"edge", "from_us", "to_us"}``."""
    rows = []
    for (src, dst), e in sorted(sim.edges.items()):
        if e["modelled_us"] <= 0:
            continue
        cls = cluster.route_class(e["src_device"], e["dst_device"])
        rows.append((src, dst, cls, e))
    before = {(s, d): comm.delay(s, d, e["src_device"], e["dst_device"], e["bytes"]) for s, d, _, e in rows}
    if mode in ("class", "both"):
        totals: dict[str, list[float]] = {}
        for _, _, cls, e in rows:
            t = totals.setdefault(cls, [0.0, 0.0])
            t[0] += e["observed_us"]
            t[1] += e["modelled_us"]
        for cls, (obs, mod) in sorted(totals.items()):
            old = comm.class_scale.get(cls, 1.0)
            comm.class_scale[cls] = old + damping * (obs / mod - old)
    if mode in ("edge", "both"):
        for src, dst, cls, e in rows:
            base = e["modelled_us"] * (comm.class_scale.get(cls, 1.0) if mode == "both" else 1.0)
            old = comm.edge_scale.get((src, dst), 1.0)
            comm.edge_scale[(src, dst)] = old + damping * (e["observed_us"] / base - old)
    moved: list[dict[str, Any]] = []
    for s, d, _, e in rows:
        after = comm.delay(s, d, e["src_device"], e["dst_device"], e["bytes"])
        moved.append({"edge": f"{s}->{d}", "from_us": before[(s, d)], "to_us": after})
    moved.sort(key=lambda m: (-abs(m["to_us"] - m["from_us"]), m["edge"]))
    return moved[:top]
