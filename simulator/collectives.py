"""Collectives as the steps and chunks NCCL moves, and their closed-form (alpha-beta) time.

A collective of ``nbytes`` (nccl-tests' ``size``: the whole buffer; for all_gather and
reduce_scatter the gathered buffer) over ``ranks`` (GPU indices) becomes phases. A phase is one
bundle of sub-flows repeated ``repeat`` times, each repetition paying ``latency_us`` (the
slowest sub-flow route's hop latencies) and then moving ``nbytes`` per sub-flow at the bundle's
rate. ``weights[l]`` counts the sub-flows crossing link ``l``. The whole collective pays the
profile's message overhead once. Algorithms:

* ``ring`` (all_reduce, all_gather, reduce_scatter, broadcast): ranks sorted by GPU. Across
  nodes with ``k`` GPUs in every node, ``k`` rings (channels) each carry ``1/k`` of the data;
  ring ``c`` enters every node at its ``c``-th GPU and leaves from the one before, so every NIC
  carries one channel (NCCL's rail-aligned rings). All-reduce: ``2(n-1)`` steps of ``size/n``
  per ring (reduce-scatter then all-gather); all_gather / reduce_scatter: ``n-1`` steps;
  broadcast: one pipelined pass down the ring from the first rank (latency: ``n-1`` hops).
* ``nvls`` (all_reduce in one node whose profile has ``node.nvls``): every GPU pushes its buffer
  into the NVSwitch, which reduces, and receives the reduced buffer back: ``size (n+1)/n`` on
  each GPU's up- and down-link, two hops of latency each way.
* ``tree`` (all_reduce): NCCL's double binary tree: two trees each with half the data, a chain
  inside each node to the node's leader (GPU ``t`` of the node for tree ``t``), a binary tree
  over nodes (tree 1 mirrored); a pipelined reduce up, then a broadcast down.
* ``direct``: all_to_all as ``n(n-1)`` pairwise flows of ``size/n``; send_recv as nccl-tests'
  ring shift, each rank sending ``size`` to the next rank of the group. A send_recv sub-flow that
  crosses nodes is also held to the rate of the NCCL channels its connection gets
  (:mod:`simulator.p2p_channels`: fewer per peer in larger groups): the phase lists those
  connections (``conns``, ``(src GPU, dst GPU)``) and their cap ``conn_rate`` (bytes/us per
  sub-flow), which the flow model enforces with one private link per connection.

``auto`` picks nvls for an all_reduce inside one NVLS node, else ring; direct for all_to_all and
send_recv. Without contention the flow simulation of these phases takes exactly
:func:`collective_time`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from engine.core.errors import InputError
from engine.core.ir import COLLECTIVE_OPS
from simulator.p2p_channels import connection_cap
from simulator.tuning import holds_full_nodes, tune_phases

if TYPE_CHECKING:
    from hardware_profiles import Cluster


ALGOS = {
    "all_reduce": ("ring", "tree", "nvls"),
    "all_gather": ("ring",),
    "reduce_scatter": ("ring",),
    "broadcast": ("ring",),
    "all_to_all": ("direct",),
    "send_recv": ("direct",),
}
# nccl-tests names -> ours
OP_ALIASES = {"alltoall": "all_to_all", "sendrecv": "send_recv", "allreduce": "all_reduce",
              "allgather": "all_gather", "reducescatter": "reduce_scatter"}


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw factor for ``op`` over ``n`` ranks."""
    if n <= 1:
        return 1.0 if op in ("send_recv", "broadcast") else 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


@dataclass(frozen=True)
class Phase:
    """``repeat`` steps, each: ``latency_us``, then ``nbytes`` per sub-flow over ``links`` (weights).

    ``conns``: the ``(src GPU, dst GPU)`` connections of sub-flows held to ``conn_rate`` (bytes/us
    per sub-flow) whatever the links leave them; each connection is a capacity of its own, not a
    share of a link."""

    links: tuple[tuple[str, str], ...]
    weights: tuple[float, ...]
    nbytes: float
    latency_us: float
    repeat: int = 1
    conns: tuple[tuple[int, int], ...] = ()
    conn_rate: float = math.inf


@dataclass(frozen=True)
class CollectivePlan:
    """How one collective moves: the algorithm, its phases, and the one-off overhead (us)."""

    op: str
    algo: str
    ranks: tuple[int, ...]
    nbytes: int
    phases: tuple[Phase, ...]
    overhead_us: float

    def time_us(self, bandwidth: dict[tuple[str, str], float]) -> float:
        """Closed-form time without contention (``bandwidth``: bytes/us per link)."""
        t = self.overhead_us if self.phases else 0.0
        for ph in self.phases:
            t += ph.repeat * (ph.latency_us + step_time(ph, bandwidth))
        return t


