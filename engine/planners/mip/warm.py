"""Warm starts for the MIP: small generic list schedules on an :class:`Instance`.

:func:`parallel_schedule` (non-delay, time-stepping), run with a few priority rules, the best
result wins: at each event time every idle stream takes the highest-priority op whose inputs have
arrived and whose allocation fits the GPU's memory (and, optionally, an in-flight limit on
allocations waiting for their release). The HEFT list schedule is the heuristic's
(:mod:`engine.planners.heuristic`), which :func:`engine.planners.mip.plan.choose_warm_start` adds.

Priority rules: critical path (longest ``p + tail`` first), earliest head first, ops that free
memory first, and, when ops carry pipeline phase tags, "zero-bubble" order (B before F before W,
then micro-batch) and memory-lean order (B, W, F). A
schedule is ``(device, start)`` lists indexed like the instance; times in us.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

from engine.core.memory import memory_events
from engine.core.timing import OrderCycle, earliest_times
from engine.planners.mip.instance import Instance

Schedule = tuple[list[int], list[float]]
PHASE_RANK = {"B": 0, "F": 1, "W": 2}  # zero-bubble: W fills gaps
LEAN_RANK = {"B": 0, "W": 1, "F": 2}  # memory-lean: W right after B frees the activation


def priority_rules(inst: Instance) -> dict[str, list[tuple]]:
    """Name -> per-op sort key (smaller runs first)."""
    head, tail = inst.heads(), inst.tails()
    n = len(inst)
    rules: dict[str, list[tuple]] = {
        "critical_path": [(-(inst.pmin(i) + tail[i]), head[i], i) for i in range(n)],
        "head": [(head[i], -tail[i], i) for i in range(n)],
    }
    frees: set[int] = set()
    for a in range(n):
        if inst.alloc[a] > 0:
            frees.update(r for r in inst.releasers(a) if r != a)
    if frees:  # memory-lean: what frees memory first
        rules["release_first"] = [(0 if i in frees else 1, -(inst.pmin(i) + tail[i]), i) for i in range(n)]
    if any("phase" in t for t in inst.tags):
        for name, rank in (("zero_bubble", PHASE_RANK), ("one_f_one_b", LEAN_RANK)):
            rules[name] = [(rank.get(inst.tags[i].get("phase", ""), 3), inst.tags[i].get("microbatch", 0), -tail[i], i)
                           for i in range(n)]
    return rules


def _arrival(inst: Instance, i: int, d: int, dev: list[int], end: list[float]) -> float:
    preds = inst.preds()[i]
    return max((end[k] + inst.delay(k, i, dev[k], d) for k in preds), default=0.0)


def parallel_schedule(inst: Instance, key: list[tuple], inflight: int | None = None) -> Schedule | None:
    """Non-delay list schedule honouring memory caps; ``None`` if it deadlocks on memory."""
    n = len(inst)
    preds, succs = inst.preds(), inst.succs()
    missing = [len(preds[i]) for i in range(n)]
    dev, start, end = [-1] * n, [0.0] * n, [0.0] * n
    free_at: dict[tuple[int, str], float] = {}
    used = dict(inst.static)
    open_allocs = {d: 0 for d in range(inst.n_devices)}
    pending = [len(inst.releasers(a)) for a in range(n)]
    waiting_on: dict[int, list[int]] = {}
    for a in range(n):
        if inst.alloc[a] > 0 or inst.release[a]:
            for r in inst.releasers(a):
                waiting_on.setdefault(r, []).append(a)
    frees: list[tuple[float, int]] = []  # (time, op whose allocation is freed)
    ready = sorted((i for i in range(n) if missing[i] == 0), key=lambda i: key[i])
    t, done = 0.0, 0
    while done < n:
        while frees and frees[0][0] <= t + 1e-9:
            _, a = heapq.heappop(frees)
            used[dev[a]] -= inst.alloc[a]
            if inst.release[a]:
                open_allocs[dev[a]] -= 1
        started = []
        for i in ready:
            best = None
            for d in inst.devices[i]:
                if any(free_at.get(r, 0.0) > t + 1e-9 for r in inst.resources(i, d)):
                    continue
                if _arrival(inst, i, d, dev, end) > t + 1e-9:
                    continue
                if inst.alloc[i] and used[d] + inst.alloc[i] > inst.cap[d]:
                    continue
                if inflight is not None and inst.release[i] and open_allocs[d] >= inflight:
                    continue
                cand = (inst.dur[i][d], d)
                if best is None or cand < best:
                    best = cand
            if best is None:
                continue
            d = best[1]
            dev[i], start[i], end[i] = d, t, t + inst.dur[i][d]
            for res in inst.resources(i, d):
                free_at[res] = end[i]
            used[d] += inst.alloc[i]
            if inst.release[i]:
                open_allocs[d] += 1
            started.append(i)
        for i in started:
            done += 1
            for a in waiting_on.get(i, ()):
                pending[a] -= 1
                if pending[a] == 0:
                    heapq.heappush(frees, (max(end[r] for r in inst.releasers(a)), a))
            for j in succs[i]:
                missing[j] -= 1
        if started:
            new = [j for i in started for j in succs[i] if missing[j] == 0]
            ready = sorted(set(i for i in ready if dev[i] < 0) | set(new), key=lambda i: key[i])
            continue
        nxt = [v for v in free_at.values() if v > t + 1e-9] + [f for f, _ in frees if f > t + 1e-9]
        for i in ready:
            for d in inst.devices[i]:
                arr = _arrival(inst, i, d, dev, end)
                if arr > t + 1e-9:
                    nxt.append(arr)
        if not nxt:
            return None  # nothing runs and nothing will: memory deadlock
        t = min(nxt)
    return dev, start


def candidate_schedules(inst: Instance, budget_runs: int = 24) -> list[tuple[str, Schedule]]:
    """Non-delay schedules from every rule, without and with in-flight limits."""
    out: list[tuple[str, Schedule]] = []
    rules = priority_rules(inst)
    n_dev = len({d for ds in inst.devices for d in ds}) or 1
    limits: list[int | None] = [None]
    if _has_release(inst):
        limits += sorted({max(1, n_dev // 2), n_dev, n_dev + 1, 2 * n_dev})
    for name, key in rules.items():
        for lim in limits:
            if len(out) >= budget_runs:
                break
            sched = parallel_schedule(inst, key, lim if _has_release(inst) else None)
            if sched is not None:
                out.append((f"list:{name}:{lim}", sched))
            if not _has_release(inst):
                break
    return out


def _has_release(inst: Instance) -> bool:
    return any(inst.release[i] for i in range(len(inst)))


def free_arcs(inst: Instance, dev: list[int], start: list[float]) -> list[tuple[int, int]]:
    """Pairs (r, o): allocating op ``o`` started after release op ``r`` had freed an allocation
    on ``o``'s GPU (so the plan's memory may rely on ``r`` ending first)."""
    n = len(inst)
    end = [start[i] + inst.dur[i][dev[i]] for i in range(n)]
    allocs = [a for a in range(n) if inst.alloc[a] > 0]
    out: set[tuple[int, int]] = set()
    for o in allocs:
        for a in allocs:
            if a != o and dev[a] == dev[o] and start[a] <= start[o]:
                rel = inst.releasers(a)
                if all(end[r] <= start[o] + 1e-9 for r in rel):
                    out.update((r, o) for r in rel if r != o)
    return sorted(out)


def semi_active(inst: Instance, dev: list[int], start: list[float], keep_frees: bool = False) -> Schedule:
    """Keep each stream's order (by start), start every op as early as its stream and inputs
    allow. Returns the new starts (same devices).

    With ``keep_frees``, an allocating op also waits for the release ops that had freed memory
    before it started (they may run on other GPUs, which plain compaction ignores)."""
    n = len(inst)
    dur = [inst.dur[i][dev[i]] for i in range(n)]
    preds = inst.preds()
    arcs = [(k, i, dur[k] + inst.delay(k, i, dev[k], dev[i])) for i in range(n) for k in preds[i]]
    rank = {i: k for k, i in enumerate(inst.topo())}
    last: dict[tuple[int, str], int] = {}
    for i in sorted(range(n), key=lambda i: (start[i], start[i] + dur[i], rank[i])):
        for res in inst.resources(i, dev[i]):
            if res in last:
                arcs.append((last[res], i, dur[last[res]]))
            last[res] = i
    if keep_frees:
        arcs += [(r, o, dur[r]) for r, o in free_arcs(inst, dev, start)]
    new_start = earliest_times(n, arcs)
    return dev, new_start


def compact_safe(inst: Instance, sched: Schedule) -> Schedule:
    """The most compact of: plain semi-active, semi-active keeping frees, ``sched`` itself,
    that still fits memory (``sched`` is returned unchanged if neither compaction does)."""
    for keep in (False, True):
        try:
            out = semi_active(inst, *sched, keep_frees=keep)
        except OrderCycle:  # starts within float tolerance of a predecessor's end can order ops backwards
            return sched
        if memory_ok(inst, out):
            return out
    return sched


def makespan(inst: Instance, sched: Schedule) -> float:
    dev, start = sched
    return max((start[i] + inst.dur[i][dev[i]] for i in range(len(inst))), default=0.0)


def resident_events(inst: Instance, sched: Schedule) -> dict[int, list[tuple[float, int, int, int]]]:
    """Per GPU, the memory events of ``sched`` (:func:`engine.core.memory.memory_events`): an
    allocation lives from its op's start until the last of its releasers ends; frees within
    1e-9 (relative) of an instant come before the allocations at it."""
    dev, start = sched
    end = [start[i] + inst.dur[i][dev[i]] for i in range(len(inst))]
    allocations: dict[int, list[tuple[int, int, float, float]]] = {}
    for a in range(len(inst)):
        if inst.alloc[a] > 0:
            free = max(end[r] for r in inst.releasers(a))
            allocations.setdefault(dev[a], []).append((a, inst.alloc[a], start[a], free))
    return {d: memory_events(allocs, 1e-9) for d, allocs in allocations.items()}


def memory_ok(inst: Instance, sched: Schedule) -> bool:
    """Resident bytes at every op start (frees at the same instant first) fit the cap."""
    for d, events in resident_events(inst, sched).items():
        live = inst.static[d]
        for _, kind, _, delta in events:
            live += delta
            if kind == 1 and live > inst.cap[d]:
                return False
    return True


def best_schedule(inst: Instance, extra: Sequence[tuple[str, Schedule]] = (),
                  accept: Callable[[Schedule], bool] | None = None) -> tuple[str, Schedule] | None:
    """The shortest memory-feasible schedule among the candidates (semi-active), or None."""
    best = None
    for name, raw in list(extra) + candidate_schedules(inst):
        sched = compact_safe(inst, raw)
        if not memory_ok(inst, sched) or (accept is not None and not accept(sched)):
            continue
        span = makespan(inst, sched)
        if best is None or span < best[0] - 1e-9:
            best = (span, name, sched)
    return None if best is None else (best[1], best[2])
