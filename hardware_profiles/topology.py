"""A cluster of identical nodes built from a profile: its link graph, routes and transfer times.

Graph (``Cluster.topology``, a networkx DiGraph with both directions of every link):

* ``gpu{i} <-> nvsw{n}``   class "nvlink": the GPU's NVLink bandwidth per direction (one logical
  NVSwitch per node stands for the node's switch chips);
* ``gpu{i} <-> nic{n}.{j}`` class "pcie": GPU ``k`` of a node (local index) uses NIC
  ``k * nics // gpus``;
* ``nic{n}.{j} <-> leaf{l}`` class "nic": the NIC line rate; node ``n`` hangs off leaf
  ``n // nodes_per_leaf``;
* ``leaf{l} <-> spine{s}`` class "spine": a leaf's uplink is its downlink (``nodes_per_leaf x
  nics x`` NIC rate, as provisioned, even when the last leaf is not full) divided by the
  oversubscription, spread evenly over the spines.

Leaves exist only when there is more than one node, spines only when there is more than one leaf.
Edge attributes: ``bandwidth`` (bytes/us, nominal x the class efficiency), ``nominal_bandwidth``
(bytes/us), ``latency_us``, ``link_class``. Treat the graph as read-only: routes and costs are
cached.
"""

from __future__ import annotations

import networkx as nx

from engine.core.errors import InputError
from hardware_profiles.profile import LINK_CLASSES, Profile

_MASK = (1 << 64) - 1


