"""The schedule library: names, generators, and the pipeline layout each schedule runs on.

:data:`SCHEDULES` maps a name (``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ``zb-h2``,
``zb-v``, ``dualpipe``, ``dualpipev``) to a generator ``f(shape, comm) -> Schedule`` that reads
the layout from the workload (see :class:`~engine.planners.schedules.actions.PipelineShape`).

To compare schedules on one model, :func:`schedule_workload` derives from a base ``pipeline``
workload (``p`` stages on ``p`` GPUs, ``m`` micro-batches, per-stage times, activation and send
bytes) the workload each schedule needs on the *same GPUs*:

* ``gpipe``, ``1f1b``, ``zb-h1``, ``zb-h2``: the ``p`` stages, one direction;
* ``interleaved``: ``2p`` chunks of half a stage (half the times and activation bytes), stage
  ``s`` on the GPU of stage ``s mod p``;
* ``zb-v``, ``dualpipev``: ``2p`` half-stage chunks in a V (GPU ``r`` holds ``r`` and
  ``2p-1-r``); DualPipeV's ``q`` GPUs are the ``p`` of the base model;
* ``dualpipe``: the ``p`` stages in both directions (two chunks, twice the parameters, per GPU).

Activation bytes of a half-stage chunk are rounded down to whole bytes; ``send_bytes`` (the
hidden state between stages) does not change with chunking.
"""

from __future__ import annotations

from typing import Callable

from engine.core.errors import InfeasibleError, InputError
from engine.core.ir import Plan, Workload
from engine.core.memory import memory_caps
from engine.core.options import SolverOptions
from engine.planners.schedules.actions import PipelineShape, Schedule, round_robin_stage_devices, v_stage_devices
from engine.planners.schedules.dualpipe import dualpipe, dualpipev
from engine.planners.schedules.fusion import overlap_ratio
from engine.planners.schedules.gpipe_1f1b import gpipe, interleaved, one_f_one_b
from engine.planners.schedules.timing import schedule_plan
from engine.planners.schedules.zero_bubble import zb_h1, zb_h2, zb_v
from engine.planners.validate import peak_memory
from engine.workloads.pipeline import SCHEDULE_NAMES, build_pipeline

Generator = Callable[..., Schedule]

_GENERATORS: dict[str, Generator] = {
    "gpipe": lambda shape, comm=None: gpipe(shape),
    "1f1b": lambda shape, comm=None: one_f_one_b(shape),
    "interleaved": lambda shape, comm=None: interleaved(shape),
    "zb-h1": lambda shape, comm=None: zb_h1(shape),
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}
SCHEDULES: dict[str, Generator] = {name: _GENERATORS[name] for name in SCHEDULE_NAMES}
# name -> (layout, chunks per GPU, directions)
LAYOUTS: dict[str, tuple[str, int, int]] = {
    "gpipe": ("linear", 1, 1), "1f1b": ("linear", 1, 1), "zb-h1": ("linear", 1, 1), "zb-h2": ("linear", 1, 1),
    "interleaved": ("round_robin", 2, 1), "zb-v": ("v", 2, 1), "dualpipev": ("v", 2, 1),
    "dualpipe": ("linear", 1, 2),
}


def check_name(name: str, source=None, field: str = "solver.planner") -> str:
    if name not in SCHEDULES:
        raise InputError(source, field, f"unknown schedule {name!r}; one of {', '.join(SCHEDULE_NAMES)}")
    return name


def generate(name: str, workload: Workload, comm=None) -> Schedule:
    """The ``name`` schedule for ``workload``'s own layout (raises :class:`InputError`, naming the
    schedule and the reason, when it does not apply)."""
    check_name(name)
    return SCHEDULES[name](PipelineShape.of(workload, name), comm)


