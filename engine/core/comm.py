"""The planners' communication cost model.

``delay(src_op, dst_op, src_dev, dst_dev, nbytes)`` is how long, in us, after ``src_op`` ends
its output reaches ``dst_dev``:

* 0 on the same GPU, and 0 for a zero-byte edge (a pure ordering constraint: no data moves);
* otherwise the cluster's contention-free time on the route, ``latency + bytes / bandwidth``
  (``Cluster.transfer_time``), times ``class_scale[c]`` for the route's link class ``c`` and
  times ``edge_scale[(src_op, dst_op)]``, the contention factor observed for that edge (it
  follows the edge when a planner moves it to other GPUs).

``class_scale`` and ``edge_scale`` are what the simulator-in-the-loop refinement updates; the
contention-free model has neither (every factor 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from engine.core.cluster import ClusterView


@dataclass
class CommModel:
    cluster: ClusterView
    class_scale: dict[str, float] = field(default_factory=dict)
    edge_scale: dict[tuple[str, str], float] = field(default_factory=dict)

    def delay(self, src_op: str, dst_op: str, src_dev: int, dst_dev: int, nbytes: int) -> float:
        """Communication delay in us of edge ``src_op -> dst_op`` placed on ``src_dev -> dst_dev``."""
        if src_dev == dst_dev or nbytes <= 0:
            return 0.0
        return self.route_delay(src_dev, dst_dev, nbytes) * self.edge_scale.get((src_op, dst_op), 1.0)

    def route_delay(self, src_dev: int, dst_dev: int, nbytes: int) -> float:
        """Modelled delay (us) of ``nbytes`` from ``src_dev`` to ``dst_dev``, ignoring per-edge data."""
        if src_dev == dst_dev or nbytes <= 0:
            return 0.0
        t = self.cluster.transfer_time(src_dev, dst_dev, nbytes)
        return t * self.class_scale.get(self.cluster.route_class(src_dev, dst_dev), 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_scale": dict(sorted(self.class_scale.items())),
            "edge_scale": {f"{s}->{d}": v for (s, d), v in sorted(self.edge_scale.items())},
        }

    @classmethod
    def from_dict(cls, cluster: ClusterView, d: Mapping[str, Any] | None) -> "CommModel":
        d = d or {}
        edges = {}
        for key, v in d.get("edge_scale", {}).items():
            s, _, t = key.partition("->")
            edges[(s, t)] = float(v)
        return cls(cluster, {k: float(v) for k, v in d.get("class_scale", {}).items()}, edges)
