"""The schedule library on a ``transformer`` workload: the named schedule's per-GPU order, semi-active.

A transformer workload (:mod:`engine.workloads.transformer`) has, per micro-batch and virtual
stage, ``F`` / ``B`` / ``W`` ops on every GPU of the stage's pipeline rank (TP ranks ``.t{r}``,
DP replicas ``.d{d}``), each phase's TP all-reduce ``.ar`` and epilogue ``.end`` when tp > 1, and
the step-end ops (DP reduction, tied-embedding all-reduce, optimizer step, parameter all-gather).

:func:`transformer_shape` describes the workload to the library as a
:class:`~engine.planners.schedules.actions.PipelineShape` (its ``pp x vpp`` stages on the GPUs of
replica 0, TP rank 0; per-phase times the largest over stages, in us), so every generator of
:data:`engine.planners.schedules.library.SCHEDULES` runs unchanged and returns the per-rank action
lists the ``pipeline`` workload uses. :func:`transformer_order` maps those actions onto the
transformer's ops, the same list on every (TP rank, DP replica) of a pipeline rank:

* ``F``: the forward, its all-reduce and its epilogue;
* ``B``: the input gradient, its all-reduce and epilogue (the zero-bubble family defers ``W``);
* ``BW`` (a full backward): ``B``, ``W``, then B's all-reduce and epilogue (Megatron overlaps
  the all-reduce with the weight-gradient GEMMs);
* ``W``: the weight gradient;
* an overlapped pair (DualPipeV's ``F&B``): the forward's ops, then the backward's;

then the step-end ops. A collective is listed on its group's first GPU. :func:`semi_active_plan`
times an order with :func:`engine.core.timing.earliest_times`.

Layouts (:data:`engine.planners.schedules.library.LAYOUTS`): one stage per rank (``vpp: 1``) for
gpipe, 1f1b, zb-h1, zb-h2; round-robin ``vpp >= 2`` for interleaved; a V (``vpp: 2``, placed by
:meth:`TransformerSpec.stage_rank`) for zb-v and dualpipev. DualPipe's two directions are two
model replicas per GPU, which the transformer workload does not build: refused.

A schedule other than the one ``parallelism.schedule`` names runs on the workload built for it
(:func:`scenario_for_schedule`: the same model with that schedule and the ``vpp`` its layout
needs), since the stage placement (V or loop) and the gradient edges (after B or after W) follow
the schedule: ``plan --planner schedule:NAME``, ``compare`` and ``export`` all build it that way.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from engine.core.cluster import ClusterView, DelayModel
from engine.core.errors import InputError
from engine.core.ir import Placement, Plan, Workload
from engine.core.timing import OrderCycle, earliest_times
from engine.planners.schedules.actions import Action, Overlap, PipelineShape, Schedule, Step
from engine.planners.schedules.library import LAYOUTS, SCHEDULES, check_fits, check_name
from engine.workloads.transformer import TransformerSpec, build_transformer, check_spec, gpu_of, spec_from_dict

STEP_END_PHASES = ("DP", "EMB", "OPT", "AG")
# the library's field names for a pipeline workload -> the transformer field that decides them
_FIELDS = {"placement.stage_devices": "workload.parallelism.vpp", "workload.stages": "workload.parallelism.pp",
           "workload.microbatches": "workload.global_batch", "workload.directions": "workload.parallelism.schedule"}


def check_layout(spec: TransformerSpec, name: str) -> None:
    """Refuse (one :class:`InputError` naming the field) a ``vpp`` the schedule's layout cannot
    hold; the library's generators check the rest (micro-batch rules)."""
    check_name(name, field="workload.parallelism.schedule")
    layout, _, directions = LAYOUTS[name]
    vpp = spec.parallelism.vpp
    field = "workload.parallelism.vpp"
    if directions != 1:
        raise InputError(None, "workload.parallelism.schedule",
                         f"schedule {name} runs two model replicas in opposite directions (twice the parameters per GPU), "
                         "which the transformer workload does not build; dualpipev is its one-direction form (vpp: 2)")
    if layout == "linear" and vpp != 1:
        raise InputError(None, field, f"schedule {name} runs one stage per pipeline rank (vpp: 1), got vpp {vpp}; "
                                      "interleaved runs virtual stages")
    if layout == "round_robin" and vpp < 2:
        raise InputError(None, field, f"schedule {name} interleaves virtual stages: needs vpp >= 2, got {vpp}")
    if layout == "v" and vpp != 2:
        raise InputError(None, field, f"schedule {name} folds two stages per rank into a V: needs vpp 2, got {vpp}")


