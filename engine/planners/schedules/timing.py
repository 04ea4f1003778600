"""Turn a :class:`~engine.planners.schedules.actions.Schedule` into a :class:`~engine.core.ir.Plan`.

:func:`time_steps` places per-GPU *steps* (lists of op ids) semi-actively: a step starts as soon
as the GPU's previous step has ended and every input of the step's ops has arrived (source end +
``comm.delay`` of the edge, from the scenario's :class:`~engine.core.comm.CommModel`); its ops run
back to back on the GPU's compute stream, each for exactly its duration on the GPU's model (the
validator's rule).

:func:`schedule_plan` is the *op-level* plan of a schedule's order: every op is its own step, so
a full backward ``BW`` is ``B`` then ``W`` with the input gradient leaving before ``W`` runs, and
an overlapped pair (:class:`~engine.planners.schedules.actions.Overlap`) is its forward followed by its
backward's ops. A real runtime runs each step as one call and sends when it returns;
:mod:`engine.planners.schedules.fusion` gives that *step-level* view, where a pair is one op of the F&B
time that starts when the inputs of both halves have arrived. Times in us.
"""

from __future__ import annotations

from engine.core.ir import Placement, Plan, Workload
from engine.core.timing import OrderCycle, earliest_times
from engine.planners.schedules.actions import PipelineShape, Schedule
from engine.planners.validate import make_transfers


class ScheduleError(RuntimeError):
    """A schedule that does not fit its workload: an op missing, doubled, on the wrong GPU, or an
    order that waits on itself (deadlock). A bug in a generator, not bad user input."""


RankSteps = dict[int, list[tuple[str, list[str]]]]


def step_ops(schedule: Schedule, workload: Workload, has_w: bool) -> RankSteps:
    """Per GPU, per step that runs ops, (step label, workload op ids); checks every op is run
    exactly once, on an eligible GPU."""
    graph = workload.graph
    seen: dict[str, int] = {}
    out: RankSteps = {}
    for gpu, _, step in schedule.steps():
        ids = step.op_ids(has_w)
        for o in ids:
            if o not in graph:
                raise ScheduleError(f"{schedule.name}: step {step} on GPU {gpu} names op {o}, not in the workload")
            if o in seen:
                raise ScheduleError(f"{schedule.name}: op {o} scheduled twice (GPU {seen[o]} and GPU {gpu})")
            devs = graph.nodes[o]["op"].devices
            if devs is not None and gpu not in devs:
                raise ScheduleError(f"{schedule.name}: op {o} scheduled on GPU {gpu}, eligible on {list(devs)}")
            seen[o] = gpu
        if ids:
            out.setdefault(gpu, []).append((str(step), ids))
    missing = sorted(set(graph.nodes) - set(seen))
    if missing:
        raise ScheduleError(f"{schedule.name}: {len(missing)} ops never scheduled, e.g. {missing[:4]}")
    return out


def time_steps(name: str, ranks: RankSteps, workload: Workload, comm, gpu_model: str | None = None) -> dict[str, Placement]:
    """Semi-active placements (device, start, end in us) of every op of ``ranks``' steps.

    Arcs for :func:`engine.core.timing.earliest_times`: the ops of a GPU back to back in step
    order, and every input of a step's ops (from outside the step) into the step's first op, so
    the whole step waits for all of them."""
    graph = workload.graph
    ids = [o for gpu in sorted(ranks) for _, step in ranks[gpu] for o in step]
    index = {o: k for k, o in enumerate(ids)}
    device = {o: gpu for gpu in ranks for _, step in ranks[gpu] for o in step}
    dur = [graph.nodes[o]["op"].duration_on(gpu_model) for o in ids]
    arcs: list[tuple[int, int, float]] = []
    for gpu in sorted(ranks):
        seq = [o for _, step in ranks[gpu] for o in step]
        arcs += [(index[a], index[b], dur[index[a]]) for a, b in zip(seq, seq[1:])]
        for _, step in ranks[gpu]:
            inside = set(step)
            for o in step:
                for u in graph.predecessors(o):
                    if u not in inside:
                        lag = dur[index[u]] + comm.delay(u, o, device[u], gpu, graph.edges[u, o]["bytes"])
                        arcs.append((index[u], index[step[0]], lag))
    try:
        times = earliest_times(len(ids), arcs)
    except OrderCycle as cycle:
        blocked = {ids[k] for k in cycle.stuck}
        stuck = {gpu: next(label for label, step in ranks[gpu] if blocked & set(step))
                 for gpu in sorted(ranks) if any(blocked & set(step) for _, step in ranks[gpu])}
        raise ScheduleError(f"{name}: the order deadlocks; GPUs wait at {stuck}") from None
    return {o: Placement(device[o], times[k], times[k] + dur[k]) for k, o in enumerate(ids)}


def plan_from_steps(name: str, ranks: RankSteps, workload: Workload, comm, gpu_model: str | None = None,
                    meta: dict | None = None) -> Plan:
    """The semi-active :class:`Plan` (planner ``schedule:<name>``) of per-GPU steps of op ids."""
    placements = time_steps(name, ranks, workload, comm, gpu_model)
    order = {gpu: [o for _, ids in ranks[gpu] for o in ids] for gpu in sorted(ranks)}
    return Plan(workload=workload.name, placements=dict(sorted(placements.items())), planner=f"schedule:{name}",
                status="schedule", order=order, transfers=make_transfers(placements, workload, comm.delay),
                meta={"schedule": name, **(meta or {})})


def schedule_plan(schedule: Schedule, workload: Workload, comm, gpu_model: str | None = None) -> Plan:
    """The op-level semi-active :class:`Plan` of ``schedule`` on ``workload``: the schedule's op
    order, each op started as soon as its GPU and its inputs allow (what the simulator does with
    any plan; :func:`engine.planners.validate.compact` leaves it unchanged).

    ``plan.meta`` records the schedule's name, its generator figures, the view (``"op"``) and the
    overlapped pairs as op ids, so an export can write each pair as one action.
    """
    shape = PipelineShape.of(workload, schedule.name)
    ranks = {gpu: [(label, [o]) for label, ids in steps for o in ids]
             for gpu, steps in step_ops(schedule, workload, shape.has_w).items()}
    pairs = [{"forward": s.forward.op_ids(shape.has_w), "backward": s.backward.op_ids(shape.has_w)}
             for s in schedule.overlaps()]
    return plan_from_steps(schedule.name, ranks, workload, comm, gpu_model,
                           {**schedule.meta, "view": "op", "overlap_pairs": pairs})
