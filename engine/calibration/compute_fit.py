"""Fit the compute-efficiency model to measured training iteration times (vTrain's Megatron runs).

Each measured run (GPT model, batch, TP x DP x PP on one node, 1F1B) becomes a
:class:`engine.workloads.transformer_costs.TransformerSpec`. Its predicted iteration time is the closed
form :func:`engine.planners.pipeline_time.iteration_time_1f1b` of the per-stage times the
transformer builder uses. Every compute time is linear in four numbers,

    t = flops / (peak x eff) + gemms x F_half / (peak x eff) + bytes / (hbm x mem_eff) + kernels x k

(GEMM FLOPs, GEMM count, element-wise HBM bytes, element-wise kernels), so each run is reduced
once to those counts per stage and phase plus its communication times (from the profile's
collective model, which the fit leaves alone), and a prediction for all runs is a few numpy
operations. The fit is least squares on log time over a training subset with scipy.

Fitted: ``gpu.compute_efficiency`` (eff), ``gpu.gemm_half_gflop`` (F_half), ``gpu.memory_efficiency``
(mem_eff) and ``gpu.kernel_overhead_us`` (k). ``comm.buffer_passes`` is rescaled with mem_eff so
the collective times the fit used stay what the profile gives.

Assumptions (Megatron-LM defaults): GPT-2 vocabulary (50,257) padded to a multiple of 128 x tp,
fp16, no recomputation, no distributed optimizer, tied embeddings, one pipeline stage per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.calibration.collective_model import mape
from engine.calibration.vtrain import VtrainRun
from engine.core.comm import CommModel
from engine.planners.pipeline_time import send_time_us
from engine.workloads.transformer import (
    Parallelism,
    TransformerSpec,
    check_spec,
    rank_params,
    simulator_collective_us,
    stage_times,
    step_end_times,
)
from engine.workloads.transformer_costs import OPTIMIZER_BYTES_PER_PARAM, ComputeModel, PhaseCost

if TYPE_CHECKING:
    from hardware_profiles import Cluster

GPT2_VOCAB = 50257
PARAM_NAMES = ("compute_efficiency", "gemm_half_gflop", "memory_efficiency", "kernel_overhead_us")
BOUNDS = ((0.05, 1.0), (0.0, 1000.0), (0.05, 1.0), (0.0, 200.0))


def padded_vocab(vocab: int, tp: int, divisible: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible x tp``."""
    step = divisible * tp
    return -(-vocab // step) * step


def run_spec(run: VtrainRun, vocab: int = GPT2_VOCAB, precision: str = "fp16") -> TransformerSpec:
    """The transformer spec of one measured run."""
    spec = TransformerSpec(layers=run.layers, hidden=run.hidden, heads=run.heads, seq_len=run.seq_len,
                           vocab=padded_vocab(vocab, run.tp), global_batch=run.global_batch,
                           micro_batch=run.micro_batch, precision=precision,
                           parallelism=Parallelism(tp=run.tp, pp=run.pp, dp=run.dp))
    check_spec(spec)
    return spec


def _counts(phase: PhaseCost) -> list[float]:
    return [phase.flops, float(len(phase.gemm_flops)), phase.memory_bytes, float(phase.kernels)]


@dataclass
class _Group:
    """Runs with the same pipeline depth, as arrays (run, stage, count)."""

    idx: np.ndarray
    m: np.ndarray
    F: np.ndarray
    B: np.ndarray
    W: np.ndarray
    extra_F: np.ndarray
    extra_B: np.ndarray
    ar_F: np.ndarray
    ar_B: np.ndarray
    send: np.ndarray
    dp: np.ndarray
    opt: np.ndarray
    emb: np.ndarray


class IterationModel:
    """Closed-form iteration times of many runs for any compute parameters."""

    def __init__(self, runs: Sequence[VtrainRun], cluster: Cluster, vocab: int = GPT2_VOCAB, precision: str = "fp16"):
        self.runs = list(runs)
        self.cluster = cluster
        self.specs = [run_spec(r, vocab, precision) for r in self.runs]
        comm = CommModel(cluster)
        ref = ComputeModel(peak_flops_per_us=1.0)  # unused by the counts; comm times do not depend on it
        rows: dict[int, list] = {}
        for i, spec in enumerate(self.specs):
            st = stage_times(spec, cluster, ref, simulator_collective_us)
            end = step_end_times(spec, cluster, ref, simulator_collective_us)
            send = send_time_us(spec, cluster, comm, st[0].cost.send_bytes)
            rows.setdefault(spec.parallelism.pp, []).append((i, spec, st, end, send, ref))
        self.groups = [self._group(v) for _, v in sorted(rows.items())]
        self.peak = [cluster.peak_flops_per_us(s.dtype) for s in self.specs]
        self.hbm = cluster.profile.gpu.hbm_bytes_per_us

    @staticmethod
    def _group(rows) -> _Group:
        """``rows``: (run index, spec, stage times, step end, send us, reference compute model)."""
        def per_stage(f):
            return np.array([[f(t, ref) for t in st] for _i, _spec, st, _end, _send, ref in rows], float)

        # the compute-stream time beyond the phase's own compute: per-message TP latencies
        extra = lambda ph: per_stage(lambda t, ref: getattr(t, ph) - getattr(t.cost, ph).compute_us(ref))
        return _Group(
            idx=np.array([r[0] for r in rows]), m=np.array([r[1].microbatches for r in rows], float),
            F=np.array([[_counts(t.cost.F) for t in r[2]] for r in rows]),
            B=np.array([[_counts(t.cost.B) for t in r[2]] for r in rows]),
            W=np.array([[_counts(t.cost.W) for t in r[2]] for r in rows]),
            extra_F=extra("F"), extra_B=extra("B"),
            ar_F=per_stage(lambda t, ref: t.ar_F), ar_B=per_stage(lambda t, ref: t.ar_B),
            send=np.array([r[4] for r in rows]), dp=np.array([list(r[3].dp) for r in rows]),
            opt=np.array([[[OPTIMIZER_BYTES_PER_PARAM * float(p), 4.0] for p in rank_params(r[1])] for r in rows]),
            emb=np.array([r[3].emb for r in rows]))

    def theta(self, params: Sequence[float]) -> np.ndarray:
        """Per run (peak differs by dtype) the four unit costs: us per FLOP, per GEMM, per byte, per kernel."""
        eff, half_gflop, mem_eff, k = params
        peak = np.array(self.peak)
        return np.stack([1.0 / (peak * eff), half_gflop * 1e9 / (peak * eff),
                         np.full(len(peak), 1.0 / (self.hbm * mem_eff)), np.full(len(peak), k)], axis=1)

    def predict(self, params: Sequence[float]) -> np.ndarray:
        """Iteration time (us) of every run."""
        th = self.theta(params)
        out = np.empty(len(self.runs))
        for g in self.groups:
            t = th[g.idx][:, None, :]
            F = (g.F * t).sum(-1) + g.extra_F
            B = (g.B * t).sum(-1) + g.extra_B
            W = (g.W * t).sum(-1)
            fwd = F + g.ar_F
            bwd = B + np.where(g.ar_B > 0, np.maximum(W, g.ar_B), W)
            slot = fwd + bwd
            p = slot.shape[1]
            pipe = slot.sum(1) + (g.m - 1) * slot.max(1) + 2 * (p - 1) * g.send
            before = np.cumsum(bwd + g.send[:, None], axis=1) - (bwd + g.send[:, None])
            ready = pipe[:, None] - before + g.dp
            if p > 1:
                e = np.maximum(ready[:, 0], ready[:, -1]) + g.emb
                ready[:, 0] = ready[:, -1] = e
            opt = g.opt[:, :, 0] * th[g.idx][:, None, 2] + g.opt[:, :, 1] * th[g.idx][:, None, 3]
            out[g.idx] = (ready + opt).max(1)
        return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@dataclass
class ComputeFit:
    """Outcome of :func:`fit_compute`. Times in us, MAPE in percent."""

    runs: list[VtrainRun]
    train: np.ndarray
    before: np.ndarray
    after: np.ndarray
    start: tuple[float, ...]
    params: tuple[float, ...]
    converged: bool
    message: str
    nfev: int

    def measured(self) -> np.ndarray:
        return np.array([r.iter_us for r in self.runs])

    def mape(self, which: str = "after", subset: str = "test") -> float:
        mask = {"test": ~self.train, "train": self.train, "all": np.ones(len(self.runs), bool)}[subset]
        pred = self.after if which == "after" else self.before
        return mape(pred[mask], self.measured()[mask]) if mask.any() else float("nan")

    def spearman(self, which: str = "after", subset: str = "test") -> float:
        mask = {"test": ~self.train, "train": self.train, "all": np.ones(len(self.runs), bool)}[subset]
        pred = self.after if which == "after" else self.before
        return spearman(pred[mask], self.measured()[mask]) if mask.sum() > 2 else float("nan")

    def overrides(self, profile: Any) -> dict[str, float]:
        """Profile fields of the fit; ``comm.buffer_passes`` rescaled so collectives are unchanged."""
        eff, half, mem, k = self.params
        out = {"gpu.compute_efficiency": float(eff), "gpu.gemm_half_gflop": float(half),
               "gpu.memory_efficiency": float(mem), "gpu.kernel_overhead_us": float(k)}
        passes = profile.comm.buffer_passes
        if passes > 0:
            out["comm.buffer_passes"] = float(min(20.0, passes * mem / profile.gpu.memory_efficiency))
        return out


def random_split(n: int, share: float = 0.5, seed: int = 0) -> np.ndarray:
    """A seeded training mask with ``round(share x n)`` runs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: int(round(share * n))]] = True
    return mask


def fit_compute(model: IterationModel, train: np.ndarray | None = None, start: Sequence[float] | None = None,
                max_nfev: int = 300) -> ComputeFit:
    """Fit the four compute parameters to the ``train`` runs (all if ``None``)."""
    from scipy.optimize import least_squares

    prof = model.cluster.profile.gpu
    start = tuple(start or (prof.compute_efficiency, prof.gemm_half_flops / 1e9, prof.memory_efficiency,
                            prof.kernel_overhead_us))
    train = np.ones(len(model.runs), bool) if train is None else np.asarray(train, bool)
    meas = np.array([r.iter_us for r in model.runs])
    lo, hi = np.array([b[0] for b in BOUNDS]), np.array([b[1] for b in BOUNDS])

    def residuals(x):
        return np.log(model.predict(x)[train] / meas[train])

    def cost(x):
        return float(np.sum(residuals(x) ** 2))

    best = None
    starts = [np.clip(start, lo + 1e-6, hi - 1e-6), np.array([0.6, 1.0, 0.8, 5.0]), np.array([0.4, 10.0, 0.5, 1.0])]
    for x0 in starts:
        try:
            sol = least_squares(residuals, x0, bounds=(lo, hi), x_scale=[0.1, 1.0, 0.1, 1.0], max_nfev=max_nfev)
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(sol.fun)) and (best is None or sol.cost < best.cost):
            best = sol
    before = model.predict(start)
    if best is None:
        return ComputeFit(model.runs, train, before, before, start, start, False, "solver failed", 0)
    ok, msg = bool(best.success), str(best.message)
    if ok and cost(best.x) > cost(np.array(start)) * (1 + 1e-9):
        ok, msg = False, "the fit ended worse than it started"
    params = tuple(float(v) for v in best.x) if ok else start
    return ComputeFit(model.runs, train, before, model.predict(params), start, params, ok, msg, int(best.nfev))
