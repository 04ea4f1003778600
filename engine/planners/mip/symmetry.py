"""Symmetry breaking for the MIP: identical micro-batches and interchangeable GPUs.

**Micro-batch twins.** Two micro-batches are twins when their ops match one to one by
(stage, phase, chunk) tag with equal kind, GPU (a single fixed one), durations, allocation and
release structure, and their edges match (same tags, same delays; edges to untagged ops go to
the same op). If micro-batches ``a < b`` are twins, some optimal plan runs, on every stream,
``a``'s op of each tag before ``b``'s: take any plan and give, for each tag, the k-th earliest
of the twins' ops to the k-th micro-batch. Each edge still holds (the k earliest ops of a tag
each have a distinct predecessor done in time, so the k-th earliest predecessor is done too) and
memory at every instant is unchanged (allocation starts and frees are the same multiset). So we
add zero-delay order arcs ``op(a, tag) -> op(b, tag)`` and relabel warm starts the same way.

**Interchangeable GPUs.** When every op may run on every GPU with the same duration, no edge
moves bytes, and all GPUs have the same static memory and cap, relabelling GPUs in order of
first use (ops in topological order) shows the op of rank k may be restricted to GPUs 0..k.
"""

from __future__ import annotations

from engine.planners.mip.instance import Instance
from engine.planners.mip.warm import Schedule

TAG_KEYS = ("stage", "phase", "chunk")


def _tag(inst: Instance, i: int) -> tuple | None:
    t = inst.tags[i]
    if "microbatch" not in t:
        return None
    return tuple(t.get(k) for k in TAG_KEYS)


def twin_groups(inst: Instance) -> list[list[dict[tuple, int]]]:
    """Groups of twin micro-batches; each micro-batch as {tag: op index}, in micro-batch order."""
    by_mb: dict[int, dict[tuple, int]] = {}
    bad: set[int] = set()
    for i in range(len(inst)):
        tag = _tag(inst, i)
        if tag is None:
            continue
        mb = inst.tags[i]["microbatch"]
        ops = by_mb.setdefault(mb, {})
        if tag in ops or inst.fixed_device(i) is None or inst.occupies[i] is not None:
            bad.add(mb)
        ops[tag] = i
    mb_of = {i: mb for mb, ops in by_mb.items() for i in ops.values()}
    for (i, j) in inst.arcs():
        if i in mb_of and j in mb_of and mb_of[i] != mb_of[j]:
            bad.update((mb_of[i], mb_of[j]))
    for a in range(len(inst)):
        if a in mb_of and any(r in mb_of and mb_of[r] != mb_of[a] for r in inst.release[a]):
            bad.add(mb_of[a])

    def signature(mb: int):
        ops = by_mb[mb]
        rows = []
        for tag, i in sorted(ops.items(), key=lambda kv: repr(kv[0])):
            rel = tuple(sorted(repr(_tag(inst, r)) if r in mb_of else f"op:{r}" for r in inst.release[i]))
            rows.append((repr(tag), inst.kind[i], inst.devices[i], tuple(sorted(inst.dur[i].items())),
                         inst.alloc[i], rel))
        edges = []
        for (i, j), delays in inst.edges.items():
            if i in mb_of and mb_of[i] == mb or j in mb_of and mb_of[j] == mb:
                src = repr(_tag(inst, i)) if i in mb_of else f"op:{i}"
                dst = repr(_tag(inst, j)) if j in mb_of else f"op:{j}"
                edges.append((src, dst, tuple(sorted(delays.items()))))
        return tuple(rows), tuple(sorted(edges))

    groups: dict[tuple, list[int]] = {}
    for mb in sorted(by_mb):
        if mb not in bad:
            groups.setdefault(signature(mb), []).append(mb)
    return [[by_mb[mb] for mb in mbs] for mbs in groups.values() if len(mbs) > 1]


def twin_arcs(inst: Instance) -> list[tuple[int, int]]:
    """Order arcs ``op(a, tag) -> op(b, tag)`` between consecutive twins ``a < b``."""
    arcs = []
    for group in twin_groups(inst):
        for first, second in zip(group, group[1:]):
            for tag, i in first.items():
                arcs.append((i, second[tag]))
    return sorted(arcs)


def relabel_twins(inst: Instance, sched: Schedule) -> Schedule:
    """Give, per tag, the k-th earliest start among twins to the k-th micro-batch."""
    dev, start = list(sched[0]), list(sched[1])
    for group in twin_groups(inst):
        for tag in group[0]:
            ops = [mb[tag] for mb in group]
            times = sorted(start[i] for i in ops)
            for i, t in zip(ops, times):
                start[i] = t
    return dev, start


def devices_interchangeable(inst: Instance) -> bool:
    n = inst.n_devices
    every = tuple(range(n))
    if n < 2 or any(o is not None for o in inst.occupies):
        return False
    if any(inst.devices[i] != every or len(set(inst.dur[i].values())) > 1 for i in range(len(inst))):
        return False
    if any(delays for delays in inst.edges.values()):
        return False
    return len(set(inst.static.values())) <= 1 and len(set(inst.cap.values())) <= 1


def restrict_devices(inst: Instance) -> Instance:
    """The op of topological rank k may only use GPUs 0..k (see the module docstring)."""
    fixed: dict[int, int] = {}
    devices = list(inst.devices)
    for k, i in enumerate(inst.topo()):
        if k + 1 < inst.n_devices:
            devices[i] = tuple(range(k + 1))
    out = inst.restricted(fixed)
    out.devices = devices
    out.dur = [{d: inst.dur[i][d] for d in devices[i]} for i in range(len(inst))]
    return out


def relabel_devices(inst: Instance, sched: Schedule) -> Schedule:
    """Rename GPUs in order of first use along the topological order."""
    dev, start = sched
    names: dict[int, int] = {}
    for i in inst.topo():
        if dev[i] not in names:
            names[dev[i]] = len(names)
    return [names[d] for d in dev], list(start)
