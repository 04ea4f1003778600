"""The independent plan validator, semi-active compaction, peak memory and makespan bounds.

Nothing here knows how a plan was made. Units: us (float), bytes (int).

Rules a valid plan keeps (:func:`validate_plan`):

* every workload op is placed exactly once, on a GPU of the cluster it is eligible on (a
  collective on its group's first GPU), lasting exactly its duration on that GPU's model;
* precedence with communication: ``dst.start >= src.end + comm.delay(src, dst, ...)``;
* no two ops overlap on one (GPU, stream); stream = ``op.kind``; a collective occupies the comm
  stream of every GPU of its group;
* ``plan.order[d]`` lists exactly the ops placed on ``d``; along each stream its start times
  never decrease (streams run their ops in issue order);
* memory: at every event, static + live allocations on each GPU <= the cap. An op's
  ``memory_bytes`` are allocated at its start and freed at the latest end among the op itself and
  the ops in its ``release`` (so never before the op ends); frees at time t happen before
  allocations at t.

Float comparisons allow ``REL_TOL`` relative (at least ``REL_TOL`` us absolute).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

from engine.core.cluster import ClusterView, DelayModel
from engine.core.errors import InputError
from engine.core.ir import Placement, Plan, Transfer, Workload, stream_sequences
from engine.core.memory import memory_caps, memory_events, peak_resident
from engine.core.timing import OrderCycle, earliest_times

REL_TOL = 1e-6


def _tol(*values: float) -> float:
    return REL_TOL * max(1.0, *(abs(v) for v in values))


def _fmt(t: float) -> str:
    return f"{t:.12g}"


def occupied_streams(op, device: int) -> list[tuple[int, str]]:
    """The (GPU, stream) pairs an op placed on ``device`` occupies while it runs."""
    if op.collective is not None:
        return [(g, "comm") for g in sorted(set(op.collective.group) | {device})]
    return [(device, op.kind)]


def free_time(op, placements: Mapping[str, Placement]) -> float:
    """When ``op``'s allocation is freed (us): the latest end of the op and its placed release ops."""
    end = placements[op.id].end
    for r in op.release:
        p = placements.get(r)
        if p is not None and p.end > end:
            end = p.end
    return end


def _memory_events(placements: Mapping[str, Placement], workload: Workload) -> dict[int, list[tuple[float, int, str, int]]]:
    """Per GPU, its memory events (:func:`engine.core.memory.memory_events`: (time, 0 free / 1
    alloc, op, bytes)); a free within the validator's tolerance of an allocation sorts before it."""
    allocations: dict[int, list[tuple[str, int, float, float]]] = {}
    graph = workload.graph
    for op_id, p in placements.items():
        if op_id not in graph:
            continue
        op = graph.nodes[op_id]["op"]
        if op.memory_bytes > 0:
            allocations.setdefault(p.device, []).append((op_id, op.memory_bytes, p.start, free_time(op, placements)))
    return {d: memory_events(allocs, REL_TOL) for d, allocs in allocations.items()}


def peak_memory(plan: Plan, workload: Workload) -> dict[int, int]:
    """Per GPU, the most bytes resident at once: static + live allocations."""
    events = _memory_events(plan.placements, workload)
    devices = sorted(set(events) | set(workload.static_memory_bytes) | {p.device for p in plan.placements.values()})
    return {d: peak_resident(workload.static_memory_bytes.get(d, 0), events.get(d, ())) for d in devices}


def make_transfers(placements: Mapping[str, Placement], workload: Workload,
                   delay: Callable[[str, str, int, int, int], float]) -> list[Transfer]:
    """One :class:`Transfer` per edge whose bytes cross GPUs, from the source's end, sorted by edge."""
    out = []
    for u, v, nbytes in sorted(workload.graph.edges(data="bytes")):
        pu, pv = placements.get(u), placements.get(v)
        if pu is None or pv is None or pu.device == pv.device or nbytes <= 0:
            continue
        out.append(Transfer(u, v, pu.device, pv.device, nbytes, pu.end, pu.end + delay(u, v, pu.device, pv.device, nbytes)))
    return out


# -- validation ---------------------------------------------------------------------------------

