"""The step-level view of a schedule: each step fused into one op, as a runtime executes it.

A pipeline runtime (PyTorch pipelining, Megatron, DualPipe) runs a step as one call and sends
its outputs when the call returns: a full backward sends the input gradient after the weight
gradient too, and an overlapped F&B pair sends both results at the end of the pair. The op-level
plan of :func:`engine.planners.schedules.timing.schedule_plan` lets each op's output leave as soon as
that op ends, which is faster than any runtime for schedules that do not split the backward.

:func:`fuse` rewrites a pipeline workload so that every multi-op step of a schedule is one op:

* duration: the sum of its ops' durations; for an overlapped pair, that sum times
  ``FB / (F + B + W)`` when the workload's ``times_us`` gives ``FB`` (the F&B time of one
  stage; chunks of a finer pipeline scale the same way) - the overlap is then a property of the
  fused workload, so the validator and the simulator see the same durations as the plan;
* edges: every edge between ops of different steps becomes an edge between their fused ops
  (bytes of parallel edges add up; each tensor is sent when its step ends);
* memory: the fused op allocates what its ops allocate and frees it when the (fused) ops in
  their ``release`` lists end; an F&B pair thus holds the new activation and the one its
  backward frees at once (DualPipe's ``p + 1``).

:func:`runtime_plan` returns the fused workload and its semi-active plan. Times in us.
"""

from __future__ import annotations

from engine.core.ir import Edge, Op, Plan, Workload
from engine.planners.schedules.actions import PipelineShape, Schedule
from engine.planners.schedules.timing import RankSteps, plan_from_steps, step_ops


def overlap_ratio(times: dict[str, float]) -> float:
    """``FB / (F + B + W)``: how much of a forward + full backward an overlapped pair takes
    (1.0 when ``FB`` is not given)."""
    if "FB" not in times:
        return 1.0
    total = sum(float(times.get(ph, 0.0)) for ph in ("F", "B", "W"))
    return float(times["FB"]) / total if total > 0 else 1.0


def fused_id(label: str) -> str:
    return f"step:{label}"


def fuse(schedule: Schedule, workload: Workload) -> tuple[Workload, RankSteps]:
    """(fused workload, its per-GPU steps of one op each) for ``schedule`` on ``workload``."""
    shape = PipelineShape.of(workload, schedule.name)
    ratio = overlap_ratio(shape.times)
    ranks = step_ops(schedule, workload, shape.has_w)
    overlapped = {str(s) for s in schedule.overlaps()}
    ops = workload.ops
    new_id: dict[str, str] = {}
    groups: list[tuple[str, list[str], bool]] = []
    for gpu in sorted(ranks):
        for label, ids in ranks[gpu]:
            fid = ids[0] if len(ids) == 1 else fused_id(label)
            groups.append((fid, ids, label in overlapped))
            for o in ids:
                new_id[o] = fid
    new_ops = []
    for fid, ids, is_pair in groups:
        members = [ops[o] for o in ids]
        if len(ids) == 1:
            op = members[0]
            new_ops.append(Op(**{**_fields(op), "release": tuple(sorted({new_id[r] for r in op.release} - {fid}))}))
            continue
        scale = ratio if is_pair else 1.0
        models = sorted({model for m in members for model, _ in m.duration_by_gpu})
        by_gpu = tuple((model, scale * sum(m.duration_on(model) for m in members)) for model in models)
        release = sorted({new_id[r] for m in members if m.memory_bytes for r in m.release} - {fid})
        first = members[0]
        new_ops.append(Op(id=fid, duration_us=scale * sum(m.duration_us for m in members), duration_by_gpu=by_gpu,
                          devices=first.devices, memory_bytes=sum(m.memory_bytes for m in members),
                          release=tuple(release), stage=first.stage, microbatch=first.microbatch, chunk=first.chunk,
                          phase="F&B" if is_pair else "BW"))
    edge_bytes: dict[tuple[str, str], int] = {}
    for u, v, nbytes in workload.graph.edges(data="bytes"):
        a, b = new_id[u], new_id[v]
        if a != b:
            edge_bytes[(a, b)] = edge_bytes.get((a, b), 0) + int(nbytes)
    fused = Workload(name=f"{workload.name}+{schedule.name}", ops=new_ops,
                     edges=[Edge(a, b, n) for (a, b), n in sorted(edge_bytes.items())],
                     static_memory_bytes=workload.static_memory_bytes, memory_cap_bytes=workload.memory_cap_bytes,
                     meta={**workload.meta, "fused_schedule": schedule.name, "overlap_ratio": ratio})
    fused_ranks = {gpu: [(label, [new_id[ids[0]]]) for label, ids in steps] for gpu, steps in ranks.items()}
    return fused, fused_ranks


def _fields(op: Op) -> dict:
    return {f: getattr(op, f) for f in op.__dataclass_fields__}


def runtime_plan(schedule: Schedule, workload: Workload, comm, gpu_model: str | None = None) -> tuple[Plan, Workload]:
    """(plan, fused workload): the step-level semi-active plan of ``schedule``; its ops are the
    fused workload's, against which it validates and simulates."""
    fused, ranks = fuse(schedule, workload)
    steps = {str(gpu): [label for label, _ in ranks[gpu]] for gpu in sorted(ranks)}
    plan = plan_from_steps(schedule.name, ranks, fused, comm, gpu_model,
                           {**schedule.meta, "view": "step", "overlap_ratio": fused.meta["overlap_ratio"],
                            "steps": steps})
    return plan, fused