def transformer_shape(spec: TransformerSpec, workload: Workload, gpu_model: str | None = None) -> PipelineShape:
    """The library's view of ``workload``: ``pp x vpp`` stages on the GPUs of replica 0, TP rank 0;
    ``times`` per phase (us) the largest over stages of micro-batch 0 (F and B with their
    all-reduce and epilogue); ``send_bytes`` of one activation send."""
    ops = workload.ops
    tag = _tag(spec, 0, 0)
    times = {"F": 0.0, "B": 0.0, "W": 0.0}
    for v in range(spec.stages):
        for ph in times:
            ids = [f"{ph}0.s{v}{tag}"]
            if ph != "W" and spec.parallelism.tp > 1:
                ids += [f"{ph}0.s{v}.ar" + _dp_tag(spec, 0), f"{ph}0.s{v}.end{tag}"]
            times[ph] = max(times[ph], sum(ops[o].duration_on(gpu_model) for o in ids))
    send = 0
    if spec.stages > 1:
        src = f"F0.s0{'.end' if spec.parallelism.tp > 1 else ''}{tag}"
        send = int(workload.graph.edges[src, f"F0.s1{tag}"]["bytes"])
    devices = tuple(gpu_of(spec, 0, spec.stage_rank(v), 0) for v in range(spec.stages))
    return PipelineShape(spec.stages, spec.microbatches, 1, devices, True, times, send)


def transformer_schedule(spec: TransformerSpec, workload: Workload, name: str, comm=None,
                         gpu_model: str | None = None) -> Schedule:
    """The library's ``name`` schedule for ``workload`` (ranks keyed by the GPU of replica 0, TP
    rank 0); refusals name the transformer field."""
    check_layout(spec, name)
    try:
        return SCHEDULES[name](transformer_shape(spec, workload, gpu_model), comm)
    except InputError as e:
        field = _FIELDS.get(e.field or "", e.field)
        hint = " (micro-batches = global_batch / (micro_batch x dp))" if field == "workload.global_batch" else ""
        raise InputError(None, field, e.reason.replace("GPUs", "pipeline ranks") + hint) from None


def _tag(spec: TransformerSpec, r: int, d: int) -> str:
    return (f".t{r}" if spec.parallelism.tp > 1 else "") + _dp_tag(spec, d)


def _dp_tag(spec: TransformerSpec, d: int) -> str:
    return f".d{d}" if spec.parallelism.dp > 1 else ""


def _action_ops(spec: TransformerSpec, act: Action, r: int, d: int) -> list[str]:
    """The op ids of one action on TP rank ``r`` of replica ``d`` (module docstring)."""
    sfx, tp = _tag(spec, r, d), spec.parallelism.tp
    base = f"{act.microbatch}.s{act.stage}"
    if act.phase == "W":
        return [f"W{base}{sfx}"]
    ph = "F" if act.phase == "F" else "B"
    out = [f"{ph}{base}{sfx}"] + ([f"W{base}{sfx}"] if act.phase == "BW" else [])
    if tp > 1:
        out += [f"{ph}{base}.ar{_dp_tag(spec, d)}", f"{ph}{base}.end{sfx}"]
    return out


def _step_ops(spec: TransformerSpec, step: Step, r: int, d: int) -> list[str]:
    if isinstance(step, Overlap):
        return _action_ops(spec, step.forward, r, d) + _action_ops(spec, step.backward, r, d)
    return _action_ops(spec, step, r, d)


def transformer_order(spec: TransformerSpec, workload: Workload, schedule: Schedule) -> dict[int, list[str]]:
    """Per GPU, its ops in ``schedule``'s order (module docstring); every op exactly once."""
    par = spec.parallelism
    ops = workload.ops
    rank_of = {gpu_of(spec, 0, p, 0): p for p in range(par.pp)}
    order: dict[int, list[str]] = {}
    listed: set[str] = set()

    def put(op_id: str) -> None:
        if op_id in listed:
            return
        op = ops[op_id]
        if op.collective is not None:
            dev = op.collective.group[0]
        else:
            assert op.devices is not None  # the transformer builder pins every op to its GPU
            dev = op.devices[0]
        order.setdefault(dev, []).append(op_id)
        listed.add(op_id)

    for d in range(par.dp):
        for lead in sorted(schedule.ranks):
            for r in range(par.tp):
                for step in schedule.ranks[lead]:
                    for o in _step_ops(spec, step, r, d):
                        if ops[o].devices is not None and ops[o].collective is None:
                            assert ops[o].devices == (gpu_of(spec, d, rank_of[lead], r),), (o, lead)
                        put(o)
    for phase in STEP_END_PHASES:
        for o in sorted(o for o in ops if o.startswith(phase + ".")):
            put(o)
    missing = sorted(set(ops) - listed)
    if missing:
        raise RuntimeError(f"{schedule.name}: ops outside the transformer order: {missing[:4]}")
    return order