def validate_plan(plan: Plan, workload: Workload, cluster: ClusterView, comm: DelayModel, memory_cap: int | None = None) -> list[str]:
    """All the ways ``plan`` breaks the rules (module docstring), one readable line each; [] = valid."""
    out: list[str] = []
    ops = workload.ops
    usable = _check_placements(plan, ops, cluster, out)
    _check_precedence(plan, workload, comm, usable, out)
    _check_overlap(plan, ops, usable, cluster.n_gpus, out)
    _check_order(plan, ops, cluster, out)
    _check_memory(plan, workload, memory_caps(workload, cluster, memory_cap), usable, out)
    if usable and plan.makespan_us is not None:
        last = max(plan.placements[o].end for o in usable)
        if plan.makespan_us < last - _tol(last):
            out.append(f"plan makespan {_fmt(plan.makespan_us)} us is before the last op ends at {_fmt(last)} us")
    return out


def _check_placements(plan: Plan, ops: Mapping[str, Any], cluster: ClusterView, out: list[str]) -> set[str]:
    """Placement-level rules; returns the ops whose placement the pairwise checks can use."""
    n = cluster.n_gpus
    model = cluster.gpu_model
    usable: set[str] = set()
    for op_id in sorted(plan.placements):
        if op_id not in ops:
            out.append(f"unknown op {op_id!r} in the plan (not in workload)")
    for op_id in sorted(ops):
        if op_id not in plan.placements:
            out.append(f"op {op_id} is not placed")
    for op_id in sorted(set(plan.placements) & set(ops)):
        op, p = ops[op_id], plan.placements[op_id]
        if not isinstance(p.device, numbers.Integral) or not 0 <= p.device < n:
            out.append(f"op {op_id} is on GPU {p.device!r}, but the cluster has GPUs 0..{n - 1}")
            continue
        if not (math.isfinite(p.start) and math.isfinite(p.end)):
            out.append(f"op {op_id} has a non-finite time: start {p.start}, end {p.end}")
            continue
        usable.add(op_id)
        if op.devices is not None and p.device not in op.devices:
            out.append(f"op {op_id} is on GPU {p.device}, not one of its eligible GPUs {list(op.devices)}")
        if op.collective is not None:
            group = op.collective.group
            if p.device != group[0]:
                out.append(f"collective op {op_id} is on GPU {p.device}, not on its group's first GPU {group[0]}")
            bad = [g for g in group if not 0 <= g < n]
            if bad:
                out.append(f"collective op {op_id} has group GPUs {bad} outside the cluster's 0..{n - 1}")
        if p.start < -_tol(p.start):
            out.append(f"op {op_id} starts at negative time {_fmt(p.start)} us")
        want = op.duration_on(model)
        if abs((p.end - p.start) - want) > _tol(want, p.end):
            out.append(f"op {op_id} on GPU {p.device} lasts {_fmt(p.end - p.start)} us "
                       f"({_fmt(p.start)}..{_fmt(p.end)}), but takes {_fmt(want)} us on {model}")
    return usable


def _check_precedence(plan: Plan, workload: Workload, comm: DelayModel, usable: set[str], out: list[str]) -> None:
    for u, v, nbytes in sorted(workload.graph.edges(data="bytes")):
        if u not in usable or v not in usable:
            continue
        pu, pv = plan.placements[u], plan.placements[v]
        delay = comm.delay(u, v, pu.device, pv.device, nbytes)
        ready = pu.end + delay
        if pv.start < ready - _tol(ready):
            via = f" + {_fmt(delay)} us comm delay (GPU {pu.device} -> GPU {pv.device}, {nbytes} bytes)" if delay else ""
            out.append(f"edge {u} -> {v}: {v} starts at {_fmt(pv.start)} us, before {u} ends at "
                       f"{_fmt(pu.end)} us{via} = {_fmt(ready)} us")


def _check_overlap(plan: Plan, ops: Mapping[str, Any], usable: set[str], cluster_gpus: int, out: list[str]) -> None:
    streams: dict[tuple[int, str], list[tuple[float, float, str]]] = {}
    for op_id in usable:
        p = plan.placements[op_id]
        for key in occupied_streams(ops[op_id], p.device):
            streams.setdefault(key, []).append((p.start, p.end, op_id))
    for (d, stream), items in sorted(streams.items()):
        if not 0 <= d < cluster_gpus:
            continue  # a collective's group GPU outside the cluster: reported with the placement
        items.sort()
        last_end, last_op = -math.inf, None
        for start, end, op_id in items:
            if last_op is not None and start < last_end - _tol(last_end):
                a = plan.placements[last_op]
                out.append(f"GPU {d} {stream} stream: {op_id} [{_fmt(start)}, {_fmt(end)}) overlaps "
                           f"{last_op} [{_fmt(a.start)}, {_fmt(a.end)})")
            if end > last_end:
                last_end, last_op = end, op_id


