"""GPipe, 1F1B and interleaved 1F1B: the schedules that run the backward whole.

With a split workload (``W`` ops) these schedules run ``B`` and ``W`` back to back as one full
backward (``BW``). Notation: ``p`` GPUs, ``m`` micro-batches, rank ``r`` = the GPU of stage ``r``.

* GPipe: all ``m`` forwards, then all ``m`` backwards in micro-batch order. Peak activations
  ``m`` per GPU; bubble ``(p-1)(F+B)``.
* 1F1B (PipeDream-flush): ``min(p-1-r, m)`` warm-up forwards, then one forward / one backward
  until the forwards run out, then the remaining backwards. Peak ``p - r`` activations on rank
  ``r`` (``p`` on the first); bubble ``(p-1)(F+B)`` with ``B`` the full backward.
* Interleaved 1F1B (Megatron-LM's virtual pipeline): ``v`` chunks per GPU, stage ``s`` on the GPU
  of stage ``s mod p``; micro-batches go through the chunks in groups of ``p``. Rank ``r`` warms
  up with ``(p-1-r)·2 + (v-1)·p`` forwards. Needs ``m`` a multiple of ``p``. Bubble
  ``(p-1)(F+B)/v`` where ``F``, ``B`` are whole-stage times (``v`` chunks of ``F/v``).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, TypeVar

from engine.planners.schedules.actions import Action, PipelineShape, Schedule, Step

T = TypeVar("T")


def gpipe(shape: PipelineShape) -> Schedule:
    """GPipe: all forwards, then all backwards (micro-batch order) on every stage."""
    shape.need_directions("gpipe", 1)
    gpus = shape.linear("gpipe")
    m = shape.microbatches
    ranks: dict[int, list[Step]] = {}
    for r, gpu in enumerate(gpus):
        ranks[gpu] = [Action(ph, r, k) for ph in ("F", "BW") for k in range(m)]  # all forwards, then all backwards
    return Schedule("gpipe", ranks, {"gpus": len(gpus)})


def one_f_one_b(shape: PipelineShape) -> Schedule:
    """1F1B: warm-up forwards, alternate forward and backward, cool-down backwards."""
    shape.need_directions("1f1b", 1)
    gpus = shape.linear("1f1b")
    p, m = len(gpus), shape.microbatches
    ranks: dict[int, list[Step]] = {}
    for r, gpu in enumerate(gpus):
        ranks[gpu] = one_f_one_b_sequence(min(p - 1 - r, m), m, partial(Action, "F", r), partial(Action, "BW", r))
    return Schedule("1f1b", ranks, {"gpus": p})


def one_f_one_b_sequence(warmup: int, total: int, fwd: Callable[[int], T], bwd: Callable[[int], T]) -> list[T]:
    """``warmup`` forwards, then (forward, backward) pairs, then the remaining backwards;
    ``fwd(k)`` / ``bwd(k)`` give the k-th forward / backward of the rank."""
    seq = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        seq += [fwd(warmup + k), bwd(k)]
    seq += [bwd(k) for k in range(total - warmup, total)]
    return seq


def interleaved(shape: PipelineShape) -> Schedule:
    """Interleaved 1F1B with ``v`` = stages / GPUs chunks per GPU (round-robin stages)."""
    shape.need_directions("interleaved", 1)
    gpus, v = shape.round_robin("interleaved")
    p, m = len(gpus), shape.microbatches
    if m % p:
        shape.fail("interleaved", "workload.microbatches",
                   f"needs micro-batches in groups of the {p} GPUs (a multiple of {p}), got {m}")
    group = p * v

    def chunk_mb(k: int, backward: bool) -> tuple[int, int]:
        within = k % group
        chunk = within // p
        return (v - 1 - chunk if backward else chunk), (k // group) * p + within % p

    ranks: dict[int, list[Step]] = {}
    for r, gpu in enumerate(gpus):
        def fwd(k, r=r):
            c, mb = chunk_mb(k, False)
            return Action("F", c * p + r, mb)

        def bwd(k, r=r):
            c, mb = chunk_mb(k, True)
            return Action("BW", c * p + r, mb)

        warmup = min((p - 1 - r) * 2 + (v - 1) * p, m * v)
        ranks[gpu] = one_f_one_b_sequence(warmup, m * v, fwd, bwd)
    return Schedule("interleaved", ranks, {"gpus": p, "chunks": v})
