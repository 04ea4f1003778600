"""Workload builders: the synthetic pipeline and JSON op graphs.

Both return an :class:`engine.core.ir.Workload`. Times in us, sizes in bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.core.documents import load_json
from engine.core.errors import InputError
from engine.core.ir import Edge, Op, Workload

PIPELINE_PHASES = ("F", "B", "W")
# The pipeline schedules a workload may name (``parallelism.schedule``, ``schedule:<name>``);
# engine.planners.schedules.library has one generator per name.
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipe", "dualpipev")


def pipeline_op_id(phase: str, microbatch: int, stage: int) -> str:
    """Op id of ``phase`` (F, B or W) of ``microbatch`` at ``stage``: e.g. ``F3.s1``."""
    return f"{phase}{microbatch}.s{stage}"


def pipeline_direction(microbatch: int, microbatches: int, directions: int) -> int:
    """0 for micro-batches that enter at GPU stage_devices[0], 1 for the reverse direction."""
    return 0 if directions == 1 or microbatch < microbatches // 2 else 1


def pipeline_device(stage: int, direction: int, stages: int, stage_devices: Sequence[int]) -> int:
    """GPU that runs ``stage`` of a micro-batch travelling in ``direction``."""
    return stage_devices[stage] if direction == 0 else stage_devices[stages - 1 - stage]


def build_pipeline(stages: int, microbatches: int, directions: int = 1,
                   times_us: Mapping[str, float] | None = None, activation_bytes: int = 0,
                   send_bytes: int = 0, stage_devices: Sequence[int] | None = None,
                   name: str = "pipeline") -> Workload:
    """A pipeline of ``stages`` stages and ``microbatches`` micro-batches.

    Per micro-batch ``mb`` and stage ``s``: ``F`` (forward), ``B`` (input gradient) and, when
    ``times_us`` has ``W``, ``W`` (weight gradient; otherwise ``B`` is the full backward).
    Edges: F(s)->F(s+1) and B(s+1)->B(s) carry ``send_bytes``; F(p-1)->B(p-1); B(s)->W(s).
    F allocates ``activation_bytes``, freed when W (or B) of the same micro-batch and stage ends.
    With ``directions=2`` the first half of the micro-batches enters at stage_devices[0], the
    second half at stage_devices[-1] (DualPipe's bidirectional layout).
    ``times_us`` may also give ``FB``: the time of an overlapped forward + full backward pair
    (DualPipe's F&B); it creates no ops and is kept in ``meta`` for the schedule library.
    """
    times = dict(times_us or {"F": 1.0, "B": 1.0, "W": 1.0})
    for key in times:
        if key not in PIPELINE_PHASES + ("FB",):
            raise InputError(None, f"workload.times_us.{key}", f"unknown phase; one of {', '.join(PIPELINE_PHASES + ('FB',))}")
    for key in ("F", "B"):
        if key not in times:
            raise InputError(None, f"workload.times_us.{key}", "missing")
    if stages < 1:
        raise InputError(None, "workload.stages", f"must be >= 1, got {stages}")
    if microbatches < 1:
        raise InputError(None, "workload.microbatches", f"must be >= 1, got {microbatches}")
    if directions not in (1, 2):
        raise InputError(None, "workload.directions", f"must be 1 or 2, got {directions}")
    if directions == 2 and microbatches % 2:
        raise InputError(None, "workload.microbatches", f"must be even with directions: 2, got {microbatches}")
    if activation_bytes < 0 or send_bytes < 0:
        raise InputError(None, "workload.activation_bytes" if activation_bytes < 0 else "workload.send_bytes",
                         "must be >= 0")
    devices = list(stage_devices) if stage_devices is not None else list(range(stages))
    if len(devices) != stages:
        raise InputError(None, "placement.stage_devices", f"needs {stages} GPUs, got {len(devices)}")
    phases = [ph for ph in PIPELINE_PHASES if ph in times]
    last = phases[-1]

    ops: list[Op] = []
    edges: list[Edge] = []
    for mb in range(microbatches):
        direction = pipeline_direction(mb, microbatches, directions)
        for s in range(stages):
            dev = pipeline_device(s, direction, stages, devices)
            for ph in phases:
                ops.append(Op(
                    id=pipeline_op_id(ph, mb, s), duration_us=float(times[ph]), devices=(dev,),
                    memory_bytes=int(activation_bytes) if ph == "F" else 0,
                    release=(pipeline_op_id(last, mb, s),) if ph == "F" and last != "F" else (),
                    stage=s, microbatch=mb, chunk=direction, phase=ph))
            if s + 1 < stages:
                edges.append(Edge(pipeline_op_id("F", mb, s), pipeline_op_id("F", mb, s + 1), int(send_bytes)))
                edges.append(Edge(pipeline_op_id("B", mb, s + 1), pipeline_op_id("B", mb, s), int(send_bytes)))
            if "W" in times:
                edges.append(Edge(pipeline_op_id("B", mb, s), pipeline_op_id("W", mb, s), 0))
        edges.append(Edge(pipeline_op_id("F", mb, stages - 1), pipeline_op_id("B", mb, stages - 1), 0))
    meta = {"kind": "pipeline", "stages": stages, "microbatches": microbatches, "directions": directions,
            "times_us": times, "activation_bytes": int(activation_bytes), "send_bytes": int(send_bytes),
            "stage_devices": devices}
    return Workload(name=name, ops=ops, edges=edges, meta=meta)


GRAPH_OP_FIELDS = {"id", "duration_us", "devices", "memory_bytes", "release", "kind", "phase"}
GRAPH_EDGE_FIELDS = {"src", "dst", "bytes"}


def load_graph(path: str | Path, name: str | None = None) -> Workload:
    """Read a ``graph`` workload from JSON.

    ``{"ops": [{"id", "duration_us", "devices"?: [..], "memory_bytes"?: int, "release"?: [..]}],
    "edges": [{"src", "dst", "bytes"?: int}]}``. ``devices`` omitted = any GPU. An op's memory
    is freed when all its consumers have ended (``release`` overrides; no consumers = its own end).
    """
    path = Path(path)
    data = load_json(path)
    try:
        return graph_from_dict(data, name or path.stem)
    except InputError as e:
        raise InputError(path, e.field, e.reason) from None


def graph_from_dict(data: Any, name: str = "graph") -> Workload:
    """Build a graph workload from the parsed JSON (see :func:`load_graph`)."""
    if not isinstance(data, dict):
        raise InputError(None, None, "a graph must be a JSON object with 'ops' and 'edges'")
    for key in data:
        if key not in ("ops", "edges", "name"):
            raise InputError(None, key, "unknown field; known: ops, edges, name")
    if not isinstance(data.get("ops"), list):
        raise InputError(None, "ops", "missing or not a list")
    raw_edges = data.get("edges", [])
    if not isinstance(raw_edges, list):
        raise InputError(None, "edges", "not a list")

    edges = []
    consumers: dict[str, list[str]] = {}
    for i, e in enumerate(raw_edges):
        if not isinstance(e, dict):
            raise InputError(None, f"edges[{i}]", "must be an object")
        for key in e:
            if key not in GRAPH_EDGE_FIELDS:
                raise InputError(None, f"edges[{i}].{key}", f"unknown field; known: {', '.join(sorted(GRAPH_EDGE_FIELDS))}")
        for key in ("src", "dst"):
            if key not in e:
                raise InputError(None, f"edges[{i}].{key}", "missing")
        nbytes = e.get("bytes", 0)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise InputError(None, f"edges[{i}].bytes", f"must be an integer >= 0, got {nbytes!r}")
        edges.append(Edge(str(e["src"]), str(e["dst"]), nbytes))
        consumers.setdefault(str(e["src"]), []).append(str(e["dst"]))

    ops = []
    for i, o in enumerate(data["ops"]):
        if not isinstance(o, dict):
            raise InputError(None, f"ops[{i}]", "must be an object")
        for key in o:
            if key not in GRAPH_OP_FIELDS:
                raise InputError(None, f"ops[{i}].{key}", f"unknown field; known: {', '.join(sorted(GRAPH_OP_FIELDS))}")
        for key in ("id", "duration_us"):
            if key not in o:
                raise InputError(None, f"ops[{i}].{key}", "missing")
        d = o["duration_us"]
        if not isinstance(d, (int, float)) or isinstance(d, bool) or d < 0:
            raise InputError(None, f"ops[{i}].duration_us", f"must be a number >= 0, got {d!r}")
        devs = o.get("devices")
        if devs is not None and (not isinstance(devs, list) or not all(isinstance(x, int) for x in devs)):
            raise InputError(None, f"ops[{i}].devices", "must be a list of GPU indices")
        if devs is not None and not devs:
            raise InputError(None, f"ops[{i}].devices", "eligible on no GPU (empty list)")
        mem = o.get("memory_bytes", 0)
        if not isinstance(mem, int) or isinstance(mem, bool) or mem < 0:
            raise InputError(None, f"ops[{i}].memory_bytes", f"must be an integer >= 0, got {mem!r}")
        op_id = str(o["id"])
        release = o.get("release", consumers.get(op_id, []) if mem else [])
        ops.append(Op(id=op_id, duration_us=float(d), devices=tuple(devs) if devs is not None else None,
                      memory_bytes=mem, release=tuple(sorted(set(release))), kind=o.get("kind", "compute"),
                      phase=o.get("phase")))
    return Workload(name=data.get("name", name), ops=ops, edges=edges, meta={"kind": "graph"})
