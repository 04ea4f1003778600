"""Run a plan on a simulated cluster: ``simulate(plan, workload, cluster, ...) -> SimResult``.

Ops run in the plan's per-GPU order on their stream (compute or comm); an op starts when its
predecessor on every stream it occupies has ended and every input has arrived. Compute ops take
their duration on the GPU model (times a seeded jitter factor), slowed while communication runs
on the GPU (:mod:`simulator.gpu`); plain comm ops take their duration on the comm stream; a
collective occupies the comm stream of every GPU of its group and moves its flows
(:mod:`simulator.collectives`). An edge whose source and destination GPUs differ and that carries
bytes becomes a flow on ``cluster.route``: the route's hop latencies plus the profile's message
overhead, then its bytes at the max-min fair share of every link it crosses
(:mod:`simulator.network`). Without contention it arrives exactly ``cluster.transfer_time``
after its source ends, so a semi-active plan made with that model simulates to its own makespan.

``mode="alpha_beta"`` skips flow sharing: every transfer takes ``cluster.transfer_time`` and
every collective its closed-form time. Equal ops of symmetric replicas run once
(:mod:`simulator.symmetry`; ``symmetry=False`` simulates every op). The event loop itself is
:mod:`simulator.event_loop`; memory and OOM are worked out from the op times (:mod:`simulator.gpu`).
"""

from __future__ import annotations

import gc
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from engine.core.errors import InputError
from engine.core.ir import Collective, Edge, Op, Placement, Plan, Workload
from engine.core.memory import memory_caps
from simulator.collectives import CollectivePlanner, choose_algo, normalize_op
from simulator.event_loop import Engine
from simulator.gpu import SimulationOOM, memory_profile
from simulator.result import SimResult, build_result
from simulator.streams import check_deadlock, check_plan, stream_sequences
from simulator.symmetry import build_model

if TYPE_CHECKING:
    from hardware_profiles import Cluster


MODES = ("flow", "alpha_beta")


def jitter_factors(names: list[str], seed: int, jitter: float) -> dict[str, float]:
    """One lognormal factor per op (mean 1, log-sd ``jitter``), drawn in sorted op-id order."""
    if jitter <= 0:
        return {o: 1.0 for o in names}
    rng = np.random.default_rng(seed)
    draws = rng.lognormal(mean=-0.5 * jitter * jitter, sigma=jitter, size=len(names))
    return {o: float(x) for o, x in zip(sorted(names), draws)}


def simulate(plan: Plan, workload: Workload, cluster: Cluster, *, seed: int = 0, jitter: float = 0.0, mode: str = "flow",
             allow_oom: bool = False, symmetry: bool = True, comm_compute_slowdown: float | None = None,
             timeline: bool = True) -> SimResult:
    """Simulate ``plan`` of ``workload`` on ``cluster``; see the module docstring.

    ``jitter``: log-sd of a lognormal factor on every compute and comm op's duration (seeded
    by ``seed``; jitter turns symmetry reduction off). ``comm_compute_slowdown``: overrides the
    profile's ``gpu.comm_compute_slowdown``. ``timeline``: keep link and memory time series
    (needed for a Chrome trace). Raises :class:`InputError` for bad input and
    :class:`SimulationOOM` when a GPU runs out of memory unless ``allow_oom``.
    """
    gc_was_on = gc.isenabled()
    gc.disable()  # the run builds many small objects and frees none: collection passes only cost time
    try:
        return _simulate(plan, workload, cluster, seed, jitter, mode, allow_oom, symmetry, comm_compute_slowdown,
                         timeline)
    finally:
        if gc_was_on:
            gc.enable()


