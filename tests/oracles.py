"""Exact optima of tiny instances, written independently of the engine, to check MIP plans.

:func:`exact_makespan` is a branch and bound over semi-active schedules. It reads only the
workload (ops, edges, eligibility, memory) and the cluster's ``transfer_time``; no engine code.
The rules it enforces, stated here on their own:

* every op runs on one eligible GPU; ops of one kind (compute / comm) on one GPU never overlap;
* an edge ``i -> j`` with ``bytes > 0`` across GPUs: ``start[j] >= end[i] + transfer_time``;
  otherwise ``start[j] >= end[i]``;
* with a cap: an op's allocation is live from its start until its last releaser (itself and
  its ``release`` ops) ends; at every start on a GPU, static + live bytes there <= cap.

Why it is exact: sort an optimal schedule by (start, op index) and re-place its ops in that
order, each at the earliest time >= the previous start that its GPU, its inputs and memory
allow. No op moves later (memory only gets freer when earlier ops move earlier), so repeating
this reaches a schedule that re-places onto itself, no worse than the optimum. The search
enumerates exactly such sequences: append a ready op on an eligible GPU at the earliest
allowed time, never before the previous start (at an equal start, only a higher op index).
Times are exact rationals (integer ticks), so ties are ties.

Published optimum: :func:`unit_pipeline_optimum`. CP-SAT: :func:`cp_sat_reference`.
"""

from __future__ import annotations

import math
from fractions import Fraction


def _exact(value: float) -> Fraction:
    """A float time (us) as the short fraction it was written as (1.1 -> 11/10)."""
    return Fraction(value).limit_denominator(1_000_000)


