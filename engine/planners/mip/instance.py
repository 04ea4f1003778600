"""The MIP's view of a workload: a flexible job-shop instance with bounds.

:class:`Instance` holds, per operation (index ``i``), its eligible GPUs and duration on each
(us), its stream, the (device, stream) resources it occupies, its memory allocation (bytes)
and release ops, and per edge the communication delay (us) for every pair of eligible GPUs.
The coarsener builds smaller instances of the same shape, so the model and the warm-start
schedules only ever see an :class:`Instance`.

Bounds (all in us, computed with the smallest duration and delay each op can have):

* ``head[i]`` earliest start: longest path to ``i``;
* ``tail[i]`` shortest time that must pass after ``i`` ends: longest path after ``i``;
* ``lower_bound()``: max of the critical path and, per resource, the earliest head + the work
  that must run there + the smallest tail (the per-device load bound).

``arcs`` are the precedences the model must respect: the DAG's edges, plus zero-delay order
arcs (micro-batch symmetry breaking, orders a polish solve keeps fixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.core.ir import topological_indices
from engine.core.memory import memory_caps

STREAMS = ("compute", "comm")


@dataclass
class Instance:
    """A flexible job-shop instance (see the module docstring). Times in us, sizes in bytes."""

    ids: list[str]
    kind: list[str]
    devices: list[tuple[int, ...]]
    dur: list[dict[int, float]]
    alloc: list[int]
    release: list[tuple[int, ...]]
    n_devices: int
    static: dict[int, int]
    cap: dict[int, int]
    # (src, dst) -> {(d_src, d_dst): delay_us}; only pairs with a positive delay are stored.
    edges: dict[tuple[int, int], dict[tuple[int, int], float]] = field(default_factory=dict)
    occupies: list[tuple[int, ...] | None] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)
    order_arcs: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self):
        n = len(self.ids)
        if not self.occupies:
            self.occupies = [None] * n
        if not self.tags:
            self.tags = [{} for _ in range(n)]
        self.index = {o: i for i, o in enumerate(self.ids)}
        self._cache: dict[str, Any] = {}

    # -- building --------------------------------------------------------------------------
    @classmethod
    def from_workload(cls, workload, cluster, comm, memory_cap: int | None = None) -> "Instance":
        """The instance of ``workload`` on ``cluster`` with delays from ``comm`` (a CommModel)."""
        n_dev = int(cluster.n_gpus)
        model = getattr(cluster, "gpu_model", None)
        order = workload.topological_order()
        index = {o: i for i, o in enumerate(order)}
        ops = [workload.op(o) for o in order]
        devices: list[tuple[int, ...]] = []
        dur: list[dict[int, float]] = []
        occupies: list[tuple[int, ...] | None] = []
        for op in ops:
            if op.collective is not None:
                devs = (op.collective.group[0],) if op.collective.group[0] < n_dev else ()
                occupies.append(tuple(g for g in op.collective.group))
            else:
                devs = workload.eligible(op.id, n_dev)
                occupies.append(None)
            devices.append(tuple(devs))
            dur.append({d: float(op.duration_on(model)) for d in devs})
        edges = {}
        for e in workload.edges:
            i, j = index[e.src], index[e.dst]
            delays = {}
            if e.bytes > 0:
                for a in devices[i]:
                    for b in devices[j]:
                        t = comm.delay(e.src, e.dst, a, b, e.bytes)
                        if t > 0:
                            delays[(a, b)] = float(t)
            edges[(i, j)] = delays
        cap = dict(enumerate(memory_caps(workload, cluster, memory_cap)))
        tags = [{k: getattr(op, k) for k in ("stage", "microbatch", "chunk", "phase") if getattr(op, k) is not None}
                for op in ops]
        return cls(ids=list(order), kind=[op.kind for op in ops], devices=devices, dur=dur,
                   alloc=[int(op.memory_bytes) for op in ops],
                   release=[tuple(sorted(index[r] for r in op.release)) for op in ops],
                   n_devices=n_dev, static={d: int(workload.static_memory_bytes.get(d, 0)) for d in range(n_dev)},
                   cap=cap, edges=edges, occupies=occupies, tags=tags)

    def restricted(self, fixed_devices: dict[int, int] | None = None,
                   order_arcs: Iterable[tuple[int, int]] = ()) -> "Instance":
        """A copy with some ops pinned to one GPU and extra zero-delay order arcs."""
        fixed_devices = fixed_devices or {}
        devices = [(fixed_devices[i],) if i in fixed_devices else self.devices[i] for i in range(len(self.ids))]
        dur = [{d: self.dur[i][d] for d in devices[i]} for i in range(len(self.ids))]
        edges = {k: {(a, b): t for (a, b), t in v.items() if a in devices[k[0]] and b in devices[k[1]]}
                 for k, v in self.edges.items()}
        return Instance(ids=list(self.ids), kind=list(self.kind), devices=devices, dur=dur, alloc=list(self.alloc),
                        release=list(self.release), n_devices=self.n_devices, static=dict(self.static),
                        cap=dict(self.cap), edges=edges, occupies=list(self.occupies), tags=list(self.tags),
                        order_arcs=set(self.order_arcs) | set(order_arcs))

    # -- basic facts -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def stream(self, i: int) -> str:
        return "comm" if self.kind[i] == "comm" else "compute"

    def resources(self, i: int, d: int) -> tuple[tuple[int, str], ...]:
        """The (device, stream) pairs op ``i`` occupies when placed on GPU ``d``."""
        occ = self.occupies[i]
        if occ is not None:
            return tuple((g, "comm") for g in occ)
        return ((d, self.stream(i)),)

    def pmin(self, i: int) -> float:
        return min(self.dur[i].values(), default=0.0)

    def pmax(self, i: int) -> float:
        return max(self.dur[i].values(), default=0.0)

    def delay(self, i: int, j: int, a: int, b: int) -> float:
        return self.edges.get((i, j), {}).get((a, b), 0.0)

    def min_delay(self, i: int, j: int) -> float:
        """Smallest delay of edge i->j over placements (0 for order arcs)."""
        delays = self.edges.get((i, j))
        if not delays:
            return 0.0
        return min(delays.get((a, b), 0.0) for a in self.devices[i] for b in self.devices[j])

    def max_delay(self, i: int, j: int) -> float:
        return max(self.edges.get((i, j), {}).values(), default=0.0)

    def fixed_device(self, i: int) -> int | None:
        return self.devices[i][0] if len(self.devices[i]) == 1 else None

    def releasers(self, i: int) -> tuple[int, ...]:
        """Ops whose latest end frees op ``i``'s allocation: the op itself and its release ops,
        minus those another of them must follow (their ends never decide)."""
        if "rel" not in self._cache:
            self._cache["rel"] = {}
        cache = self._cache["rel"]
        if i not in cache:
            rel = sorted(set(self.release[i]) | {i})
            cache[i] = tuple(r for r in rel if not any(q != r and self.ordered(r, q) for q in rel))
        return cache[i]

    # -- graph -----------------------------------------------------------------------------
    def arcs(self) -> list[tuple[int, int]]:
        """All precedence arcs: DAG edges and zero-delay order arcs, sorted."""
        return sorted(set(self.edges) | self.order_arcs)

    def topo(self) -> list[int]:
        """A topological order of the arcs (ties by index)."""
        if "topo" not in self._cache:
            self._cache["topo"] = topological_indices(len(self.ids), self.arcs())
        return self._cache["topo"]

    def preds(self) -> list[list[int]]:
        if "preds" not in self._cache:
            p: list[list[int]] = [[] for _ in self.ids]
            for i, j in self.arcs():
                p[j].append(i)
            self._cache["preds"] = p
        return self._cache["preds"]

    def succs(self) -> list[list[int]]:
        if "succs" not in self._cache:
            s: list[list[int]] = [[] for _ in self.ids]
            for i, j in self.arcs():
                s[i].append(j)
            self._cache["succs"] = s
        return self._cache["succs"]

    def descendants(self) -> list[int]:
        """Per op, a bitset (Python int) of the ops reachable from it by arcs."""
        if "desc" not in self._cache:
            desc = [0] * len(self.ids)
            succ = self.succs()
            for i in reversed(self.topo()):
                m = 0
                for j in succ[i]:
                    m |= (1 << j) | desc[j]
                desc[i] = m
            self._cache["desc"] = desc
        return self._cache["desc"]

    def ordered(self, i: int, j: int) -> bool:
        """True if a chain of arcs leads from ``i`` to ``j``."""
        return bool((self.descendants()[i] >> j) & 1)

    # -- bounds ----------------------------------------------------------------------------
    def heads(self) -> list[float]:
        if "head" not in self._cache:
            head = [0.0] * len(self.ids)
            preds = self.preds()
            for j in self.topo():
                head[j] = max((head[i] + self.pmin(i) + self.min_delay(i, j) for i in preds[j]), default=0.0)
            self._cache["head"] = head
        return self._cache["head"]

    def tails(self) -> list[float]:
        if "tail" not in self._cache:
            tail = [0.0] * len(self.ids)
            succ = self.succs()
            for i in reversed(self.topo()):
                tail[i] = max((self.min_delay(i, j) + self.pmin(j) + tail[j] for j in succ[i]), default=0.0)
            self._cache["tail"] = tail
        return self._cache["tail"]

    def resource_ops(self) -> dict[tuple[int, str], list[int]]:
        """Per (device, stream), the ops that may occupy it."""
        if "res" not in self._cache:
            res: dict[tuple[int, str], list[int]] = {}
            for i in range(len(self.ids)):
                seen = set()
                for d in self.devices[i]:
                    for r in self.resources(i, d):
                        if r not in seen:
                            seen.add(r)
                            res.setdefault(r, []).append(i)
            self._cache["res"] = dict(sorted(res.items()))
        return self._cache["res"]

    def must_occupy(self, i: int) -> tuple[tuple[int, str], ...]:
        """Resources op ``i`` occupies wherever it is placed."""
        sets = [set(self.resources(i, d)) for d in self.devices[i]]
        return tuple(sorted(set.intersection(*sets))) if sets else ()

    def critical_path(self) -> float:
        head, tail = self.heads(), self.tails()
        return max((head[i] + self.pmin(i) + tail[i] for i in range(len(self.ids))), default=0.0)

    def load_bound(self) -> float:
        """Per resource: min head + work that must run there + min tail; and the spread bound
        (work of a stream / the number of GPUs that can run it)."""
        head, tail = self.heads(), self.tails()
        best = 0.0
        forced: dict[tuple[int, str], list[int]] = {}
        for i in range(len(self.ids)):
            for r in self.must_occupy(i):
                forced.setdefault(r, []).append(i)
        for r, ops in forced.items():
            work = sum(self.pmin(i) for i in ops)
            best = max(best, min(head[i] for i in ops) + work + min(tail[i] for i in ops))
        for stream in STREAMS:
            ops = [i for i in range(len(self.ids)) if self.stream(i) == stream and self.occupies[i] is None]
            devs = {d for i in ops for d in self.devices[i]}
            if ops and devs:
                work = sum(self.pmin(i) for i in ops)
                best = max(best, min(head[i] for i in ops) + work / len(devs) + min(tail[i] for i in ops))
        return best

    def lifetimes(self) -> dict[int, float]:
        """Per allocating op, the shortest time (us) its allocation can live: from its start to
        the latest end among itself and the release ops it must precede (longest path)."""
        if "life" not in self._cache:
            succ, desc, order = self.succs(), self.descendants(), self.topo()
            pos = {i: k for k, i in enumerate(order)}
            life = {}
            for a in range(len(self.ids)):
                if self.alloc[a] <= 0:
                    continue
                targets = [r for r in self.releasers(a) if r != a and (desc[a] >> r) & 1]
                if not targets:
                    life[a] = self.pmin(a)
                    continue
                last = max(pos[r] for r in targets)
                end = {a: self.pmin(a)}
                for i in order[pos[a]:last + 1]:
                    if i not in end:
                        continue
                    for j in succ[i]:
                        if pos[j] <= last:
                            t = end[i] + self.min_delay(i, j) + self.pmin(j)
                            if t > end.get(j, -1.0):
                                end[j] = t
                life[a] = max([self.pmin(a)] + [end[r] for r in targets if r in end])
            self._cache["life"] = life
        return self._cache["life"]

    def memory_bound(self) -> float:
        """Memory-time area: on a GPU, the allocations pinned there live at least their
        lifetimes, within [first head, Cmax - last tail], under ``cap - static`` bytes:
        ``Cmax >= min head + sum_a bytes_a * life_a / (cap - static) + min tail``."""
        life = self.lifetimes()
        head, tail = self.heads(), self.tails()
        by_dev: dict[int, list[int]] = {}
        for a in life:
            d = self.fixed_device(a)
            if d is not None and self.occupies[a] is None:
                by_dev.setdefault(d, []).append(a)
        best = 0.0
        for d, allocs in by_dev.items():
            room = self.cap[d] - self.static[d]
            if room <= 0 or self.static[d] + sum(self.alloc[a] for a in allocs) <= self.cap[d]:
                continue
            area = sum(self.alloc[a] * life[a] for a in allocs)
            after = min(min(tail[r] for r in self.releasers(a)) for a in allocs)
            best = max(best, min(head[a] for a in allocs) + area / room + after)
        return best

    def lower_bound(self) -> float:
        """A valid lower bound on the makespan (us): critical path, per-device load and the
        memory-time area of pinned allocations."""
        if "lb" not in self._cache:
            self._cache["lb"] = max(self.critical_path(), self.load_bound(), self.memory_bound())
        return self._cache["lb"]

    def serial_bound(self) -> float:
        """An upper bound on the optimal makespan (us): every op one after another, longest
        duration and delay each. Any feasible plan serialised by start time stays feasible
        (memory included), so the optimum is never above this."""
        return sum(self.pmax(i) for i in range(len(self.ids))) + sum(self.max_delay(i, j) for i, j in self.edges)

    def windows(self, horizon: float) -> tuple[list[float], list[float]]:
        """Earliest and latest start of each op for a makespan of at most ``horizon`` us."""
        head, tail = self.heads(), self.tails()
        latest = [max(head[i], horizon - tail[i] - self.pmin(i)) for i in range(len(self.ids))]
        return list(head), latest
