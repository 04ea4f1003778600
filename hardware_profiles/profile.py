"""The hardware profile: a GPU, a node of GPUs and the cluster fabric, in internal units.

A profile file (YAML) is written in datasheet units; :data:`FIELDS` is the one table that says,
for every dotted key, its datasheet unit, the factor to internal units, its type, its range and
its default. The loader converts once with it and :meth:`Profile.to_dict` converts back with it.

Internal units: time in us, sizes in bytes (int), bandwidth in bytes/us (= MB/s), compute in
FLOP/us. Conversions: GB/s x 1e3 = bytes/us, Gb/s x 125 = bytes/us, TFLOP/s x 1e6 = FLOP/us,
GiB x 2**30 = bytes.

Round trip: ``load(write(p)) == p`` holds exactly for every profile that came from a file (with
or without overrides): :func:`to_datasheet` picks, among the floats next to ``internal / factor``,
one that converts back to exactly ``internal``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import yaml

from engine.core.errors import InputError

GIB = 2**30
GBS = 1e3  # GB/s -> bytes/us
GBPS = 125.0  # Gb/s -> bytes/us
TFLOPS = 1e6  # TFLOP/s -> FLOP/us

DTYPES = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "fp4")
LINK_CLASSES = ("nvlink", "pcie", "nic", "spine")
COLLECTIVE_NAMES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "broadcast")


@dataclass(frozen=True)
class Field:
    """One dotted key of a profile file.

    ``kind`` is "int", "float", "bool" or "str"; ``lo``/``hi`` bound the datasheet value
    (``lo_open``/``hi_open``: strict); ``factor`` multiplies the datasheet value into internal
    units (``None``: no conversion); ``default`` (``REQUIRED`` if none) is in datasheet units.
    """

    path: str
    attr: str
    kind: str
    unit: str
    doc: str
    default: Any = None
    factor: float | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


def _f(path, attr, kind, unit, doc, default=REQUIRED, factor=None, lo=None, hi=None, lo_open=False, hi_open=False):
    return Field(path, attr, kind, unit, doc, default, factor, lo, hi, lo_open, hi_open)


_POSITIVE = dict(lo=0.0, lo_open=True)
_NONNEG = dict(lo=0.0)
_SHARE = dict(lo=0.0, lo_open=True, hi=1.0)  # an efficiency: (0, 1]

FIELDS: tuple[Field, ...] = (
    _f("name", "name", "str", "", "profile name (the GPU model name plans and traces use)", default=None),
    _f("description", "description", "str", "", "one line for people", default=""),
    # gpu
    _f("gpu.model", "model", "str", "", "marketing name of the GPU"),
    *(_f(f"gpu.tflops.{dt}", f"tflops.{dt}", "float", "TFLOP/s", f"peak dense {dt} throughput",
         default=None, factor=TFLOPS, **_POSITIVE) for dt in DTYPES),
    _f("gpu.memory_gib", "memory_bytes", "float", "GiB", "HBM capacity", factor=GIB, **_POSITIVE),
    _f("gpu.hbm_gbs", "hbm_bytes_per_us", "float", "GB/s", "HBM bandwidth", factor=GBS, **_POSITIVE),
    _f("gpu.compute_efficiency", "compute_efficiency", "float", "", "share of peak FLOP/s kernels reach",
       default=0.5, **_SHARE),
    _f("gpu.comm_compute_slowdown", "comm_compute_slowdown", "float", "",
       "share by which compute slows while a comm kernel runs on the same GPU", default=0.0, lo=0.0, hi=1.0, hi_open=True),
    _f("gpu.memory_efficiency", "memory_efficiency", "float", "", "achievable share of HBM bandwidth",
       default=0.7, **_SHARE),
    _f("gpu.gemm_half_gflop", "gemm_half_flops", "float", "GFLOP",
       "GEMM size at which a GEMM reaches half of compute_efficiency (0: every GEMM reaches it)",
       default=0.0, factor=1e9, **_NONNEG),
    _f("gpu.kernel_overhead_us", "kernel_overhead_us", "float", "us", "fixed cost of one element-wise kernel",
       default=0.0, **_NONNEG),
    # node
    _f("node.gpus", "gpus", "int", "", "GPUs per node", lo=1),
    _f("node.nvlink_gbs", "nvlink_bytes_per_us", "float", "GB/s", "NVLink bandwidth per GPU, per direction",
       factor=GBS, **_POSITIVE),
    _f("node.nvlink_latency_us", "nvlink_latency_us", "float", "us", "latency of one GPU<->NVSwitch hop", **_NONNEG),
    _f("node.nvlink_efficiency", "nvlink_efficiency", "float", "", "achievable share of NVLink bandwidth",
       default=0.8, **_SHARE),
    _f("node.nvls", "nvls", "bool", "", "NVSwitch can reduce in the switch (NVLink SHARP)", default=False),
    _f("node.nics", "nics", "int", "", "scale-out NICs per node", lo=1),
    _f("node.nic_gbps", "nic_bytes_per_us", "float", "Gb/s", "line rate of one NIC, per direction",
       factor=GBPS, **_POSITIVE),
    _f("node.nic_latency_us", "nic_latency_us", "float", "us", "latency of one NIC<->leaf hop", **_NONNEG),
    _f("node.nic_efficiency", "nic_efficiency", "float", "", "achievable share of NIC line rate",
       default=0.9, **_SHARE),
    _f("node.pcie_gbs", "pcie_bytes_per_us", "float", "GB/s", "GPU<->NIC PCIe bandwidth, per direction",
       factor=GBS, **_POSITIVE),
    _f("node.pcie_latency_us", "pcie_latency_us", "float", "us", "latency of one GPU<->NIC hop", **_NONNEG),
    _f("node.pcie_efficiency", "pcie_efficiency", "float", "", "achievable share of PCIe bandwidth",
       default=0.8, **_SHARE),
    # fabric
    _f("fabric.nodes_per_leaf", "nodes_per_leaf", "int", "", "nodes under one leaf switch", lo=1),
    _f("fabric.spines", "spines", "int", "", "spine switches (ECMP paths between leaves)", lo=1),
    _f("fabric.oversubscription", "oversubscription", "float", "",
       "leaf downlink / uplink bandwidth (1 = non-blocking)", lo=1.0),
    _f("fabric.latency_us", "latency_us", "float", "us", "latency of one leaf<->spine hop", **_NONNEG),
    _f("fabric.efficiency", "efficiency", "float", "", "achievable share of leaf<->spine bandwidth",
       default=0.9, **_SHARE),
    # comm
    _f("comm.message_overhead_us", "message_overhead_us", "float", "us",
       "fixed software cost of one message (kernel launch, protocol handshake)", default=5.0, **_NONNEG),
    _f("comm.buffer_passes", "buffer_passes", "float", "",
       "times a collective streams its input and output buffers through HBM (at hbm x memory_efficiency)",
       default=0.0, lo=0.0, hi=20.0),
    _f("comm.net_channels_per_nic", "net_channels_per_nic", "int", "channels",
       "NCCL channels that drive one NIC (NCCL's own default 2, not fitted): one channel moves at most "
       "NIC rate / this; a send/recv to another node gets this many channels, halved in large groups "
       "(simulator.p2p_channels); 0 turns the per-connection cap off", default=2, lo=0, hi=64),
    _f("comm.nvls_efficiency", "nvls_efficiency", "float", "",
       "share of the NVLink-limited rate an in-switch (NVLS) all-reduce reaches", default=1.0, lo=0.0, lo_open=True, hi=2.0),
    *(_f(f"comm.efficiency.{scope}.{op}", f"{scope}_{op}_efficiency", "float", "",
         f"share of the link-limited rate a {op} reaches {where}", default=1.0, lo=0.0, lo_open=True, hi=2.0)
      for scope, where in (("intra", "inside a node"), ("inter", "across nodes")) for op in COLLECTIVE_NAMES),
    *(_f(f"comm.efficiency.full_node.{op}", f"full_node_{op}_efficiency", "float", "",
         f"share of the NIC and PCIe rates a {op} across nodes keeps when its group holds every GPU of each "
         "of its nodes (all NICs of a node busy at once)", default=1.0, lo=0.0, lo_open=True, hi=2.0)
      for op in COLLECTIVE_NAMES),
    *(_f(f"comm.latency.{scope}.{op}", f"{scope}_{op}_latency_us", "float", "us",
         f"fixed cost of one {op} {where} on top of comm.message_overhead_us (channel set-up, protocol "
         "ramp-up: the bytes a collective moves before it reaches its full rate)", default=0.0, lo=0.0, hi=1e5)
      for scope, where in (("intra", "inside a node"), ("inter", "across nodes")) for op in COLLECTIVE_NAMES),
)

FIELD_BY_PATH: dict[str, Field] = {f.path: f for f in FIELDS}
SECTIONS = ("gpu", "node", "fabric", "comm")


def to_internal(f: Field, value: Any) -> Any:
    """Datasheet value of field ``f`` -> internal units (bytes are rounded to an int)."""
    if value is None or f.factor is None:
        return value
    if f.factor == GIB:
        return int(round(value * GIB))
    return float(value) * f.factor


def to_datasheet(f: Field, internal: Any) -> Any:
    """Internal value of field ``f`` -> datasheet units, chosen so that ``to_internal`` inverts it."""
    if internal is None or f.factor is None:
        return internal
    if f.factor == GIB:
        return internal / GIB  # exact: a division by a power of two
    x = internal / f.factor
    if x * f.factor == internal:
        return x
    up = down = x
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        for cand in (up, down):
            if cand * f.factor == internal:
                return cand
    return x


@dataclass(frozen=True)
class GPU:
    """One GPU. ``flops_per_us``: peak dense FLOP/us per dtype (sorted (dtype, value) pairs)."""

    model: str
    flops_per_us: tuple[tuple[str, float], ...]
    memory_bytes: int
    hbm_bytes_per_us: float
    compute_efficiency: float
    comm_compute_slowdown: float
    memory_efficiency: float
    gemm_half_flops: float
    kernel_overhead_us: float


@dataclass(frozen=True)
class Node:
    """One node: GPUs on an NVSwitch, each GPU on a NIC through PCIe. Bandwidths per direction."""

    gpus: int
    nvlink_bytes_per_us: float
    nvlink_latency_us: float
    nvlink_efficiency: float
    nvls: bool
    nics: int
    nic_bytes_per_us: float
    nic_latency_us: float
    nic_efficiency: float
    pcie_bytes_per_us: float
    pcie_latency_us: float
    pcie_efficiency: float


@dataclass(frozen=True)
class Fabric:
    """The scale-out network: a two-level leaf/spine (fat-tree) of NIC ports."""

    nodes_per_leaf: int
    spines: int
    oversubscription: float
    latency_us: float
    efficiency: float


@dataclass(frozen=True)
class Comm:
    """Communication software costs and calibrated collective efficiencies (see
    ``engine.calibration``)."""

    message_overhead_us: float
    buffer_passes: float
    nvls_efficiency: float
    intra_all_reduce_efficiency: float
    intra_all_gather_efficiency: float
    intra_reduce_scatter_efficiency: float
    intra_all_to_all_efficiency: float
    intra_send_recv_efficiency: float
    intra_broadcast_efficiency: float
    inter_all_reduce_efficiency: float
    inter_all_gather_efficiency: float
    inter_reduce_scatter_efficiency: float
    inter_all_to_all_efficiency: float
    inter_send_recv_efficiency: float
    inter_broadcast_efficiency: float
    full_node_all_reduce_efficiency: float = 1.0
    full_node_all_gather_efficiency: float = 1.0
    full_node_reduce_scatter_efficiency: float = 1.0
    full_node_all_to_all_efficiency: float = 1.0
    full_node_send_recv_efficiency: float = 1.0
    full_node_broadcast_efficiency: float = 1.0
    intra_all_reduce_latency_us: float = 0.0
    intra_all_gather_latency_us: float = 0.0
    intra_reduce_scatter_latency_us: float = 0.0
    intra_all_to_all_latency_us: float = 0.0
    intra_send_recv_latency_us: float = 0.0
    intra_broadcast_latency_us: float = 0.0
    inter_all_reduce_latency_us: float = 0.0
    inter_all_gather_latency_us: float = 0.0
    inter_reduce_scatter_latency_us: float = 0.0
    inter_all_to_all_latency_us: float = 0.0
    inter_send_recv_latency_us: float = 0.0
    inter_broadcast_latency_us: float = 0.0
    net_channels_per_nic: int = 2

    def collective_efficiency(self, op: str, inter_node: bool) -> float:
        """The calibrated share of the link-limited rate ``op`` reaches inside / across nodes."""
        return getattr(self, f"{'inter' if inter_node else 'intra'}_{op}_efficiency", 1.0)

    def full_node_efficiency(self, op: str) -> float:
        """The calibrated share of the NIC-side (NIC, PCIe) rate ``op`` keeps across nodes when its
        group holds every GPU of each of its nodes."""
        return getattr(self, f"full_node_{op}_efficiency", 1.0)

    def collective_latency_us(self, op: str, inter_node: bool) -> float:
        """The calibrated fixed cost (us) of one ``op`` inside / across nodes, on top of the
        message overhead."""
        return getattr(self, f"{'inter' if inter_node else 'intra'}_{op}_latency_us", 0.0)


@dataclass(frozen=True)
class Profile:
    """A validated hardware profile in internal units (build one with ``load_profile``)."""

    name: str
    description: str
    gpu: GPU
    node: Node
    fabric: Fabric
    comm: Comm

    def peak_flops_per_us(self, dtype: str) -> float:
        """Peak dense FLOP/us of one GPU for ``dtype``; InputError if the profile gives none."""
        for dt, v in self.gpu.flops_per_us:
            if dt == dtype:
                return v
        have = ", ".join(dt for dt, _ in self.gpu.flops_per_us)
        raise InputError(None, "dtype", f"profile {self.name!r} gives no {dtype!r} throughput (it gives: {have})")

    def dtypes(self) -> tuple[str, ...]:
        return tuple(dt for dt, _ in self.gpu.flops_per_us)

    def link_efficiency(self, link_class: str) -> float:
        """The achievable share of nominal bandwidth for a link class (see ``LINK_CLASSES``)."""
        return {"nvlink": self.node.nvlink_efficiency, "pcie": self.node.pcie_efficiency,
                "nic": self.node.nic_efficiency, "spine": self.fabric.efficiency}[link_class]

    def get(self, path: str) -> Any:
        """The value of dotted key ``path`` in datasheet units (``None`` for an absent dtype)."""
        f = FIELD_BY_PATH[path]
        return to_datasheet(f, self._internal(f))

    def _internal(self, f: Field) -> Any:
        if f.section not in SECTIONS:
            return getattr(self, f.attr)
        part = getattr(self, f.section)
        if f.attr.startswith("tflops."):
            return dict(part.flops_per_us).get(f.attr.split(".", 1)[1])
        return getattr(part, f.attr)

    def to_flat(self) -> dict[str, Any]:
        """``{dotted key: datasheet value}`` for every field set (absent dtypes left out)."""
        out = {}
        for f in FIELDS:
            v = self.get(f.path)
            if v is not None:
                out[f.path] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The profile as a nested mapping in datasheet units, in :data:`FIELDS` order."""
        return unflatten(self.to_flat())

    def to_yaml(self) -> str:
        """The profile as a YAML document that ``load_profile`` reads back to an equal Profile."""
        head = f"# plansim hardware profile {self.name!r} (datasheet units: GB/s, Gb/s, TFLOP/s, GiB, us)\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=1000)

    def summary(self) -> dict[str, Any]:
        """Key figures for listings, in datasheet units."""
        return {
            "name": self.name, "gpu": self.gpu.model, "memory_gib": self.get("gpu.memory_gib"),
            "hbm_gbs": self.get("gpu.hbm_gbs"), "bf16_tflops": self.get("gpu.tflops.bf16"),
            "fp8_tflops": self.get("gpu.tflops.fp8"), "gpus_per_node": self.node.gpus,
            "nvlink_gbs": self.get("node.nvlink_gbs"), "nvls": self.node.nvls, "nics": self.node.nics,
            "nic_gbps": self.get("node.nic_gbps"), "description": self.description,
        }


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b.c": v}`` -> ``{"a": {"b": {"c": v}}}`` (insertion order kept)."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        d = out
        *heads, last = path.split(".")
        for h in heads:
            d = d.setdefault(h, {})
        d[last] = v
    return out


def profile_from_flat(values: Mapping[str, Any]) -> Profile:
    """Build a Profile from validated ``{dotted key: datasheet value}`` (defaults filled in)."""
    internal = {f.path: to_internal(f, values.get(f.path, None if f.required else f.default)) for f in FIELDS}

    def section(cls, name):
        kw = {}
        for fl in fields(cls):
            if fl.name == "flops_per_us":
                kw[fl.name] = tuple((dt, internal[f"gpu.tflops.{dt}"]) for dt in DTYPES
                                    if internal[f"gpu.tflops.{dt}"] is not None)
            else:
                kw[fl.name] = next(internal[f.path] for f in FIELDS if f.section == name and f.attr == fl.name)
        return cls(**kw)

    return Profile(name=internal["name"], description=internal["description"], gpu=section(GPU, "gpu"),
                   node=section(Node, "node"), fabric=section(Fabric, "fabric"), comm=section(Comm, "comm"))


__all__ = ["Profile", "GPU", "Node", "Fabric", "Comm", "FIELDS", "FIELD_BY_PATH", "DTYPES", "LINK_CLASSES",
           "GIB", "unflatten", "profile_from_flat", "to_internal", "to_datasheet"]
