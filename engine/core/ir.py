"""The intermediate representation shared by planners, the validator and the simulator.

Units: time in microseconds (float), sizes in bytes (int). Devices are global GPU indices
``0 .. n_gpus-1`` of a cluster (see ``hardware_profiles``).

* :class:`Op` is one operation (a job-shop *operation*): it runs on one GPU, on that GPU's
  compute stream (``kind="compute"``) or communication stream (``kind="comm"``).
* :class:`Workload` is a DAG of ops (a networkx ``DiGraph``, op ids as nodes) whose edges carry
  the bytes one op sends the next. It refuses cycles, unknown ids and negative sizes.
* :class:`Plan` says, per op, the device, start and end; per device, the order; and what the
  planner predicted (makespan, status, gap).

Memory: an op allocates ``memory_bytes`` on its device when it starts; the allocation is freed
when every op in ``release`` has ended (``release=()`` frees it when the op itself ends).
``Workload.static_memory_bytes`` holds what sits on a device for the whole step (weights,
optimizer state). A collective op (``collective`` set) occupies the comm stream of every GPU in
its group at once; its plan device is the group's first GPU.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import networkx as nx

from engine.core.documents import parse_json
from engine.core.errors import InputError

OP_KINDS = ("compute", "comm")
COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")


@dataclass(frozen=True)
class Collective:
    """A collective over ``group`` (GPU indices). ``bytes`` follows nccl-tests' ``size``:
    the whole buffer (for all_gather / reduce_scatter the gathered buffer)."""

    op: str
    group: tuple[int, ...]
    bytes: int
    algo: str = "auto"

    def __post_init__(self):
        if self.op not in COLLECTIVE_OPS:
            raise InputError(None, "collective.op", f"unknown collective {self.op!r}; one of {', '.join(COLLECTIVE_OPS)}")
        if self.bytes < 0:
            raise InputError(None, "collective.bytes", f"negative size {self.bytes}")
        if len(self.group) < 1:
            raise InputError(None, "collective.group", "empty group")
        object.__setattr__(self, "group", tuple(int(g) for g in self.group))


@dataclass(frozen=True)
class Op:
    """One operation.

    ``duration_us`` is the time on the reference GPU; ``duration_by_gpu`` may give the time per
    GPU model name (profile name), which wins where it names the device's model. Tags
    (``stage``, ``microbatch``, ``chunk``, ``phase``) are for schedules, symmetry breaking and
    traces; planners never need them.
    """

    id: str
    duration_us: float
    kind: str = "compute"
    devices: tuple[int, ...] | None = None
    memory_bytes: int = 0
    release: tuple[str, ...] = ()
    stage: int | None = None
    microbatch: int | None = None
    chunk: int | None = None
    phase: str | None = None
    flops: float = 0.0
    duration_by_gpu: tuple[tuple[str, float], ...] = ()
    collective: Collective | None = None

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise InputError(None, "op.id", f"must be a non-empty string, got {self.id!r}")
        where = f"ops[{self.id}]"
        if not isinstance(self.duration_us, (int, float)) or not math.isfinite(self.duration_us) or self.duration_us < 0:
            raise InputError(None, f"{where}.duration_us", f"must be a finite number >= 0, got {self.duration_us!r}")
        if self.kind not in OP_KINDS:
            raise InputError(None, f"{where}.kind", f"must be one of {OP_KINDS}, got {self.kind!r}")
        if not isinstance(self.memory_bytes, int) or self.memory_bytes < 0:
            raise InputError(None, f"{where}.memory_bytes", f"must be an integer >= 0, got {self.memory_bytes!r}")
        if self.devices is not None:
            devs = tuple(int(d) for d in self.devices)
            if not devs:
                raise InputError(None, f"{where}.devices", "eligible on no GPU (empty list)")
            if min(devs) < 0:
                raise InputError(None, f"{where}.devices", f"negative GPU index in {list(devs)}")
            object.__setattr__(self, "devices", tuple(sorted(set(devs))))
        object.__setattr__(self, "release", tuple(self.release))
        object.__setattr__(self, "duration_by_gpu", tuple(sorted((str(k), float(v)) for k, v in dict(self.duration_by_gpu).items())))
        for model, t in self.duration_by_gpu:
            if not math.isfinite(t) or t < 0:
                raise InputError(None, f"{where}.duration_by_gpu.{model}", f"must be a finite number >= 0, got {t!r}")
        if self.collective is not None and self.kind != "comm":
            raise InputError(None, f"{where}.kind", "a collective op must have kind 'comm'")

    def duration_on(self, gpu_model: str | None = None) -> float:
        """Duration in us on a GPU of the given model (profile name)."""
        if gpu_model is not None:
            for model, t in self.duration_by_gpu:
                if model == gpu_model:
                    return t
        return float(self.duration_us)

    @property
    def occupied_devices(self) -> tuple[int, ...] | None:
        """GPUs whose stream this op occupies besides its own device (collectives)."""
        return self.collective.group if self.collective is not None else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices) if self.devices is not None else None
        d["release"] = list(self.release)
        d["duration_by_gpu"] = dict(self.duration_by_gpu)
        if self.collective is not None:
            d["collective"]["group"] = list(self.collective.group)
        return {k: v for k, v in d.items() if v not in (None, (), [], {}) or k in ("id", "duration_us")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Op":
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InputError(None, f"op.{sorted(unknown)[0]}", f"unknown field; known: {', '.join(sorted(known))}")
        if "collective" in d and d["collective"] is not None:
            d["collective"] = Collective(**{**d["collective"], "group": tuple(d["collective"]["group"])})
        if d.get("devices") is not None:
            d["devices"] = tuple(d["devices"])
        d["release"] = tuple(d.get("release", ()))
        d["duration_by_gpu"] = tuple(dict(d.get("duration_by_gpu", {})).items())
        return cls(**d)


@dataclass(frozen=True)
class Edge:
    """``src`` must finish, and its output of ``bytes`` reach ``dst``'s GPU, before ``dst`` starts."""

    src: str
    dst: str
    bytes: int = 0


