"""Bi-level coarsening: merge operations, solve the smaller MIP, expand, polish.

A coarse op is an ordered group of fine ops that run back-to-back on one GPU, in group order.
Merges, in this order, until the op count reaches the target:

1. **micro-batch groups**: ops of consecutive micro-batches with the same (stage, phase, chunk)
   on the same single GPU: a pipeline with fewer, larger micro-batches (it keeps the pipeline's
   shape, so symmetry breaking still applies to the coarse model);
2. **chains**: ``u -> v`` where ``v`` is ``u``'s only successor and ``u`` is ``v``'s only
   predecessor, same stream, same eligible GPUs;
3. **edges**: contract ``u -> v`` (shortest pair first) when no other path joins them, the stream
   matches and some GPU is eligible for both.

Why an expanded coarse plan is valid: a coarse op starts after every predecessor group ended
plus the largest delay of the fine edges it stands for, so each fine op inside starts no earlier;
a coarse op allocates its members' bytes at its start and frees them when every group holding
one of their release ops has ended, so fine memory is never above the coarse memory.

The polish step (:func:`engine.planners.mip.lns.improve`) re-solves windows of fine ops around the
critical path with everything else pinned to its GPU and its place in its stream's order.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Any

from engine.core.errors import InputError
from engine.planners.mip.instance import Instance
from engine.planners.mip.lns import improve
from engine.planners.mip.solution import Solution, solve_instance
from engine.planners.mip.symmetry import twin_arcs
from engine.planners.mip.warm import Schedule, best_schedule, compact_safe, makespan, memory_ok

AUTO_PAIR_LIMIT = 20_000  # sequencing pairs above which merge="auto" coarsens


@dataclass
class Coarse:
    """A coarse instance and, per coarse op, its fine ops in the order they run."""

    inst: Instance
    members: list[list[int]]


def count_pairs(inst: Instance) -> int:
    """Sequencing pairs the model would need: ops that may share a stream and that no chain of
    arcs (micro-batch symmetry arcs included) orders."""
    arcs = twin_arcs(inst)
    view = inst.restricted(order_arcs=arcs) if arcs else inst
    desc = view.descendants()
    anc = [0] * len(view)
    for i, d in enumerate(desc):
        j, rest = 0, d
        while rest:
            if rest & 1:
                anc[j] |= 1 << i
            rest >>= 1
            j += 1
    total = 0
    for ops in view.resource_ops().values():
        mask = 0
        for i in ops:
            mask |= 1 << i
        for i in ops:
            total += bin(mask & ~desc[i] & ~anc[i] & ~(1 << i)).count("1")
    return total // 2


def resolve_merge(merge, inst: Instance) -> int | None:
    """The target op count of ``merge`` ("none", "auto" or an int), or None for no coarsening."""
    if merge is None or merge == "none":
        return None
    if merge == "auto":
        pairs = count_pairs(inst)
        if pairs <= AUTO_PAIR_LIMIT:
            return None
        return max(20, int(len(inst) * math.sqrt(AUTO_PAIR_LIMIT / pairs)))
    try:
        target = int(merge)
    except (TypeError, ValueError):
        raise InputError(None, "solver.merge", f"must be auto, none or a target op count, got {merge!r}") from None
    if target < 1:
        raise InputError(None, "solver.merge", f"target op count must be >= 1, got {target}")
    return target


# -- building the coarse instance --------------------------------------------------------------------

class _Groups:
    """Union of fine ops into ordered groups, with the coarse graph kept acyclic."""

    def __init__(self, inst: Instance):
        self.inst = inst
        self.of = list(range(len(inst)))
        self.members = {i: [i] for i in range(len(inst))}
        self.devs = {i: set(inst.devices[i]) for i in range(len(inst))}
        self.succ: dict[int, set[int]] = {i: set() for i in range(len(inst))}
        self.pred: dict[int, set[int]] = {i: set() for i in range(len(inst))}
        for i, j in inst.arcs():
            self.succ[i].add(j)
            self.pred[j].add(i)

    def count(self) -> int:
        return len(self.members)

    def compatible(self, g: int, h: int) -> bool:
        inst = self.inst
        a, b = self.members[g][0], self.members[h][0]
        return (inst.stream(a) == inst.stream(b) and inst.occupies[a] is None and inst.occupies[b] is None
                and bool(self.devs[g] & self.devs[h]))

    def joined_elsewhere(self, g: int, h: int) -> bool:
        """True if a path from g to h (or h to g) exists other than the direct arc."""
        return _reaches(self, g, h, direct=False) or _reaches(self, h, g, direct=False)

    def merge(self, g: int, h: int) -> int:
        """Merge group h into g (g's members run first)."""
        self.members[g] = self.members[g] + self.members.pop(h)
        self.devs[g] &= self.devs.pop(h)
        for i in self.members[g]:
            self.of[i] = g
        for w in self.succ.pop(h):
            self.pred[w].discard(h)
            if w != g:
                self.succ[g].add(w)
                self.pred[w].add(g)
        for w in self.pred.pop(h):
            self.succ[w].discard(h)
            if w != g:
                self.pred[g].add(w)
                self.succ[w].add(g)
        self.succ[g].discard(g)
        self.pred[g].discard(g)
        return g


def _merge_chains(gr: _Groups, target: int) -> None:
    for g in sorted(gr.members):
        while g in gr.members and gr.count() > target and len(gr.succ[g]) == 1:
            h = next(iter(gr.succ[g]))
            if len(gr.pred[h]) != 1 or not gr.compatible(g, h) or gr.devs[g] != gr.devs[h]:
                break
            gr.merge(g, h)


def _merge_microbatches(gr: _Groups, target: int) -> None:
    inst = gr.inst
    tagged = [i for i in range(len(inst)) if "microbatch" in inst.tags[i] and inst.fixed_device(i) is not None
              and gr.members[gr.of[i]] == [i]]
    if not tagged or gr.count() <= target:
        return
    mbs = sorted({inst.tags[i]["microbatch"] for i in tagged})
    size = min(len(mbs), math.ceil(gr.count() / max(target, 1)))
    if size < 2:
        return
    buckets: dict[tuple, list[int]] = {}
    for i in tagged:
        t = inst.tags[i]
        key = (t.get("stage"), t.get("phase"), t.get("chunk"), inst.fixed_device(i), inst.kind[i])
        buckets.setdefault(key, []).append(i)
    for key in sorted(buckets, key=repr):
        ops = sorted(buckets[key], key=lambda i: inst.tags[i]["microbatch"])
        for k in range(0, len(ops), size):
            chunk = ops[k:k + size]
            g = gr.of[chunk[0]]
            for i in chunk[1:]:
                h = gr.of[i]
                if h != g and not _path_between(gr, g, h):
                    g = gr.merge(g, h)


def _path_between(gr: _Groups, g: int, h: int) -> bool:
    """True if any path joins g and h (merging unrelated ops must not create a cycle)."""
    return _reaches(gr, g, h) or _reaches(gr, h, g)


def _reaches(gr: _Groups, src: int, dst: int, direct: bool = True) -> bool:
    """True if a path of arcs leads from group ``src`` to ``dst`` (``direct=False``: other than
    the arc ``src -> dst`` itself)."""
    stack = [w for w in gr.succ[src] if direct or w != dst]
    seen = set(stack)
    while stack:
        w = stack.pop()
        if w == dst:
            return True
        for x in gr.succ[w]:
            if x not in seen:
                seen.add(x)
                stack.append(x)
    return False


def _merge_edges(gr: _Groups, target: int) -> None:
    """Contract arcs, keeping the most GPUs eligible first, then the shortest pair. A merge must
    keep the longest path through the new group, and the work pinned to any one GPU, within the
    fine instance's lower bound, and no group grows past twice the average coarse op: coarse
    plans then stay near the fine optimum instead of serialising the graph."""
    inst = gr.inst
    size = {g: sum(inst.pmin(i) for i in gr.members[g]) for g in gr.members}
    limit = 2.0 * sum(size.values()) / max(1, target)
    bound = inst.lower_bound()
    head, tail = _group_bounds(gr, size)
    pinned: dict[int, float] = {}
    for g, devs in gr.devs.items():
        if len(devs) == 1:
            (d,) = devs
            pinned[d] = pinned.get(d, 0.0) + size[g]

    def entry(g, h):
        return (-len(gr.devs[g] & gr.devs[h]), size[g] + size[h], g, h)

    heap = [entry(g, h) for g in gr.members for h in gr.succ[g]]
    heapq.heapify(heap)
    merges = 0
    while heap and gr.count() > target:
        key = heapq.heappop(heap)
        g, h = key[2], key[3]
        if g not in gr.members or h not in gr.members or h not in gr.succ[g] or key != entry(g, h):
            continue
        both = size[g] + size[h]
        if both > limit or not gr.compatible(g, h):
            continue
        new_head = max([head[g]] + [head[p] + size[p] for p in gr.pred[h] if p != g])
        new_tail = max([tail[h]] + [size[x] + tail[x] for x in gr.succ[g] if x != h])
        if new_head + both + new_tail > bound:
            continue
        devs = gr.devs[g] & gr.devs[h]
        if len(devs) == 1:
            (d,) = devs
            already = sum(size[x] for x in (g, h) if gr.devs[x] == devs)
            if pinned.get(d, 0.0) - already + both > bound:
                continue
        if gr.joined_elsewhere(g, h):
            continue
        for x in (g, h):
            if len(gr.devs[x]) == 1:
                (d,) = gr.devs[x]
                pinned[d] -= size[x]
        g = gr.merge(g, h)
        size[g] = both
        del size[h]
        if len(gr.devs[g]) == 1:
            (d,) = gr.devs[g]
            pinned[d] = pinned.get(d, 0.0) + both
        head[g], tail[g] = new_head, new_tail
        merges += 1
        if merges % 50 == 0:
            head, tail = _group_bounds(gr, size)
        for x in gr.succ[g]:
            heapq.heappush(heap, entry(g, x))
        for x in gr.pred[g]:
            heapq.heappush(heap, entry(x, g))


def _group_bounds(gr: _Groups, size: dict[int, float]) -> tuple[dict[int, float], dict[int, float]]:
    """Longest path (shortest durations, no delays) before and after each group."""
    order, indeg = [], {g: len(gr.pred[g]) for g in gr.members}
    stack = sorted(g for g, k in indeg.items() if k == 0)
    while stack:
        g = stack.pop()
        order.append(g)
        for x in gr.succ[g]:
            indeg[x] -= 1
            if indeg[x] == 0:
                stack.append(x)
    head = {g: 0.0 for g in gr.members}
    tail = {g: 0.0 for g in gr.members}
    for g in order:
        for x in gr.succ[g]:
            head[x] = max(head[x], head[g] + size[g])
    for g in reversed(order):
        for x in gr.succ[g]:
            tail[g] = max(tail[g], size[x] + tail[x])
    return head, tail


def coarsen(inst: Instance, target: int) -> Coarse:
    """Merge ``inst`` down to about ``target`` ops (fewer merges if nothing more is allowed)."""
    gr = _Groups(inst)
    _merge_microbatches(gr, target)
    _merge_chains(gr, target)
    _merge_edges(gr, target)
    return _build(inst, gr)


def _build(inst: Instance, gr: _Groups) -> Coarse:
    # coarse ops in topological order of their first member; members in the order they merged
    rank = {i: k for k, i in enumerate(inst.topo())}
    groups = sorted(gr.members.values(), key=lambda ms: min(rank[i] for i in ms))
    of = {}
    for k, ms in enumerate(groups):
        for i in ms:
            of[i] = k
    ids, kind, devices, dur, alloc, release, occupies, tags = [], [], [], [], [], [], [], []
    for k, ms in enumerate(groups):
        devs = sorted(set.intersection(*(set(inst.devices[i]) for i in ms)))
        ids.append(inst.ids[ms[0]] if len(ms) == 1 else f"{inst.ids[ms[0]]}+{len(ms) - 1}")
        kind.append(inst.kind[ms[0]])
        devices.append(tuple(devs))
        dur.append({d: sum(inst.dur[i][d] for i in ms) for d in devs})
        alloc.append(sum(inst.alloc[i] for i in ms))
        rel = {of[r] for i in ms for r in inst.release[i]} - {k}
        release.append(tuple(sorted(rel)))
        occupies.append(inst.occupies[ms[0]] if len(ms) == 1 else None)
        first = inst.tags[ms[0]]
        same = all({k: v for k, v in inst.tags[i].items() if k != "microbatch"} ==
                   {k: v for k, v in first.items() if k != "microbatch"} for i in ms)
        common = dict(first) if same else {}
        if same and "microbatch" in first:
            common["microbatch"] = min(inst.tags[i]["microbatch"] for i in ms)
        tags.append(common)
    edges: dict[tuple[int, int], dict[tuple[int, int], float]] = {}
    for (i, j), delays in inst.edges.items():
        a, b = of[i], of[j]
        if a == b:
            continue
        cur = edges.setdefault((a, b), {})
        for (x, y), t in delays.items():
            if x in devices[a] and y in devices[b]:
                cur[(x, y)] = max(cur.get((x, y), 0.0), t)
    arcs = {(of[i], of[j]) for i, j in inst.order_arcs if of[i] != of[j]}
    coarse = Instance(ids=ids, kind=kind, devices=devices, dur=dur, alloc=alloc, release=release,
                      n_devices=inst.n_devices, static=dict(inst.static), cap=dict(inst.cap), edges=edges,
                      occupies=occupies, tags=tags, order_arcs=arcs)
    return Coarse(coarse, groups)


def expand(coarse: Coarse, fine: Instance, sched: Schedule) -> Schedule:
    """Fine devices and starts: each group's members back-to-back from the group's start."""
    dev, start = [0] * len(fine), [0.0] * len(fine)
    cdev, cstart = sched
    for k, ms in enumerate(coarse.members):
        t = cstart[k]
        for i in ms:
            dev[i], start[i] = cdev[k], t
            t += fine.dur[i][cdev[k]]
    return dev, start


# -- solve ------------------------------------------------------------------------------------------

def solve_coarsened(inst: Instance, target: int, warm: Schedule | None, opts: dict, deadline: float):
    """Coarsen to ``target`` ops, solve (half the time left), expand, polish by window MIPs on
    the fine ops (the rest); returns (Solution, ops after merging)."""
    coarse = coarsen(inst, target)
    cwarm = best_schedule(coarse.inst)
    candidates: list[tuple[str, Schedule]] = []
    if warm is not None:
        candidates.append(("warm_start", warm))
    n_bin = 0
    meta: dict[str, Any] = {}
    pairs = count_pairs(coarse.inst)
    meta["coarse_pairs"] = pairs
    if pairs > 3 * AUTO_PAIR_LIMIT and cwarm is not None:
        # the merge rules could not shrink this graph enough for a MIP: polish the best of the
        # fine warm start and the expanded coarse list schedule instead
        meta["coarse_status"] = "skipped"
        fine = compact_safe(inst, expand(coarse, inst, cwarm[1]))
        if memory_ok(inst, fine):
            candidates.append(("coarse_list", fine))
    elif cwarm is not None or warm is None:
        left = deadline - time.perf_counter()
        csol = solve_instance(coarse.inst, cwarm[1] if cwarm else None, **{**opts, "time_limit_s": max(1.0, 0.5 * left)})
        n_bin = csol.n_binaries
        fine = compact_safe(inst, expand(coarse, inst, csol.sched))
        if memory_ok(inst, fine):
            candidates.append(("coarse", fine))
        meta.update({"coarse_makespan_us": makespan(coarse.inst, csol.sched), "coarse_status": csol.status})
    if not candidates:
        # no plan in hand proves nothing: say so, not "infeasible"
        raise InputError(None, "solver.merge", "no plan found for the coarsened instance under the memory caps within "
                         "the time limit (not proven infeasible: raise the time limit or use merge none)")
    name, best = min(candidates, key=lambda c: makespan(inst, c[1]))
    before = makespan(inst, best)
    if opts["speedups"].get("lns", True):
        best, stats = improve(inst, best, deadline - time.perf_counter(), opts)
        meta.update(stats)
        n_bin = max(n_bin, stats["lns_max_binaries"])
    source = "polish" if makespan(inst, best) < before - 1e-9 else name
    lb = inst.lower_bound()
    span = makespan(inst, best)
    gap = max(0.0, (span - lb) / span) if span > 0 else 0.0
    status = "optimal" if gap <= 1e-9 else "time_limit"
    meta["merged_source"] = source
    return Solution(best, status, lb, gap, n_bin, "solver", meta=meta), len(coarse.inst)
