"""The plan as the simulator runs it: per (GPU, stream) sequences of ops, checked.

Each GPU has a ``compute`` and a ``comm`` stream. ``plan.order[d]`` gives GPU ``d``'s own ops in
issue order; a collective also occupies the comm stream of every other GPU of its group, where
it is merged in by its planned (start, end, id), before the first own op with a later key (the
rule ``engine.planners.validate`` uses). An op runs when its predecessor on each stream it occupies has
ended and its inputs have arrived, so an order that contradicts the dependencies deadlocks:
:func:`stream_sequences` finds that before simulating and names a cycle.

Bad input (a plan for another workload, GPUs outside the cluster, an order that deadlocks) is
one :class:`engine.core.errors.InputError`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Mapping

from engine.core.errors import InputError
from engine.core.ir import Plan, Workload
from engine.core.ir import stream_sequences as ir_stream_sequences

if TYPE_CHECKING:
    from hardware_profiles import Cluster

STREAMS = ("compute", "comm")


def check_plan(plan: Plan, workload: Workload, cluster: Cluster, ops: Mapping[str, Any] | None = None) -> None:
    """The plan places exactly the workload's ops on GPUs of the cluster, each listed once in order.

    ``ops``: ``workload.ops`` if the caller has it (it is rebuilt on every access)."""
    ops = workload.ops if ops is None else ops
    n = cluster.n_gpus
    extra = sorted(set(plan.placements) - set(ops))
    if extra:
        raise InputError(None, "plan.placements",
                         f"op {extra[0]!r} is not in workload {workload.name!r} ({len(extra)} unknown ops: "
                         "a plan for another scenario?)")
    missing = sorted(set(ops) - set(plan.placements))
    if missing:
        raise InputError(None, "plan.placements",
                         f"op {missing[0]!r} of workload {workload.name!r} is not placed ({len(missing)} unplaced ops)")
    for op_id in sorted(ops):
        d = plan.placements[op_id].device
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < n:
            raise InputError(None, f"plan.placements[{op_id}].device",
                             f"GPU {d!r} is not in the cluster (GPUs 0..{n - 1})")
        coll = ops[op_id].collective
        if coll is not None:
            bad = [g for g in coll.group if not 0 <= g < n]
            if bad:
                raise InputError(None, f"ops[{op_id}].collective.group",
                                 f"GPU {bad[0]} is not in the cluster (GPUs 0..{n - 1})")
    seen: dict[str, int] = {}
    for d in sorted(plan.order):
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < n:
            raise InputError(None, "plan.order", f"GPU {d!r} is not in the cluster (GPUs 0..{n - 1})")
        for op_id in plan.order[d]:
            if op_id not in ops:
                raise InputError(None, f"plan.order[{d}]", f"op {op_id!r} is not in workload {workload.name!r}")
            if op_id in seen:
                raise InputError(None, f"plan.order[{d}]",
                                 f"op {op_id!r} is listed twice (GPU {seen[op_id]} and GPU {d})")
            if plan.placements[op_id].device != d:
                raise InputError(None, f"plan.order[{d}]",
                                 f"op {op_id!r} is listed on GPU {d} but placed on GPU {plan.placements[op_id].device}")
            seen[op_id] = d
    if len(seen) != len(ops):
        op_id = sorted(set(ops) - set(seen))[0]
        raise InputError(None, "plan.order",
                         f"op {op_id!r} is missing from the order of GPU {plan.placements[op_id].device}")


def stream_sequences(plan: Plan, workload: Workload,
                     ops: Mapping[str, Any] | None = None) -> dict[tuple[int, str], list[str]]:
    """Per (GPU, stream), the ops it runs in order (collectives on every GPU of their group)."""
    return ir_stream_sequences(plan, workload.ops if ops is None else ops)


def check_deadlock(workload: Workload, seqs: Mapping[tuple[int, str], list[str]]) -> None:
    """InputError naming a cycle if dependencies plus stream orders cannot all be met."""
    succ: dict[str, list[str]] = {o: list(nbrs) for o, nbrs in workload.graph.adjacency()}
    indeg = dict(workload.graph.in_degree())
    for seq in seqs.values():
        for a, b in zip(seq, seq[1:]):
            if a == b:
                raise InputError(None, "plan.order", f"op {a!r} appears twice in a row on one stream")
            succ[a].append(b)
            indeg[b] += 1
    queue = deque(o for o, k in indeg.items() if k == 0)
    done = 0
    while queue:
        o = queue.popleft()
        done += 1
        for v in succ[o]:
            indeg[v] -= 1
            if indeg[v] == 0:
                queue.append(v)
    if done == len(indeg):
        return
    stuck = {o for o, k in indeg.items() if k > 0}
    cycle = _find_cycle(stuck, succ)
    stream_of = {}
    for (d, s), seq in seqs.items():
        for a, b in zip(seq, seq[1:]):
            stream_of[(a, b)] = f"GPU {d} {s} order"
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        how = "edge" if workload.graph.has_edge(a, b) else stream_of.get((a, b), "order")
        steps.append(f"{a} -({how})-> {b}")
    raise InputError(None, "plan.order", "the plan deadlocks (its order breaks precedence): " + ", ".join(steps))


def _find_cycle(nodes: set[str], succ: Mapping[str, list[str]]) -> list[str]:
    """A cycle inside ``nodes`` (every node there has a predecessor there), closed: [a, ..., a]."""
    pred_in: dict[str, str] = {}
    for a in sorted(nodes):
        for b in succ[a]:
            if b in nodes and b not in pred_in:
                pred_in[b] = a
    # walk predecessors until a node repeats
    walk: list[str] = []
    pos: dict[str, int] = {}
    o = min(nodes)
    while o not in pos:
        pos[o] = len(walk)
        walk.append(o)
        o = pred_in[o]
    cyc = walk[pos[o]:]
    cyc.reverse()
    return cyc + [cyc[0]]
