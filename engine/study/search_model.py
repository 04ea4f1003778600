"""One configuration's memory and alpha-beta iteration time, without building its op graph.

The transformer workload builds ``5 x m x pp x vpp x tp x dp`` ops; a search over a thousand
configurations of a 1,024-GPU job cannot build them all. Every TP rank and DP replica of a
pipeline rank runs the same ops at the same times when nothing contends (the alpha-beta model:
every transfer ``cluster.transfer_time``, every collective its closed form), so one representative
GPU per pipeline rank (TP rank 0 of replica 0) carries the whole iteration:

* the ops are the workload's own (:func:`engine.workloads.transformer.stage_times` and
  :func:`~engine.workloads.transformer.step_end_times` give every duration, the collectives timed on
  their real groups), in the order of the named schedule (the schedule library's action lists,
  generated from the shape :func:`engine.planners.transformer_schedule.transformer_shape` reads);
* each action maps onto ops as :func:`engine.planners.transformer_schedule.transformer_order` maps
  it (F: compute, TP all-reduce, epilogue; a full backward BW: B, W, B's all-reduce, epilogue;
  split B: B, all-reduce, epilogue; W), with the workload's edges: the activation send
  ``F.end(v) -> F(v+1)``, the gradient send into ``B(v)`` (after ``B.end(v+1)`` with the
  zero-bubble family, after ``W(v+1)`` otherwise), the DP reduction after every W of the rank,
  the tied-embedding all-reduce, the optimizer step, the parameter all-gather;
* :func:`engine.core.timing.earliest_times` (the one semi-active timer) times them, one compute
  and one comm stream per representative GPU: what the simulator does in ``alpha_beta`` mode
  (``tests/test_search_model.py`` checks both give the same iteration on every schedule).

Memory follows the one residency rule (:mod:`engine.core.memory`): F allocates the stage's
activations at its start and W frees them at its end, B holds the recompute working set for its
own duration, on top of the weights, gradients and optimizer states
(:func:`engine.workloads.transformer_costs.static_memory_bytes`). A GPU's compute stream runs its
ops one after another in schedule order, so the peak along that order is the exact peak.

Times in us, sizes in bytes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from engine.core.comm import CommModel
from engine.core.errors import InputError
from engine.core.timing import earliest_times
from engine.planners.schedules.actions import Action, Overlap, PipelineShape, Schedule
from engine.planners.schedules.library import SCHEDULES
from engine.planners.transformer_schedule import check_layout
from engine.study.search_space import Config
from engine.workloads.transformer import (
    PARALLELISM_KEYS,
    StageTimes,
    StepEnd,
    TransformerSpec,
    gpu_of,
    rank_params,
    simulator_collective_us,
    spec_from_dict,
    stage_times,
    step_end_times,
)
from engine.workloads.transformer_costs import SPLIT_BACKWARD, ComputeModel, static_memory_bytes

# a refused configuration's field -> the reason it is counted under
PRUNE_REASONS = {
    "workload.parallelism.tp": "tp does not split heads / MLP",
    "workload.heads": "heads do not split hidden",
    "workload.layers": "layers do not split over pp x vpp",
    "workload.global_batch": "global batch does not split over micro_batch x dp",
    "workload.parallelism.vpp": "schedule layout",
    "workload.parallelism.schedule": "schedule layout",
}
MEMORY_REASON = "memory: over the per-GPU cap"
STATIC_REASON = "memory: weights, gradients and optimizer states alone over the cap"


@dataclass
class Evaluation:
    """What the memory and rank stages know of one configuration: the reason it was dropped, or
    its peak memory per GPU (bytes, the highest pipeline rank) and alpha-beta iteration (us)."""

    config: Config
    pruned: str | None = None
    detail: str = ""
    peak_memory_bytes: int = 0
    static_bytes: int = 0
    iteration_us: float = 0.0
    peak_by_rank: list[int] = field(default_factory=list)
    static_by_rank: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "pruned": self.pruned, "detail": self.detail,
                "peak_memory_bytes": self.peak_memory_bytes, "static_bytes": self.static_bytes,
                "iteration_us": self.iteration_us, "peak_by_rank": list(self.peak_by_rank),
                "static_by_rank": list(self.static_by_rank)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Evaluation":
        return cls(Config.from_dict(d["config"]), d["pruned"], d.get("detail", ""), int(d["peak_memory_bytes"]),
                   int(d["static_bytes"]), float(d["iteration_us"]), [int(x) for x in d.get("peak_by_rank", [])],
                   [int(x) for x in d.get("static_by_rank", [])])


def workload_section(base: dict[str, Any], config: Config) -> dict[str, Any]:
    """The scenario's ``workload`` section with ``config`` written in (fields the workload lacks left out)."""
    out = copy.deepcopy(base)
    out["micro_batch"] = config.micro_batch
    out["activation_recompute"] = config.recompute
    par = {k: v for k, v in config.to_dict().items() if k in PARALLELISM_KEYS}
    out["parallelism"] = par
    return out