def _check_order(plan: Plan, ops: Mapping[str, Any], cluster: ClusterView, out: list[str]) -> None:
    seen: dict[str, int] = {}
    for d in sorted(plan.order):
        if not isinstance(d, numbers.Integral) or not 0 <= d < cluster.n_gpus:
            out.append(f"plan order lists GPU {d!r}, but the cluster has GPUs 0..{cluster.n_gpus - 1}")
        last: dict[str, tuple[str, float]] = {}
        for op_id in plan.order[d]:
            if op_id not in ops or op_id not in plan.placements:
                out.append(f"plan order of GPU {d} lists {op_id!r}, which is not a placed workload op")
                continue
            if op_id in seen:
                out.append(f"plan order lists op {op_id} twice (GPU {seen[op_id]} and GPU {d})")
                continue
            seen[op_id] = d
            p = plan.placements[op_id]
            if p.device != d:
                out.append(f"plan order lists op {op_id} on GPU {d}, but it is placed on GPU {p.device}")
                continue
            stream = ops[op_id].kind
            if stream in last:
                prev, prev_start = last[stream]
                if p.start < prev_start - _tol(prev_start):
                    out.append(f"GPU {d} {stream} stream order lists {prev} before {op_id}, but {op_id} starts "
                               f"at {_fmt(p.start)} us, before {prev} at {_fmt(prev_start)} us")
            last[stream] = (op_id, p.start)
    for op_id in sorted(set(plan.placements) & set(ops)):
        if op_id not in seen:
            out.append(f"op {op_id} is missing from the plan order of GPU {plan.placements[op_id].device}")


