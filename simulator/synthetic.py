"""A synthetic training step with tensor, pipeline and data parallelism, and its 1F1B plan.

For benchmarks and tests of the simulator at scale. ``tp x pp x dp`` GPUs: GPU of (replica
``r``, stage ``s``, tensor rank ``t``) is ``(r * pp + s) * tp + t``, so a tensor-parallel group
is ``tp`` consecutive GPUs (inside a node when ``tp`` divides the node) and, with ``tp`` equal to
the node size, every stage of every replica has a node of its own.

Per replica, stage and micro-batch, each tensor rank runs the forward as two compute ops around a
tensor-parallel all_reduce (``Fa -> AR -> Fb``), sends ``send_bytes`` to the same tensor rank of
the next stage, and likewise backward (``Ba -> AR -> Bb``, sent to the previous stage). ``Fa``
allocates ``activation_bytes``, freed when ``Bb`` of the same micro-batch ends. After its last
backward each stage all-reduces ``grad_bytes`` across the replicas (one data-parallel group per
stage and tensor rank). Times in us, sizes in bytes.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Mapping

from engine.core.ir import Collective, Edge, Op, Placement, Plan, Workload
from simulator.simulate import simulate

if TYPE_CHECKING:
    from hardware_profiles import Cluster


def gpu_of(r: int, s: int, t: int, tp: int, pp: int) -> int:
    return (r * pp + s) * tp + t


def training_step(tp: int, pp: int, dp: int, microbatches: int, *, times_us: Mapping[str, float] | None = None,
                  send_bytes: int = 32 << 20, tp_bytes: int = 64 << 20, grad_bytes: int = 1 << 30,
                  activation_bytes: int = 2 << 30, static_bytes: int = 20 << 30, cluster: Cluster | None = None,
                  name: str | None = None) -> tuple[Workload, Plan]:
    """The workload and its 1F1B plan (see the module docstring).

    Without ``cluster`` the plan's times only order the ops (one slot per op); with it they are
    the contention-free times (an alpha-beta simulation), so ``plan.makespan_us`` is a prediction.
    """
    times = dict(times_us or {"F": 1200.0, "B": 2400.0})
    m = microbatches
    ops: list[Op] = []
    edges: list[Edge] = []
    order: dict[int, list[str]] = {}
    start: dict[str, float] = {}

    def add(op: Op, gpu: int, t0: float) -> None:
        ops.append(op)
        order.setdefault(gpu, []).append(op.id)
        start[op.id] = t0

    for r in range(dp):
        for s in range(pp):
            group = tuple(gpu_of(r, s, t, tp, pp) for t in range(tp))
            warm = min(pp - 1 - s, m)
            seq = [("F", k) for k in range(warm)]
            for k in range(m - warm):
                seq += [("F", warm + k), ("B", k)]
            seq += [("B", k) for k in range(m - warm, m)]
            for slot, (ph, k) in enumerate(seq):
                base = 4.0 * (slot + 2 * s)
                half = times[ph] / 2
                tagged = partial(Op, stage=s, microbatch=k, phase=ph)
                a_id, b_id = ("Fa", "Fb") if ph == "F" else ("Ba", "Bb")
                ar = f"AR{ph}{k}.s{s}.r{r}"
                for t, g in enumerate(group):
                    sfx = f"{k}.s{s}.r{r}.t{t}"
                    mem, release = (activation_bytes, (f"Bb{sfx}",)) if ph == "F" else (0, ())
                    add(tagged(f"{a_id}{sfx}", half, devices=(g,), memory_bytes=mem, release=release), g, base)
                    edges.append(Edge(f"{a_id}{sfx}", ar, 0))
                    edges.append(Edge(ar, f"{b_id}{sfx}", 0))
                add(tagged(ar, 0.0, kind="comm", collective=Collective("all_reduce", group, tp_bytes)), group[0],
                    base + 1)
                for t, g in enumerate(group):
                    add(tagged(f"{b_id}{k}.s{s}.r{r}.t{t}", half, devices=(g,)), g, base + 2)
                for t in range(tp):
                    sfx = f"{k}.s{s}.r{r}.t{t}"
                    if ph == "F":
                        nxt = f"Fa{k}.s{s + 1}.r{r}.t{t}" if s + 1 < pp else f"Ba{sfx}"
                        edges.append(Edge(f"Fb{sfx}", nxt, send_bytes if s + 1 < pp else 0))
                    elif s > 0:
                        edges.append(Edge(f"Bb{sfx}", f"Ba{k}.s{s - 1}.r{r}.t{t}", send_bytes))
    if dp > 1:
        end = 4.0 * (2 * m + 3 * pp)
        for s in range(pp):
            for t in range(tp):
                group = tuple(gpu_of(r, s, t, tp, pp) for r in range(dp))
                dp_id = f"DP.s{s}.t{t}"
                add(Op(dp_id, 0.0, kind="comm", collective=Collective("all_reduce", group, grad_bytes), stage=s),
                    group[0], end)
                for r in range(dp):
                    edges.append(Edge(f"Bb{m - 1}.s{s}.r{r}.t{t}", dp_id, 0))
    n_gpus = tp * pp * dp
    wl = Workload(name=name or f"tp{tp}-pp{pp}-dp{dp}-m{m}", ops=ops, edges=edges,
                  static_memory_bytes={g: static_bytes for g in range(n_gpus)},
                  meta={"kind": "training_step", "tp": tp, "pp": pp, "dp": dp, "microbatches": m})
    placements = {o.id: Placement(_device(o, order), start[o.id], start[o.id] + 1.0) for o in ops}
    plan = Plan(wl.name, placements, "1f1b", status="schedule", order=order)
    if cluster is None:
        return wl, plan
    res = simulate(plan, wl, cluster, mode="alpha_beta", allow_oom=True, timeline=False)
    timed = {o: Placement(d, s, e) for o, (d, s, e) in res.op_times.items()}
    return wl, Plan(wl.name, timed, "1f1b", status="schedule", makespan_us=res.makespan_us, order=order)


def _device(op: Op, order: dict[int, list[str]]) -> int:
    if op.collective is not None:
        return op.collective.group[0]
    if op.devices is None:  # every non-collective op here is pinned to its GPU
        raise RuntimeError(f"op {op.id} has neither devices nor a collective")
    return op.devices[0]
