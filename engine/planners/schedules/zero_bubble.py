"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): ZB-H1, ZB-H2,
ZB-V. They split the backward into ``B`` (input gradient, on the critical path between stages) and
``W`` (weight gradient, free to move) and place the ``W`` passes in what would be bubbles.

* ZB-H1: 1F1B's forward/backward order and warm-up (peak ``p`` activations per GPU), with rank
  ``r``'s ``W`` passes delayed by ``r`` micro-batches; the ``r + 1`` delayed ones close the tail.
  Bubble ``(p-1)(F+B-2W)`` with ``B`` the full backward.
* ZB-H2: rank ``r`` warms up with ``2(p-1-r) + 1`` forwards (peak ``2p - 1`` activations on
  the first rank) so that ``W`` passes can fill the whole tail. Its order comes from the
  paper's greedy rule, run on the workload's own times and communication delays
  (:func:`list_schedule`): whenever a rank is free it runs a ready ``B`` (oldest first), else a
  ready ``F`` (within its warm-up count, then within ``2p - 1`` activations), else the oldest
  pending ``W``, and waits otherwise. Bubble ``(p-1)(F+B-3W)`` in the paper (``B`` full), which
  assumes each stage starts the next iteration as soon as it is done; within one step the last
  stage cannot start before ``(p-1)F``, so the measured bubble is the larger of the two.
* ZB-V: ``2p`` chunks in a V (GPU ``r`` holds chunks ``r`` and ``2p-1-r``); the paper's
  handcrafted pattern (:func:`zb_v`), 1F1B's peak memory (``2p`` half-stage activations) and,
  for ``F = B = W`` and ``m >= 2p - 1``, only the ``(p-1)`` chunk forwards of the ramp as bubble.
"""

from __future__ import annotations

import heapq
from typing import Callable

from engine.core.comm import CommModel
from engine.planners.schedules.actions import Action, PipelineShape, Schedule, Step


def zb_h1(shape: PipelineShape) -> Schedule:
    """ZB-H1: 1F1B order with rank r's W passes delayed by r micro-batches."""
    shape.need_directions("zb-h1", 1)
    shape.need_w("zb-h1")
    gpus = shape.linear("zb-h1")
    p, m = len(gpus), shape.microbatches
    ranks: dict[int, list[Step]] = {}
    for r, gpu in enumerate(gpus):
        warmup = min(p - 1 - r, m)
        seq: list[Step] = [Action("F", r, k) for k in range(warmup)]
        w_next = 0

        def w_until(k: int) -> list[Action]:
            nonlocal w_next
            out = []
            while w_next <= k:
                out.append(Action("W", r, w_next))
                w_next += 1
            return out

        for k in range(m - warmup):
            seq += [Action("F", r, warmup + k), Action("B", r, k)] + w_until(k - r)
        for k in range(m - warmup, m):
            seq += [Action("B", r, k)] + w_until(k - r)
        seq += w_until(m - 1)
        ranks[gpu] = seq
    return Schedule("zb-h1", ranks, {"gpus": p})


def zb_h2(shape: PipelineShape, comm=None) -> Schedule:
    """ZB-H2: a deeper warm-up (2(p-1-r)+1 forwards) so W passes fill the whole tail."""
    shape.need_directions("zb-h2", 1)
    shape.need_w("zb-h2")
    gpus = shape.linear("zb-h2")
    p = len(gpus)
    chunks = {gpu: [r] for r, gpu in enumerate(gpus)}
    warmup = {gpu: 2 * (p - 1 - r) + 1 for r, gpu in enumerate(gpus)}
    limits = {gpu: 2 * p - 1 for gpu in gpus}
    ranks = list_schedule(shape, *timing_of(shape, comm), chunks, limits, warmup=warmup)
    return Schedule("zb-h2", ranks, {"gpus": p, "rule": RULE})


def zb_v(shape: PipelineShape, comm=None) -> Schedule:
    """ZB-V: V-shaped chunks (r and 2p-1-r on GPU r); the paper's handcrafted pattern.

    Rank ``r`` with chunk 0 = stage ``r`` and chunk 1 = stage ``2p-1-r`` runs: ``2(p-r)-1``
    forwards of chunk 0; ``r`` times (F1, F0); ``p-r`` times (F1, B1, W1); then, while forwards
    remain, (F0, B0, W0, F1, B1, W1); the cool-down ``r`` times (B0, B1) and ``p-r`` times
    (B0, W0); then the pending W passes, chunk 1's first. The pattern is laid out for
    ``max(m, 2p-1)`` micro-batches and passes of micro-batches ``>= m`` are dropped.
    """
    shape.need_directions("zb-v", 1)
    shape.need_w("zb-v")
    gpus = shape.v_shape("zb-v")
    p, m = len(gpus), shape.microbatches
    n = max(m, 2 * p - 1)
    ranks: dict[int, list[Step]] = {}
    for r, gpu in enumerate(gpus):
        c0, c1 = r, 2 * p - 1 - r
        count = {(ph, c): 0 for ph in "FBW" for c in (c0, c1)}
        seq: list[Step] = []

        def run(phase: str, stage: int) -> None:
            k = count[(phase, stage)]
            count[(phase, stage)] = k + 1
            if k < m:
                seq.append(Action(phase, stage, k))

        for _ in range(2 * (p - r) - 1):
            run("F", c0)
        for _ in range(r):
            run("F", c1)
            run("F", c0)
        for _ in range(p - r):
            for ph in "FBW":
                run(ph, c1)
        while count[("F", c1)] < count[("F", c0)] or count[("F", c0)] < n:
            if count[("F", c0)] < n:
                run("F", c0)
            run("B", c0)
            run("W", c0)
            for ph in "FBW":
                run(ph, c1)
        for _ in range(r):
            run("B", c0)
            run("B", c1)
        for _ in range(p - r):
            run("B", c0)
            run("W", c0)
        for c in (c1, c0):
            while count[("W", c)] < count[("B", c)]:
                run("W", c)
        ranks[gpu] = seq
    return Schedule("zb-v", ranks, {"gpus": p})