def _mix64(x: int) -> int:
    """A 64-bit integer mixer (the splitmix64 finaliser): same result in every process."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def ecmp_index(a: int, b: int, salt: int, paths: int) -> int:
    """Which of ``paths`` equal-cost paths the flow ``a -> b`` (with ``salt``) takes."""
    key = _mix64(a) ^ _mix64((b + 0x9E3779B97F4A7C15) & _MASK) ^ _mix64((salt * 0xD6E8FEB86659FD93 + 1) & _MASK)
    return _mix64(key) % paths


class Cluster:
    """``nodes`` nodes of ``profile``; GPUs are numbered ``0 .. n_gpus-1`` node by node."""

    def __init__(self, profile: Profile, nodes: int):
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise InputError(None, "nodes", f"must be an integer >= 1, got {nodes!r}")
        self.profile = profile
        self.nodes = nodes
        self.gpus_per_node = profile.node.gpus
        self.n_gpus = nodes * self.gpus_per_node
        self.gpu_model = profile.name
        fab = profile.fabric
        self.n_leaves = 0 if nodes == 1 else -(-nodes // fab.nodes_per_leaf)
        self.n_spines = fab.spines if self.n_leaves > 1 else 0
        self._class_params = self._link_class_params()
        self.topology = self._build_graph()
        self._routes: dict[tuple[int, int, int], tuple[tuple[str, str], ...]] = {}
        self._costs: dict[str, tuple[float, float]] = {}

    # ----- structure -------------------------------------------------------------------------
    def _link_class_params(self) -> dict[str, tuple[float, float, float]]:
        """``{class: (nominal bytes/us, effective bytes/us, latency us)}`` of one link of each class."""
        p, node, fab = self.profile, self.profile.node, self.profile.fabric
        leaf_down = fab.nodes_per_leaf * node.nics * node.nic_bytes_per_us
        spine_link = leaf_down / fab.oversubscription / fab.spines
        nominal = {"nvlink": (node.nvlink_bytes_per_us, node.nvlink_latency_us),
                   "pcie": (node.pcie_bytes_per_us, node.pcie_latency_us),
                   "nic": (node.nic_bytes_per_us, node.nic_latency_us),
                   "spine": (spine_link, fab.latency_us)}
        return {c: (bw, bw * p.link_efficiency(c), lat) for c, (bw, lat) in nominal.items()}

    def _build_graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        links: list[tuple[str, str, str]] = []
        per, nics = self.gpus_per_node, self.profile.node.nics
        for n in range(self.nodes):
            g.add_node(f"nvsw{n}", kind="nvswitch", node=n)
            for j in range(nics):
                g.add_node(f"nic{n}.{j}", kind="nic", node=n)
                if self.n_leaves:
                    links.append((f"nic{n}.{j}", f"leaf{self.leaf_of_node(n)}", "nic"))
            for k in range(per):
                gpu = f"gpu{n * per + k}"
                g.add_node(gpu, kind="gpu", node=n)
                links.append((gpu, f"nvsw{n}", "nvlink"))
                links.append((gpu, f"nic{n}.{k * nics // per}", "pcie"))
        for leaf in range(self.n_leaves):
            g.add_node(f"leaf{leaf}", kind="leaf")
        for s in range(self.n_spines):
            g.add_node(f"spine{s}", kind="spine")
            links.extend((f"leaf{leaf}", f"spine{s}", "spine") for leaf in range(self.n_leaves))
        edges = []
        for u, v, cls in links:
            nominal, eff, lat = self._class_params[cls]
            attrs = {"bandwidth": eff, "nominal_bandwidth": nominal, "latency_us": lat, "link_class": cls}
            edges.append((u, v, attrs))
            edges.append((v, u, dict(attrs)))
        g.add_edges_from(edges)
        return g

    def _check_gpu(self, gpu: int) -> int:
        if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < self.n_gpus:
            raise InputError(None, "gpu", f"GPU {gpu!r} not in the cluster (0..{self.n_gpus - 1})")
        return gpu

    def node_of(self, gpu: int) -> int:
        """The node index of GPU ``gpu``."""
        return self._check_gpu(gpu) // self.gpus_per_node

    def gpus_of(self, node: int) -> range:
        """The GPU indices of node ``node``."""
        if not 0 <= node < self.nodes:
            raise InputError(None, "node", f"node {node!r} not in the cluster (0..{self.nodes - 1})")
        return range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node)

    def leaf_of_node(self, node: int) -> int:
        """The leaf switch of node ``node`` (meaningful when the cluster has leaves)."""
        return node // self.profile.fabric.nodes_per_leaf

    def nic_of(self, gpu: int) -> str:
        """The graph name of the NIC GPU ``gpu`` sends and receives through."""
        n, k = divmod(self._check_gpu(gpu), self.gpus_per_node)
        return f"nic{n}.{k * self.profile.node.nics // self.gpus_per_node}"

    # ----- routes ----------------------------------------------------------------------------
    def route(self, a: int, b: int, salt: int = 0) -> tuple[tuple[str, str], ...]:
        """The directed links ``(u, v)`` a transfer from GPU ``a`` to GPU ``b`` crosses.

        ``()`` on the same GPU; ``gpu -> nvsw -> gpu`` in a node; ``gpu -> nic -> leaf ->
        [spine ->  leaf ->] nic -> gpu`` between nodes, the spine chosen by :func:`ecmp_index`
        from ``(a, b, salt)``: different salts spread one pair's flows over the spines.
        """
        key = (a, b, salt)
        hit = self._routes.get(key)
        if hit is not None:
            return hit
        na, nb = self.node_of(a), self.node_of(b)
        if a == b:
            hops: list[str] = []
        elif na == nb:
            hops = [f"gpu{a}", f"nvsw{na}", f"gpu{b}"]
        else:
            la, lb = self.leaf_of_node(na), self.leaf_of_node(nb)
            hops = [f"gpu{a}", self.nic_of(a), f"leaf{la}"]
            if la != lb:
                hops += [f"spine{ecmp_index(a, b, salt, self.n_spines)}", f"leaf{lb}"]
            hops += [self.nic_of(b), f"gpu{b}"]
        route = tuple(zip(hops, hops[1:]))
        self._routes[key] = route
        return route

    def route_class(self, a: int, b: int) -> str:
        """"local" (same GPU), "nvlink" (same node), "nic" (same leaf) or "spine" (across leaves)."""
        na, nb = self.node_of(a), self.node_of(b)
        if a == b:
            return "local"
        if na == nb:
            return "nvlink"
        return "nic" if self.leaf_of_node(na) == self.leaf_of_node(nb) else "spine"

    def route_cost(self, a: int, b: int) -> tuple[float, float]:
        """``(sum of hop latencies in us, min effective bandwidth in bytes/us)`` of ``a -> b``.

        Nodes are identical and ECMP paths alike, so every route of one class costs the same:
        the cost is computed on the first route of each class and cached. ``(0.0, inf)`` if ``a == b``.
        """
        cls = self.route_class(a, b)
        hit = self._costs.get(cls)
        if hit is None:
            edges = [self.topology.edges[u, v] for u, v in self.route(a, b)]
            hit = (sum(e["latency_us"] for e in edges), min((e["bandwidth"] for e in edges), default=float("inf")))
            self._costs[cls] = hit
        return hit

    def transfer_time(self, a: int, b: int, nbytes: int) -> float:
        """Contention-free time in us to move ``nbytes`` from GPU ``a`` to GPU ``b``.

        ``sum of hop latencies + comm.message_overhead_us + nbytes / min effective bandwidth``
        on the route; 0 if ``a == b`` or ``nbytes <= 0``.
        """
        if a == b or nbytes <= 0:
            self._check_gpu(a)
            return 0.0
        latency, bandwidth = self.route_cost(a, b)
        return latency + self.profile.comm.message_overhead_us + nbytes / bandwidth

    # ----- figures -----------------------------------------------------------------------------
    def link_classes(self) -> tuple[str, ...]:
        """The link classes present in this cluster, in the order of ``LINK_CLASSES``."""
        present = {"nvlink", "pcie"} | ({"nic"} if self.n_leaves else set()) | ({"spine"} if self.n_spines else set())
        return tuple(c for c in LINK_CLASSES if c in present)

    def class_bandwidth(self, link_class: str, effective: bool = True) -> float:
        """Bandwidth in bytes/us of one link of ``link_class`` (effective unless ``effective=False``)."""
        nominal, eff, _ = self._class_params[link_class]
        return eff if effective else nominal

    def class_latency_us(self, link_class: str) -> float:
        """Latency in us of one hop over a link of ``link_class``."""
        return self._class_params[link_class][2]

    def memory_cap_bytes(self, gpu: int) -> int:
        """HBM capacity of GPU ``gpu`` in bytes."""
        self._check_gpu(gpu)
        return self.profile.gpu.memory_bytes

    def peak_flops_per_us(self, dtype: str) -> float:
        """Peak dense FLOP/us of one GPU for ``dtype`` (InputError if the profile gives none)."""
        return self.profile.peak_flops_per_us(dtype)

    def effective_flops_per_us(self, dtype: str) -> float:
        """Peak FLOP/us x ``gpu.compute_efficiency``: what a typical kernel reaches."""
        return self.peak_flops_per_us(dtype) * self.profile.gpu.compute_efficiency

    def to_dict(self) -> dict:
        """Shape and per-class link figures (bytes/us, us) for reports."""
        return {
            "profile": self.profile.name, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            "n_gpus": self.n_gpus, "leaves": self.n_leaves, "spines": self.n_spines,
            "links": {c: {"bandwidth": self.class_bandwidth(c), "nominal_bandwidth": self.class_bandwidth(c, False),
                          "latency_us": self.class_latency_us(c)} for c in self.link_classes()},
        }

    def __repr__(self) -> str:
        return f"Cluster({self.profile.name!r}, nodes={self.nodes}, gpus={self.n_gpus})"


def build_cluster(profile: Profile, nodes: int) -> Cluster:
    """The cluster of ``nodes`` nodes of ``profile`` (see the module docstring for the graph)."""
    return Cluster(profile, nodes)