def _check_memory(plan: Plan, workload: Workload, caps: list[int], usable: set[str], out: list[str]) -> None:
    events = _memory_events({o: plan.placements[o] for o in usable}, workload)
    for d in range(len(caps)):
        static = workload.static_memory_bytes.get(d, 0)
        if static > caps[d]:
            out.append(f"GPU {d}: static memory {static} bytes exceeds the cap {caps[d]} bytes")
            continue
        live, first, more = static, None, 0
        live_ops: dict[str, int] = {}
        for t, kind, op_id, delta in events.get(d, ()):
            live += delta
            if kind == 0:
                live_ops.pop(op_id, None)
                continue
            live_ops[op_id] = delta
            if live > caps[d]:
                if first is None:
                    biggest = sorted(live_ops.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
                    named = ", ".join(f"{o} {b}" for o, b in biggest)
                    first = (f"GPU {d} memory at {_fmt(t)} us: {live} bytes live (static {static}; largest: {named}) "
                             f"exceed the cap {caps[d]} by {live - caps[d]} bytes when {op_id} allocates {delta}")
                else:
                    more += 1
        if first is not None:
            out.append(first + (f" (and {more} more allocations over the cap on GPU {d})" if more else ""))


# -- compaction -----------------------------------------------------------------------------------

def compact(plan: Plan, workload: Workload, comm: DelayModel) -> Plan:
    """The semi-active plan with the same placement and per-stream order as ``plan``.

    Every op starts at max(end of the previous op on each stream it occupies, arrival of each
    input = source end + comm delay), keeping its duration (``end - start`` in ``plan``). Makespan
    and transfers are recomputed; a collective's place on other group GPUs' comm streams follows
    its start time. Memory is not considered: starting ops earlier can make allocations overlap,
    so validate the result where caps bind. Raises :class:`InputError` if the plan does not place
    exactly the workload's ops, or its order contradicts the dependencies.
    """
    ops = workload.ops
    pl = plan.placements
    if set(pl) != set(ops):
        extra, missing = sorted(set(pl) - set(ops)), sorted(set(ops) - set(pl))
        raise InputError(None, "placements", f"cannot compact: unknown ops {extra[:3]}, unplaced ops {missing[:3]}")
    chains = _stream_chains(plan, ops)
    ids = sorted(ops)
    index = {o: k for k, o in enumerate(ids)}
    dur = [pl[o].end - pl[o].start for o in ids]
    arcs = [(index[u], index[v], dur[index[u]] + comm.delay(u, v, pl[u].device, pl[v].device, nbytes))
            for u, v, nbytes in workload.graph.edges(data="bytes")]
    arcs += [(index[a], index[b], dur[index[a]]) for seq in chains.values() for a, b in zip(seq, seq[1:])]
    try:
        times = earliest_times(len(ids), arcs)
    except OrderCycle as cycle:
        stuck = [ids[k] for k in cycle.stuck][:5]
        raise InputError(None, "order", f"the per-stream order contradicts the dependencies (a cycle through {stuck})") from None
    start = {o: times[k] for k, o in enumerate(ids)}
    end = {o: times[k] + dur[k] for k, o in enumerate(ids)}
    placements = {o: Placement(pl[o].device, start[o], end[o]) for o in sorted(ops)}
    makespan = max(end.values(), default=0.0)
    gap = plan.mip_gap
    if gap is not None and plan.lower_bound_us is not None and makespan > 0:
        gap = max(0.0, (makespan - plan.lower_bound_us) / makespan)
    return Plan(workload=plan.workload, placements=placements, planner=plan.planner, status=plan.status,
                makespan_us=makespan, order={d: list(ids) for d, ids in sorted(plan.order.items())},
                transfers=make_transfers(placements, workload, comm.delay), lower_bound_us=plan.lower_bound_us,
                mip_gap=gap, solve_s=plan.solve_s, meta={**plan.meta, "compacted": True})


def _stream_chains(plan: Plan, ops: Mapping[str, Any]) -> dict[tuple[int, str], list[str]]:
    """Per (GPU, stream), the ops it runs in order: ``plan.order`` for the GPU's own ops, with
    collectives placed on another GPU of their group merged in by (start, end, id)."""
    listed = {o for ids in plan.order.values() for o in ids}
    if listed != set(ops) or sum(len(ids) for ids in plan.order.values()) != len(ops):
        raise InputError(None, "order", "cannot compact: the plan order must list every op exactly once")
    for d in sorted(plan.order):
        for o in plan.order[d]:
            if plan.placements[o].device != d:
                raise InputError(None, "order", f"cannot compact: order of GPU {d} lists {o}, placed on GPU {plan.placements[o].device}")
    return stream_sequences(plan, ops)


# -- bounds -------------------------------------------------------------------------------------

def lower_bounds(workload: Workload, cluster: ClusterView) -> dict[str, float]:
    """Valid lower bounds (us) on the makespan of any plan of ``workload`` on ``cluster``.

    * ``critical_path_us``: the longest path of op durations (comm ignored: it is 0 when
      both ends share a GPU);
    * ``load_us``: per stream, the total work over the number of GPUs, and the work of ops pinned
      to one GPU (a collective counts on each GPU of its group), maxed over GPUs;
    * ``lower_bound_us``: the larger of the two.
    """
    n = cluster.n_gpus
    model = cluster.gpu_model
    graph = workload.graph
    dur = {o: graph.nodes[o]["op"].duration_on(model) for o in graph.nodes}
    longest: dict[str, float] = {}
    for v in workload.topological_order():
        longest[v] = dur[v] + max((longest[u] for u in graph.predecessors(v)), default=0.0)
    total = {"compute": 0.0, "comm": 0.0}
    pinned: dict[tuple[int, str], float] = {}
    for o in graph.nodes:
        op = graph.nodes[o]["op"]
        if op.collective is not None:
            group = [g for g in set(op.collective.group) if 0 <= g < n]
            total["comm"] += dur[o] * len(group)
            for g in group:
                pinned[(g, "comm")] = pinned.get((g, "comm"), 0.0) + dur[o]
            continue
        total[op.kind] += dur[o]
        elig = workload.eligible(o, n)
        if len(elig) == 1:
            pinned[(elig[0], op.kind)] = pinned.get((elig[0], op.kind), 0.0) + dur[o]
    load = max([t / n for t in total.values()] + list(pinned.values()), default=0.0) if n else 0.0
    cp = max(longest.values(), default=0.0)
    return {"critical_path_us": cp, "load_us": load, "lower_bound_us": max(cp, load)}
