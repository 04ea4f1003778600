"""What a simulation observed: :class:`SimResult` (times in us, sizes in bytes).

* ``makespan_us``; per op (GPU, start, end); per GPU compute-busy and comm-busy time, bubble
  (makespan - compute busy) and peak memory; bubble of the step = makespan - max compute busy.
* per link: bytes carried, utilisation (bytes / (bandwidth x makespan)), peak concurrent
  sub-flows;
* per edge that moves bytes between GPUs: observed delay (arrival at the destination GPU - source
  end) next to the modelled contention-free ``cluster.transfer_time``;
* out-of-memory events, simulated (SimPy) events, wall time of the whole call and of the event
  loop alone, what symmetry reduction did.

``to_dict()`` is JSON-able with sorted keys; ``to_dict(timing=False)`` leaves out the wall time,
so it is byte-identical for the same inputs and seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimResult:
    makespan_us: float
    predicted_makespan_us: float | None
    mode: str
    seed: int
    jitter: float
    op_times: dict[str, tuple[int, float, float]]
    devices: dict[int, dict[str, Any]]
    links: dict[str, dict[str, Any]]
    edges: dict[tuple[str, str], dict[str, Any]]  # (src op, dst op) -> observed and modelled delay (us)
    oom_events: list[dict[str, Any]]
    events: int
    sim_wall_s: float
    symmetry: dict[str, Any]
    loop_wall_s: float = 0.0
    loop_cpu_s: float = 0.0
    link_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict, repr=False)
    memory_series: dict[int, list[tuple[float, int]]] = field(default_factory=dict, repr=False)

    @property
    def oom(self) -> bool:
        return bool(self.oom_events)

    @property
    def bubble_us(self) -> float:
        """makespan - max over GPUs of compute-busy time (docs/DESIGN.md)."""
        busy = max((d["busy_us"] for d in self.devices.values()), default=0.0)
        return self.makespan_us - busy

    @property
    def bubble_ratio(self) -> float:
        return self.bubble_us / self.makespan_us if self.makespan_us > 0 else 0.0

    @property
    def peak_memory_bytes(self) -> int:
        return max((d["peak_memory_bytes"] for d in self.devices.values()), default=0)

    @property
    def events_per_s(self) -> float:
        """Events processed per second of the event loop's wall time (setup not counted)."""
        return self.events / self.loop_wall_s if self.loop_wall_s > 0 else 0.0

    def top_links(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` most utilised links (ties by name)."""
        rows = sorted(self.links.items(), key=lambda kv: (-kv[1]["utilization"], kv[0]))[:n]
        return [{"link": k, **v} for k, v in rows]

    def summary(self, top: int = 10) -> dict[str, Any]:
        """The headline figures (what ``plansim simulate --json`` prints)."""
        return {
            "makespan_us": self.makespan_us,
            "predicted_makespan_us": self.predicted_makespan_us,
            "bubble_us": self.bubble_us,
            "bubble_ratio": self.bubble_ratio,
            "peak_memory_bytes": self.peak_memory_bytes,
            "oom": self.oom,
            "oom_events": self.oom_events[:10],
            "events": self.events,
            "sim_wall_s": self.sim_wall_s,
            "loop_wall_s": self.loop_wall_s,
            "events_per_s": self.events_per_s,
            "mode": self.mode,
            "symmetry": self.symmetry,
            "link_utilization": [{"link": r["link"], "utilization": r["utilization"], "bytes": r["bytes"]}
                                 for r in self.top_links(top)],
        }

    def to_dict(self, timing: bool = True) -> dict[str, Any]:
        d = {
            "makespan_us": self.makespan_us,
            "predicted_makespan_us": self.predicted_makespan_us,
            "bubble_us": self.bubble_us,
            "bubble_ratio": self.bubble_ratio,
            "mode": self.mode,
            "seed": self.seed,
            "jitter": self.jitter,
            "ops": {o: {"device": t[0], "start_us": t[1], "end_us": t[2]} for o, t in sorted(self.op_times.items())},
            "devices": {str(k): v for k, v in sorted(self.devices.items())},
            "links": dict(sorted(self.links.items())),
            "edges": {f"{u}->{v}": e for (u, v), e in sorted(self.edges.items())},
            "oom": self.oom,
            "oom_events": self.oom_events,
            "events": self.events,
            "symmetry": self.symmetry,
        }
        if timing:
            d["sim_wall_s"] = self.sim_wall_s
            d["loop_wall_s"] = self.loop_wall_s
            d["loop_cpu_s"] = self.loop_cpu_s
        return d

    def to_json(self, timing: bool = False) -> str:
        return json.dumps(self.to_dict(timing), indent=1, sort_keys=True) + "\n"


def build_result(plan, workload, cluster, *, ops, mode, seed, jitter, op_times, arrivals, peak, caps, oom, mem_series,
                 network, events, symmetry, wall_s, loop_s, loop_cpu_s) -> SimResult:
    """Assemble a :class:`SimResult` from per-op times, edge arrivals and the network's counters."""
    makespan = max((t[2] for t in op_times.values()), default=0.0)
    devices: dict[int, dict[str, Any]] = {}

    def dev(d):
        if d not in devices:
            devices[d] = {"busy_us": 0.0, "comm_busy_us": 0.0, "peak_memory_bytes": int(peak.get(d, 0)),
                          "memory_cap_bytes": int(caps[d])}
        return devices[d]

    for d in peak:
        dev(d)
    for o in sorted(op_times):
        d, s, e = op_times[o]
        op = ops[o]
        if op.collective is not None:
            for g in sorted(set(op.collective.group) | {d}):
                dev(g)["comm_busy_us"] += e - s
        elif op.kind == "compute":
            dev(d)["busy_us"] += e - s
        else:
            dev(d)["comm_busy_us"] += e - s
    for v in devices.values():
        v["bubble_us"] = makespan - v["busy_us"]
    links: dict[str, dict[str, Any]] = {}
    series: dict[str, list[tuple[float, float]]] = {}
    topo = cluster.topology
    carried = network.bytes
    for i, (u, v) in enumerate(network.names):
        b = carried[i]
        if b <= 0:
            continue
        name = f"{u}->{v}"
        cap = network.cap[i]
        links[name] = {"bytes": int(round(b)), "bandwidth": cap, "link_class": topo.edges[u, v]["link_class"],
                       "utilization": b / (cap * makespan) if makespan > 0 else 0.0,
                       "peak_flows": network.peak_subflows[i]}
        if network.timeline is not None and network.timeline[i]:
            series[name] = list(network.timeline[i])
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    for (u, v), t in sorted(arrivals.items()):
        du, dv = op_times[u][0], op_times[v][0]
        nbytes = workload.graph.edges[u, v]["bytes"]
        edges[(u, v)] = {"observed_us": t - op_times[u][2], "modelled_us": cluster.transfer_time(du, dv, nbytes),
                              "bytes": nbytes, "src_device": du, "dst_device": dv}
    return SimResult(makespan_us=makespan, predicted_makespan_us=plan.makespan_us, mode=mode, seed=seed,
                     jitter=float(jitter), op_times=op_times, devices=dict(sorted(devices.items())), links=links,
                     edges=edges, oom_events=oom, events=events, sim_wall_s=wall_s, symmetry=symmetry,
                     loop_wall_s=loop_s,
                     loop_cpu_s=loop_cpu_s,
                     link_series=series, memory_series={d: s for d, s in mem_series.items() if s})