def exact_makespan(workload, cluster, cap: int | None = None, max_nodes: int = 2_000_000) -> float:
    """The optimal makespan (us) of ``workload`` on ``cluster`` under a per-GPU memory ``cap``
    (bytes; None: memory is not limited), ``math.inf`` when nothing fits. Collectives and
    zero-length ops are refused (ValueError); so is a search over ``max_nodes`` nodes."""
    ids = sorted(workload.ops)
    ops = [workload.ops[o] for o in ids]
    index = {o: k for k, o in enumerate(ids)}
    n, n_gpus = len(ids), cluster.n_gpus
    for op in ops:
        if op.collective is not None:
            raise ValueError(f"{op.id}: collectives are not modelled here")
    elig = [tuple(d for d in (op.devices if op.devices is not None else range(n_gpus)) if d < n_gpus) for op in ops]
    if any(not e for e in elig):
        return math.inf
    durs = [_exact(op.duration_on(cluster.gpu_model)) for op in ops]
    if any(p <= 0 for p in durs):
        raise ValueError("zero-length ops are not modelled here")
    preds: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for e in workload.edges:
        preds[index[e.dst]].append((index[e.src], e.bytes))
        succs[index[e.src]].append(index[e.dst])
    delays = {}
    for j in range(n):
        for i, nbytes in preds[j]:
            for a in elig[i]:
                for b in elig[j]:
                    delays[i, j, a, b] = _exact(cluster.transfer_time(a, b, nbytes)) if a != b and nbytes > 0 else 0
    # integer ticks
    scale = math.lcm(*(f.denominator for f in [*durs, *map(Fraction, delays.values())]))
    dur = [int(p * scale) for p in durs]
    delay = {k: int(Fraction(v) * scale) for k, v in delays.items()}
    stream = [op.kind for op in ops]
    alloc = [op.memory_bytes if cap is not None else 0 for op in ops]
    releasers = [sorted({k} | {index[r] for r in op.release}) for k, op in enumerate(ops)]
    static = {d: workload.static_memory_bytes.get(d, 0) for d in range(n_gpus)}
    if cap is not None and any(s > cap for s in static.values()):
        return math.inf
    tail = [0] * n  # longest chain of durations after an op (a lower bound on what follows it)
    for i in reversed(_topo(n, succs)):
        tail[i] = max((dur[j] + tail[j] for j in succs[i]), default=0)
    kinds = sorted(set(stream))

    dev = [-1] * n
    start = [0] * n
    end = [0] * n
    avail: dict[tuple[int, str], int] = {}
    n_preds_left = [len(p) for p in preds]
    left = set(range(n))
    best = [math.inf]
    nodes = [0]

    def live_bytes(d: int, t: int) -> int:
        total = static[d]
        for a in range(n):
            if alloc[a] and dev[a] == d and start[a] <= t:
                rel = releasers[a]
                if any(dev[r] < 0 for r in rel) or max(end[r] for r in rel) > t:
                    total += alloc[a]
        return total

    def earliest(o: int, d: int, t0: int) -> int | None:
        """The first time >= t0 at which o's allocation fits on d (None: never, given the ops placed)."""
        if not alloc[o]:
            return t0
        frees = sorted({max(end[r] for r in releasers[a]) for a in range(n)
                        if alloc[a] and dev[a] == d and all(dev[r] >= 0 for r in releasers[a])})
        for t in [t0] + [f for f in frees if f > t0]:
            if live_bytes(d, t) + alloc[o] <= cap:
                return t
        return None

    pinned = [elig[o][0] if len(elig[o]) == 1 else None for o in range(n)]

    def bound(t_prev: int, span: int) -> int:
        lb = span
        work = {k: 0 for k in kinds}
        own: dict[tuple[int, str], int] = {}
        for o in left:
            lb = max(lb, t_prev + dur[o] + tail[o])
            work[stream[o]] += dur[o]
            if pinned[o] is not None:
                own[pinned[o], stream[o]] = own.get((pinned[o], stream[o]), 0) + dur[o]
        for (d, k), w in own.items():  # what is left on one GPU runs after what it has done
            lb = max(lb, max(avail.get((d, k), 0), t_prev) + w)
        for k in kinds:  # the busiest GPU does at least the average of what is left
            busy = sum(max(avail.get((d, k), 0), t_prev) for d in range(n_gpus))
            lb = max(lb, -(-(busy + work[k]) // n_gpus))
        return lb

    seen: dict[tuple, int] = {}

    def state(t_prev: int, o_prev: int) -> tuple:
        """What the rest of the search depends on (two equal states: the later span loses)."""
        ready_at = tuple((i, dev[i], end[i]) for i in range(n) if dev[i] >= 0 and any(dev[j] < 0 for j in succs[i]))
        frees = []
        for a in range(n):
            if alloc[a] and dev[a] >= 0:
                rel = releasers[a]
                pending = any(dev[r] < 0 for r in rel)
                f = max((end[r] for r in rel if dev[r] >= 0), default=0)
                if pending or f > t_prev:
                    frees.append((a, dev[a], pending, f))
        ends = tuple(sorted((key, max(v, t_prev)) for key, v in avail.items()))
        return (frozenset(left), t_prev, o_prev, ends, ready_at, tuple(frees))

    def search(t_prev: int, o_prev: int, span: int) -> None:
        nodes[0] += 1
        if nodes[0] > max_nodes:
            raise ValueError(f"search over {max_nodes} nodes: instance too large for the brute force")
        if not left:
            best[0] = min(best[0], span)
            return
        if bound(t_prev, span) >= best[0]:
            return
        key = state(t_prev, o_prev)
        if seen.get(key, math.inf) <= span:
            return
        seen[key] = span
        moves = []
        for o in left:
            if n_preds_left[o]:
                continue
            for d in elig[o]:
                t0 = max(t_prev, avail.get((d, stream[o]), 0),
                         max((end[i] + delay[i, o, dev[i], d] for i, _ in preds[o]), default=0))
                t = earliest(o, d, t0)
                if t is None or (t == t_prev and o < o_prev):
                    continue
                moves.append((t + dur[o], t, o, d))
        for e, t, o, d in sorted(moves):
            if max(span, e) >= best[0]:
                continue
            key = (d, stream[o])
            was = avail.get(key, 0)
            dev[o], start[o], end[o], avail[key] = d, t, e, e
            left.discard(o)
            for j in succs[o]:
                n_preds_left[j] -= 1
            search(t, o, max(span, e))
            for j in succs[o]:
                n_preds_left[j] += 1
            left.add(o)
            dev[o], avail[key] = -1, was

    search(0, -1, 0)
    return math.inf if best[0] == math.inf else float(Fraction(best[0], scale))


def _topo(n: int, succs: list[list[int]]) -> list[int]:
    indeg = [0] * n
    for i in range(n):
        for j in succs[i]:
            indeg[j] += 1
    order, ready = [], [i for i in range(n) if indeg[i] == 0]
    while ready:
        i = ready.pop()
        order.append(i)
        for j in succs[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    return order


def unit_pipeline_optimum(p: int, m: int) -> float:
    """Optimal makespan of p stages x m >= p micro-batches with F = B = W = 1, memory unlimited:
    3m + p - 1. The last stage waits p - 1 for its first F, then has 3m units of work; ZB-H1
    (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) meets it, its bubble being p - 1
    units here. With m < p the bound is not met (p = 3, m = 2: 9, not 8)."""
    if m < p:
        raise ValueError(f"3m + p - 1 is the optimum for m >= p only (p={p}, m={m})")
    return 3.0 * m + p - 1


def cp_sat_reference():
    """``bench/reference_optimum.py`` (CP-SAT: zero-byte edges, no memory), or a skip without OR-Tools."""
    import importlib.util
    from pathlib import Path

    import pytest

    pytest.importorskip("ortools")
    path = Path(__file__).resolve().parents[1] / "bench" / "reference_optimum.py"
    spec = importlib.util.spec_from_file_location("reference_optimum", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