class Workload:
    """A DAG of :class:`Op` (networkx ``DiGraph``: node = op id with attribute ``op``,
    edge attribute ``bytes``).

    ``static_memory_bytes[d]`` sits on GPU ``d`` for the whole step; ``memory_cap_bytes`` (per
    GPU), if set, overrides the cluster's GPU memory.
    """

    def __init__(self, name: str = "workload", ops: Iterable[Op] = (), edges: Iterable[Edge] = (),
                 static_memory_bytes: Mapping[int, int] | None = None, memory_cap_bytes: int | None = None,
                 meta: Mapping[str, Any] | None = None):
        self.name = name
        self.graph = nx.DiGraph()
        self.static_memory_bytes: dict[int, int] = {int(k): int(v) for k, v in (static_memory_bytes or {}).items()}
        self.memory_cap_bytes = memory_cap_bytes
        self.meta: dict[str, Any] = dict(meta or {})
        for op in ops:
            self.add_op(op)
        for e in edges:
            self.add_edge(e.src, e.dst, e.bytes)
        self.check()

    # -- building -------------------------------------------------------------------------
    def add_op(self, op: Op) -> None:
        if op.id in self.graph:
            raise InputError(None, f"ops[{op.id}]", "duplicate op id")
        self.graph.add_node(op.id, op=op)

    def add_edge(self, src: str, dst: str, nbytes: int = 0) -> None:
        for end, name in (("src", src), ("dst", dst)):
            if name not in self.graph:
                raise InputError(None, f"edges[{src}->{dst}].{end}", f"unknown op id {name!r}")
        if not isinstance(nbytes, int) or nbytes < 0:
            raise InputError(None, f"edges[{src}->{dst}].bytes", f"must be an integer >= 0, got {nbytes!r}")
        if src == dst:
            raise InputError(None, f"edges[{src}->{dst}]", "an op cannot depend on itself")
        self.graph.add_edge(src, dst, bytes=nbytes)

    def check(self) -> None:
        """Refuse cycles and ``release`` lists that name unknown ops."""
        if not nx.is_directed_acyclic_graph(self.graph):
            cycle = nx.find_cycle(self.graph)
            path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
            raise InputError(None, "edges", f"the graph has a cycle: {path}")
        for op in self.ops.values():
            for r in op.release:
                if r not in self.graph:
                    raise InputError(None, f"ops[{op.id}].release", f"unknown op id {r!r}")
        for d, b in self.static_memory_bytes.items():
            if b < 0:
                raise InputError(None, f"static_memory_bytes[{d}]", f"negative size {b}")

    # -- reading --------------------------------------------------------------------------
    @property
    def ops(self) -> dict[str, Op]:
        return {n: data["op"] for n, data in self.graph.nodes(data=True)}

    def op(self, op_id: str) -> Op:
        return self.graph.nodes[op_id]["op"]

    @property
    def edges(self) -> list[Edge]:
        return [Edge(u, v, d["bytes"]) for u, v, d in self.graph.edges(data=True)]

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def topological_order(self) -> list[str]:
        """A deterministic topological order (ties broken by op id)."""
        return list(nx.lexicographical_topological_sort(self.graph))

    def eligible(self, op_id: str, n_devices: int) -> tuple[int, ...]:
        """GPUs ``op_id`` may run on in a cluster of ``n_devices`` GPUs."""
        devs = self.op(op_id).devices
        if devs is None:
            return tuple(range(n_devices))
        return tuple(d for d in devs if d < n_devices)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ops": [self.op(o).to_dict() for o in sorted(self.graph.nodes)],
            "edges": [asdict(e) for e in sorted(self.edges, key=lambda e: (e.src, e.dst))],
            "static_memory_bytes": {str(k): v for k, v in sorted(self.static_memory_bytes.items())},
            "memory_cap_bytes": self.memory_cap_bytes,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Workload":
        return cls(
            name=d.get("name", "workload"),
            ops=[Op.from_dict(o) for o in d["ops"]],
            edges=[Edge(e["src"], e["dst"], int(e.get("bytes", 0))) for e in d.get("edges", [])],
            static_memory_bytes={int(k): v for k, v in d.get("static_memory_bytes", {}).items()},
            memory_cap_bytes=d.get("memory_cap_bytes"),
            meta=d.get("meta"),
        )


