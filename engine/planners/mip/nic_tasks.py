"""The transfer tasks of NIC capacity (opt-in): which arcs may cross nodes, the NIC links each
placement of their ends occupies, and those links' bandwidths (bytes/us). The model blocks are in
:mod:`engine.planners.mip.nic`, the schedules under NIC capacity in :mod:`engine.planners.mip.nic_sched`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.errors import InputError
from engine.planners.mip.instance import Instance

Arc = tuple[int, int]
Link = tuple[str, str]


@dataclass
class NicTasks:
    """The transfer tasks of an instance: per arc its bytes and, per cross-node placement
    ``(a, b)``, the NIC links it occupies; per link its effective bandwidth (bytes/us)."""

    nbytes: dict[Arc, int]
    uses: dict[Arc, dict[tuple[int, int], tuple[Link, ...]]]
    bandwidth: dict[Link, float]

    def __bool__(self) -> bool:
        return bool(self.uses)

    def arcs(self) -> list[Arc]:
        return sorted(self.uses)

    def tau(self, t: Arc, r: Link) -> float:
        """How long (us) task ``t`` holds link ``r``: bytes / the link's effective bandwidth."""
        return self.nbytes[t] / self.bandwidth[r]

    def used(self, t: Arc, a: int, b: int) -> tuple[Link, ...]:
        """The NIC links task ``t`` occupies with its source on GPU ``a`` and its sink on ``b``."""
        return self.uses.get(t, {}).get((a, b), ())

    def links(self, t: Arc, inst: Instance | None = None) -> list[Link]:
        """Links ``t`` may use (over the eligible GPUs of ``inst``, if given)."""
        i, j = t
        out: set[Link] = set()
        for (a, b), links in self.uses[t].items():
            if inst is None or (a in inst.devices[i] and b in inst.devices[j]):
                out.update(links)
        return sorted(out)

    def serial_extra(self) -> float:
        """Sum over tasks of their longest hold (us): what NIC waits add to a fully serial plan."""
        return sum(max(self.tau(t, r) for r in self.links(t)) for t in self.arcs())

    def integral(self) -> bool:
        """True if every hold time is a whole number of us."""
        return all(abs(self.tau(t, r) - round(self.tau(t, r))) < 1e-9 for t in self.arcs() for r in self.links(t))


def nic_tasks(inst: Instance, workload, cluster) -> NicTasks:
    """The transfer tasks of ``inst`` (built from ``workload``) on ``cluster``; each NIC link is
    read off ``cluster.route(a, b)``: its first hop of link class ``nic`` is the sender's NIC,
    its last the receiver's."""
    topo = getattr(cluster, "topology", None)
    if topo is None or not hasattr(cluster, "route"):
        raise InputError(None, "solver.nic_capacity", "NIC capacity needs a cluster with a link topology "
                         "(one built from a hardware profile)")
    nbytes: dict[Arc, int] = {}
    uses: dict[Arc, dict[tuple[int, int], tuple[Link, ...]]] = {}
    bandwidth: dict[Link, float] = {}
    for i, j in sorted(inst.edges):
        size = int(workload.graph.edges[inst.ids[i], inst.ids[j]].get("bytes", 0))
        if size <= 0:
            continue
        per: dict[tuple[int, int], tuple[Link, ...]] = {}
        for a in inst.devices[i]:
            for b in inst.devices[j]:
                if a == b or cluster.node_of(a) == cluster.node_of(b):
                    continue
                hops = [h for h in cluster.route(a, b) if topo.edges[h]["link_class"] == "nic"]
                if not hops:
                    continue
                links = tuple(dict.fromkeys((hops[0], hops[-1])))
                for r in links:
                    bandwidth[r] = float(topo.edges[r]["bandwidth"])
                per[(a, b)] = links
        if per:
            nbytes[(i, j)], uses[(i, j)] = size, per
    return NicTasks(nbytes, uses, bandwidth)