def overlap_pairs(spec: TransformerSpec, schedule: Schedule) -> list[dict[str, list[str]]]:
    """The overlapped pairs of ``schedule`` as compute op ids of TP rank 0, replica 0 (what
    :func:`engine.planners.schedules.torch_csv.torch_actions` writes as one action)."""
    tag = _tag(spec, 0, 0)

    def compute(act: Action) -> list[str]:
        base = f"{act.microbatch}.s{act.stage}{tag}"
        return {"F": [f"F{base}"], "B": [f"B{base}"], "W": [f"W{base}"], "BW": [f"B{base}", f"W{base}"]}[act.phase]

    return [{"forward": compute(s.forward), "backward": compute(s.backward)} for s in schedule.overlaps()]


def semi_active_plan(workload: Workload, order: dict[int, list[str]], cluster: ClusterView, comm: DelayModel,
                     planner: str = "1f1b") -> Plan:
    """The semi-active plan of ``order``: each op starts when the previous op of every stream it
    occupies (a collective: the comm stream of every GPU of its group) has ended and its inputs
    have arrived (``comm.delay``). Times in us."""
    ops = workload.ops
    ids = sorted(ops)
    index = {o: k for k, o in enumerate(ids)}
    dur = [ops[o].duration_on(cluster.gpu_model) for o in ids]
    device = {o: dev for dev, seq in order.items() for o in seq}
    arcs = [(index[u], index[v], dur[index[u]] + comm.delay(u, v, device[u], device[v], nbytes))
            for u, v, nbytes in workload.graph.edges(data="bytes")]
    # a collective joins the comm stream of every GPU of its group where its lead GPU has it:
    # members of a group run the same sequence, so the lead's position is theirs
    chains: dict[tuple[int, str], list[tuple[int, int, str]]] = {}
    for dev, seq in order.items():
        for i, o in enumerate(seq):
            op = ops[o]
            late = 1 if op.phase in STEP_END_PHASES else 0
            for g in (op.collective.group if op.collective is not None else (dev,)):
                chains.setdefault((g, op.kind), []).append((late, i, o))
    for chain in chains.values():
        chain.sort()
        arcs += [(index[a], index[b], dur[index[a]]) for (_, _, a), (_, _, b) in zip(chain, chain[1:])]
    try:
        times = earliest_times(len(ids), arcs)
    except OrderCycle:
        raise InputError(None, "order", "the order waits on itself (deadlock)") from None
    placements = {o: Placement(device[o], times[k], times[k] + dur[k]) for k, o in enumerate(ids)}
    return Plan(workload.name, dict(sorted(placements.items())), planner, status="schedule",
                order={d: list(v) for d, v in sorted(order.items())})


def plan_transformer(spec: TransformerSpec, workload: Workload, name: str, cluster: ClusterView, comm: Any) -> Plan:
    """The op-level semi-active plan of schedule ``name`` on ``workload`` (built from ``spec``);
    ``plan.meta`` records the schedule, its generator figures and its overlapped pairs."""
    schedule = transformer_schedule(spec, workload, name, comm, cluster.gpu_model)
    plan = semi_active_plan(workload, transformer_order(spec, workload, schedule), cluster, comm,
                            planner=f"schedule:{name}")
    plan.meta.update({**schedule.meta, "schedule": name, "view": "op", "overlap_pairs": overlap_pairs(spec, schedule)})
    return plan


def spec_for_schedule(spec: TransformerSpec, name: str) -> TransformerSpec:
    """``spec`` with schedule ``name`` and the ``vpp`` its layout needs (interleaved keeps a
    ``vpp >= 2``, else 2; a V 2; the others 1): what ``plansim compare`` builds per schedule."""
    layout = LAYOUTS[check_name(name)][0]
    vpp = spec.parallelism.vpp
    vpp = 1 if layout == "linear" else (vpp if layout == "round_robin" and vpp >= 2 else 2)
    out = replace(spec, parallelism=replace(spec.parallelism, schedule=name, vpp=vpp))
    check_spec(out)
    return out


