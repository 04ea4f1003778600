"""Fit the collective cost model (:mod:`engine.calibration.collective_model`) to measurements.

Least squares on log time (every point weighs by its relative error) with scipy's bounded
trust-region solver. Only parameters the data can identify are free:

* a link class's efficiency and latency when some point crosses that class;
* per scope (intra-node, inter-node) the first collective present of all_gather,
  reduce_scatter, all_reduce, all_to_all, send_recv is the reference (its share ``eta`` stays 1,
  so the class efficiency is that collective's); the others get their own ``eta``;
* the NVLS share when some all-reduce runs NVLS and some other intra-node collective pins the
  NVLink efficiency (the intra-node all-reduce ``eta`` then stays 1);
* per-step latencies and ``passes`` only when the points have at least two group sizes (one
  group size cannot tell a per-step latency from the per-message overhead, nor a per-buffer
  HBM pass from link efficiency); otherwise they keep the given priors;
* per collective and scope a fixed cost ``fixed`` (us) when the points of that collective have
  at least two sizes; inside a node the reference collective's stays at its prior (the
  per-message overhead is its fixed cost), across nodes every collective has its own;
* per collective the full-node share ``full`` when its across-node points include groups that
  fill their nodes and groups that do not (otherwise it cannot be told from ``eta``).

A fit that does not converge, or ends worse than it started, is reported as failed and the
input parameters are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from engine.calibration.collective_model import CLASSES, OPS, CollectiveModel, CollectivePoint, CommParams, mape
from engine.calibration.nccl_tests import NcclLog
from engine.calibration.vtrain import LutRow

REFERENCE_ORDER = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send_recv", "broadcast")
BOUNDS = {"eff": (0.02, 1.0), "lat": (0.0, 200.0), "overhead": (0.0, 5000.0), "eta": (0.05, 2.0),
          "nvls": (0.05, 2.0), "passes": (0.0, 20.0),
          "fixed": (0.0, 5000.0), "full": (0.05, 2.0)}


def points_from_nccl(logs: Iterable[NcclLog], gpus_per_node: int, placement: str = "out-of-place"
                     ) -> tuple[list[CollectivePoint], list[str]]:
    """Points of nccl-tests rows: ranks laid out node by node on the first GPUs of each node.
    Returns the points and notes on the rows left out (unknown ranks, collectives the model lacks)."""
    points, notes = [], []
    for log in logs:
        for t in log.tests:
            if t.collective not in OPS:
                notes.append(f"{log.source}: {t.collective} left out (the simulator has no model for it)")
                continue
            if not t.ranks:
                notes.append(f"{log.source}: {t.collective} left out (rank count unknown)")
                continue
            nodes = t.nodes or math.ceil(t.ranks / gpus_per_node)
            per = t.ranks // nodes
            if per * nodes != t.ranks or per > gpus_per_node:
                notes.append(f"{log.source}: {t.collective} left out ({t.ranks} ranks on {nodes} nodes of "
                             f"{gpus_per_node} GPUs)")
                continue
            ranks = tuple(n * gpus_per_node + k for n in range(nodes) for k in range(per))
            label = f"{t.collective} {nodes}x{per}"
            for r in t.rows:
                m = r.measure(placement)
                if m is None:
                    continue
                points.append(CollectivePoint(t.collective, r.size, ranks, nodes, m.time_us, label, r.source, r.line))
    return points, notes


def points_from_lut(rows: Iterable[LutRow]) -> list[CollectivePoint]:
    """Points of a vTrain all-reduce LUT (out-of-place times), GPUs 0..n-1 of one node."""
    out = []
    for r in rows:
        if not r.gpus:
            continue
        out.append(CollectivePoint("all_reduce", r.size, tuple(range(r.gpus)), 1, r.time_us,
                                   f"all_reduce 1x{r.gpus}", r.source, r.line))
    return out


def alternate_split(points: Sequence[CollectivePoint]) -> np.ndarray:
    """Training mask: per curve (label and source), sizes in increasing order, every other one
    (the smallest in training)."""
    mask = np.zeros(len(points), bool)
    curves: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(points):
        curves.setdefault((p.source, p.label), []).append(i)
    for idx in curves.values():
        for k, i in enumerate(sorted(idx, key=lambda i: (points[i].size, i))):
            mask[i] = k % 2 == 0
    return mask


@dataclass
class CollectiveFit:
    """Outcome of :func:`fit_collectives`. Times in us; MAPEs in percent."""

    points: list[CollectivePoint]
    train: np.ndarray
    before: np.ndarray
    after: np.ndarray
    params: CommParams
    start: CommParams
    free: list[str]
    converged: bool
    message: str
    nfev: int = 0
    algorithms: list[str] = field(default_factory=list)

    def mape(self, which: str = "after", subset: str = "test") -> float:
        pred = self.after if which == "after" else self.before
        mask = {"test": ~self.train, "train": self.train, "all": np.ones(len(self.points), bool)}[subset]
        meas = np.array([p.time_us for p in self.points])
        return mape(pred[mask], meas[mask]) if mask.any() else float("nan")

    def per_curve(self) -> list[dict[str, Any]]:
        """Per curve: points, MAPE before/after (all points) and max error after."""
        curves: dict[str, list[int]] = {}
        for i, p in enumerate(self.points):
            curves.setdefault(p.label, []).append(i)
        out = []
        for label, idx in sorted(curves.items()):
            meas = np.array([self.points[i].time_us for i in idx])
            err = np.abs(self.after[idx] - meas) / meas * 100
            out.append({"curve": label, "points": len(idx), "mape_before": mape(self.before[idx], meas),
                        "mape_after": float(err.mean()), "max_error_after": float(err.max()),
                        "algorithm": self.algorithms[idx[0]] if self.algorithms else None})
        return out


def free_parameters(points: Sequence[CollectivePoint], model: CollectiveModel, fit_latency: bool | None = None,
                    fit_passes: bool | None = None, fit_fixed: bool = True) -> list[str]:
    """Names of the parameters the points identify (see the module docstring). ``points`` may be
    a subset (the training points) of the model's."""
    shape_of = dict(zip(model.points, model._shapes))
    algos = [shape_of[p].algo for p in points]
    classes = set()
    for sh in model._shapes:
        for ph in sh.phases:
            classes |= {c for c, cap in zip(CLASSES, ph.cap) if math.isfinite(cap)}
    names = [f"eff.{c}" for c in CLASSES if c in classes and c in ("nvlink", "nic")]
    sizes = {len(p.ranks) for p in points}
    if fit_latency is None:
        fit_latency = len(sizes) > 1
    if fit_latency:
        names += [f"lat.{c}" for c in CLASSES if c in classes and c in ("nvlink", "nic")]
    names.append("overhead")
    for scope in ("intra", "inter"):
        ops = {p.op for p, a in zip(points, algos) if p.scope == scope}
        nvls_only = scope == "intra" and "all_reduce" in ops and all(
            a == "nvls" for p, a in zip(points, algos) if p.op == "all_reduce" and p.scope == "intra")
        ref = next((o for o in REFERENCE_ORDER if o in ops and not (o == "all_reduce" and nvls_only)), None)
        for o in OPS:
            if o in ops and o != ref and not (o == "all_reduce" and nvls_only):
                names.append(f"eta.{o}.{scope}")
        if fit_fixed:
            fixed_ref = next((o for o in REFERENCE_ORDER if o in ops), None)  # its fixed cost is the overhead
            for o in OPS:
                sizes_o = {p.size for p in points if p.op == o and p.scope == scope}
                if len(sizes_o) > 1 and not (scope == "intra" and o == fixed_ref):
                    names.append(f"fixed.{o}.{scope}")
    for o in OPS:
        fills = {shape_of[p].full for p in points if p.op == o and p.scope == "inter"}
        if fills == {True, False}:
            names.append(f"full.{o}")
    if "nvls" in algos and any(a != "nvls" for p, a in zip(points, algos) if p.scope == "intra"):
        names.append("nvls")  # NVLS alone cannot tell its share from the NVLink efficiency
    if fit_passes is None:
        fit_passes = any(len({len(p.ranks) for p in points if p.op == o and p.scope == s}) > 1
                         for o in OPS for s in ("intra", "inter"))
    if fit_passes:
        names.append("passes")
    return names