def config_spec(base: dict[str, Any], config: Config) -> TransformerSpec:
    """The validated spec of ``config`` (the workload's and the schedule layout's rules; raises InputError)."""
    spec = spec_from_dict(workload_section(base, config))
    check_layout(spec, config.schedule)
    return spec


def representative_shape(spec: TransformerSpec, times: list[StageTimes]) -> PipelineShape:
    """The schedule library's view of ``spec``: as
    :func:`engine.planners.transformer_schedule.transformer_shape` reads it off the workload
    (per phase the largest stage time, F and B with their all-reduce), from the stage times."""
    ph = {"F": max(t.F + t.ar_F for t in times), "B": max(t.B + t.ar_B for t in times), "W": max(t.W for t in times)}
    devices = tuple(gpu_of(spec, 0, spec.stage_rank(v), 0) for v in range(spec.stages))
    return PipelineShape(spec.stages, spec.microbatches, 1, devices, True, ph, times[0].cost.send_bytes)


class _Graph:
    """Ops of the representative GPUs: durations, arcs (u, v, lag) and per-GPU stream chains."""

    def __init__(self) -> None:
        self.dur: list[float] = []
        self.arcs: list[tuple[int, int, float]] = []
        self.chains: dict[tuple[int, str], list[int]] = {}
        self.names: list[str] = []

    def op(self, name: str, dur: float, gpu: int, stream: str) -> int:
        k = len(self.dur)
        self.dur.append(dur)
        self.names.append(name)
        self.chains.setdefault((gpu, stream), []).append(k)
        return k

    def after(self, u: int, v: int, delay: float = 0.0) -> None:
        self.arcs.append((u, v, self.dur[u] + delay))

    def times(self) -> list[float]:
        arcs = list(self.arcs)
        for chain in self.chains.values():
            arcs += [(a, b, self.dur[a]) for a, b in zip(chain, chain[1:])]
        return earliest_times(len(self.dur), arcs)


def _schedule(spec: TransformerSpec, times: list[StageTimes], comm: CommModel) -> Schedule:
    try:
        return SCHEDULES[spec.parallelism.schedule](representative_shape(spec, times), comm)
    except InputError as e:
        raise InputError(None, "workload.parallelism.schedule", e.reason) from None


def _actions(step) -> list[Action]:
    return [step.forward, step.backward] if isinstance(step, Overlap) else [step]