def base_model(workload: Workload) -> dict:
    """The model a pipeline workload describes: stages, GPUs, micro-batches, per-stage times,
    activation and send bytes (for :func:`schedule_workload`)."""
    meta = workload.meta or {}
    if meta.get("kind") != "pipeline":
        raise InputError(None, "workload.kind", f"known schedules need a pipeline workload, got {meta.get('kind', 'graph')!r}")
    shape = PipelineShape.of(workload, "base")
    return {"stages": shape.stages, "gpus": shape.gpus, "microbatches": shape.microbatches, "times_us": dict(shape.times),
            "activation_bytes": int(meta.get("activation_bytes", 0)), "send_bytes": shape.send_bytes,
            "name": workload.name, "memory_cap_bytes": workload.memory_cap_bytes}


def schedule_workload(name: str, base: Workload) -> Workload:
    """The workload ``name`` runs on for the model of ``base`` (module docstring)."""
    check_name(name)
    model = base_model(base)
    layout, chunks, directions = LAYOUTS[name]
    gpus = list(model["gpus"])
    p = model["stages"]
    if len(gpus) != p:
        raise InputError(None, "placement.stage_devices",
                         f"schedule {name}: the base model needs one stage per GPU, got {p} stages on {len(gpus)} GPUs")
    times = {k: float(v) / chunks for k, v in model["times_us"].items()}
    if layout == "linear":
        devices = gpus
    elif layout == "round_robin":
        devices = round_robin_stage_devices(gpus, chunks)
    else:
        devices = v_stage_devices(gpus)
    m = model["microbatches"]
    if directions == 2 and m % 2:
        raise InputError(None, "workload.microbatches", f"schedule {name}: needs an even number of micro-batches, got {m}")
    wl = build_pipeline(p * chunks, m, directions, times, model["activation_bytes"] // chunks, model["send_bytes"],
                        devices, name=f"{model['name']}:{name}")
    wl.memory_cap_bytes = model["memory_cap_bytes"]
    return wl


def applicable(base: Workload, comm=None, names=SCHEDULE_NAMES) -> dict[str, tuple[Workload, Schedule] | str]:
    """Per schedule name, (its workload, its schedule) for the model of ``base``, or the reason
    it does not apply (one line)."""
    out: dict[str, tuple[Workload, Schedule] | str] = {}
    for name in names:
        try:
            wl = schedule_workload(name, base)
            out[name] = (wl, generate(name, wl, comm))
        except InputError as e:
            out[name] = e.reason
    return out


def schedule_planner(scenario, options: SolverOptions) -> Plan:
    """The ``schedule:<name>`` planner: the op-level plan of the named schedule on the scenario's
    own workload (see :func:`engine.planners.schedules.timing.schedule_plan`).

    Raises :class:`InputError` when the schedule does not apply to the workload, or when the
    workload gives an F&B time (``times_us.FB``) other than F + B + W: the scenario's workload
    has one op per pass, so an overlap discount exists only in the step-level view
    (``plansim compare``). Raises :class:`InfeasibleError` when the schedule needs more memory
    than the cap.
    """
    name = options.planner.split(":", 1)[1]
    check_name(name, scenario.path)
    wl = scenario.workload
    try:
        shape = PipelineShape.of(wl, name)
        if overlap_ratio(shape.times) != 1.0:
            raise InputError(None, "workload.times_us.FB",
                             f"schedule {name}: an F&B overlap time applies to the step-level view only "
                             "(plansim compare); the op-level plan keeps every op's own duration")
        plan = schedule_plan(generate(name, wl, scenario.comm), wl, scenario.comm, scenario.cluster.gpu_model)
    except InputError as e:
        raise InputError(scenario.path, e.field, e.reason) from None
    check_fits(plan, scenario, name)
    return plan


def check_fits(plan: Plan, scenario, name: str) -> None:
    """Raise :class:`InfeasibleError` (field ``memory.cap_bytes``) when schedule ``name``'s plan
    needs more memory on some GPU than the scenario's cap."""
    wl = scenario.workload
    caps = memory_caps(wl, scenario.cluster, scenario.memory_cap_bytes)
    for d, peak in sorted(peak_memory(plan, wl).items()):
        if peak > caps[d]:
            raise InfeasibleError(scenario.path, "memory.cap_bytes",
                                  f"schedule {name} needs {peak} bytes on GPU {d}, over the cap of {caps[d]} bytes")
