"""The one semi-active timer: every op as early as the orders and delays it must respect allow.

Whatever a plan's ops are (a workload's ops, a schedule's steps, an instance's indices, NIC
transfer tasks), timing a fixed placement and a fixed order per stream is a longest path over
arcs ``(u, v, lag)`` that each say ``t[v] >= t[u] + lag``: a data edge has lag ``duration(u) +
delay(u -> v)``, the stream order lag ``duration(u)``, a transfer's hold of a NIC the hold time.
Callers build the arcs; :func:`earliest_times` solves them. Times in us.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable


class OrderCycle(ValueError):
    """The arcs contradict each other (a cycle); ``stuck`` holds the nodes that can never start."""

    def __init__(self, stuck: list[int]):
        super().__init__(f"the orders create a cycle through {len(stuck)} nodes")
        self.stuck = stuck


def earliest_times(n: int, arcs: Iterable[tuple[int, int, float]]) -> list[float]:
    """``t[v] = max(0, max over arcs (u, v, lag) of t[u] + lag)`` for nodes ``0..n-1``.

    Raises :class:`OrderCycle` (listing the nodes never reached, ascending) when the arcs
    contain a cycle."""
    succ: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    indeg = [0] * n
    for u, v, lag in arcs:
        succ[u].append((v, lag))
        indeg[v] += 1
    time = [0.0] * n
    ready = deque(v for v in range(n) if indeg[v] == 0)
    done = 0
    while ready:
        u = ready.popleft()
        done += 1
        tu = time[u]
        for v, lag in succ[u]:
            if tu + lag > time[v]:
                time[v] = tu + lag
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    if done < n:
        raise OrderCycle([v for v in range(n) if indeg[v] > 0])
    return time