def workload_for_schedule(spec: TransformerSpec, name: str, cluster) -> tuple[TransformerSpec, Workload]:
    """(spec, workload) of :func:`spec_for_schedule` on ``cluster``."""
    out = spec_for_schedule(spec, name)
    return out, build_transformer(out, cluster, name=f"transformer:{name}")


def is_transformer(scenario: Any) -> bool:
    return (scenario.workload.meta or {}).get("kind") == "transformer"


def built_schedule(workload: Workload) -> str:
    """The schedule a transformer workload was built for (its ``parallelism.schedule``)."""
    return str(workload.meta["parallelism"]["schedule"])


def scenario_for_schedule(scenario: Any, name: str) -> Any:
    """``scenario`` itself when its transformer workload was built for schedule ``name``, else a
    copy whose workload is the same model built for ``name`` (:func:`spec_for_schedule`; same
    workload name and memory cap) and whose ``raw`` workload section says so. Refusals (an unknown
    name, layers that do not split over the new ``pp x vpp``) are one :class:`InputError` naming
    the scenario file."""
    check_name(name, scenario.path)
    if name == built_schedule(scenario.workload):
        return scenario
    try:
        spec = spec_for_schedule(spec_from_dict(scenario.raw["workload"]), name)
        check_layout(spec, name)
        wl = build_transformer(spec, scenario.cluster, name=scenario.workload.name)
    except InputError as e:
        # the name came from the planner, not from the workload's own field
        field = "solver.planner" if e.field == "workload.parallelism.schedule" else e.field
        reason = e.reason if e.reason.startswith(f"schedule {name}") else f"schedule {name}: {e.reason}"
        raise InputError(scenario.path, field, reason) from None
    wl.memory_cap_bytes = scenario.workload.memory_cap_bytes
    raw = copy.deepcopy(scenario.raw)
    raw["workload"].setdefault("parallelism", {}).update(schedule=name, vpp=spec.parallelism.vpp)
    return replace(scenario, workload=wl, raw=raw)


def scenario_for_planner(scenario: Any, planner: str | None) -> Any:
    """The scenario ``planner`` (default: the scenario's ``solver.planner``) runs on:
    :func:`scenario_for_schedule` for ``schedule:<name>`` on a transformer workload, else ``scenario``."""
    planner = planner or scenario.solver.planner
    if planner and planner.startswith("schedule:") and is_transformer(scenario):
        return scenario_for_schedule(scenario, planner.split(":", 1)[1])
    return scenario


def scenario_for_plan(scenario: Any, plan: Plan) -> Any:
    """The scenario ``plan`` was made on: for a transformer plan of a named schedule
    (``plan.meta["schedule"]``, as ``plan --planner schedule:NAME`` writes it) the model built for
    that schedule (:func:`scenario_for_schedule`), else ``scenario``. What a command that reads a
    plan file back against its scenario (``export``) calls first."""
    name = plan.meta.get("schedule")
    if name and is_transformer(scenario):
        return scenario_for_schedule(scenario, str(name))
    return scenario


def transformer_schedule_plan(scenario: Any, name: str) -> Plan:
    """The ``schedule:<name>`` planner on ``scenario``'s transformer workload (what ``plansim
    simulate``, ``loop`` and ``whatif`` run by default), which must have been built for ``name``:
    a caller that plans another schedule builds its scenario first (:func:`scenario_for_planner`,
    as ``plansim plan`` does), since a plan is only valid for the workload it was made on. Refused in one line: an unknown name, a layout or
    micro-batch count the schedule does not fit, and a plan over the memory cap
    (:class:`InfeasibleError`)."""
    check_name(name, scenario.path)
    built_for = built_schedule(scenario.workload)
    if name != built_for:
        raise InputError(scenario.path, "solver.planner",
                         f"schedule:{name} on a transformer workload built for {built_for}: set "
                         f"workload.parallelism.schedule: {name} (stage placement and gradient edges follow it)")
    try:
        plan = plan_transformer(spec_from_dict(scenario.raw["workload"]), scenario.workload, name,
                                scenario.cluster, scenario.comm)
    except InputError as e:
        raise InputError(scenario.path, e.field, e.reason) from None
    check_fits(plan, scenario, name)
    return plan
