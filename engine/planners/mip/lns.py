"""Large-neighbourhood improvement of a plan by small MIPs (also the coarsening's polish step).

Each round frees a window of ops around a stretch of the critical path (on their eligible
GPUs, with sequencing binaries) and keeps every other op on its GPU and in its place in its
stream's order (zero-delay order arcs), then solves that much smaller MIP with the current plan
as warm start and horizon. A better makespan, or the same one with a smaller sum of starts, is
kept. Rounds walk the critical path from a seeded random position, so runs are repeatable up to
what the solver finds within its time limits.
"""

from __future__ import annotations

import random
import time

from engine.core.errors import InfeasibleError
from engine.planners.mip.instance import Instance
from engine.planners.mip.solution import solve_instance
from engine.planners.mip.warm import Schedule, free_arcs, makespan

WINDOW_OPS = 20  # ops freed per round at first; grows when rounds prove nothing better, shrinks on time-outs
MIN_WINDOW, GROW = 8, 1.5
ROUND_S = 2.0


def slack(inst: Instance, sched: Schedule) -> list[float]:
    """Per op, how much later it could start without delaying the end (us), with the devices,
    every stream's order and the frees each allocation waited for fixed as in ``sched``."""
    dev, start = sched
    n = len(inst)
    end = [start[i] + inst.dur[i][dev[i]] for i in range(n)]
    span = max(end, default=0.0)
    after: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for i, j in inst.arcs():
        after[i].append((j, inst.delay(i, j, dev[i], dev[j])))
    for seq in _chains(inst, sched, range(n)).values():
        for a, b in zip(seq, seq[1:]):
            after[a].append((b, 0.0))
    for r, o in free_arcs(inst, dev, start):  # waits for memory are part of the critical path
        after[r].append((o, 0.0))
    latest_end = [span] * n
    for i in sorted(range(n), key=lambda i: (-start[i], -end[i])):
        for j, c in after[i]:
            latest_end[i] = min(latest_end[i], latest_end[j] - inst.dur[j][dev[j]] - c)
    return [latest_end[i] - end[i] for i in range(n)]


def _chains(inst: Instance, sched: Schedule, ops) -> dict[tuple[int, str], list[int]]:
    dev, start = sched
    chains: dict[tuple[int, str], list[int]] = {}
    for i in sorted(ops, key=lambda i: (start[i], start[i] + inst.dur[i][dev[i]], i)):
        for r in inst.resources(i, dev[i]):
            chains.setdefault(r, []).append(i)
    return chains


def freeze_except(inst: Instance, sched: Schedule, free: set[int]) -> Instance:
    """``inst`` with every op outside ``free`` pinned to its GPU and its stream order fixed."""
    dev = sched[0]
    fixed = {i: dev[i] for i in range(len(inst)) if i not in free}
    arcs = set()
    for seq in _chains(inst, sched, fixed).values():
        for a, b in zip(seq, seq[1:]):
            if not inst.ordered(a, b):
                arcs.add((a, b))
    return inst.restricted(fixed, arcs)


def window(inst: Instance, sched: Schedule, size: int, rng: random.Random) -> set[int]:
    """About ``size`` ops: a stretch of critical ops (zero slack) from a random point, plus the
    ops that run during that stretch, nearest first."""
    dev, start = sched
    sl = slack(inst, sched)
    tol = 1e-6 * max(1.0, makespan(inst, sched))
    critical = sorted((i for i in range(len(inst)) if sl[i] <= tol), key=lambda i: (start[i], i))
    if not critical:
        critical = sorted(range(len(inst)), key=lambda i: (sl[i], start[i], i))[:1]
    k = rng.randrange(len(critical))
    stretch = critical[k:k + max(1, size // 2)]
    lo = min(start[i] for i in stretch)
    hi = max(start[i] + inst.dur[i][dev[i]] for i in stretch)
    mid = (lo + hi) / 2
    others = sorted((i for i in range(len(inst)) if i not in stretch),
                    key=lambda i: (0 if start[i] < hi and start[i] + inst.dur[i][dev[i]] > lo else 1,
                                   abs(start[i] - mid), i))
    return set(stretch) | set(others[:max(0, size - len(stretch))])


def improve(inst: Instance, sched: Schedule, budget_s: float, opts: dict, size: int = WINDOW_OPS,
            seed: int = 0) -> tuple[Schedule, dict]:
    """Improve ``sched`` by window MIPs for about ``budget_s`` seconds; returns the best
    schedule and counts of rounds, improvements and the most binaries of a round's model."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + budget_s
    best, best_key = sched, _key(inst, sched)
    rounds = better = most = 0
    size = min(size, len(inst))
    # rounds always start from the current plan (whatever the caller's warm-start switch says)
    sub_opts = {**opts, "progress": None, "speedups": {**opts.get("speedups", {}), "lns": False, "warm_start": True}}
    lb = inst.lower_bound()
    while size > 0 and time.perf_counter() < deadline - 0.2 and makespan(inst, best) > lb + 1e-6 * max(1.0, lb):
        free = window(inst, best, size, rng)
        sub = freeze_except(inst, best, free)
        left = deadline - time.perf_counter()
        try:
            sol = solve_instance(sub, best, **{**sub_opts, "time_limit_s": max(0.2, min(ROUND_S, left))})
        except InfeasibleError:  # cannot happen with the plan as warm start; never fatal here
            rounds += 1
            continue
        rounds += 1
        most = max(most, sol.n_binaries)
        key = _key(inst, sol.sched)
        if key < best_key:
            best, best_key = sol.sched, key
            better += 1
        elif sol.meta.get("solver_status") == "optimal":
            size = min(len(inst), max(size + 1, int(size * GROW)))  # window exhausted: widen it
        elif sol.meta.get("solver_status") == "time_limit":
            size = max(MIN_WINDOW, int(size / GROW))
    return best, {"lns_rounds": rounds, "lns_improvements": better, "lns_max_binaries": most}


def _key(inst: Instance, sched: Schedule) -> tuple[float, float]:
    return round(makespan(inst, sched), 6), round(sum(sched[1]), 6)