def step_time(ph: Phase, bandwidth: dict[tuple[str, str], float]) -> float:
    """Time (us) of one step's bytes when the phase is alone on the network."""
    if ph.nbytes <= 0 or not ph.links:
        return 0.0
    rate = min(bandwidth[l] / w for l, w in zip(ph.links, ph.weights))
    if ph.conns and ph.conn_rate < rate:
        rate = ph.conn_rate
    return ph.nbytes / rate


def normalize_op(op: str) -> str:
    name = OP_ALIASES.get(op, op)
    if name not in COLLECTIVE_OPS:
        raise InputError(None, "op", f"unknown collective {op!r}; one of {', '.join(COLLECTIVE_OPS)}")
    return name


def choose_algo(cluster: Cluster, op: str, ranks: Sequence[int], algo: str = "auto") -> str:
    """The algorithm ``auto`` stands for, or ``algo`` checked against ``op``."""
    op = normalize_op(op)
    if algo == "auto":
        if op == "all_reduce":
            one_node = len({cluster.node_of(g) for g in ranks}) == 1
            return "nvls" if one_node and cluster.profile.node.nvls and len(set(ranks)) > 1 else "ring"
        return ALGOS[op][0]
    if algo not in ALGOS[op]:
        raise InputError(None, "algo", f"{op} has no algorithm {algo!r}; one of auto, {', '.join(ALGOS[op])}")
    if algo == "nvls":
        if len({cluster.node_of(g) for g in ranks}) != 1:
            raise InputError(None, "algo", "nvls reduces inside one NVSwitch: the group must sit in one node")
        if not cluster.profile.node.nvls:
            raise InputError(None, "algo", f"profile {cluster.profile.name!r} has no NVLink SHARP (node.nvls: false)")
    return algo