@dataclass
class Placement:
    """Where and when one op runs: GPU index, start and end in us."""

    device: int
    start: float
    end: float


@dataclass
class Transfer:
    """Bytes of edge ``src -> dst`` moving between two GPUs, with the planner's timing (us)."""

    src: str
    dst: str
    src_device: int
    dst_device: int
    bytes: int
    start: float
    end: float


PLAN_STATUSES = ("optimal", "feasible", "time_limit", "heuristic", "schedule", "infeasible")


@dataclass
class Plan:
    """A plan: per op a :class:`Placement`; per device the order of its ops; predictions.

    ``order[d]`` lists the ops on GPU ``d`` (both streams) in the order they are issued.
    ``makespan_us`` is the planner's predicted makespan; ``lower_bound_us`` and ``mip_gap``
    are set by planners that prove bounds.
    """

    workload: str
    placements: dict[str, Placement]
    planner: str
    status: str = "feasible"
    makespan_us: float | None = None
    order: dict[int, list[str]] = field(default_factory=dict)
    transfers: list[Transfer] = field(default_factory=list)
    lower_bound_us: float | None = None
    mip_gap: float | None = None
    solve_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.makespan_us is None:
            self.makespan_us = max((p.end for p in self.placements.values()), default=0.0)
        if not self.order:
            self.order = self.default_order(self.placements)

    @staticmethod
    def default_order(placements: Mapping[str, Placement]) -> dict[int, list[str]]:
        """Per device, ops sorted by (start, end, id)."""
        order: dict[int, list[str]] = {}
        for op_id, p in sorted(placements.items(), key=lambda kv: (kv[1].start, kv[1].end, kv[0])):
            order.setdefault(p.device, []).append(op_id)
        return dict(sorted(order.items()))

    @property
    def devices(self) -> list[int]:
        return sorted(self.order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "planner": self.planner,
            "status": self.status,
            "makespan_us": self.makespan_us,
            "lower_bound_us": self.lower_bound_us,
            "mip_gap": self.mip_gap,
            "solve_s": self.solve_s,
            "placements": {k: asdict(v) for k, v in sorted(self.placements.items())},
            "order": {str(d): list(ops) for d, ops in sorted(self.order.items())},
            "transfers": [asdict(t) for t in self.transfers],
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "Plan":
        try:
            placements = {k: Placement(int(v["device"]), float(v["start"]), float(v["end"]))
                          for k, v in d["placements"].items()}
            return cls(
                workload=d.get("workload", "workload"),
                placements=placements,
                planner=d.get("planner", "unknown"),
                status=d.get("status", "feasible"),
                makespan_us=d.get("makespan_us"),
                order={int(k): list(v) for k, v in d.get("order", {}).items()},
                transfers=[Transfer(**t) for t in d.get("transfers", [])],
                lower_bound_us=d.get("lower_bound_us"),
                mip_gap=d.get("mip_gap"),
                solve_s=float(d.get("solve_s", 0.0)),
                meta=dict(d.get("meta", {})),
            )
        except KeyError as e:
            raise InputError(source, str(e.args[0]), "missing field in plan") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise InputError(source, "placements", f"malformed plan: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> "Plan":
        d = parse_json(text, source)
        if not isinstance(d, dict):
            raise InputError(source, None, "a plan must be a JSON object")
        return cls.from_dict(d, source)


def compute_busy_us(plan: Plan, workload: Workload) -> dict[int, float]:
    """Per device, the summed duration of its compute-stream ops (us)."""
    busy: dict[int, float] = {d: 0.0 for d in plan.order}
    for op_id, p in plan.placements.items():
        if workload.op(op_id).kind == "compute":
            busy[p.device] = busy.get(p.device, 0.0) + (p.end - p.start)
    return busy


def bubble_us(plan: Plan, workload: Workload, makespan_us: float | None = None) -> float:
    """bubble = makespan - max over devices of compute-busy time (docs/DESIGN.md)."""
    makespan = plan.makespan_us if makespan_us is None else makespan_us
    if makespan is None:  # Plan.__post_init__ fills it in
        raise ValueError(f"plan {plan.workload!r} has no makespan")
    busy = compute_busy_us(plan, workload)
    return makespan - max(busy.values(), default=0.0)


def stream_sequences(plan: Plan, ops: Mapping[str, Op]) -> dict[tuple[int, str], list[str]]:
    """Per (GPU, stream), the ops it runs in order: ``plan.order`` for the GPU's own ops (stream
    = op kind), with collectives placed on another GPU of their group merged into that GPU's comm
    stream by (start, end, id). Assumes every op of ``ops`` is in ``plan.order`` once."""
    own: dict[tuple[int, str], list[str]] = {}
    for d in sorted(plan.order):
        for op_id in plan.order[d]:
            own.setdefault((d, ops[op_id].kind), []).append(op_id)
    foreign: dict[tuple[int, str], list[str]] = {}
    for op_id in sorted(ops):
        coll = ops[op_id].collective
        if coll is not None:
            home = plan.placements[op_id].device
            for g in sorted(set(coll.group) - {home}):
                foreign.setdefault((g, "comm"), []).append(op_id)

    def key(o: str) -> tuple[float, float, str]:
        p = plan.placements[o]
        return (p.start, p.end, o)

    seqs = dict(own)
    for k, extra in foreign.items():
        extra.sort(key=key)
        merged, i = [], 0
        for o in own.get(k, []):
            while i < len(extra) and key(extra[i]) < key(o):
                merged.append(extra[i])
                i += 1
            merged.append(o)
        seqs[k] = merged + extra[i:]
    return dict(sorted(seqs.items()))


def topological_indices(n: int, arcs: Iterable[tuple[int, int]]) -> list[int]:
    """Topological order of nodes ``0..n-1`` under ``arcs`` (i before j), smallest ready index
    first (Kahn's algorithm with a heap). Raises ``ValueError`` on a cycle."""
    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for i, j in arcs:
        succ[i].append(j)
        indeg[j] += 1
    heap = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        i = heapq.heappop(heap)
        out.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, j)
    if len(out) != n:
        raise ValueError("the arcs create a cycle")
    return out
