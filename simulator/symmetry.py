"""Symmetry reduction: simulate one representative of each class of interchangeable ops.

Identical data-parallel replicas, or the GPUs of a tensor-parallel group that run the same ops in
lock-step, do the same thing at the same time. We find such classes by colour refinement (the
coarsest *equitable* partition): ops start coloured by what they are (kind, duration, memory,
collective and its contention-free time), GPUs by their memory; then, until nothing splits, a
GPU is re-coloured by the colour sequences of its two streams and the ops it allocates memory
for, and an op by its GPU's colour and its place in the stream, the colours, bytes and
contention-free delays of its in- and out-edges, and its release relations. In an equitable
partition every op of a class sees the same kinds of predecessors, stream neighbours and
memory partners, so (by induction over events) all members start and end together: the
simulator runs one op per class and copies its times to the members.

Transfers stay complete: the concrete edges of a class pair become one bundle of sub-flows and a
collective class moves every member's flows, so links carry exactly the bytes of the full run.
What is assumed: the members' flows progress at one rate (exact when the topology treats them
alike, as it does for replicas on identical nodes; ECMP hashing may put images on different
spines, which the bundle then couples). Jitter (one random factor per op) breaks symmetry, so
the simulator turns the reduction off when jitter is used.

:func:`build_model` returns a :class:`Model` (``symmetry=False``: one class per op).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from engine.core.ir import Plan, Workload

if TYPE_CHECKING:
    from hardware_profiles import Cluster

KIND_COMPUTE, KIND_COMM, KIND_COLLECTIVE = 0, 1, 2
MAX_ROUNDS = 64  # refinement rounds before giving up on symmetry (the partition is not yet stable)


@dataclass
class Dep:
    """Inputs of one class from one class: concrete edges ``(u, v, src_gpu, dst_gpu)`` of ``nbytes``.

    ``flow`` is False for edges that cost nothing (same GPU or zero bytes)."""

    src: int
    dst: int
    nbytes: int
    edges: list[tuple[str, str, int, int]]
    flow: bool


@dataclass
class Model:
    """What the event loop runs: classes of ops (index = class id), streams of class ids, deps."""

    names: list[str]  # representative op id per class
    members: list[list[str]]
    kind: list[int]
    duration: list[float]  # us, on the GPU model, jitter applied (compute and plain comm ops)
    device: list[int]  # representative GPU of the class's plan device
    streams: list[tuple[int, str]]  # representative (GPU, stream) pairs
    stream_seq: list[list[int]]
    op_streams: list[list[int]]  # stream indices each class occupies
    deps: list[Dep]
    in_deps: list[int]  # per class, number of deps it waits for
    out_deps: list[list[int]]  # per class, dep indices it feeds
    collectives: dict[int, list[str]] = field(default_factory=dict)  # class -> member collective op ids
    device_members: dict[int, list[int]] = field(default_factory=dict)  # representative GPU -> GPUs
    rounds: int = 0

    @property
    def reduced(self) -> bool:
        return any(len(m) > 1 for m in self.members)


def edge_salt(u: str, v: str) -> int:
    """A stable per-edge ECMP salt (same in every process)."""
    return zlib.crc32(f"{u}->{v}".encode()) & 0xFFFF


def build_model(workload: Workload, plan: Plan, seqs: Mapping[tuple[int, str], list[str]],
                durations: Mapping[str, float], cluster: Cluster, coll_time: Any, caps: Mapping[int, int],
                symmetry: bool = True, ops: Mapping[str, Any] | None = None) -> Model:
    """The classes to simulate. ``coll_time(op) -> us`` is a collective's contention-free time;
    ``ops``: ``workload.ops`` if the caller has it."""
    ops = workload.ops if ops is None else ops
    names = sorted(ops)
    if symmetry:
        op_color, dev_color, rounds = _refine(workload, ops, plan, seqs, durations, cluster, coll_time, caps)
    if symmetry and rounds <= MAX_ROUNDS:
        model = _quotient(workload, ops, plan, seqs, durations, cluster, op_color, dev_color)
        if model is not None:
            model.rounds = rounds
            return model
    ident = {o: i for i, o in enumerate(names)}
    devs = {d: d for d in range(cluster.n_gpus)}
    model = _quotient(workload, ops, plan, seqs, durations, cluster, ident, devs)
    if model is None:  # one class per op fits any checked plan's streams
        raise RuntimeError("the plan's stream sequences do not match its placements (unchecked plan?)")
    return model


def _transfer(cluster: Cluster, du: int, dv: int, nbytes: int) -> float:
    return 0.0 if du == dv or nbytes <= 0 else cluster.transfer_time(du, dv, nbytes)


def _refine(workload, ops, plan, seqs, durations, cluster, coll_time, caps):
    names = sorted(ops)
    idx = {o: i for i, o in enumerate(names)}
    n_ops, n_dev = len(names), cluster.n_gpus
    dev_of = [plan.placements[o].device for o in names]
    intern: dict[Any, int] = {}

    def color(sig):
        c = intern.get(sig)
        if c is None:
            c = intern[sig] = len(intern)
        return c

    opc = []
    for o in names:
        op = ops[o]
        coll = op.collective
        sig = ("op", op.kind, durations[o], op.memory_bytes, len(op.release),
               None if coll is None else (coll.op, coll.bytes, coll.algo, len(coll.group), coll_time(op)))
        opc.append(color(sig))
    devc = [color(("dev", workload.static_memory_bytes.get(d, 0), caps[d])) for d in range(n_dev)]

    # static structure, as indices
    seq_idx = {k: [idx[o] for o in seq] for k, seq in seqs.items()}
    pos: dict[tuple[int, int], int] = {}  # (op, gpu) -> position on the gpu's stream
    for (d, _s), seq in seq_idx.items():
        for p, i in enumerate(seq):
            pos[(i, d)] = p
    placed_mem: list[list[int]] = [[] for _ in range(n_dev)]
    for i, o in enumerate(names):
        if ops[o].memory_bytes > 0:
            placed_mem[dev_of[i]].append(i)
    groups = [tuple(sorted(set(ops[o].collective.group))) if ops[o].collective is not None else None for o in names]
    own_pos = [pos[(i, dev_of[i])] if groups[i] is None else None for i in range(n_ops)]
    # relations per op, tagged: 0 in-edge, 1 out-edge (with bytes and delay), 2 releases, 3 released by
    rels: list[list[tuple[int, int, int, float]]] = [[] for _ in range(n_ops)]
    tt_cache: dict[tuple[int, int, int], float] = {}
    for u, v, b in workload.graph.edges(data="bytes"):
        iu, iv = idx[u], idx[v]
        key = (dev_of[iu], dev_of[iv], b)
        tt = tt_cache.get(key)
        if tt is None:
            tt = tt_cache[key] = _transfer(cluster, dev_of[iu], dev_of[iv], b)
        rels[iv].append((0, iu, b, tt))
        rels[iu].append((1, iv, b, tt))
    for i, o in enumerate(names):
        for r in ops[o].release:
            rels[i].append((2, idx[r], 0, 0.0))
            rels[idx[r]].append((3, i, 0, 0.0))
    stream_keys = sorted(seq_idx)

    n_classes = (len(set(opc)), len(set(devc)))
    rounds = MAX_ROUNDS + 1  # stays there unless the partition stops splitting
    for r in range(1, MAX_ROUNDS + 1):
        dev_seqs: dict[int, list] = {d: [devc[d]] for d in range(n_dev)}
        for (d, s) in stream_keys:
            dev_seqs[d].append((s, tuple([opc[i] for i in seq_idx[(d, s)]])))
        new_devc = [color(("D", tuple(dev_seqs[d]), tuple(sorted([opc[i] for i in placed_mem[d]]))))
                    for d in range(n_dev)]
        new_opc = []
        for i in range(n_ops):
            g = groups[i]
            if g is None:
                where = (new_devc[dev_of[i]], own_pos[i])
            else:
                where = (new_devc[dev_of[i]], tuple(sorted([(new_devc[x], pos[(i, x)]) for x in g])))
            ri = rels[i]
            if len(ri) > 1:
                nb = tuple(sorted([(t, opc[j], b, dt) for t, j, b, dt in ri]))
            elif ri:
                t, j, b, dt = ri[0]
                nb = ((t, opc[j], b, dt),)
            else:
                nb = ()
            new_opc.append(color(("O", opc[i], where, nb)))
        opc, devc = new_opc, new_devc
        now = (len(set(opc)), len(set(devc)))
        if now == n_classes or now[0] == n_ops:  # stable, or every op alone: nothing to reduce
            rounds = r
            break
        n_classes = now
    return {o: opc[i] for i, o in enumerate(names)}, {d: devc[d] for d in range(n_dev)}, rounds


def _quotient(workload, ops, plan, seqs, durations, cluster, op_color, dev_color) -> Model | None:
    """The class-level model for a colouring; None if the colouring cannot be simulated per class."""
    # representative GPU per GPU colour: the lowest index
    rep_dev: dict[int, int] = {}
    for d in range(cluster.n_gpus):
        rep_dev.setdefault(dev_color[d], d)
    dev_rep = {d: rep_dev[dev_color[d]] for d in range(cluster.n_gpus)}
    device_members: dict[int, list[int]] = {}
    for d in range(cluster.n_gpus):
        device_members.setdefault(dev_rep[d], []).append(d)

    # classes, numbered by their smallest member id (deterministic)
    place = plan.placements
    if len(set(op_color.values())) == len(ops):  # no reduction: one class per op
        classes = [[o] for o in sorted(ops)]
        cls_of = {o: c for c, (o,) in enumerate(classes)}
    else:
        by_color: dict[int, list[str]] = {}
        for o in sorted(ops):
            by_color.setdefault(op_color[o], []).append(o)
        classes = sorted(by_color.values(), key=lambda m: m[0])
        cls_of = {o: c for c, members in enumerate(classes) for o in members}

    streams: list[tuple[int, str]] = []
    stream_seq: list[list[int]] = []
    op_streams: list[list[int]] = [[] for _ in classes]
    for (d, s), seq in seqs.items():
        if dev_rep[d] != d:
            continue
        k = len(streams)
        streams.append((d, s))
        cseq = [cls_of[o] for o in seq]
        if len(set(cseq)) != len(cseq):
            return None  # a class twice on one stream: not simulable per class
        stream_seq.append(cseq)
        for c in cseq:
            op_streams[c].append(k)

    names, kinds, durs, devices = [], [], [], []
    collectives: dict[int, list[str]] = {}
    for c, members in enumerate(classes):
        rep = members[0]
        if len(members) > 1:  # prefer the member on the representative GPU (its name shows in errors)
            rep = next((o for o in members if dev_rep[place[o].device] == place[o].device), rep)
        op = ops[rep]
        names.append(rep)
        kind = KIND_COMPUTE if op.kind == "compute" else KIND_COMM
        kinds.append(KIND_COLLECTIVE if op.collective is not None else kind)
        durs.append(float(durations[rep]))
        devices.append(dev_rep[place[rep].device])
        if op.collective is not None:
            collectives[c] = members
            first = members[0]
            want = sorted({dev_rep[g] for g in set(ops[first].collective.group) | {place[first].device}})
            got = sorted(streams[k][0] for k in op_streams[c])
            if got != want:
                return None
        elif len(op_streams[c]) != 1:
            return None

    deps: list[Dep] = []
    dep_index: dict[tuple, int] = {}
    grouped = len(classes) < len(ops)
    for u, v, b in sorted(workload.graph.edges(data="bytes")):
        du, dv = place[u].device, place[v].device
        # per class pair, edges group by bytes and contention-free delay (0: same GPU or no bytes)
        tt = _transfer(cluster, du, dv, b) if grouped else float(du != dv and b > 0)
        key = (cls_of[u], cls_of[v], b, tt)
        di = dep_index.get(key)
        if di is None:
            di = dep_index[key] = len(deps)
            deps.append(Dep(cls_of[u], cls_of[v], int(b), [], tt > 0))
        deps[di].edges.append((u, v, du, dv))
    in_deps = [0] * len(classes)
    out_deps: list[list[int]] = [[] for _ in classes]
    for k, dep in enumerate(deps):
        in_deps[dep.dst] += 1
        out_deps[dep.src].append(k)
    return Model(names, classes, kinds, durs, devices, streams, stream_seq, op_streams, deps, in_deps, out_deps,
                 collectives, device_members)
