"""Schedules under NIC capacity: transfer start times, semi-active compaction, warm starts, the
plan's transfers (times in us). The model side is :mod:`engine.planners.mip.nic`.

A :class:`NicSchedule` is a schedule ``(dev, start)`` (so every function of
:mod:`engine.planners.mip.warm` takes it) that also carries ``sigma[(i, j)]``: when each transfer task
that crosses nodes in this placement starts to move its bytes.
"""

from __future__ import annotations

from typing import Sequence

from engine.core.ir import Transfer
from engine.core.timing import OrderCycle, earliest_times
from engine.planners.mip.instance import Instance
from engine.planners.mip.nic_tasks import Arc, Link, NicTasks
from engine.planners.mip.symmetry import _tag, twin_groups
from engine.planners.mip.warm import Schedule, candidate_schedules, free_arcs, makespan, memory_ok


class NicSchedule(tuple):
    """``(dev, start)`` plus ``.sigma``: per crossing task, its transfer start (us)."""

    sigma: dict[Arc, float]

    def __new__(cls, dev: list[int], start: list[float], sigma: dict[Arc, float]):
        obj = super().__new__(cls, (list(dev), list(start)))
        obj.sigma = dict(sorted(sigma.items()))
        return obj


def crossing(nic: NicTasks, dev: list[int]) -> list[Arc]:
    """Tasks that use a NIC in placement ``dev``."""
    return [t for t in nic.arcs() if nic.used(t, dev[t[0]], dev[t[1]])]


def nic_semi_active(inst: Instance, nic: NicTasks, sched: Schedule, keep_frees: bool = False) -> NicSchedule | None:
    """Same devices, same order on every stream (by start) and on every NIC link (by
    ``sched.sigma``, or by the source's end when ``sched`` has none), everything as early as
    those orders, the arcs and the NIC holds allow:

    ``sigma[t] >= end[i]``; ``s[j] >= sigma[t] + c`` (crossing tasks) or ``s[j] >= end[i] + c``;
    ``s >=`` the end of the stream predecessor; ``sigma[t] >= sigma[t_prev] + tau[t_prev,r]``
    on each link ``r``. With ``keep_frees`` an allocating op also waits for the release ops
    that freed memory before it in ``sched`` (:func:`engine.planners.mip.warm.free_arcs`). None if the
    orders contradict the arcs.
    """
    dev, start = sched
    n = len(inst)
    dur = [inst.dur[i][dev[i]] for i in range(n)]
    end = [start[i] + dur[i] for i in range(n)]
    given = getattr(sched, "sigma", None) or {}
    rank = {i: k for k, i in enumerate(inst.topo())}
    tasks = crossing(nic, dev)
    node = {t: n + k for k, t in enumerate(tasks)}
    succ: list[list[tuple[int, float]]] = [[] for _ in range(n + len(tasks))]
    for i, j in inst.arcs():
        c = inst.delay(i, j, dev[i], dev[j])
        if (i, j) in node:
            succ[i].append((node[(i, j)], dur[i]))
            succ[node[(i, j)]].append((j, c))
        else:
            succ[i].append((j, dur[i] + c))
    last_op: dict[tuple[int, str], int] = {}
    for i in sorted(range(n), key=lambda i: (start[i], end[i], rank[i])):
        for res in inst.resources(i, dev[i]):
            if res in last_op:
                succ[last_op[res]].append((i, dur[last_op[res]]))
            last_op[res] = i
    ref = {t: given.get(t, end[t[0]]) for t in tasks}
    last_task: dict[Link, Arc] = {}
    for t in sorted(tasks, key=lambda t: (ref[t], rank[t[0]], rank[t[1]])):
        for link in nic.used(t, dev[t[0]], dev[t[1]]):
            if link in last_task:
                succ[node[last_task[link]]].append((node[t], nic.tau(last_task[link], link)))
            last_task[link] = t
    if keep_frees:
        for r, o in free_arcs(inst, dev, start):
            succ[r].append((o, dur[r]))
    try:
        time = earliest_times(len(succ), [(u, v, w) for u in range(len(succ)) for v, w in succ[u]])
    except OrderCycle:
        return None
    return NicSchedule(dev, time[:n], {t: time[node[t]] for t in tasks})


def nic_compact(inst: Instance, nic: NicTasks, sched: Schedule) -> NicSchedule | None:
    """The first of plain and keep-frees :func:`nic_semi_active` that fits memory, or None."""
    for keep in (False, True):
        out = nic_semi_active(inst, nic, sched, keep_frees=keep)
        if out is not None and memory_ok(inst, out):
            return out
    return None


def best_nic_schedule(inst: Instance, nic: NicTasks,
                      extra: Sequence[tuple[str, Schedule]] = ()) -> tuple[str, NicSchedule] | None:
    """The shortest memory-feasible schedule under NIC capacity among ``extra`` and the list
    schedules of :func:`engine.planners.mip.warm.candidate_schedules`, each made NIC-feasible by
    :func:`nic_compact` (transfers in the order their sources end)."""
    best = None
    for name, raw in list(extra) + candidate_schedules(inst):
        sched = nic_compact(inst, nic, raw)
        if sched is None:
            continue
        span = makespan(inst, sched)
        if best is None or span < best[0] - 1e-9:
            best = (span, name, sched)
    return None if best is None else (best[1], best[2])


def twins_consistent(inst: Instance, nic: NicTasks) -> bool:
    """True if twin micro-batches (:func:`engine.planners.mip.symmetry.twin_groups`) also have equal
    transfer tasks (bytes and NIC links per tag), so their order arcs stay valid under NIC
    capacity (relabelling twins then permutes equal NIC holds)."""
    for group in twin_groups(inst):
        sigs = set()
        for mb in group:
            own = {i: tag for tag, i in mb.items()}
            sig = []
            for t in nic.arcs():
                if t[0] in own or t[1] in own:
                    ends = tuple(repr(_tag(inst, k)) if k in own else f"op:{k}" for k in t)
                    sig.append((ends, nic.nbytes[t], tuple(sorted(nic.uses[t].items()))))
            sigs.add(tuple(sorted(sig)))
        if len(sigs) > 1:
            return False
    return True


def plan_transfers(workload, inst: Instance, sched: Schedule, comm) -> list[Transfer]:
    """One :class:`Transfer` per edge whose bytes cross GPUs, sorted by edge: from the task's
    ``sigma`` where it crosses nodes, else from the source's end; it ends when the bytes arrive
    (start + the comm model's delay)."""
    dev, start = sched
    sigma = getattr(sched, "sigma", None) or {}
    out = []
    for u, v, nbytes in sorted(workload.graph.edges(data="bytes")):
        i, j = inst.index[u], inst.index[v]
        a, b = int(dev[i]), int(dev[j])
        if a == b or nbytes <= 0:
            continue
        t0 = float(sigma.get((i, j), start[i] + inst.dur[i][a]))
        out.append(Transfer(u, v, a, b, int(nbytes), t0, t0 + comm.delay(u, v, a, b, nbytes)))
    return out