def _simulate(plan, workload, cluster, seed, jitter, mode, allow_oom, symmetry, comm_compute_slowdown, timeline):
    wall0 = time.perf_counter()
    if mode not in MODES:
        raise InputError(None, "simulator.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if not (isinstance(jitter, (int, float)) and math.isfinite(jitter) and jitter >= 0):
        raise InputError(None, "simulator.jitter", f"must be a number >= 0, got {jitter!r}")
    slowdown = cluster.profile.gpu.comm_compute_slowdown if comm_compute_slowdown is None else comm_compute_slowdown
    if not 0.0 <= slowdown < 1.0:
        raise InputError(None, "simulator.comm_compute_slowdown", f"must be in [0, 1), got {slowdown!r}")
    ops = workload.ops
    check_plan(plan, workload, cluster, ops)
    seqs = stream_sequences(plan, workload, ops)
    check_deadlock(workload, seqs)

    factors = jitter_factors(list(ops), seed, jitter)
    durations = {o: op.duration_on(cluster.gpu_model) * factors[o] for o, op in ops.items()}
    planner = CollectivePlanner(cluster)

    def coll_plan(op):
        c = op.collective
        return planner.plan(c.op, c.bytes, c.group, c.algo)

    for o in sorted(ops):
        if ops[o].collective is not None:
            try:
                coll_plan(ops[o])
            except InputError as err:
                raise InputError(None, f"ops[{o}].collective.{err.field}", err.reason) from None
    caps = dict(enumerate(memory_caps(workload, cluster)))
    use_symmetry = symmetry and jitter == 0
    model = build_model(workload, plan, seqs, durations, cluster, lambda op: coll_plan(op).time_us(planner.bandwidth),
                        caps, use_symmetry, ops)
    engine = Engine(model, ops, cluster, planner, coll_plan, mode, slowdown, timeline)
    if model.reduced and not engine.collectives_align():
        model = build_model(workload, plan, seqs, durations, cluster, None, caps, False, ops)
        engine = Engine(model, ops, cluster, planner, coll_plan, mode, slowdown, timeline)
    engine.prepare()
    loop0, cpu0 = time.perf_counter(), time.process_time()
    engine.run()
    loop_s, loop_cpu_s = time.perf_counter() - loop0, time.process_time() - cpu0

    op_times: dict[str, tuple[int, float, float]] = {}
    for c, members in enumerate(model.members):
        s, e = engine.start[c], engine.end[c]
        for o in members:
            op_times[o] = (plan.placements[o].device, s, e)
    arrivals: dict[tuple[str, str], float] = {}
    for k, dep in enumerate(model.deps):
        if dep.flow:
            for u, v, _du, _dv in dep.edges:
                arrivals[(u, v)] = engine.arrival[k]
    placed: dict[int, list[tuple[str, int, float, float]]] = {}
    for o, op in ops.items():
        if op.memory_bytes > 0:
            d, s, e = op_times[o]
            free = max([e] + [op_times[r][2] for r in op.release])
            placed.setdefault(d, []).append((o, op.memory_bytes, s, free))
    devices = sorted({d for d, _s, _e in op_times.values()} | {g for op in ops.values() if op.collective
                                                                for g in op.collective.group}
                     | set(workload.static_memory_bytes))
    peak, oom, mem_series = memory_profile(devices, placed, workload.static_memory_bytes, caps, timeline)
    if oom and not allow_oom:
        raise SimulationOOM(oom[0], len(oom))
    sym = {"enabled": use_symmetry, "classes": len(model.members), "ops": len(ops),
           "gpus_simulated": len(model.device_members), "refinement_rounds": model.rounds}
    return build_result(plan, workload, cluster, ops=ops, mode=mode, seed=seed, jitter=jitter, op_times=op_times,
                        arrivals=arrivals, peak=peak, caps=caps, oom=oom, mem_series=mem_series, network=engine.net,
                        events=engine.env.n_events, symmetry=sym, wall_s=time.perf_counter() - wall0,
                        loop_s=loop_s, loop_cpu_s=loop_cpu_s)


def simulate_collective(cluster: Cluster, op: str, nbytes: int, ranks, algo: str = "auto", mode: str = "flow") -> float:
    """Time in us of one collective alone, run through the simulator (flow or alpha_beta mode)."""
    ranks = tuple(int(g) for g in ranks)
    name = normalize_op(op)
    choose_algo(cluster, name, ranks, algo)
    coll = Op("collective", 0.0, kind="comm", collective=Collective(name, ranks, int(nbytes), algo))
    wl = Workload(name=f"{name}-{nbytes}", ops=[coll])
    plan = Plan(wl.name, {"collective": Placement(ranks[0], 0.0, 0.0)}, "collective", status="schedule")
    return simulate(plan, wl, cluster, mode=mode, symmetry=False, timeline=False).makespan_us


def simulate_transfers(cluster: Cluster, pairs, nbytes: int) -> SimResult:
    """Simulate one ``nbytes`` transfer per (source GPU, destination GPU) pair, all starting at
    time 0 (zero-length ops at each end): what concurrent point-to-point traffic gets."""
    ops, edges, placements = [], [], {}
    for i, (a, b) in enumerate(pairs):
        ops += [Op(f"s{i}", 0.0, devices=(a,)), Op(f"d{i}", 0.0, devices=(b,))]
        edges.append(Edge(f"s{i}", f"d{i}", int(nbytes)))
        placements[f"s{i}"], placements[f"d{i}"] = Placement(a, 0.0, 0.0), Placement(b, 0.0, 0.0)
    wl = Workload("transfers", ops, edges)
    return simulate(Plan(wl.name, placements, "transfers"), wl, cluster, symmetry=False)