class CollectivePlanner:
    """Builds (and caches) :class:`CollectivePlan` s for one cluster."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        topo = cluster.topology
        self.bandwidth = {(u, v): d["bandwidth"] for u, v, d in topo.edges(data=True)}
        self.latency = {(u, v): d["latency_us"] for u, v, d in topo.edges(data=True)}
        self.overhead_us = cluster.profile.comm.message_overhead_us
        self._classes = {(u, v): d["link_class"] for u, v, d in topo.edges(data=True)}
        self._cache: dict[tuple, CollectivePlan] = {}

    def _link_class(self, link: tuple[str, str]) -> str:
        return self._classes[link]

    def plan(self, op: str, nbytes: int, ranks: Sequence[int], algo: str = "auto") -> CollectivePlan:
        op = normalize_op(op)
        ranks = tuple(int(g) for g in ranks)
        for g in ranks:
            if not 0 <= g < self.cluster.n_gpus:
                raise InputError(None, "ranks", f"GPU {g} not in the cluster (0..{self.cluster.n_gpus - 1})")
        if len(set(ranks)) != len(ranks):
            raise InputError(None, "ranks", f"a GPU appears twice in the group {list(ranks)}")
        key = (op, int(nbytes), ranks, algo)
        hit = self._cache.get(key)
        if hit is None:
            name = choose_algo(self.cluster, op, ranks, algo)
            phases = self._phases(op, name, int(nbytes), ranks) if len(ranks) > 1 else ()
            # calibrated per-collective efficiency, fixed cost and buffer passes (identity when uncalibrated)
            phases = tune_phases(self.cluster.profile, op, name, int(nbytes), ranks,
                                 len({self.cluster.node_of(g) for g in ranks}) > 1, phases,
                                 holds_full_nodes(self.cluster, ranks), self._link_class)
            hit = self._cache[key] = CollectivePlan(op, name, ranks, int(nbytes), tuple(phases), self.overhead_us)
        return hit

    def time_us(self, op: str, nbytes: int, ranks: Sequence[int], algo: str = "auto") -> float:
        return self.plan(op, nbytes, ranks, algo).time_us(self.bandwidth)

    # -- building blocks ---------------------------------------------------------------------------
    def _phase(self, pairs: Sequence[tuple[int, int, int]], nbytes: float, repeat: int = 1,
               hops: int = 1) -> Phase:
        """A phase from ``(src, dst, salt)`` GPU pairs; latency = ``hops`` x the slowest route."""
        weights: dict[tuple[str, str], float] = {}
        worst = 0.0
        for a, b, salt in pairs:
            route = self.cluster.route(a, b, salt)
            worst = max(worst, sum(self.latency[l] for l in route))
            for l in route:
                weights[l] = weights.get(l, 0.0) + 1.0
        links = tuple(sorted(weights))
        return Phase(links, tuple(weights[l] for l in links), float(nbytes), hops * worst, repeat)

    def _rings(self, ranks: Sequence[int]) -> list[list[int]]:
        by_node: dict[int, list[int]] = {}
        for g in sorted(ranks):
            by_node.setdefault(self.cluster.node_of(g), []).append(g)
        sizes = {len(v) for v in by_node.values()}
        blocks = [by_node[n] for n in sorted(by_node)]
        if len(blocks) > 1 and len(sizes) == 1 and (k := sizes.pop()) > 1:
            return [[g for b in blocks for g in b[c:] + b[:c]] for c in range(k)]
        return [[g for b in blocks for g in b]]

    def _phases(self, op: str, algo: str, nbytes: int, ranks: tuple[int, ...]) -> list[Phase]:
        n = len(ranks)
        if algo == "ring":
            rings = self._rings(ranks)
            share = nbytes / len(rings)
            if op == "broadcast":
                root = ranks[0]
                pairs = []
                for c, ring in enumerate(rings):
                    i0 = ring.index(root)
                    chain = ring[i0:] + ring[:i0]
                    pairs += [(a, b, c) for a, b in zip(chain, chain[1:])]
                return [self._phase(pairs, share, 1, hops=n - 1)]
            pairs = [(ring[i], ring[(i + 1) % n], c) for c, ring in enumerate(rings) for i in range(n)]
            steps = 2 * (n - 1) if op == "all_reduce" else n - 1
            return [self._phase(pairs, share / n, steps)]
        if algo == "nvls":
            node = self.cluster.node_of(ranks[0])
            sw = f"nvsw{node}"
            links = sorted([(f"gpu{g}", sw) for g in ranks] + [(sw, f"gpu{g}") for g in ranks])
            hop = max(self.latency[l] for l in links)
            return [Phase(tuple(links), tuple(float(n + 1) for _ in links), nbytes / n, 4 * hop, 1)]
        if algo == "tree":
            return self._tree(ranks, nbytes)
        if op == "all_to_all":
            return [self._phase([(a, b, 0) for a in ranks for b in ranks if a != b], nbytes / n)]
        # send_recv: ring shift in group order; connections across nodes get only their channels' rate
        pairs = [(ranks[i], ranks[(i + 1) % n], 0) for i in range(n) if ranks[i] != ranks[(i + 1) % n]]
        phase = self._phase(pairs, nbytes)
        cap = connection_cap(self.cluster, ranks)
        node_of = self.cluster.node_of
        conns = tuple((a, b) for a, b, _s in pairs if node_of(a) != node_of(b))
        if conns and cap < math.inf:
            phase = replace(phase, conns=conns, conn_rate=cap)
        return [phase]

    def _tree(self, ranks: tuple[int, ...], nbytes: int) -> list[Phase]:
        by_node: dict[int, list[int]] = {}
        for g in sorted(ranks):
            by_node.setdefault(self.cluster.node_of(g), []).append(g)
        blocks = [by_node[n] for n in sorted(by_node)]
        m = len(blocks)
        up: list[tuple[int, int, int]] = []
        depth = 0
        for t in range(2):
            order = blocks if t == 0 else blocks[::-1]
            chains = []
            for b in order:
                c = t % len(b)
                chains.append(b[c:] + b[:c])  # leader first
            for chain in chains:
                up += [(chain[j], chain[j - 1], t) for j in range(1, len(chain))]
            for i in range(1, m):
                up.append((chains[i][0], chains[(i - 1) // 2][0], t))
            depth = max(depth, max(len(c) for c in chains) - 1 + int(math.log2(m)))
        down = [(b, a, s) for a, b, s in up]
        depth = max(depth, 1)
        return [self._phase(up, nbytes / 2, 1, hops=depth), self._phase(down, nbytes / 2, 1, hops=depth)]


def collective_time(cluster: Cluster, op: str, nbytes: int, ranks: Sequence[int], algo: str = "auto") -> float:
    """Time in us of one collective alone on ``cluster`` (closed form; the flow model agrees)."""
    return CollectivePlanner(cluster).time_us(op, nbytes, ranks, algo)
