"""The ``transformer`` workload: one training iteration of a GPT-style model.

Scenario form::

    workload:
      kind: transformer
      layers: 24
      hidden: 2048
      heads: 16
      seq_len: 2048
      vocab: 50257
      global_batch: 64
      micro_batch: 2
      precision: bf16                   # fp32 | tf32 | fp16 | bf16 | fp8
      activation_recompute: none        # none | selective | full
      ffn_hidden: 8192                  # optional, default 4 x hidden
      distributed_optimizer: false      # true: reduce-scatter grads, all-gather params (ZeRO-1)
      parallelism: {tp: 2, pp: 4, dp: 1, vpp: 1, schedule: 1f1b}

GPU layout: TP ranks innermost (consecutive GPUs, inside a node when tp <= GPUs per node), then
pipeline ranks, then data-parallel replicas: GPU = d x (pp x tp) + p x tp + r.

Ops (costs from :mod:`engine.workloads.transformer_costs`; times in us from the cluster's profile):

* per micro-batch ``mb``, virtual stage ``v``, TP rank ``r`` and DP replica ``d``: compute ops
  ``F{mb}.s{v}``, ``B{mb}.s{v}`` (input gradient) and ``W{mb}.s{v}`` (weight gradient), with
  suffix ``.t{r}`` when tp > 1 and ``.d{d}`` when dp > 1. Every TP rank has its own ops: they run
  in lock step, so a simulator that exploits symmetry simulates one; the op count is
  ``3 x m x pp x vpp x tp x dp`` (5 x with the TP epilogues below, plus the collectives), which
  is why scenarios for big jobs should keep tp x dp small or coarsen.
* tp > 1: ``F{mb}.s{v}.ar`` / ``B{mb}.s{v}.ar`` (+ ``.d{d}``), one comm op per phase standing for
  all of the stage's TP all-reduces (two per layer each way, Megatron without sequence
  parallelism): ``Collective(all_reduce, the TP group, bytes = total bytes)``, lasting what the
  simulator gives that collective. It runs after the phase's compute op on every TP rank and
  before that phase's epilogue ``F{mb}.s{v}.end`` / ``B{mb}.s{v}.end`` (+ rank suffix: the bias,
  dropout and residual work after the last all-reduce, part of F's or B's time, plus the
  per-message latency of the other k - 1 all-reduces, which stalls the compute stream). A plan
  that puts the epilogue right after its phase keeps the compute stream waiting for the
  all-reduce, as Megatron does; a plan may also fill that wait with another micro-batch's work.
  W does not wait for B's all-reduce (Megatron overlaps it with the weight-gradient GEMMs).
* pipeline sends: edges from the end of F(v) to F(v+1) and, backwards, into B(v) between the
  same TP rank carry ``b x s x h x bytes / tp`` (scatter/gather of the activation across the TP
  ranks). The gradient leaves stage v+1 after its W with schedules that run the backward in one
  piece (1f1b, gpipe, interleaved: Megatron), after its B with the zero-bubble family (zb-*,
  dualpipe*), which is what lets those schedules defer W.
* per pipeline rank, TP rank: the data-parallel gradient reduction ``DP.p{p}.t{r}`` (all-reduce,
  or reduce-scatter with the distributed optimizer) over the dp replicas after every W there
  (only when dp > 1); when the first and last stage sit on different pipeline ranks, the
  tied-embedding all-reduce ``EMB.t{r}.d{d}`` between them; then the optimizer step
  ``OPT.p{p}.t{r}.d{d}`` on every GPU (and ``AG.p{p}.t{r}`` all-gathering the updated parameters
  with the distributed optimizer).

Memory: ``static_memory_bytes`` = weights + gradients + optimizer states per GPU; each F holds
its activations (Korthikanti et al., the form without sequence parallelism:
:func:`engine.workloads.transformer_costs.activation_bytes_per_layer`) until its W ends; B of a
recomputing stage holds the recomputed working set for its own duration.

The schedule (1F1B, interleaved, ZB, DualPipe) is the plan's order, not the workload's: it is
kept in ``meta`` and decides only which pipeline rank holds each virtual stage (V-shaped
schedules fold the second chunk back) and whether gradients wait for W (above).
:mod:`engine.planners.pipeline_time` builds Megatron's 1F1B order for vpp = 1.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from engine.core.errors import InputError, nearest
from engine.core.ir import Collective, Edge, Op, Workload
from engine.workloads.pipeline import SCHEDULE_NAMES
from engine.workloads.transformer_costs import (
    PRECISIONS,
    RECOMPUTE,
    SPLIT_BACKWARD,
    ComputeModel,
    Parallelism,
    StageCost,
    TransformerSpec,
    optimizer_us,
    stage_cost,
    static_memory_bytes,
)
from simulator.collectives import CollectivePlanner

if TYPE_CHECKING:
    from hardware_profiles import Cluster

TRANSFORMER_KEYS = ("kind", "layers", "hidden", "heads", "seq_len", "vocab", "global_batch", "micro_batch",
                    "precision", "activation_recompute", "parallelism", "ffn_hidden", "distributed_optimizer")
PARALLELISM_KEYS = ("tp", "pp", "dp", "vpp", "schedule")
# Element passes of the epilogue after a TP all-reduce (bias, dropout mask, residual: read 3, write 1)
TAIL_ELEMENTS = 4
_REQUIRED = ("layers", "hidden", "heads", "seq_len", "vocab", "global_batch", "micro_batch")

CollectiveTime = Callable[[Any, Collective], float]


def _pos_int(spec: dict, key: str, where: str, default: int | None = None) -> int:
    v = spec.get(key, default)
    if v is None:
        raise InputError(None, f"{where}.{key}", "missing")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(None, f"{where}.{key}", f"must be an integer >= 1, got {v!r}")
    return v


def spec_from_dict(spec: Any) -> TransformerSpec:
    """Validate a ``workload: {kind: transformer, ...}`` mapping (errors name the field)."""
    if not isinstance(spec, dict):
        raise InputError(None, "workload", "must be a mapping")
    for key in spec:
        if key not in TRANSFORMER_KEYS:
            raise InputError(None, f"workload.{key}", "unknown field" + nearest(str(key), tuple(TRANSFORMER_KEYS)))
    vals = {k: _pos_int(spec, k, "workload") for k in _REQUIRED}
    ffn = spec.get("ffn_hidden")
    if ffn is not None:
        ffn = _pos_int(spec, "ffn_hidden", "workload")
    precision = spec.get("precision", "bf16")
    if precision not in PRECISIONS:
        raise InputError(None, "workload.precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    recompute = spec.get("activation_recompute", "none")
    if recompute in (False, None):
        recompute = "none"
    if recompute not in RECOMPUTE:
        raise InputError(None, "workload.activation_recompute", f"must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    dist_opt = spec.get("distributed_optimizer", False)
    if not isinstance(dist_opt, bool):
        raise InputError(None, "workload.distributed_optimizer", f"must be true or false, got {dist_opt!r}")
    par = spec.get("parallelism") or {}
    if not isinstance(par, dict):
        raise InputError(None, "workload.parallelism", "must be a mapping {tp, pp, dp, vpp, schedule}")
    for key in par:
        if key not in PARALLELISM_KEYS:
            raise InputError(None, f"workload.parallelism.{key}", "unknown field" + nearest(str(key), tuple(PARALLELISM_KEYS)))
    tp, pp, dp, vpp = (_pos_int(par, k, "workload.parallelism", 1) for k in ("tp", "pp", "dp", "vpp"))
    schedule = par.get("schedule", "interleaved" if vpp > 1 else "1f1b")
    if schedule not in SCHEDULE_NAMES:
        raise InputError(None, "workload.parallelism.schedule", f"must be one of {', '.join(SCHEDULE_NAMES)}, got {schedule!r}")
    out = TransformerSpec(precision=precision, activation_recompute=recompute, ffn_hidden=ffn,
                          distributed_optimizer=dist_opt, parallelism=Parallelism(tp, pp, dp, vpp, schedule), **vals)
    check_spec(out)
    return out


def check_spec(spec: TransformerSpec) -> None:
    """Divisibility rules Megatron enforces (errors name the field)."""
    par = spec.parallelism
    if spec.heads % par.tp:
        raise InputError(None, "workload.parallelism.tp", f"{spec.heads} heads do not split over tp={par.tp}")
    if spec.hidden % spec.heads:
        raise InputError(None, "workload.heads", f"hidden {spec.hidden} is not a multiple of {spec.heads} heads")
    if spec.ffn % par.tp:
        raise InputError(None, "workload.parallelism.tp", f"MLP hidden {spec.ffn} does not split over tp={par.tp}")
    if spec.layers % spec.stages:
        raise InputError(None, "workload.layers", f"{spec.layers} layers do not split over pp x vpp = {spec.stages} stages")
    if spec.global_batch % (spec.micro_batch * par.dp):
        raise InputError(None, "workload.global_batch",
                         f"{spec.global_batch} is not a multiple of micro_batch x dp = {spec.micro_batch * par.dp}")


def gpu_of(spec: TransformerSpec, d: int, p: int, r: int) -> int:
    """GPU of DP replica ``d``, pipeline rank ``p``, TP rank ``r`` (TP innermost, then PP, then DP)."""
    par = spec.parallelism
    return d * par.pp * par.tp + p * par.tp + r


@dataclass(frozen=True)
class StageTimes:
    """Times (us) of virtual stage ``stage`` for one micro-batch on one GPU of pipeline rank
    ``rank``: compute-stream time ``F``, ``B``, ``W`` (each whole), of which ``F_tail`` /
    ``B_tail`` run after the phase's TP all-reduce ``ar_F`` / ``ar_B`` (0 when tp = 1), and its
    :class:`StageCost`.

    The all-reduce op moves all of the phase's messages as one collective (the simulator moves
    its bytes); the per-message latency of the other ``k - 1`` messages, ``k x t(one) - t(all)``,
    stalls the compute stream and is part of the tail (Megatron's TP all-reduces are synchronous).
    """

    stage: int
    rank: int
    F: float
    B: float
    W: float
    F_tail: float
    B_tail: float
    ar_F: float
    ar_B: float
    cost: StageCost


def stage_times(spec: TransformerSpec, cluster: Cluster, model: ComputeModel,
                collective_us: CollectiveTime) -> list[StageTimes]:
    """Per virtual stage, the op times :func:`build_transformer` uses (TP group of replica 0)."""
    out = []
    tp = spec.parallelism.tp
    for v in range(spec.stages):
        c, p = stage_cost(spec, v), spec.stage_rank(v)
        ar = {"F": 0.0, "B": 0.0}
        extra = {"F": 0.0, "B": 0.0}
        tail = 0.0
        if tp > 1:
            group = tuple(gpu_of(spec, 0, p, r) for r in range(tp))
            msg = c.send_bytes * tp
            one = collective_us(cluster, Collective("all_reduce", group, msg))
            for ph, phase in (("F", c.F), ("B", c.B)):
                k = phase.tp_messages
                ar[ph] = collective_us(cluster, Collective("all_reduce", group, msg * k)) if k else 0.0
                extra[ph] = max(0.0, k * one - ar[ph])
            tail = model.memory_us(TAIL_ELEMENTS * msg, kernels=1)
        out.append(StageTimes(v, p, c.F.compute_us(model) + extra["F"], c.B.compute_us(model) + extra["B"],
                              c.W.compute_us(model), tail + extra["F"] if tp > 1 else 0.0,
                              tail + extra["B"] if tp > 1 else 0.0, ar["F"], ar["B"], c))
    return out


def simulator_collective_us(cluster: Cluster, coll: Collective) -> float:
    """Time (us) the simulator gives ``coll`` alone on ``cluster`` (its planner, cached per cluster)."""
    planner = _PLANNERS.get(cluster)
    if planner is None:
        planner = _PLANNERS[cluster] = CollectivePlanner(cluster)
    return planner.time_us(coll.op, coll.bytes, coll.group, coll.algo)


_PLANNERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def build_transformer(spec: TransformerSpec, cluster: Cluster, collective_us: CollectiveTime | None = None,
                      compute: ComputeModel | None = None, name: str = "transformer") -> Workload:
    """The op graph of one training iteration of ``spec`` on ``cluster`` (see the module doc)."""
    par = spec.parallelism
    if par.gpus > cluster.n_gpus:
        raise InputError(None, "workload.parallelism",
                         f"tp x pp x dp = {par.gpus} GPUs but the cluster has {cluster.n_gpus}")
    coll_us = collective_us or simulator_collective_us
    model = compute or ComputeModel.from_profile(cluster.profile, spec.dtype)
    times = stage_times(spec, cluster, model, coll_us)
    costs = [t.cost for t in times]
    m, tp, dp = spec.microbatches, par.tp, par.dp
    tag = lambda r, d: (f".t{r}" if tp > 1 else "") + (f".d{d}" if dp > 1 else "")
    ops: list[Op] = []
    edges: list[Edge] = []
    static: dict[int, int] = {}
    params = rank_params(spec)
    last = spec.stages - 1
    split = par.schedule in SPLIT_BACKWARD
    for d in range(dp):
        for mb in range(m):
            for st in times:
                v, p, c = st.stage, st.rank, st.cost
                # the op that ends phase F / B of (mb, v) on TP rank r: the epilogue when tp > 1
                f_end = lambda r, v=v: f"F{mb}.s{v}" + (".end" if tp > 1 else "") + tag(r, d)
                b_end = lambda r, v=v: f"B{mb}.s{v}" + (".end" if tp > 1 else "") + tag(r, d)
                for r in range(tp):
                    gpu, sfx = gpu_of(spec, d, p, r), tag(r, d)
                    on = partial(Op, devices=(gpu,), stage=v, microbatch=mb, chunk=v // par.pp)
                    ops.append(on(f"F{mb}.s{v}{sfx}", st.F - st.F_tail, memory_bytes=c.activation_bytes,
                                  release=(f"W{mb}.s{v}{sfx}",), phase="F", flops=c.F.flops))
                    ops.append(on(f"B{mb}.s{v}{sfx}", st.B - st.B_tail, memory_bytes=c.backward_temp_bytes,
                                  phase="B", flops=c.B.flops))
                    ops.append(on(f"W{mb}.s{v}{sfx}", st.W, phase="W", flops=c.W.flops))
                    if tp > 1:
                        ops.append(on(f_end(r), st.F_tail, phase="F"))
                        ops.append(on(b_end(r), st.B_tail, phase="B"))
                    edges.append(Edge(f_end(r), f"B{mb}.s{v}{sfx}", 0))  # F (all of it) before its own B
                    edges.append(Edge(f"B{mb}.s{v}{sfx}", f"W{mb}.s{v}{sfx}", 0))  # W need not wait for B's all-reduce
                    if v < last:
                        edges.append(Edge(f_end(r), f"F{mb}.s{v + 1}{sfx}", c.send_bytes))
                        if split:
                            edges.append(Edge(b_end(r, v + 1), f"B{mb}.s{v}{sfx}", c.send_bytes))
                        else:  # the gradient leaves after the whole backward of the next stage
                            if tp > 1:
                                edges.append(Edge(b_end(r, v + 1), f"B{mb}.s{v}{sfx}", 0))
                            edges.append(Edge(f"W{mb}.s{v + 1}{sfx}", f"B{mb}.s{v}{sfx}", c.send_bytes))
                if tp > 1:
                    group = tuple(gpu_of(spec, d, p, r) for r in range(tp))
                    for ph, phase, dur in (("F", c.F, st.ar_F), ("B", c.B, st.ar_B)):
                        ar = f"{ph}{mb}.s{v}.ar" + (f".d{d}" if dp > 1 else "")
                        coll = Collective("all_reduce", group, c.send_bytes * tp * phase.tp_messages)
                        ops.append(Op(ar, dur, kind="comm", devices=(group[0],), collective=coll, phase=ph,
                                      stage=v, microbatch=mb, chunk=v // par.pp))
                        tail = f_end if ph == "F" else b_end
                        for r in range(tp):
                            edges.append(Edge(f"{ph}{mb}.s{v}{tag(r, d)}", ar, 0))
                            edges.append(Edge(ar, tail(r), 0))

    _add_step_end(spec, cluster, costs, params, model, coll_us, ops, edges, static)
    meta = {"kind": "transformer", "layers": spec.layers, "hidden": spec.hidden, "heads": spec.heads,
            "seq_len": spec.seq_len, "vocab": spec.vocab, "global_batch": spec.global_batch,
            "micro_batch": spec.micro_batch, "microbatches": m, "precision": spec.precision,
            "activation_recompute": spec.activation_recompute, "stages": spec.stages,
            "parallelism": {"tp": tp, "pp": par.pp, "dp": dp, "vpp": par.vpp, "schedule": par.schedule},
            "stage_ranks": [spec.stage_rank(v) for v in range(spec.stages)],
            "distributed_optimizer": spec.distributed_optimizer}
    return Workload(name=name, ops=ops, edges=edges, static_memory_bytes=static, meta=meta)


def rank_params(spec: TransformerSpec) -> list[int]:
    """Parameters on one GPU of each pipeline rank."""
    costs = [stage_cost(spec, v) for v in range(spec.stages)]
    return [sum(c.params for c in costs if spec.stage_rank(c.stage) == p) for p in range(spec.parallelism.pp)]


@dataclass(frozen=True)
class StepEnd:
    """Times (us) after the last micro-batch, per pipeline rank: the DP gradient reduction
    ``dp`` (0 when dp = 1), the optimizer step ``opt``, the parameter all-gather ``ag``
    (distributed optimizer); and the tied-embedding all-reduce ``emb`` between the ranks
    ``emb_ranks`` (``None`` when one rank holds both ends)."""

    dp: tuple[float, ...]
    opt: tuple[float, ...]
    ag: tuple[float, ...]
    emb: float
    emb_ranks: tuple[int, int] | None


def _dp_collective(spec: TransformerSpec, params: int, p: int, r: int, gather: bool = False) -> Collective:
    group = tuple(gpu_of(spec, d, p, r) for d in range(spec.parallelism.dp))
    if gather:
        return Collective("all_gather", group, params * spec.elem_bytes)
    op = "reduce_scatter" if spec.distributed_optimizer else "all_reduce"
    return Collective(op, group, params * spec.grad_bytes)


def _emb_collective(spec: TransformerSpec, d: int, r: int) -> Collective | None:
    first, last = spec.stage_rank(0), spec.stage_rank(spec.stages - 1)
    if first == last:
        return None
    ends = (gpu_of(spec, d, first, r), gpu_of(spec, d, last, r))
    return Collective("all_reduce", ends, (spec.vocab * spec.hidden) // spec.parallelism.tp * spec.grad_bytes)


def step_end_times(spec: TransformerSpec, cluster: Cluster, model: ComputeModel, collective_us: CollectiveTime) -> StepEnd:
    """The step-end op times :func:`build_transformer` uses (TP rank 0, replica 0)."""
    par = spec.parallelism
    params = rank_params(spec)
    dp = tuple(collective_us(cluster, _dp_collective(spec, params[p], p, 0)) if par.dp > 1 else 0.0
               for p in range(par.pp))
    ag = tuple(collective_us(cluster, _dp_collective(spec, params[p], p, 0, gather=True))
               if par.dp > 1 and spec.distributed_optimizer else 0.0 for p in range(par.pp))
    opt = tuple(optimizer_us(spec, params[p], model) for p in range(par.pp))
    emb = _emb_collective(spec, 0, 0)
    ranks = (spec.stage_rank(0), spec.stage_rank(spec.stages - 1)) if emb is not None else None
    return StepEnd(dp, opt, ag, collective_us(cluster, emb) if emb is not None else 0.0, ranks)


def _add_step_end(spec: TransformerSpec, cluster, costs: list[StageCost], params: list[int],
                  model: ComputeModel, coll_us: CollectiveTime, ops: list[Op], edges: list[Edge],
                  static: dict[int, int]) -> None:
    """Gradient reductions (DP, then the tied embedding, as Megatron orders them), the optimizer
    step and, with the distributed optimizer, the parameter all-gather."""
    par = spec.parallelism
    m, tp, dp, pp = spec.microbatches, par.tp, par.dp, par.pp
    tag = lambda r, d: (f".t{r}" if tp > 1 else "") + (f".d{d}" if dp > 1 else "")
    rank_stages = {p: [c.stage for c in costs if spec.stage_rank(c.stage) == p] for p in range(pp)}
    ready: dict[tuple[int, int, int], list[str]] = {}  # (p, r, d) -> ops after which grads are final
    for p in range(pp):
        for r in range(tp):
            for d in range(dp):
                ready[p, r, d] = [f"W{mb}.s{v}{tag(r, d)}" for mb in range(m) for v in rank_stages[p]]
            if dp > 1:
                coll = _dp_collective(spec, params[p], p, r)
                dp_id = f"DP.p{p}.t{r}"
                ops.append(Op(dp_id, coll_us(cluster, coll), kind="comm", devices=(coll.group[0],), collective=coll,
                              stage=p, phase="DP"))
                edges.extend(Edge(w, dp_id, 0) for d in range(dp) for w in ready[p, r, d])
                for d in range(dp):
                    ready[p, r, d] = [dp_id]
    first, last = spec.stage_rank(0), spec.stage_rank(spec.stages - 1)
    for r in range(tp):
        for d in range(dp):
            emb_coll = _emb_collective(spec, d, r)
            if emb_coll is None:  # one rank holds both ends of the tied embedding
                continue
            emb = f"EMB.t{r}" + (f".d{d}" if dp > 1 else "")
            ops.append(Op(emb, coll_us(cluster, emb_coll), kind="comm", devices=(emb_coll.group[0],),
                          collective=emb_coll, phase="EMB"))
            edges.extend(Edge(x, emb, 0) for x in sorted(set(ready[first, r, d] + ready[last, r, d])))
            ready[first, r, d] = ready[last, r, d] = [emb]
    for p in range(pp):
        for r in range(tp):
            for d in range(dp):
                gpu = gpu_of(spec, d, p, r)
                static[gpu] = static_memory_bytes(spec, params[p])
                opt_id = f"OPT.p{p}{tag(r, d)}"
                ops.append(Op(opt_id, optimizer_us(spec, params[p], model), devices=(gpu,), stage=p, phase="OPT"))
                edges.extend(Edge(x, opt_id, 0) for x in ready[p, r, d])
                if tp > 1:  # the step is complete: backward epilogues (some have no other successor) before OPT
                    edges.extend(Edge(f"B{mb}.s{v}.end{tag(r, d)}", opt_id, 0) for mb in range(m) for v in rank_stages[p])
            if dp > 1 and spec.distributed_optimizer:
                coll = _dp_collective(spec, params[p], p, r, gather=True)
                ag = f"AG.p{p}.t{r}"
                ops.append(Op(ag, coll_us(cluster, coll), kind="comm", devices=(coll.group[0],), collective=coll,
                              stage=p, phase="AG"))
                edges.extend(Edge(f"OPT.p{p}{tag(r, d)}", ag, 0) for d in range(dp))


def transformer_workload(spec: dict, base: Path, placement: dict, cluster: Cluster) -> Workload:
    """Scenario builder for ``kind: transformer`` (registered in ``engine.scenario.loader``)."""
    if placement.get("stage_devices") is not None:
        raise InputError(None, "placement.stage_devices", "not used by a transformer workload (its layout is tp, pp, dp)")
    return build_transformer(spec_from_dict(spec), cluster)