def _get(params: CommParams, name: str) -> float:
    kind, *rest = name.split(".")
    if kind == "eff":
        return params.eff[rest[0]]
    if kind == "lat":
        return params.lat[rest[0]]
    if kind == "eta":
        return params.eta.get((rest[0], rest[1]), 1.0)
    if kind == "fixed":
        return params.fixed.get((rest[0], rest[1]), 0.0)
    if kind == "full":
        return params.full.get(rest[0], 1.0)
    return {"overhead": params.overhead_us, "nvls": params.nvls_eff, "passes": params.passes}[kind]


def _with(params: CommParams, names: Sequence[str], x: Sequence[float]) -> CommParams:
    out = params.copy()
    for name, v in zip(names, x):
        kind, *rest = name.split(".")
        v = float(v)
        if kind == "eff":
            out.eff[rest[0]] = v
        elif kind == "lat":
            out.lat[rest[0]] = v
        elif kind == "eta":
            out.eta[(rest[0], rest[1])] = v
        elif kind == "fixed":
            out.fixed[(rest[0], rest[1])] = v
        elif kind == "full":
            out.full[rest[0]] = v
        elif kind == "overhead":
            out.overhead_us = v
        elif kind == "nvls":
            out.nvls_eff = v
        else:
            out.passes = v
    return out


