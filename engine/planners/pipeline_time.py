"""Megatron's 1F1B iteration of a ``transformer`` workload: the plan, and its time in closed form.

:func:`one_f_one_b_order` orders the ops of :func:`engine.workloads.transformer.build_transformer` the way
Megatron-LM runs them without virtual stages: on pipeline rank ``p`` of ``pp``, ``pp - p - 1``
warm-up forwards, then one forward / one backward until the forwards run out, then the remaining
backwards; each forward is followed by its epilogue after the TP all-reduce, each backward by its
weight gradient and then its epilogue; after the last backward the DP reduction, the tied
embedding all-reduce and the optimizer step. Times are the semi-active schedule of that order
(every op as early as its stream order, its inputs and the comm delays allow). The order is the
schedule library's ``1f1b`` action lists mapped onto the transformer's ops, as for every other
schedule (:mod:`engine.planners.transformer_schedule`).

:func:`iteration_time_1f1b` is the closed form of the same schedule: with ``F'_s = F_s + ar_F``
and ``B'_s = B_s + max(W_s, ar_B)`` (``B_s + W_s`` without TP) per stage, and ``c`` the send time,

    T_pipe = sum_s (F'_s + B'_s) + (m - 1) max_s (F'_s + B'_s) + 2 (pp - 1) c

rank ``s`` ends its last backward at ``T_pipe - sum_{s' < s} (B'_s' + c)``, then the DP reduction,
the embedding all-reduce (after both ends are ready) and the optimizer step. Exact for uniform
stages; a test and the calibration bench compare it with the semi-active plan and the simulator.
Times in us.

:func:`transformer_schedule_plan` (``schedule:<name>`` on a transformer scenario, every schedule of
the library) lives in :mod:`engine.planners.transformer_schedule` and is re-exported here.
"""

from __future__ import annotations

from typing import Sequence

from engine.core.cluster import ClusterView
from engine.core.comm import CommModel
from engine.core.ir import Workload
from engine.planners.transformer_schedule import (
    STEP_END_PHASES,
    semi_active_plan,
    transformer_order,
    transformer_schedule,
    transformer_schedule_plan,
)
from engine.workloads.transformer import StageTimes, StepEnd, TransformerSpec, gpu_of

__all__ = ["STEP_END_PHASES", "iteration_time_1f1b", "one_f_one_b_order", "semi_active_plan", "send_time_us",
           "transformer_schedule_plan"]


def iteration_time_1f1b(times: Sequence[StageTimes], end: StepEnd, microbatches: int, send_us: float) -> float:
    """Closed-form 1F1B iteration time (us) from per-stage times (one stage per rank)."""
    p = len(times)
    fwd = [t.F + t.ar_F for t in times]
    bwd = [t.B + (max(t.W, t.ar_B) if t.ar_B > 0 else t.W) for t in times]
    slot = [f + b for f, b in zip(fwd, bwd)]
    pipe = sum(slot) + (microbatches - 1) * max(slot) + 2 * (p - 1) * send_us
    ready = []
    done = pipe
    for s in range(p):
        ready.append(done + end.dp[s])
        done -= bwd[s] + send_us
    if end.emb_ranks is not None:
        a, b = end.emb_ranks
        e = max(ready[a], ready[b]) + end.emb
        ready[a] = ready[b] = e
    return max(r + o for r, o in zip(ready, end.opt))


def one_f_one_b_order(spec: TransformerSpec, workload: Workload) -> dict[int, list[str]]:
    """Per GPU, its ops in Megatron's 1F1B order (collectives on their group's first GPU): the
    schedule library's ``1f1b`` action lists mapped onto the workload's ops
    (:func:`engine.planners.transformer_schedule.transformer_order`); vpp must be 1."""
    return transformer_order(spec, workload, transformer_schedule(spec, workload, "1f1b"))


def send_time_us(spec: TransformerSpec, cluster: ClusterView, comm: CommModel, send_bytes: int) -> float:
    """Delay of one pipeline send between consecutive ranks (0 with one stage)."""
    if spec.parallelism.pp < 2:
        return 0.0
    return comm.route_delay(gpu_of(spec, 0, 0, 0), gpu_of(spec, 0, 1, 0), send_bytes)
