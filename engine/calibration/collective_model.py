"""The calibrated collective cost model: the simulator's collective plans with tunable parameters.

:class:`simulator.collectives.CollectivePlanner` turns a collective into phases: ``repeat`` steps,
each paying a latency (hops x the slowest route's hop latencies) and moving ``nbytes`` per
sub-flow at ``rate = min over links of bandwidth / weight``. Link bandwidth is nominal x the link
class's efficiency. This module takes those phases apart once per measured point so that the
time can be re-evaluated in microseconds for any parameter vector (what a least-squares fit
needs)::

    t = overhead + fixed[op, scope] + sum_phases repeat x latency(lat_c)
        + passes x (input + output bytes) / (hbm x memory_efficiency)
        + sum_phases repeat x nbytes / (rate(eff_c x full_c) x eta[op, scope] x (nvls_eff if nvls))

* ``eff_c`` / ``lat_c``: per link class (nvlink, nic, pcie, spine) efficiency and hop latency
  (profile ``node.<c>_efficiency`` / ``node.<c>_latency_us``; ``fabric.*`` for spine);
* ``overhead``: the per-message software cost (``comm.message_overhead_us``);
* ``eta[op, scope]``: a per-collective share of the class-limited rate, ``scope`` "intra" for a
  group inside one node, "inter" across nodes; ``nvls_eff``: NVLink SHARP's share;
* ``full_c``: ``full[op]`` (``comm.efficiency.full_node.<op>``) for the NIC-side classes (nic,
  pcie) when the group spans nodes and holds every GPU of each of them (all NICs of a node busy
  at once), else 1;
* a send/recv connection's channel cap (``Phase.conn_rate``, :mod:`simulator.p2p_channels`) is a
  share of the NIC rate, so it counts as one more "nic" cap (it scales with ``eff_nic``);
* ``fixed[op, scope]``: a per-collective fixed cost in us (``comm.latency.<scope>.<op>``), the
  ramp-up of a saturating rate ``bw_max size / (size + s_half)`` (``fixed = s_half / bw_max``);
* ``passes``: how many times the collective's kernels stream its input and output buffers
  through HBM; a cost per byte independent of the group size, so the time per bus byte falls
  with the group size, as measured (A100: busbw 197 GB/s on 2 GPUs, 229 on 8).

For the parameters a profile holds this is exactly ``simulator.collective_time`` on that profile
(the planner applies the same corrections, :mod:`simulator.tuning`; a test checks). Latency is linear in ``lat_c`` with the coefficients of the base profile's
slowest route (routes of one phase are alike on these symmetric topologies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np

from hardware_profiles import build_cluster, override_profile
from simulator.collectives import CollectivePlanner
from simulator.tuning import NIC_SIDE, buffer_bytes, collective_scale, fixed_us, full_node_share, holds_full_nodes

CLASSES = ("nvlink", "pcie", "nic", "spine")
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "broadcast")
SCOPES = ("intra", "inter")
_LAT_PATH = {"nvlink": "node.nvlink_latency_us", "pcie": "node.pcie_latency_us", "nic": "node.nic_latency_us",
             "spine": "fabric.latency_us"}
_EFF_PATH = {"nvlink": "node.nvlink_efficiency", "pcie": "node.pcie_efficiency", "nic": "node.nic_efficiency",
             "spine": "fabric.efficiency"}


@dataclass(frozen=True)
class CollectivePoint:
    """One measured collective: ``op`` over GPUs ``ranks`` of a ``nodes``-node cluster, buffer
    ``size`` bytes (nccl-tests convention), measured ``time_us``; ``label`` names its curve."""

    op: str
    size: int
    ranks: tuple[int, ...]
    nodes: int
    time_us: float
    label: str
    source: str = ""
    line: int = 0
    algo: str = "auto"

    @property
    def scope(self) -> str:
        """"inter" when the group spans nodes (ranks are laid out node by node), else "intra"."""
        return "inter" if self.nodes > 1 else "intra"


@dataclass
class CommParams:
    """The tunable parameters (internal units: us, shares)."""

    eff: dict[str, float]
    lat: dict[str, float]
    overhead_us: float
    eta: dict[tuple[str, str], float] = field(default_factory=dict)
    nvls_eff: float = 1.0
    passes: float = 0.0
    full: dict[str, float] = field(default_factory=dict)
    fixed: dict[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def from_profile(cls, profile: Any) -> "CommParams":
        return cls(eff={c: profile.link_efficiency(c) for c in CLASSES},
                   lat={c: float(profile.get(_LAT_PATH[c])) for c in CLASSES},
                   overhead_us=profile.comm.message_overhead_us,
                   eta={(o, s): profile.comm.collective_efficiency(o, s == "inter") for o in OPS for s in SCOPES},
                   nvls_eff=profile.comm.nvls_efficiency, passes=profile.comm.buffer_passes,
                   full={o: getattr(profile.comm, f"full_node_{o}_efficiency", 1.0) for o in OPS},
                   fixed={(o, s): profile.comm.collective_latency_us(o, s == "inter") for o in OPS for s in SCOPES})

    def overrides(self) -> dict[str, Any]:
        """The profile fields (dotted keys, datasheet units) that hold these parameters."""
        out: dict[str, Any] = {}
        for c in CLASSES:
            out[_EFF_PATH[c]] = float(self.eff[c])
            out[_LAT_PATH[c]] = float(self.lat[c]) if self.lat[c] > 1e-9 else 0.0  # a solver's 1e-22 is 0
        out["comm.message_overhead_us"] = float(self.overhead_us)
        out["comm.nvls_efficiency"] = float(self.nvls_eff)
        out["comm.buffer_passes"] = float(self.passes)
        for (op, scope), v in sorted(self.eta.items()):
            out[f"comm.efficiency.{scope}.{op}"] = float(v)
        for op, v in sorted(self.full.items()):
            out[f"comm.efficiency.full_node.{op}"] = float(v)
        for (op, scope), v in sorted(self.fixed.items()):
            out[f"comm.latency.{scope}.{op}"] = float(v) if v > 1e-9 else 0.0
        return out

    def copy(self) -> "CommParams":
        return replace(self, eff=dict(self.eff), lat=dict(self.lat), eta=dict(self.eta), full=dict(self.full),
                       fixed=dict(self.fixed))


@dataclass(frozen=True)
class _Phase:
    repeat: int
    lat0: float                    # latency (us) under the base profile
    dlat: tuple[float, ...]        # d latency / d lat_c, per class in CLASSES
    nbytes: float
    cap: tuple[float, ...]         # per class: min over its links of nominal bandwidth / weight (inf if none)


@dataclass(frozen=True)
class _Shape:
    algo: str
    phases: tuple[_Phase, ...]
    buffer: float                  # input + output buffer bytes on one GPU
    full: bool = False             # across nodes, holding every GPU of each node


class CollectiveModel:
    """Decomposed plans of a list of points, evaluated for any :class:`CommParams`."""

    def __init__(self, profile: Any, points: Sequence[CollectivePoint]):
        self.profile = profile
        self.points = list(points)
        self.base = CommParams.from_profile(profile)
        shapes: dict[tuple, _Shape] = {}
        planners: dict[tuple[int, str | None], Any] = {}

        def planner(nodes: int, bump: str | None):
            key = (nodes, bump)
            if key not in planners:
                prof = profile if bump is None else override_profile(profile, {_LAT_PATH[bump]: self.base.lat[bump] + 1.0})
                planners[key] = CollectivePlanner(build_cluster(prof, nodes))
            return planners[key]

        self._shapes = []
        for p in self.points:
            key = (p.op, p.nodes, p.ranks, p.size, p.algo)
            if key not in shapes:
                shapes[key] = self._decompose(p, planner)
            self._shapes.append(shapes[key])

    def _decompose(self, p: CollectivePoint, planner) -> _Shape:
        """The plan's phases without the base profile's tuning (see ``tuning``), per class caps
        and latency slopes."""
        base = planner(p.nodes, None)
        plan = base.plan(p.op, p.size, p.ranks, p.algo)
        bumped = [planner(p.nodes, c).plan(p.op, p.size, p.ranks, p.algo) for c in CLASSES]
        topo = base.cluster.topology
        full = p.scope == "inter" and holds_full_nodes(base.cluster, p.ranks)
        scale = collective_scale(self.profile, p.op, plan.algo, p.scope == "inter")
        share = full_node_share(self.profile, p.op, p.scope == "inter", full)  # undone from the NIC-side weights
        extra = fixed_us(self.profile, p.op, len(p.ranks), p.size, p.scope == "inter")
        phases = []
        for i, ph in enumerate(plan.phases):
            caps = []
            for c in CLASSES:
                vals = [topo.edges[l]["nominal_bandwidth"] / w for l, w in zip(ph.links, ph.weights)
                        if topo.edges[l]["link_class"] == c]
                if c == "nic" and ph.conns and ph.conn_rate < math.inf:
                    # a p2p connection's channel cap is a share of the NIC rate: nominal share here
                    vals.append(ph.conn_rate / self.profile.node.nic_efficiency)
                caps.append(min(vals) / (share if c in NIC_SIDE else 1.0) if vals else math.inf)
            dlat = tuple(b.phases[i].latency_us - ph.latency_us for b in bumped)
            lat0 = ph.latency_us - (extra / ph.repeat if i == 0 else 0.0)
            phases.append(_Phase(ph.repeat, lat0, dlat, ph.nbytes * scale, tuple(caps)))
        return _Shape(plan.algo, tuple(phases), buffer_bytes(p.op, len(p.ranks), p.size), full)

    def times(self, params: CommParams) -> np.ndarray:
        """Predicted time (us) of every point (the simulator's ``collective_time`` for the
        profile these parameters describe)."""
        eff = [params.eff[c] for c in CLASSES]
        dl = [params.lat[c] - self.base.lat[c] for c in CLASSES]
        hbm = self.profile.gpu.hbm_bytes_per_us * self.profile.gpu.memory_efficiency
        out = np.empty(len(self.points))
        for i, (p, sh) in enumerate(zip(self.points, self._shapes)):
            if not sh.phases:
                out[i] = 0.0
                continue
            scale = params.eta.get((p.op, p.scope), 1.0) * (params.nvls_eff if sh.algo == "nvls" else 1.0)
            t = params.overhead_us + params.fixed.get((p.op, p.scope), 0.0) + params.passes * sh.buffer / hbm
            eff_p = self._effective(params, p, sh, eff)
            for ph in sh.phases:
                lat = ph.lat0 + sum(a * b for a, b in zip(ph.dlat, dl))
                rate = min(e * cap for e, cap in zip(eff_p, ph.cap))
                t += ph.repeat * (lat + (ph.nbytes / (rate * scale) if ph.nbytes > 0 else 0.0))
            out[i] = t
        return out

    def bottlenecks(self, params: CommParams) -> list[str | None]:
        """Per point, the link class that limits the rate of its slowest phase (``None`` if none)."""
        eff = [params.eff[c] for c in CLASSES]
        out: list[str | None] = []
        for p, sh in zip(self.points, self._shapes):
            best, cls = math.inf, None
            for ph in sh.phases:
                for c, e, cap in zip(CLASSES, self._effective(params, p, sh, eff), ph.cap):
                    if e * cap < best:
                        best, cls = e * cap, c
            out.append(cls)
        return out

    @staticmethod
    def _effective(params: CommParams, p: CollectivePoint, sh: _Shape, eff: list[float]) -> list[float]:
        """Per class efficiency for point ``p``: NIC-side classes times the full-node share."""
        if not sh.full:
            return eff
        f = params.full.get(p.op, 1.0)
        return [e * f if c in NIC_SIDE else e for c, e in zip(CLASSES, eff)]

    def algorithms(self) -> list[str]:
        return [sh.algo for sh in self._shapes]


def mape(pred: Iterable[float], meas: Iterable[float]) -> float:
    """Mean absolute percentage error, in percent."""
    pred, meas = np.asarray(list(pred), float), np.asarray(list(meas), float)
    return float(np.mean(np.abs(pred - meas) / meas) * 100.0) if len(meas) else float("nan")
