"""The figures Megatron users compare, from a transformer spec and a simulated iteration.

* throughput: ``tokens_per_s = global_batch x seq_len / iteration`` (and per GPU, over
  ``tp x pp x dp`` GPUs);
* ``model_tflops_per_gpu`` and ``mfu``: :func:`engine.workloads.transformer_costs.model_flops_per_iteration`
  (Megatron's model-FLOPs count, Narayanan et al. 2021: forward + backward = 3 x forward, no
  recomputation) over the iteration and the GPUs, MFU against the profile's dense peak for the
  spec's precision (``Profile.peak_flops_per_us``);
* ``breakdown_us``: the iteration of the GPU with the most compute-busy time (the one that sets
  the bubble, docs/DESIGN.md) split into ``compute`` (its compute ops), exposed communication
  (time it computes nothing while a collective it belongs to runs: ``tp`` for the stage's TP
  all-reduces, ``dp`` for the gradient reduction, the tied-embedding all-reduce and the
  parameter all-gather, ``ep`` for all-to-all, ``cp`` for ops of phase ``CP``; then ``pp``:
  idle time while a pipeline send into one of its ops is in flight) and ``bubble`` (the rest).
  The parts add up to the makespan;
* ``memory_breakdown_bytes`` of the GPU with the highest simulated peak: weights, gradients and
  optimizer states (:func:`engine.workloads.transformer_costs.static_memory_breakdown`) and
  activations = simulated peak - static (the simulator's residency, :mod:`engine.core.memory`).

Times in us, sizes in bytes, rates per second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.core.ir import Workload
from engine.workloads.transformer import rank_params
from engine.workloads.transformer_costs import TransformerSpec, model_flops_per_iteration, static_memory_breakdown
from simulator.result import SimResult

COMM_CLASSES = ("tp", "ep", "cp", "dp", "pp")  # exposed time goes to the first class running
_PHASE_CLASS = {"DP": "dp", "AG": "dp", "EMB": "dp", "EP": "ep", "CP": "cp", "PP": "pp"}


@dataclass(frozen=True)
class TransformerFigures:
    makespan_us: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    breakdown_us: dict[str, float]
    peak_memory_bytes: int
    memory_breakdown_bytes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"makespan_us": self.makespan_us, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "model_tflops_per_gpu": self.model_tflops_per_gpu,
                "mfu": self.mfu, "breakdown_us": dict(self.breakdown_us), "peak_memory_bytes": self.peak_memory_bytes,
                "memory_breakdown_bytes": dict(self.memory_breakdown_bytes)}


def comm_class(op: Any) -> str:
    """The breakdown class of a communication op (see the module docstring)."""
    if op.phase in _PHASE_CLASS:
        return _PHASE_CLASS[op.phase]
    if op.collective is not None and op.collective.op == "all_to_all":
        return "ep"
    return "tp"


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint sorted ``a`` without disjoint sorted ``b``."""
    out, j = [], 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum((e - s for s, e in intervals), 0.0)


def breakdown_us(workload: Workload, result: SimResult, gpu: int) -> dict[str, float]:
    """``gpu``'s iteration split into compute, exposed comm per class and bubble (us, summing to the makespan)."""
    compute: list[tuple[float, float]] = []
    comm: dict[str, list[tuple[float, float]]] = {c: [] for c in COMM_CLASSES}
    for name, (d, s, e) in result.op_times.items():
        op = workload.ops[name]
        if op.collective is not None:
            if gpu in op.collective.group or d == gpu:
                comm[comm_class(op)].append((s, e))
        elif d == gpu:
            (compute if op.kind == "compute" else comm[comm_class(op)]).append((s, e))
    for (u, v), edge in result.edges.items():  # pipeline sends in flight into this GPU
        if edge["dst_device"] == gpu and edge["src_device"] != gpu:
            start = result.op_times[u][2]
            comm["pp"].append((start, start + edge["observed_us"]))
    busy = _union(compute)
    out = {"compute": _length(busy)}
    covered = busy
    for c in COMM_CLASSES:
        exposed = _minus(_union(comm[c]), covered)
        out[c] = _length(exposed)
        covered = _union(covered + exposed)
    out["bubble"] = max(0.0, result.makespan_us - _length(covered))
    return out


def transformer_figures(spec: TransformerSpec, profile: Any, workload: Workload, result: SimResult) -> TransformerFigures:
    """The figures of one simulated iteration of ``spec`` (``profile``: the cluster's hardware profile)."""
    t = result.makespan_us
    gpus = spec.parallelism.gpus
    tokens = spec.global_batch * spec.seq_len
    per_s = tokens / (t * 1e-6) if t > 0 else 0.0
    flops_per_s = model_flops_per_iteration(spec) / (t * 1e-6) if t > 0 else 0.0
    peak = profile.peak_flops_per_us(spec.dtype) * 1e6  # FLOP/s of one GPU
    busy = {d: v["busy_us"] for d, v in result.devices.items()}
    critical = min(busy, key=lambda d: (-busy[d], d)) if busy else 0
    peaks = {d: v["peak_memory_bytes"] for d, v in result.devices.items()}
    top = min(peaks, key=lambda d: (-peaks[d], d)) if peaks else 0
    par = spec.parallelism
    static = static_memory_breakdown(spec, rank_params(spec)[(top // par.tp) % par.pp])
    mem = {**static, "activations": max(0, int(peaks.get(top, 0)) - workload.static_memory_bytes.get(top, 0))}
    return TransformerFigures(makespan_us=t, tokens_per_s=per_s, tokens_per_s_per_gpu=per_s / gpus,
                              model_tflops_per_gpu=flops_per_s / gpus / 1e12, mfu=flops_per_s / gpus / peak,
                              breakdown_us=breakdown_us(workload, result, critical),
                              peak_memory_bytes=int(peaks.get(top, 0)), memory_breakdown_bytes=mem)