def time_iteration(spec: TransformerSpec, schedule: Schedule, times: list[StageTimes], end: StepEnd,
                   comm: CommModel) -> tuple[float, dict[str, tuple[float, float]]]:
    """The alpha-beta iteration (us) of ``schedule`` on the representative GPUs, and each op's
    (start, end) by the workload's op id without rank suffixes (module docstring)."""
    g = _Graph()
    tp = spec.parallelism.tp > 1
    last = spec.stages - 1
    split = spec.parallelism.schedule in SPLIT_BACKWARD
    gpu = {v: gpu_of(spec, 0, spec.stage_rank(v), 0) for v in range(spec.stages)}
    ids: dict[str, int] = {}

    def put(name: str, dur: float, dev: int, stream: str = "compute") -> int:
        ids[name] = g.op(name, dur, dev, stream)
        return ids[name]

    def phase(ph: str, mb: int, v: int) -> None:
        st = times[v]
        dur, tail, ar = (st.F, st.F_tail, st.ar_F) if ph == "F" else (st.B, st.B_tail, st.ar_B)
        k = put(f"{ph}{mb}.s{v}", dur - tail, gpu[v])
        if tp:
            ids[f"{ph}{mb}.s{v}.ar"] = a = g.op(f"{ph}{mb}.s{v}.ar", ar, gpu[v], "comm")
            g.after(k, a)

    def epilogue(ph: str, mb: int, v: int) -> None:
        if tp:
            st = times[v]
            e = put(f"{ph}{mb}.s{v}.end", st.F_tail if ph == "F" else st.B_tail, gpu[v])
            g.after(ids[f"{ph}{mb}.s{v}.ar"], e)

    for lead in sorted(schedule.ranks):
        for step in schedule.ranks[lead]:
            for act in _actions(step):
                mb, v = act.microbatch, act.stage
                if act.phase == "F":
                    phase("F", mb, v)
                    epilogue("F", mb, v)
                elif act.phase == "W":
                    put(f"W{mb}.s{v}", times[v].W, gpu[v])
                else:
                    phase("B", mb, v)
                    if act.phase == "BW":
                        put(f"W{mb}.s{v}", times[v].W, gpu[v])
                    epilogue("B", mb, v)
    f_end = lambda mb, v: ids[f"F{mb}.s{v}.end" if tp else f"F{mb}.s{v}"]
    b_end = lambda mb, v: ids[f"B{mb}.s{v}.end" if tp else f"B{mb}.s{v}"]
    for mb in range(spec.microbatches):
        for v in range(spec.stages):
            send = times[v].cost.send_bytes
            g.after(f_end(mb, v), ids[f"B{mb}.s{v}"])
            g.after(ids[f"B{mb}.s{v}"], ids[f"W{mb}.s{v}"])
            if v < last:
                hop = comm.route_delay(gpu[v], gpu[v + 1], send)
                g.after(f_end(mb, v), ids[f"F{mb}.s{v + 1}"], hop)
                back = comm.route_delay(gpu[v + 1], gpu[v], send)
                if split:
                    g.after(b_end(mb, v + 1), ids[f"B{mb}.s{v}"], back)
                else:
                    g.after(b_end(mb, v + 1), ids[f"B{mb}.s{v}"])
                    g.after(ids[f"W{mb}.s{v + 1}"], ids[f"B{mb}.s{v}"], back)
    _step_end(spec, end, g, ids, gpu)
    t = g.times()
    span = {n: (t[k], t[k] + g.dur[k]) for n, k in ids.items()}
    return max((e for _, e in span.values()), default=0.0), span


