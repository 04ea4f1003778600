"""Chrome-trace JSON of a simulation (opens in Perfetto and chrome://tracing).

One process per GPU (``pid`` = GPU index, named "GPU d (node n)") with a thread per stream
(``tid`` 0 compute, 1 comm); every op is a complete event (``ph: X``, ``ts``/``dur`` in us) on
its GPU and stream, a collective on the comm stream of every GPU of its group. Counters
(``ph: C``): per GPU ``memory`` (bytes), and under a "network" process one counter per link
with its utilisation share over time. Events are sorted and keys too, so the same result
gives the same bytes. Written with :func:`engine.core.errors.write_atomic`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from engine.core.errors import write_atomic
from engine.core.ir import Workload

if TYPE_CHECKING:
    from hardware_profiles import Cluster
    from simulator.result import SimResult


TIDS = {"compute": 0, "comm": 1}


def chrome_trace(result: SimResult, workload: Workload, cluster: Cluster) -> dict[str, Any]:
    """The trace as a dict ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``."""
    ops = workload.ops
    events: list[dict[str, Any]] = []
    gpus = sorted(result.devices)
    for d in gpus:
        events.append({"ph": "M", "name": "process_name", "pid": d, "tid": 0,
                       "args": {"name": f"GPU {d} (node {cluster.node_of(d)})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": d, "tid": 0, "args": {"sort_index": d}})
        for stream, tid in TIDS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": d, "tid": tid, "args": {"name": stream}})
    for o, (d, s, e) in result.op_times.items():
        op = ops[o]
        args: dict[str, Any] = {}
        for tag in ("stage", "microbatch", "chunk", "phase"):
            v = getattr(op, tag)
            if v is not None:
                args[tag] = v
        if op.memory_bytes:
            args["memory_bytes"] = op.memory_bytes
        where = [(d, TIDS[op.kind])]
        if op.collective is not None:
            c = op.collective
            args.update({"collective": c.op, "bytes": c.bytes, "group": list(c.group)})
            where = [(g, 1) for g in sorted(set(c.group) | {d})]
        for pid, tid in where:
            events.append({"ph": "X", "name": o, "cat": op.kind, "pid": pid, "tid": tid, "ts": s, "dur": e - s,
                           "args": args})
    for d, series in result.memory_series.items():
        for t, b in series:
            events.append({"ph": "C", "name": "memory", "pid": d, "tid": 0, "ts": t, "args": {"bytes": b}})
    net_pid = cluster.n_gpus
    if result.link_series:
        events.append({"ph": "M", "name": "process_name", "pid": net_pid, "tid": 0, "args": {"name": "network"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": net_pid, "tid": 0,
                       "args": {"sort_index": net_pid}})
    for link, shares in result.link_series.items():
        for t, share in shares:
            events.append({"ph": "C", "name": link, "pid": net_pid, "tid": 0, "ts": t,
                           "args": {"utilization": share}})
    order = {"M": 0, "X": 1, "C": 2}
    events.sort(key=lambda ev: (order[ev["ph"]], ev["pid"], ev["tid"], ev.get("ts", 0.0), ev["name"]))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"makespan_us": result.makespan_us, "mode": result.mode, "seed": result.seed,
                          "jitter": result.jitter, "workload": workload.name}}


def trace_json(result: SimResult, workload: Workload, cluster: Cluster) -> str:
    return json.dumps(chrome_trace(result, workload, cluster), sort_keys=True, separators=(",", ":")) + "\n"


def write_trace(result: SimResult, workload: Workload, cluster: Cluster, path) -> None:
    """Write the Chrome trace of ``result`` to ``path`` atomically."""
    write_atomic(path, trace_json(result, workload, cluster))
