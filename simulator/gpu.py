"""One GPU: a compute stream slowed while communication kernels run, and its memory counter.

SM sharing: while at least one communication kernel (a comm op or a collective) runs on the
GPU, compute proceeds at ``1 - slowdown`` of its speed (``gpu.comm_compute_slowdown``: the share
by which compute slows). The running compute op's remaining work is re-rated exactly whenever
communication starts or ends on the GPU.

Memory: an op allocates ``memory_bytes`` on its GPU when it starts; the allocation is freed at
the latest end among the op and the ops in its ``release`` (IR semantics); frees at a time come
before allocations at that time; ``static_memory_bytes`` is resident all along. Exceeding the cap
is an out-of-memory event (GPU, time, op, bytes over): :func:`memory_profile` lists them, and
the simulator raises :class:`SimulationOOM` for the first unless OOM is allowed.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

from engine.core.errors import InputError
from engine.core.memory import memory_events


class SimulationOOM(InputError):
    """The plan runs a GPU out of memory (printed as one line; the CLI exits 2)."""

    def __init__(self, event: Mapping[str, Any], total: int):
        self.event = dict(event)
        gib = 1 << 30
        more = f" ({total - 1} more OOM events)" if total > 1 else ""
        super().__init__(None, "simulation",
                         f"out of memory on GPU {event['device']} at {event['time_us']:.6g} us: op {event['op']} "
                         f"allocates {event['bytes'] / gib:.3f} GiB, {event['bytes_over'] / gib:.3f} GiB over the "
                         f"{event['cap_bytes'] / gib:.3f} GiB cap{more}; pass --allow-oom to simulate on")


class ComputeStream:
    """The compute stream of one GPU: runs one op at a time at speed 1, or ``1 - slowdown``."""

    __slots__ = ("env", "slowdown", "comm_active", "remaining", "speed", "t_last", "version", "on_end")

    def __init__(self, env, slowdown: float):
        self.env = env
        self.slowdown = float(slowdown)
        self.comm_active = 0
        self.remaining = 0.0
        self.speed = 1.0
        self.t_last = 0.0
        self.version = 0
        self.on_end: Callable[[], None] | None = None

    def run(self, work_us: float, on_end: Callable[[], None]) -> None:
        """Run ``work_us`` of work (us at full speed); call ``on_end`` when it is done."""
        self.remaining = float(work_us)
        self.t_last = self.env.now
        self.speed = 1.0 - self.slowdown if self.comm_active else 1.0
        self.on_end = on_end
        self._schedule()

    def comm_started(self) -> None:
        self.comm_active += 1
        if self.comm_active == 1:
            self._rerate()

    def comm_ended(self) -> None:
        self.comm_active -= 1
        if self.comm_active == 0:
            self._rerate()

    def _rerate(self) -> None:
        speed = 1.0 - self.slowdown if self.comm_active else 1.0
        if self.on_end is None or speed == self.speed:
            self.speed = speed
            return
        now = self.env.now
        self.remaining -= (now - self.t_last) * self.speed
        self.t_last = now
        self.speed = speed
        self._schedule()

    def _schedule(self) -> None:
        self.version += 1
        ev = self.env.timeout(max(self.remaining, 0.0) / self.speed)
        ev.callbacks.append(partial(self._fire, self.version))

    def _fire(self, version: int, _ev) -> None:
        if version != self.version or self.on_end is None:
            return
        on_end, self.on_end = self.on_end, None
        on_end()


def memory_profile(devices, placed: Mapping[int, list[tuple[str, int, float, float]]], static: Mapping[int, int],
                   caps: Mapping[int, int], timeline: bool = False):
    """Peak bytes, OOM events and (optionally) the memory timeline per GPU.

    ``placed[d]``: ``(op, bytes, alloc_time, free_time)`` of the allocations on GPU ``d``.
    Returns ``(peak, events, series)``: ``peak[d]`` bytes; ``events`` sorted by time, each a
    dict with device, time_us, op, bytes, bytes_over, cap_bytes; ``series[d]`` a list of
    ``(time_us, bytes)`` steps (empty unless ``timeline``).
    """
    peak: dict[int, int] = {}
    events: list[dict[str, Any]] = []
    series: dict[int, list[tuple[float, int]]] = {}
    for d in devices:
        base = int(static.get(d, 0))
        steps = memory_events(placed.get(d, ()))
        live = best = base
        cap = int(caps[d])
        tl = [(0.0, base)] if timeline else []
        if base > cap:
            events.append({"device": d, "time_us": 0.0, "op": "(static memory)", "bytes": base,
                           "bytes_over": base - cap, "cap_bytes": cap})
        for t, kind, op, delta in steps:
            live += delta
            if live > best:
                best = live
            if kind == 1 and live > cap:
                events.append({"device": d, "time_us": t, "op": op, "bytes": delta, "bytes_over": live - cap,
                               "cap_bytes": cap})
            if timeline:
                if tl and tl[-1][0] == t:
                    tl[-1] = (t, live)
                else:
                    tl.append((t, live))
        peak[d] = best
        series[d] = tl
    events.sort(key=lambda e: (e["time_us"], e["device"], e["op"]))
    return peak, events, series
