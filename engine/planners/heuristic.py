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
   Deadlock avoidance (a pure list scheduler can fill every cap with activations whose frees
   need yet more memory): placing an allocation reserves room for its *blockers*, the unplaced
   allocating ancestors of its release ops, which must be placed before it can be freed. Those
   pinned to one GPU are reserved on that GPU, the others from the pool of room on all capped
   GPUs (and each must fit on some GPU by itself). An allocating op is placed only if every GPU's
   open + reserved bytes, and the pool, stay within the caps. Ops that do not fit wait; while
   some wait, ops that allocate nothing go first (they free memory: B/W of started
   micro-batches); a free gives the ``RETRY`` best waiting ops another try, and all of them get
   one when nothing else is ready. If still nothing fits, the best waiting op that fits the cap
   alone is placed ("loose"); if none does, :class:`InfeasibleError` names the op (preferring one
   an open allocation waits for), the GPU closest to fitting it and the bytes over.

Times in us, sizes in bytes. Deterministic: ties break on topological index and GPU index.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from typing import Any

from engine.core.cluster import ClusterView
from engine.core.comm import CommModel
from engine.core.delay_table import DelayTable
from engine.core.errors import InfeasibleError
from engine.core.ir import Placement, Plan, Transfer, Workload, topological_indices
from engine.core.memory import MemoryTimeline, memory_caps

SCAN_LIMIT = 64  # gaps examined after an op's ready time before it goes after the stream's last op
RETRY = 4  # waiting ops given another try when memory is freed (all of them once the list runs dry)
INF = math.inf