RULE = "list schedule on the workload's times: B > F (in-flight limit) > W"


def timing_of(shape: PipelineShape, comm: CommModel) -> tuple[dict[str, float], Callable[[str, int, int], float]]:
    """(per-phase duration in us, stage-to-stage delay function) of ``shape`` under ``comm``
    (no communication delay when ``comm`` is None)."""
    dur = {ph: float(shape.times.get(ph, 0.0)) for ph in ("F", "B", "W")}

    def delay(phase: str, s_from: int, s_to: int) -> float:
        a, b = shape.stage_devices[s_from], shape.stage_devices[s_to]
        if comm is None or a == b:
            return 0.0
        return comm.route_delay(a, b, shape.send_bytes)

    return dur, delay


def list_schedule(shape: PipelineShape, dur: dict[str, float], delay, chunks: dict[int, list[int]],
                  limits: dict[int, int], warmup: dict[int, int] | None = None) -> dict[int, list[Step]]:
    """Per GPU, the order an event-driven list schedule runs (see the module docstring).

    ``dur[phase]`` is the time (us) of one pass of a chunk, ``delay(phase_from, stage_from,
    stage_to)`` the communication delay (us) of the edge between two stages' passes;
    ``chunks[gpu]`` are the stages the GPU holds; ``limits[gpu]`` the most activations (F done,
    W not yet) it may hold; ``warmup[gpu]``, if given, the forwards it runs before its first B.
    Dependencies: F(s-1)->F(s), F(last)->B(last), B(s+1)->B(s), B(s)->W(s).
    """
    stages, m = shape.stages, shape.microbatches
    owner = {s: gpu for gpu, ss in chunks.items() for s in ss}
    inf = float("inf")
    busy = {gpu: 0.0 for gpu in chunks}
    decide = {gpu: 0.0 for gpu in chunks}
    next_f = {s: 0 for s in range(stages)}
    f_arrival: dict[tuple[int, int], float] = {(0, k): 0.0 for k in range(m)}  # (stage, mb) -> input arrival
    b_ready: dict[int, list[tuple[float, int, int]]] = {gpu: [] for gpu in chunks}  # (arrival, mb, -stage)
    w_ready: dict[int, list[tuple[int, int]]] = {gpu: [] for gpu in chunks}  # (mb, stage)
    live = {gpu: 0 for gpu in chunks}
    forwards = {gpu: 0 for gpu in chunks}
    backwards = {gpu: 0 for gpu in chunks}
    order: dict[int, list[Step]] = {gpu: [] for gpu in chunks}
    remaining = 3 * stages * m

    def arrive(gpu: int, t: float) -> None:
        decide[gpu] = min(decide[gpu], max(t, busy[gpu]))

    while remaining:
        gpu = min(chunks, key=lambda g: (decide[g], g))
        t = decide[gpu]
        if t == inf:
            raise RuntimeError("list schedule stuck: no GPU can run anything")
        may_forward = live[gpu] < limits[gpu] and (warmup is None or forwards[gpu] < warmup[gpu] or backwards[gpu] > 0)
        act, wake = _pick(t, chunks[gpu], m, next_f, f_arrival, b_ready[gpu], w_ready[gpu], may_forward)
        if act is None:
            decide[gpu] = wake
            continue
        order[gpu].append(act)
        end = t + dur[act.phase]
        busy[gpu] = decide[gpu] = end
        remaining -= 1
        s, k = act.stage, act.microbatch
        if act.phase == "F":
            live[gpu] += 1
            forwards[gpu] += 1
            next_f[s] += 1
            if s + 1 < stages:
                f_arrival[(s + 1, k)] = end + delay("F", s, s + 1)
                arrive(owner[s + 1], f_arrival[(s + 1, k)])
            else:
                heapq.heappush(b_ready[gpu], (end, k, -s))
        elif act.phase == "B":
            backwards[gpu] += 1
            heapq.heappush(w_ready[gpu], (k, s))
            if s > 0:
                a = end + delay("B", s, s - 1)
                heapq.heappush(b_ready[owner[s - 1]], (a, k, -(s - 1)))
                arrive(owner[s - 1], a)
        else:
            live[gpu] -= 1
    return order


def _pick(t, stages_here, m, next_f, f_arrival, b_heap, w_heap, may_forward) -> tuple[Action | None, float]:
    """The pass a GPU runs at time ``t`` (B > F > W, see the module docstring), or (None, the
    earliest time a known input arrives)."""
    wake = float("inf")
    ready_b = [e for e in b_heap if e[0] <= t]
    if ready_b:
        best = min(ready_b, key=lambda e: (e[1], e[2]))
        b_heap.remove(best)
        heapq.heapify(b_heap)
        return Action("B", -best[2], best[1]), t
    if b_heap:
        wake = min(e[0] for e in b_heap)
    if may_forward:
        for s in sorted(stages_here, reverse=True):
            k = next_f[s]
            a = f_arrival.get((s, k)) if k < m else None
            if a is None:
                continue
            if a <= t:
                return Action("F", s, k), t
            wake = min(wake, a)
    if w_heap:
        mb, s = heapq.heappop(w_heap)
        return Action("W", s, mb), t
    return None, wake