def fit_collectives(profile: Any, points: Sequence[CollectivePoint], train: np.ndarray | None = None,
                    start: CommParams | None = None, free: Sequence[str] | None = None,
                    max_nfev: int = 400) -> CollectiveFit:
    """Fit the free parameters to the ``train`` points (all if ``None``); predict every point."""
    from scipy.optimize import least_squares

    points = list(points)
    model = CollectiveModel(profile, points)
    train = np.ones(len(points), bool) if train is None else np.asarray(train, bool)
    start = start or model.base
    names = list(free) if free is not None else free_parameters([p for p, t in zip(points, train) if t], model)
    meas = np.array([p.time_us for p in points])
    before = model.times(model.base)  # the input profile's prediction
    lo = np.array([BOUNDS[n.split(".")[0]][0] for n in names])
    hi = np.array([BOUNDS[n.split(".")[0]][1] for n in names])
    x0 = np.clip([_get(start, n) for n in names], lo + 1e-9, hi - 1e-9)
    scale = np.maximum(np.abs(x0), [{"lat": 1.0, "overhead": 10.0, "passes": 1.0, "fixed": 10.0}.get(n.split(".")[0], 0.1)
                                    for n in names])

    def residuals(x):
        pred = model.times(_with(start, names, x))[train]
        return np.log(pred / meas[train])

    def cost(p):
        return float(np.sum(np.log(model.times(p)[train] / meas[train]) ** 2))

    try:
        sol = least_squares(residuals, x0, bounds=(lo, hi), x_scale=scale, max_nfev=max_nfev, method="trf")
        fitted, ok, msg, nfev = _with(start, names, sol.x), bool(sol.success), str(sol.message), int(sol.nfev)
        if not np.all(np.isfinite(sol.fun)):
            ok, msg = False, "residuals are not finite"
    except (ValueError, FloatingPointError) as e:
        fitted, ok, msg, nfev = start, False, f"solver failed: {e}", 0
    if ok and cost(fitted) > cost(start) * (1 + 1e-9):
        ok, msg = False, "the fit ended worse than it started"
    if not ok:
        fitted = start
    return CollectiveFit(points, train, before, model.times(fitted), fitted, start, names, ok, msg, nfev,
                         model.algorithms())
