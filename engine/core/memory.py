"""Per-GPU memory: the cap every planner, the validator and the simulator hold a GPU to, and the
bookkeeping list schedulers (:mod:`engine.planners.heuristic`) keep under it.

:func:`memory_caps` is the one rule for the cap: the cap a caller names, else the workload's
(the scenario's ``memory`` section), else each GPU's memory from its profile. :func:`memory_events`
and :func:`peak_resident` are the one residency rule (see there).

:class:`MemoryTimeline`, for list schedulers: an allocation is recorded as +bytes at its start and, once known, -bytes at its free time;
until then it is *open* (live to infinity). Sizes in bytes, times in us. Per GPU the timeline
keeps one net change per distinct time, so "frees at t happen before allocations at t" holds
by construction: only the state after all changes at t is ever compared with the cap.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any, Iterable, TypeVar

from engine.core.cluster import ClusterView
from engine.core.ir import Workload

K = TypeVar("K", str, int)

INF = math.inf


def memory_events(allocations: Iterable[tuple[K, int, float, float]],
                  rel_tol: float = 0.0) -> list[tuple[float, int, K, int]]:
    """One GPU's memory events in the order they happen, from its allocations ``(op, bytes,
    allocated at, freed at)`` (us): ``(time, 1, op, +bytes)`` and ``(time, 0, op, -bytes)``.

    The one residency rule: bytes are resident from the allocation until the free, and a free
    sorts before an allocation at the same instant (or within ``rel_tol * max(1, |t|)`` us of
    it), so memory freed at ``t`` can be reused at ``t``. Ties then go by op."""
    keyed = []
    for op, nbytes, t0, t1 in allocations:
        keyed.append((t0, 1, op, nbytes, t0))
        keyed.append((t1 - rel_tol * max(1.0, abs(t1)), 0, op, -nbytes, t1))
    keyed.sort()
    return [(t, kind, op, delta) for _, kind, op, delta, t in keyed]


def peak_resident(static: int, events: Iterable[tuple[float, int, Any, int]]) -> int:
    """The most bytes resident at once: ``static`` plus the live allocations of ``events``."""
    live = peak = static
    for _, _, _, delta in events:
        live += delta
        if live > peak:
            peak = live
    return peak


def memory_caps(workload: Workload, cluster: ClusterView, memory_cap: int | None = None) -> list[int]:
    """Per GPU of ``cluster``, the memory cap in bytes: ``memory_cap``, else the workload's
    ``memory_cap_bytes``, else the GPU's own memory (``cluster.memory_cap_bytes(gpu)``)."""
    cap = memory_cap if memory_cap is not None else workload.memory_cap_bytes
    if cap is not None:
        return [int(cap)] * cluster.n_gpus
    return [int(cluster.memory_cap_bytes(d)) for d in range(cluster.n_gpus)]


class MemoryTimeline:
    """Per GPU: net allocation changes over time, open (unfreed) bytes and reserved bytes."""

    def __init__(self, caps: list[int], static: list[int]):
        n = len(caps)
        self.caps, self.static = caps, static
        self.open = [0] * n
        self.reserved = [0] * n  # bytes reserved for ops pinned to the GPU
        self.flex_reserved = 0  # bytes reserved for ops that may go on several capped GPUs
        self.times: list[list[float]] = [[] for _ in range(n)]
        self.deltas: list[list[int]] = [[] for _ in range(n)]

    def add(self, d: int, t: float, delta: int) -> None:
        """Record ``delta`` bytes (+ allocate, - free) on GPU ``d`` at time ``t``."""
        times, deltas = self.times[d], self.deltas[d]
        k = bisect_left(times, t)
        if k < len(times) and times[k] == t:
            deltas[k] += delta
        else:
            times.insert(k, t)
            deltas.insert(k, delta)

    def earliest(self, d: int, m: int, r: float) -> float:
        """Earliest ``t >= r`` from which usage on ``d`` stays <= cap - ``m`` (INF if never).

        Usage only matters from ``t`` on because the new allocation is open: it lasts to infinity.
        """
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