def plan_heuristic(workload: Workload, cluster: ClusterView, comm: CommModel, memory_cap: int | None = None) -> Plan:
    """A valid plan of ``workload`` on ``cluster`` by list scheduling (module docstring).

    Raises :class:`engine.core.errors.InfeasibleError` when an op has no eligible GPU or memory
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
    raw = [(pos[u], pos[v], b) for u, v, b in graph.edges(data="bytes")]
    topo = topological_indices(n, ((u, v) for u, v, _ in raw))
    rank_of = [0] * n
    for i, k in enumerate(topo):
        rank_of[k] = i
    names = [by_id[k] for k in topo]
    node_op = dict(graph.nodes(data="op"))
    edges = sorted((rank_of[u], rank_of[v], b) for u, v, b in raw)
    return names, [node_op[o] for o in names], edges


class _ListScheduler:
    def __init__(self, workload: Workload, cluster: ClusterView, comm: CommModel, memory_cap: int | None):
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
        # preds[i]: (pred index, bytes, contention factor of the edge); succs for the rank.
        self.preds: list[list[tuple[int, int, float]]] = [[] for _ in range(n)]
        succs: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        self.edges = edges
        names, elig, edge_scale = self.names, self.elig, table.edge_scale
        for u, v, b in edges:
            f = edge_scale.get((names[u], names[v]), 1.0) if edge_scale else 1.0
            self.preds[v].append((u, b, f))
            if b <= 0:
                c = 0.0
            elif len(elig[u]) == 1 and len(elig[v]) == 1:
                c = table.route(elig[u][0], elig[v][0], b) * f
            else:
                c = table.mean(b) * f
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

    def _setup_memory(self, workload: Workload, cluster: ClusterView, memory_cap: int | None) -> None:
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
        self.mem = MemoryTimeline(caps, static) if any(self.binding) else None
        n = len(ops)
        self.mbytes = [op.memory_bytes if self.mem is not None else 0 for op in ops]
        self.allocating = [m > 0 and any(self.binding[d] for d in e) for m, e in zip(self.mbytes, self.elig)]
        self.pinned = [e[0] if len(e) == 1 else -1 for e in self.elig]
        self.capped_only = [all(self.binding[d] for d in e) for e in self.elig]
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

    def _new_demand(self, i: int) -> tuple[dict[int, int], int, list[int], list[int]]:
        """What placing ``i`` newly reserves among its blockers that can only go on capped GPUs:
        per GPU the bytes of those pinned to one, the bytes of the others (reserved from the pool
        of all capped GPUs' room), the ops to mark reserved, and every such multi-GPU blocker."""
        pinned, binding, reserved, mbytes, capped_only = self.pinned, self.binding, self.reserved, self.mbytes, self.capped_only
        per_gpu: dict[int, int] = {}
        flex_bytes = 0
        found, flexible = [], []
        for v in self._blockers(i):
            g = pinned[v]
            if g >= 0:
                if binding[g] and not reserved[v]:
                    found.append(v)
                    per_gpu[g] = per_gpu.get(g, 0) + mbytes[v]
            elif capped_only[v]:
                flexible.append(v)
                if not reserved[v]:
                    found.append(v)
                    flex_bytes += mbytes[v]
        return per_gpu, flex_bytes, found, flexible

    def _strict_room(self, i: int) -> tuple[list[float], float, list[tuple[tuple[int, ...], int]], list[int]] | None:
        """For placing ``i`` under the reservation rule: per GPU the room left after open,
        reserved and newly reserved bytes (INF where the cap cannot bind), the room left in the
        pool of capped GPUs for multi-GPU blockers, those blockers' (GPUs, bytes), and the ops
        to reserve; None if some GPU's pinned reservations alone would not fit."""
        per_gpu, flex_bytes, found, flexible = self._new_demand(i)
        mem, binding = self.mem, self.binding
        assert mem is not None, "strict mode is only used when memory is checked"
        room: list[float] = [mem.caps[g] - mem.used(g) - mem.reserved[g] - per_gpu.get(g, 0) if binding[g] else INF
                for g in range(self.n_gpus)]
        if any(r < 0 for r in room):
            return None
        pool = sum(r for r in room if r != INF) - mem.flex_reserved - flex_bytes
        needs = sorted({(self.elig[y], self.mbytes[y]) for y in flexible})
        return room, pool, needs, found

    def _strict_ok(self, i: int, d: int, room: list[float], pool: float, needs: list[tuple[tuple[int, ...], int]]) -> bool:
        """Placing ``i`` on ``d`` keeps: ``d``'s room >= 0; the pool >= 0; each multi-GPU blocker
        fitting on some GPU by itself (the pool ignores how room is split between GPUs)."""
        m, mine, pinned = self.mbytes[i], self.reserved[i], self.pinned[i] >= 0
        take = 0 if mine and pinned else m  # what ``i`` adds on ``d`` beyond what was reserved there
        if self.binding[d]:
            if take > room[d]:
                return False
            if not mine:
                pool -= m
        elif mine and not pinned:
            pool += m  # its share of the pool is no longer needed
        if pool < 0:
            return False
        for gpus, b in needs:
            if not any((room[g] - take if g == d else room[g]) >= b for g in gpus):
                return False
        return True

    # -- placement ------------------------------------------------------------------------------
    def _choose(self, i: int, mode: str) -> tuple[float, int, list[int]] | None:
        """Best (start, GPU, ops to reserve) for op ``i``, or None if no GPU may take it.

        ``mode``: "free" (no memory rules apply), "strict" (caps and reservations) or "loose" (caps only).
        """
        p = self.dur[i]
        found: list[int] = []
        if mode == "strict":
            ctx = self._strict_room(i)
            if ctx is None:
                return None
            room, pool, needs, found = ctx
        group = self.group[i]
        gs, ge, tail = self.gap_start, self.gap_end, self.tail
        best_f, best = INF, None
        preds, dev, en, table = self.preds[i], self.dev, self.end, self.table
        lat, inv, affine = table.lat, table.inv, table.affine
        for d in self.elig[i]:
            r = 0.0  # when every input has reached GPU d
            for q, b, f in preds:
                t = en[q]
                dq = dev[q]
                if dq != d and b > 0:
                    if affine:
                        t += (lat[dq][d] + b * inv[dq][d]) * f
                    else:
                        t += table.route(dq, d, b) * f
                if t > r:
                    r = t
            if r + p >= best_f:
                continue
            if mode == "strict" and not self._strict_ok(i, d, room, pool, needs):
                continue
            if mode != "free" and self.binding[d]:
                assert self.mem is not None  # a binding cap is why the timeline exists
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
        return best[0], best[1], found

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
        group = self.group[i]
        keys = [2 * g + 1 for g in group] if group is not None else [2 * d + self.kind[i]]
        for k in keys:
            self._occupy(k, s, e)
        if self.mem is None:
            return False
        mem, mbytes = self.mem, self.mbytes
        if self.reserved[i]:
            self.reserved[i] = False
            if self.pinned[i] >= 0:
                mem.reserved[d] -= mbytes[i]
            else:
                mem.flex_reserved -= mbytes[i]
        for y in found:
            self.reserved[y] = True
            if self.pinned[y] >= 0:
                mem.reserved[self.pinned[y]] += mbytes[y]
            else:
                mem.flex_reserved += mbytes[y]
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
        assert mem is not None, "only memory rules can leave every waiting op unplaced"
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
        blocked: list[tuple[float, int]] = []  # ops that may not allocate now, by priority
        swept = False  # every waiting op was retried since the last free
        loose = 0
        placed = 0
        while placed < n:
            if free_heap and (blocked or not alloc_heap or free_heap[0] < alloc_heap[0]):
                i = heapq.heappop(free_heap)[1]
                choice = self._choose(i, "free" if self.mem is None or not allocating[i] else "strict")
            elif alloc_heap:
                i = heapq.heappop(alloc_heap)[1]
                choice = self._choose(i, "strict")
            elif not swept:
                # nothing else to do: retry every waiting op (frees may have let them in)
                alloc_heap, blocked, swept = blocked, [], True
                continue
            else:
                # no waiting op fits with reservations and no free can come: loosen to the cap
                waiting = [k for _, k in sorted(blocked)]
                for i in waiting:
                    choice = self._choose(i, "loose")
                    if choice is not None:
                        blocked.remove((-rank[i], i))
                        heapq.heapify(blocked)
                        loose += 1
                        break
                else:
                    raise self._infeasible(waiting)
            if choice is None:
                heapq.heappush(blocked, (-rank[i], i))
                continue
            s, d, found = choice
            if self._commit(i, s, d, found):
                swept = False
                for _ in range(min(RETRY, len(blocked))):
                    heapq.heappush(alloc_heap, heapq.heappop(blocked))
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
        for _, _, i in sorted(zip(self.start, self.end, range(len(self.names)))):
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
