"""Calibrated corrections the simulator applies to every collective plan.

:class:`simulator.collectives.CollectivePlanner` calls :func:`tune_phases` on the phases it
builds, so the closed form and the flow simulation see the same corrections:

* the bytes of every phase are divided by ``comm.efficiency.<intra|inter>.<op>`` (times
  ``comm.nvls_efficiency`` for the NVLS algorithm): a collective that reaches a share ``e`` of
  the link-limited rate moves, in effect, ``1/e`` times the bytes;
* ``comm.buffer_passes x (input + output bytes) / (hbm x gpu.memory_efficiency)`` is added to
  the latency of the first phase (spread over its steps): the collective's kernels stream its
  buffers through HBM, a cost per byte that does not shrink with the group size the way the
  per-link share ``(n-1)/n`` does.

With the defaults (efficiencies 1, ``buffer_passes`` 0) the phases are returned unchanged.
Units: bytes, us, bytes/us.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence


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


def tune_phases(profile: Any, op: str, algo: str, nbytes: int, ranks: Sequence[int], inter_node: bool,
                phases: Sequence[Any]) -> list[Any]:
    """``phases`` (``simulator.collectives.Phase``) with the calibrated corrections applied."""
    phases = list(phases)
    if not phases:
        return phases
    scale = collective_scale(profile, op, algo, inter_node)
    extra = buffer_us(profile, op, len(ranks), nbytes)
    if scale != 1.0:
        phases = [replace(ph, nbytes=ph.nbytes / scale) for ph in phases]
    if extra > 0:
        first = phases[0]
        phases[0] = replace(first, latency_us=first.latency_us + extra / first.repeat)
    return phases
