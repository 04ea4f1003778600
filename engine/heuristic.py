"""HEFT-style list scheduling under memory caps: :func:`plan_heuristic`.

1. Upward rank: ``rank(o) = duration(o) + max over successors s of (mean comm(o->s) + rank(s))``
   (the mean over GPU pairs, or the exact delay when both ends are pinned to one GPU each).
2. Ops become ready when all their predecessors are placed; the ready op of highest rank (ties:
   topological index) goes next, on the eligible GPU and start that finish it earliest given
   communication delays, filling an idle gap of its stream if one fits (insertion-based, looking
   at up to ``SCAN_LIMIT`` gaps after its ready time). A collective goes on its group's first GPU
   at a time when the comm stream of every GPU in its group is free.
3. Memory (only on GPUs where all allocations that could land there exceed the cap): an
   allocation is live from its op's start until the latest end of the op and its ``release``
   ops; while a release op is unplaced it is live to infinity. An op may start at ``t`` only if
   the usage from ``t`` on leaves room for it, so later frees only ever add slack.
   Deadlock avoidance: placing an allocation reserves room for the not yet placed allocations
   (pinned to one GPU) that must run before it can be freed, i.e. the allocating ancestors of its
   release ops; an op is placed only if every GPU's open + reserved bytes stay within the cap.
   Ops that do not fit wait; while some wait, ops that allocate nothing go first (they are what
   frees memory: B/W of started micro-batches). If nothing fits that way, the best op that fits
   the cap alone is placed; if none does, :class:`InfeasibleError` names op, GPU and bytes over.

Times in us, sizes in bytes. Deterministic: ties break on topological index and GPU index.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from typing import Any

from engine.commtable import DelayTable
from engine.errors import InfeasibleError
from engine.ir import Placement, Plan, Transfer, Workload
from engine.validate import memory_caps

SCAN_LIMIT = 64  # gaps examined after an op's ready time before it goes after the stream's last op
INF = math.inf


def plan_heuristic(workload: Workload, cluster: Any, comm: Any, memory_cap: int | None = None) -> Plan:
    """A valid plan of ``workload`` on ``cluster`` by list scheduling (module docstring).

    Raises :class:`engine.errors.InfeasibleError` when an op has no eligible GPU or memory
    cannot be found for it.
    """
    return _ListScheduler(workload, cluster, comm, memory_cap).run()


def _fit(gs: list[float], ge: list[float], tail: float, r: float, p: float) -> tuple[float, int]:
    """Earliest start >= ``r`` of a ``p`` us op on a stream busy up to ``tail`` except for the
    idle gaps ``[gs[k], ge[k])`` (sorted, disjoint, non-empty); returns (start, gap index or -1
    for after ``tail``)."""
    if r >= tail:
        return r, -1
    k = bisect_right(ge, r)
    stop = min(len(ge), k + SCAN_LIMIT)
    while k < stop:
        t = gs[k] if gs[k] > r else r
        if t + p <= ge[k]:
            return t, k
        k += 1
    return tail, -1


def _indexed(workload: Workload) -> tuple[list[str], list[Any], list[tuple[int, int, int]]]:
    """Op ids in the lexicographic topological order (ties by id, as
    ``Workload.topological_order``), their ops, and edges as (src index, dst index, bytes)."""
    graph = workload.graph
    by_id = sorted(graph.nodes)
    pos = {o: k for k, o in enumerate(by_id)}
    n = len(by_id)
    out: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    raw = [(pos[u], pos[v], b) for u, v, b in graph.edges(data="bytes")]
    for u, v, _ in raw:
        out[u].append(v)
        indeg[v] += 1
    heap = [k for k in range(n) if indeg[k] == 0]
    heapq.heapify(heap)
    topo = []
    while heap:
        u = heapq.heappop(heap)
        topo.append(u)
        for v in out[u]:
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(heap, v)
    rank_of = [0] * n
    for i, k in enumerate(topo):
        rank_of[k] = i
    names = [by_id[k] for k in topo]
    node_op = dict(graph.nodes(data="op"))
    edges = sorted((rank_of[u], rank_of[v], b) for u, v, b in raw)
    return names, [node_op[o] for o in names], edges


class _Memory:
    """Per GPU: a timeline of net allocation changes, open (unfreed) and reserved bytes."""

    def __init__(self, caps: list[int], static: list[int]):
        n = len(caps)
        self.caps, self.static = caps, static
        self.open = [0] * n
        self.reserved = [0] * n
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.deltas: list[list[int]] = [[] for _ in range(n)]

    def add(self, d: int, t: float, delta: int) -> None:
        times, deltas = self.times[d], self.deltas[d]
        k = bisect_left(times, t)
        if k < len(times) and times[k] == t:
            deltas[k] += delta
        else:
            times.insert(k, t)
            deltas.insert(k, delta)

    def earliest(self, d: int, m: int, r: float) -> float:
        """Earliest ``t >= r`` from which usage on ``d`` stays <= cap - ``m`` (INF if never)."""
        room = self.caps[d] - m
        u = self.static[d] + self.open[d]  # usage after the last event
        if u > room:
            return INF
        times, deltas = self.times[d], self.deltas[d]
        k = len(times) - 1
        while k >= 0 and times[k] > r:
            before = u - deltas[k]
            if before > room:
                return times[k]
            u = before
            k -= 1
        return r

    def used(self, d: int) -> int:
        """Bytes that stay resident on ``d`` once every placed, freed allocation is gone."""
        return self.static[d] + self.open[d]


class _ListScheduler:
    def __init__(self, workload: Workload, cluster: Any, comm: Any, memory_cap: int | None):
        self.workload = workload
        self.n_gpus = n_gpus = cluster.n_gpus
        self.table = DelayTable(comm, n_gpus)
        model = cluster.gpu_model
        self.names, self.ops, edges = _indexed(workload)
        ops = self.ops
        n = len(ops)
        self.dur = [op.duration_on(model) for op in ops]
        self.kind = [1 if op.kind == "comm" else 0 for op in ops]
        self.group = [op.collective.group if op.collective is not None else None for op in ops]
        every = tuple(range(n_gpus))
        self.elig: list[tuple[int, ...]] = []
        for op in ops:
            if op.collective is not None:
                g0 = op.collective.group[0]
                outside = [g for g in op.collective.group if not 0 <= g < n_gpus]
                if outside or (op.devices is not None and g0 not in op.devices):
                    raise InfeasibleError(None, f"ops[{op.id}]", f"collective group {list(op.collective.group)} must lie "
                                          f"in GPUs 0..{n_gpus - 1} and its first GPU be eligible")
                self.elig.append((g0,))
                continue
            e = every if op.devices is None else tuple(d for d in op.devices if d < n_gpus)
            if not e:
                raise InfeasibleError(None, f"ops[{op.id}]", f"eligible GPUs {list(op.devices)} are not in this "
                                      f"cluster of {n_gpus} GPUs")
            self.elig.append(e)
        table = self.table
        # preds[i]: (pred index, bytes, observed delay or None); succs for the rank.
        self.preds: list[list[tuple[int, int, float | None]]] = [[] for _ in range(n)]
        succs: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        self.edges = edges
        names, elig, overrides = self.names, self.elig, table.overrides
        for u, v, b in edges:
            ov = overrides.get((names[u], names[v])) if overrides else None
            self.preds[v].append((u, b, ov))
            if b <= 0:
                c = 0.0
            elif ov is not None:
                c = ov
            elif len(elig[u]) == 1 and len(elig[v]) == 1:
                c = table.route(elig[u][0], elig[v][0], b)
            else:
                c = table.mean(b)
            succs[u].append((v, c))
        self.rank = rank = [0.0] * n
        for i in range(n - 1, -1, -1):
            best = 0.0
            for s, c in succs[i]:
                if c + rank[s] > best:
                    best = c + rank[s]
            rank[i] = self.dur[i] + best
        self.n_succ = [len(s) for s in succs]
        self.succ_idx = [[s for s, _ in ss] for ss in succs]
        self._setup_memory(workload, cluster, memory_cap)

    def _setup_memory(self, workload: Workload, cluster: Any, memory_cap: int | None) -> None:
        n_gpus, ops = self.n_gpus, self.ops
        index = {o: i for i, o in enumerate(self.names)}
        caps = memory_caps(workload, cluster, memory_cap)
        static = [workload.static_memory_bytes.get(d, 0) for d in range(n_gpus)]
        for d in range(n_gpus):
            if static[d] > caps[d]:
                raise InfeasibleError(None, f"static_memory_bytes[{d}]", f"GPU {d} static memory {static[d]} bytes "
                                      f"exceeds the cap {caps[d]} by {static[d] - caps[d]} bytes")
        worst = list(static)
        for i, op in enumerate(ops):
            if op.memory_bytes > 0:
                for d in self.elig[i]:
                    worst[d] += op.memory_bytes
        self.binding = [worst[d] > caps[d] for d in range(n_gpus)]
        self.mem = _Memory(caps, static) if any(self.binding) else None
        n = len(ops)
        self.mbytes = [op.memory_bytes if self.mem is not None else 0 for op in ops]
        self.allocating = [m > 0 and any(self.binding[d] for d in e) for m, e in zip(self.mbytes, self.elig)]
        self.pinned = [e[0] if len(e) == 1 else -1 for e in self.elig]
        self.release = [sorted({index[r] for r in op.release}) for op in ops]
        self.released_by: list[list[int]] = [[] for _ in range(n)]
        self.pending = [0] * n
        for i in range(n):
            if self.allocating[i]:
                self.pending[i] = len(self.release[i])
                for r in self.release[i]:
                    self.released_by[r].append(i)
        self.rel_end = [-INF] * n
        self.is_open = [False] * n
        self.reserved = [False] * n

    # -- memory rules ---------------------------------------------------------------------------
    def _blockers(self, i: int) -> list[int]:
        """Unplaced ops with memory that must be placed before ``i``'s allocation can be freed:
        the allocating ancestors of its unplaced release ops (and those ops themselves)."""
        dev, preds, mbytes = self.dev, self.preds, self.mbytes
        stack = [r for r in self.release[i] if dev[r] < 0 and r != i]
        seen = set(stack)
        found = []
        while stack:
            v = stack.pop()
            if mbytes[v] > 0:
                found.append(v)
            for q, _, _ in preds[v]:
                if dev[q] < 0 and q != i and q not in seen:
                    seen.add(q)
                    stack.append(q)
        return found

    def _new_demand(self, i: int) -> tuple[dict[int, int], list[int]]:
        """The blockers of ``i`` pinned to a capped GPU and not reserved yet: per GPU their
        bytes, and the ops."""
        pinned, binding, reserved, mbytes = self.pinned, self.binding, self.reserved, self.mbytes
        per_gpu: dict[int, int] = {}
        found = []
        for v in self._blockers(i):
            g = pinned[v]
            if g >= 0 and binding[g] and not reserved[v]:
                found.append(v)
                per_gpu[g] = per_gpu.get(g, 0) + mbytes[v]
        return per_gpu, found

    def _strict_ok(self, i: int, d: int, demand: dict[int, int]) -> bool:
        """Open + reserved bytes on ``d`` leave room for ``i`` and what ``i`` newly reserves there."""
        mem, m = self.mem, self.mbytes[i]
        reserved_d = mem.reserved[d] - (m if self.reserved[i] else 0)
        return mem.used(d) + m + reserved_d + demand.get(d, 0) <= mem.caps[d]

    def _demand_fits_elsewhere(self, demand: dict[int, int]) -> bool:
        mem = self.mem
        return all(mem.used(g) + mem.reserved[g] + b <= mem.caps[g] for g, b in demand.items())

    # -- placement ------------------------------------------------------------------------------
    def _choose(self, i: int, mode: str) -> tuple[float, int, dict[int, int], list[int]] | None:
        """Best (start, GPU, new reservations per GPU, reserved ops) for op ``i`` or None.

        ``mode``: "free" (no memory rules apply), "strict" (caps and reservations) or "loose" (caps only).
        """
        p = self.dur[i]
        demand, found = {}, []
        if mode == "strict":
            demand, found = self._new_demand(i)
            if not self._demand_fits_elsewhere(demand):
                return None
        group = self.group[i]
        gs, ge, tail = self.gap_start, self.gap_end, self.tail
        best_f, best = INF, None
        preds, dev, en, table = self.preds[i], self.dev, self.end, self.table
        lat, inv, affine = table.lat, table.inv, table.affine
        for d in self.elig[i]:
            r = 0.0  # when every input has reached GPU d
            for q, b, ov in preds:
                t = en[q]
                dq = dev[q]
                if dq != d and b > 0:
                    if ov is not None:
                        t += ov
                    elif affine:
                        t += lat[dq][d] + b * inv[dq][d]
                    else:
                        t += table.route(dq, d, b)
                if t > r:
                    r = t
            if r + p >= best_f:
                continue
            if mode != "free" and self.binding[d]:
                if mode == "strict" and not self._strict_ok(i, d, demand):
                    continue
                t = self.mem.earliest(d, self.mbytes[i], r)
                if t == INF:
                    continue
                r = t
            if group is not None:
                s = self._fit_group(group, r, p)
            else:
                k = 2 * d + self.kind[i]
                s = _fit(gs[k], ge[k], tail[k], r, p)[0]
            if s + p < best_f:
                best_f, best = s + p, (s, d)
        if best is None:
            return None
        return best[0], best[1], demand, found

    def _fit_group(self, group: tuple[int, ...], r: float, p: float) -> float:
        """Earliest start >= ``r`` free on the comm stream of every GPU of ``group``."""
        t = r
        while True:
            t0 = t
            for g in group:
                k = 2 * g + 1
                t = _fit(self.gap_start[k], self.gap_end[k], self.tail[k], t, p)[0]
            if t == t0:
                return t

    def _commit(self, i: int, s: float, d: int, found: list[int]) -> bool:
        """Place op ``i`` on GPU ``d`` at ``s``; returns True if some allocation got freed."""
        p = self.dur[i]
        e = s + p
        self.dev[i], self.start[i], self.end[i] = d, s, e
        keys = [2 * g + 1 for g in self.group[i]] if self.group[i] is not None else [2 * d + self.kind[i]]
        for k in keys:
            self._occupy(k, s, e)
        if self.mem is None:
            return False
        mem, mbytes = self.mem, self.mbytes
        if self.reserved[i]:
            self.reserved[i] = False
            mem.reserved[d] -= mbytes[i]
        for y in found:
            self.reserved[y] = True
            mem.reserved[self.pinned[y]] += mbytes[y]
        if self.allocating[i] and self.binding[d]:
            mem.add(d, s, mbytes[i])
            if self.pending[i] == 0:
                mem.add(d, max(e, self.rel_end[i]), -mbytes[i])
            else:
                mem.open[d] += mbytes[i]
                self.is_open[i] = True
        freed = False
        for a in self.released_by[i]:
            self.pending[a] -= 1
            if e > self.rel_end[a]:
                self.rel_end[a] = e
            if self.pending[a] == 0 and self.is_open[a]:
                da = self.dev[a]
                mem.add(da, max(self.end[a], self.rel_end[a]), -mbytes[a])
                mem.open[da] -= mbytes[a]
                self.is_open[a] = False
                freed = True
        return freed

    def _occupy(self, k: int, s: float, e: float) -> None:
        """Mark ``[s, e)`` busy on stream ``k`` (it lies in one gap or after the tail)."""
        gs, ge = self.gap_start[k], self.gap_end[k]
        g = _fit(gs, ge, self.tail[k], s, e - s)[1]
        if g < 0:
            if s > self.tail[k]:
                gs.append(self.tail[k])
                ge.append(s)
            self.tail[k] = max(self.tail[k], e)
            return
        a, b = gs[g], ge[g]
        new = [(x, y) for x, y in ((a, s), (e, b)) if y > x]
        gs[g:g + 1] = [x for x, _ in new]
        ge[g:g + 1] = [y for _, y in new]

    def _infeasible(self, blocked: list[int]) -> InfeasibleError:
        """The error for a dead end: names the waiting op that stands in the way of freeing an
        open allocation (else the first waiting op), the GPU closest to fitting it and the excess."""
        i, why = blocked[0], ""
        waiting = set(blocked)
        for a in (a for a in range(len(self.ops)) if self.is_open[a]):
            stuck = [y for y in self._blockers(a) if y in waiting]
            if stuck:
                i, why = min(stuck), f" (needed before {self.names[a]}'s allocation can be freed)"
                break
        mem, m, op = self.mem, self.mbytes[i], self.ops[i]
        over, d = min((mem.used(d) + m - mem.caps[d], d) for d in self.elig[i])
        return InfeasibleError(None, f"ops[{op.id}]", f"no memory for {op.id}{why}: it allocates {m} bytes; on GPU {d} "
                               f"{mem.used(d)} bytes (static {mem.static[d]}) stay live under the cap {mem.caps[d]}, "
                               f"{over} bytes over")

    # -- the list -------------------------------------------------------------------------------
    def run(self) -> Plan:
        n = len(self.ops)
        self.dev = [-1] * n
        self.start = [0.0] * n
        self.end = [0.0] * n
        # per stream (2 * GPU + kind): idle gaps before the tail, after which it is free
        self.gap_start: list[list[float]] = [[] for _ in range(2 * self.n_gpus)]
        self.gap_end: list[list[float]] = [[] for _ in range(2 * self.n_gpus)]
        self.tail = [0.0] * (2 * self.n_gpus)
        rank, allocating = self.rank, self.allocating
        indeg = [len(p) for p in self.preds]
        free_heap: list[tuple[float, int]] = []  # ready ops that allocate nothing on a capped GPU
        alloc_heap: list[tuple[float, int]] = []
        for i in range(n):
            if indeg[i] == 0:
                heapq.heappush(alloc_heap if allocating[i] else free_heap, (-rank[i], i))
        blocked: list[int] = []
        loose = 0
        placed = 0
        while placed < n:
            if free_heap and (blocked or not alloc_heap or free_heap[0] < alloc_heap[0]):
                i = heapq.heappop(free_heap)[1]
                choice = self._choose(i, "free" if self.mem is None or not allocating[i] else "strict")
            elif alloc_heap:
                i = heapq.heappop(alloc_heap)[1]
                choice = self._choose(i, "strict")
            else:
                blocked.sort(key=lambda k: (-rank[k], k))
                for i in blocked:
                    choice = self._choose(i, "loose")
                    if choice is not None:
                        blocked.remove(i)
                        loose += 1
                        break
                else:
                    raise self._infeasible(blocked)
            if choice is None:
                blocked.append(i)
                continue
            s, d, _, found = choice
            if self._commit(i, s, d, found) and blocked:
                for k in blocked:
                    heapq.heappush(alloc_heap, (-rank[k], k))
                blocked = []
            placed += 1
            for v in self.succ_idx[i]:
                indeg[v] -= 1
                if indeg[v] == 0:
                    heapq.heappush(alloc_heap if allocating[v] else free_heap, (-rank[v], v))
        return self._plan(loose)

    def _plan(self, loose: int) -> Plan:
        placements = {name: Placement(self.dev[i], self.start[i], self.end[i]) for i, name in enumerate(self.names)}
        meta = {"memory_checked": self.mem is not None, "loose_placements": loose}
        # per GPU by (start, end, topological index): unlike ids, the index orders zero-length
        # ops that start together the way their dependencies do
        order: dict[int, list[str]] = {}
        for i in sorted(range(len(self.names)), key=lambda k: (self.start[k], self.end[k], k)):
            order.setdefault(self.dev[i], []).append(self.names[i])
        return Plan(workload=self.workload.name, placements=placements, planner="heuristic", status="heuristic",
                    makespan_us=max(self.end, default=0.0), order=dict(sorted(order.items())),
                    transfers=self._transfers(), meta=meta)

    def _transfers(self) -> list[Transfer]:
        """Transfers of the edges whose bytes cross GPUs, sorted by (src, dst) like ``make_transfers``."""
        names, dev, end, delay = self.names, self.dev, self.end, self.table.delay
        out = []
        for u, v, b in self.edges:
            if b > 0 and dev[u] != dev[v]:
                t = delay(names[u], names[v], dev[u], dev[v], b)
                out.append(Transfer(names[u], names[v], dev[u], dev[v], b, end[u], end[u] + t))
        out.sort(key=lambda tr: (tr.src, tr.dst))
        return out
