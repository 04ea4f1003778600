"""A small fake cluster for tests that must not depend on ``hardware_profiles``.

:class:`FakeCluster` exposes what planners, the validator and :class:`engine.core.comm.CommModel`
use: ``n_gpus``, ``gpus_per_node``, ``nodes``, ``gpu_model``, ``node_of``, ``route_class``,
``transfer_time`` and ``memory_cap_bytes``. Transfers are ``latency + bytes / bandwidth`` with
one figure inside a node (NVLink) and one across nodes (NIC). Units: us, bytes, bytes/us.
"""

from __future__ import annotations

import math


class FakeCluster:
    """``nodes`` nodes of ``gpus_per_node`` GPUs named ``gpu_model``.

    Defaults: NVLink 400 bytes/us (400 MB/s, small numbers keep hand-computed delays readable)
    with 1 us latency, NIC 50 bytes/us with 5 us latency, 80 GiB per GPU.
    """

    def __init__(self, n_gpus: int = 8, gpus_per_node: int | None = None, gpu_model: str = "fake-gpu",
                 nvlink_bw: float = 400.0, nvlink_lat_us: float = 1.0, nic_bw: float = 50.0,
                 nic_lat_us: float = 5.0, memory_bytes: int = 80 << 30):
        self.n_gpus = int(n_gpus)
        self.gpus_per_node = int(gpus_per_node or n_gpus)
        self.nodes = math.ceil(self.n_gpus / self.gpus_per_node)
        self.gpu_model = gpu_model
        self.nvlink_bw, self.nvlink_lat_us = float(nvlink_bw), float(nvlink_lat_us)
        self.nic_bw, self.nic_lat_us = float(nic_bw), float(nic_lat_us)
        self.memory_bytes = int(memory_bytes)
        self.calls = 0  # transfer_time calls, for tests that check caching

    def node_of(self, gpu: int) -> int:
        return int(gpu) // self.gpus_per_node

    def route_class(self, a: int, b: int) -> str:
        if a == b:
            return "local"
        return "nvlink" if self.node_of(a) == self.node_of(b) else "nic"

    def transfer_time(self, a: int, b: int, nbytes: int) -> float:
        """Contention-free time (us) of ``nbytes`` from GPU ``a`` to GPU ``b``."""
        self.calls += 1
        if a == b or nbytes <= 0:
            return 0.0
        if self.route_class(a, b) == "nvlink":
            return self.nvlink_lat_us + nbytes / self.nvlink_bw
        return self.nic_lat_us + nbytes / self.nic_bw

    def memory_cap_bytes(self, gpu: int) -> int:
        return self.memory_bytes


class PacketCluster(FakeCluster):
    """A fake whose transfer time is not affine in the size: whole 4 KiB packets."""

    PACKET = 4096

    def transfer_time(self, a: int, b: int, nbytes: int) -> float:
        if a == b or nbytes <= 0:
            return 0.0
        packets = -(-nbytes // self.PACKET)
        return super().transfer_time(a, b, packets * self.PACKET)
