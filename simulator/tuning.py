"""Calibrated corrections the simulator applies to every collective plan.

:class:`simulator.collectives.CollectivePlanner` calls :func:`tune_phases` on the phases it
builds, so the closed form and the flow simulation see the same corrections:

* the bytes of every phase are divided by ``comm.efficiency.<intra|inter>.<op>`` (times
  ``comm.nvls_efficiency`` for the NVLS algorithm): a collective that reaches a share ``e`` of
  the link-limited rate moves, in effect, ``1/e`` times the bytes;
* when the group spans nodes and holds every GPU of each of them (all NICs of a node busy at
  once) the weights of its NIC-side links (:data:`NIC_SIDE` classes) are divided by
  ``comm.efficiency.full_node.<op>``: those links reach only that share of their rate, and so
  does a phase's per-connection cap (``conn_rate``, a share of the NIC rate);
* ``comm.buffer_passes x (input + output bytes) / (hbm x gpu.memory_efficiency)`` is added to
  the latency of the first phase (spread over its steps): the collective's kernels stream its
  buffers through HBM, a cost per byte that does not shrink with the group size the way the
  per-link share ``(n-1)/n`` does;
* ``comm.latency.<intra|inter>.<op>`` (us) is added the same way: a fixed cost per collective
  (NCCL sets up its channels and ramps its protocol before it reaches full rate; with
  ``bw(size) = bw_max size / (size + s_half)`` the time is ``(size + s_half) / bw_max``, a
  fixed ``s_half / bw_max`` on top of the alpha-beta time).

With the defaults (efficiencies 1, ``buffer_passes`` 0, latencies 0) the phases are returned
unchanged.
Units: bytes, us, bytes/us.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from hardware_profiles import Cluster


NIC_SIDE = ("nic", "pcie")  # link classes between a GPU and the scale-out fabric


def buffer_bytes(op: str, n: int, nbytes: int) -> float:
    """Input + output buffer bytes on one GPU for ``op`` of ``nbytes`` (nccl-tests ``size``) over ``n``."""
    if n <= 1:
        return 0.0
    if op == "all_gather":
        return nbytes / n + nbytes
    if op == "reduce_scatter":
        return nbytes + nbytes / n
    return 2.0 * nbytes


def collective_scale(profile: Any, op: str, algo: str, inter_node: bool) -> float:
    """The share of the link-limited rate ``op`` with ``algo`` reaches (1 when uncalibrated)."""
    comm = profile.comm
    scale = comm.collective_efficiency(op, inter_node) if hasattr(comm, "collective_efficiency") else 1.0
    if algo == "nvls":
        scale *= getattr(comm, "nvls_efficiency", 1.0)
    return scale


def buffer_us(profile: Any, op: str, n: int, nbytes: int) -> float:
    """Time (us) of the buffer passes through HBM (0 unless ``comm.buffer_passes`` is set)."""
    passes = getattr(profile.comm, "buffer_passes", 0.0)
    if passes <= 0:
        return 0.0
    rate = profile.gpu.hbm_bytes_per_us * getattr(profile.gpu, "memory_efficiency", 1.0)
    return passes * buffer_bytes(op, n, nbytes) / rate


def fixed_us(profile: Any, op: str, n: int, nbytes: int, inter_node: bool) -> float:
    """Time (us) the first phase carries on top of its hops: buffer passes + the collective's
    calibrated fixed cost."""
    lat = profile.comm.collective_latency_us(op, inter_node) if hasattr(profile.comm, "collective_latency_us") else 0.0
    return buffer_us(profile, op, n, nbytes) + lat


def holds_full_nodes(cluster: Cluster, ranks: Sequence[int]) -> bool:
    """True when ``ranks`` hold every GPU of each node they touch."""
    count: dict[int, int] = {}
    for g in ranks:
        n = cluster.node_of(g)
        count[n] = count.get(n, 0) + 1
    return all(c == cluster.gpus_per_node for c in count.values())


def full_node_share(profile: Any, op: str, inter_node: bool, full_node: bool) -> float:
    """The share of their rate NIC-side links keep for ``op`` (1 unless across full nodes)."""
    comm = profile.comm
    if not (inter_node and full_node and hasattr(comm, "full_node_efficiency")):
        return 1.0
    return comm.full_node_efficiency(op)


def tune_phases(profile: Any, op: str, algo: str, nbytes: int, ranks: Sequence[int], inter_node: bool,
                phases: Sequence[Any], full_node: bool = False,
                link_class: Callable[[tuple[str, str]], str] | None = None) -> list[Any]:
    """``phases`` (``simulator.collectives.Phase``) with the calibrated corrections applied;
    ``full_node``: the group holds every GPU of each of its nodes (see :func:`holds_full_nodes`);
    ``link_class(link)``: a link's class (needed for the full-node share)."""
    phases = list(phases)
    if not phases:
        return phases
    share = full_node_share(profile, op, inter_node, full_node)
    if share != 1.0 and link_class is not None:
        phases = [replace(ph, weights=tuple(w / share if link_class(l) in NIC_SIDE else w
                                            for l, w in zip(ph.links, ph.weights)),
                          conn_rate=ph.conn_rate * share) for ph in phases]
    scale = collective_scale(profile, op, algo, inter_node)
    extra = fixed_us(profile, op, len(ranks), nbytes, inter_node)
    if scale != 1.0:
        phases = [replace(ph, nbytes=ph.nbytes / scale) for ph in phases]
    if extra > 0:
        first = phases[0]
        phases[0] = replace(first, latency_us=first.latency_us + extra / first.repeat)
    return phases