def _step_end(spec: TransformerSpec, end: StepEnd, g: _Graph, ids: dict[str, int], gpu: dict[int, int]) -> None:
    """DP reduction, tied-embedding all-reduce, optimizer step and parameter all-gather per rank
    (as :func:`engine.workloads.transformer._add_step_end` orders them)."""
    par = spec.parallelism
    rank_gpu = {p: gpu_of(spec, 0, p, 0) for p in range(par.pp)}
    stages_of = {p: [v for v in range(spec.stages) if spec.stage_rank(v) == p] for p in range(par.pp)}
    ready: dict[int, list[int]] = {p: [ids[f"W{mb}.s{v}"] for mb in range(spec.microbatches) for v in stages_of[p]]
                                   for p in range(par.pp)}
    if par.dp > 1:
        for p in range(par.pp):
            k = g.op(f"DP.p{p}", end.dp[p], rank_gpu[p], "comm")
            for w in ready[p]:
                g.after(w, k)
            ready[p] = [k]
    if end.emb_ranks is not None:
        a, b = end.emb_ranks
        k = g.op("EMB", end.emb, rank_gpu[a], "comm")
        g.chains.setdefault((rank_gpu[b], "comm"), []).append(k)
        for x in sorted(set(ready[a] + ready[b])):
            g.after(x, k)
        ready[a] = ready[b] = [k]
    for p in range(par.pp):
        k = g.op(f"OPT.p{p}", end.opt[p], rank_gpu[p], "compute")
        for x in ready[p]:
            g.after(x, k)
        ids[f"OPT.p{p}"] = k
        if par.dp > 1 and spec.distributed_optimizer:
            ids[f"AG.p{p}"] = ag = g.op(f"AG.p{p}", end.ag[p], rank_gpu[p], "comm")
            g.after(k, ag)


def peak_memory(spec: TransformerSpec, schedule: Schedule, times: list[StageTimes]) -> tuple[list[int], list[int]]:
    """Per pipeline rank, (static bytes, peak bytes) of its GPUs along the schedule's order."""
    params = rank_params(spec)
    static = [static_memory_bytes(spec, params[p]) for p in range(spec.parallelism.pp)]
    rank_of = {gpu_of(spec, 0, p, 0): p for p in range(spec.parallelism.pp)}
    peaks = list(static)
    for lead, steps in schedule.ranks.items():
        p = rank_of[lead]
        live = static[p]
        for step in steps:
            for act in _actions(step):
                c = times[act.stage].cost
                if act.phase == "F":
                    live += c.activation_bytes
                    peaks[p] = max(peaks[p], live)
                if act.phase in ("B", "BW"):
                    peaks[p] = max(peaks[p], live + c.backward_temp_bytes)
                if act.phase in ("W", "BW"):
                    live -= c.activation_bytes
    return static, peaks


def evaluate(base: dict[str, Any], config: Config, cluster: Any, cap_bytes: int, *, timed: bool = True) -> Evaluation:
    """The memory stage and (``timed``) the rank stage for ``config`` of the model ``base`` (the
    scenario's ``workload`` section) on ``cluster``, against ``cap_bytes`` per GPU."""
    try:
        spec = config_spec(base, config)
    except InputError as e:
        return Evaluation(config, PRUNE_REASONS.get(e.field or "", e.field or "invalid"), e.reason)
    model = ComputeModel.from_profile(cluster.profile, spec.dtype)
    times = stage_times(spec, cluster, model, simulator_collective_us)
    params = rank_params(spec)
    static_max = max(static_memory_bytes(spec, n) for n in params)
    if static_max > cap_bytes:
        return Evaluation(config, STATIC_REASON, f"{static_max} B static > cap {cap_bytes} B", static_bytes=static_max)
    comm = CommModel(cluster)
    try:
        schedule = _schedule(spec, times, comm)
    except InputError as e:
        return Evaluation(config, PRUNE_REASONS["workload.parallelism.schedule"], e.reason)
    static, peaks = peak_memory(spec, schedule, times)
    out = Evaluation(config, peak_memory_bytes=max(peaks), static_bytes=max(static), peak_by_rank=peaks,
                     static_by_rank=static)
    if out.peak_memory_bytes > cap_bytes:
        out.pruned, out.detail = MEMORY_REASON, f"{out.peak_memory_bytes} B > cap {cap_bytes} B"
        return out
    if timed:
        end = step_end_times(spec, cluster, model, simulator_collective_us)
        out.iteration_us, _ = time_iteration(spec, schedule, times, end, comm)
    return out
