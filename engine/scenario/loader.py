"""Scenario files: workload + cluster + placement + objective + solver + simulator + loop + seed.

A scenario is YAML::

    name: quickstart
    seed: 0
    workload: {kind: pipeline, stages: 4, microbatches: 8, ...}   # or kind: graph, path: g.json
    cluster: {profile: h100-sxm, nodes: 1, overrides: {node.nic_gbps: 200}}
    placement: {stage_devices: [0, 1, 2, 3]}                      # pipeline only, optional
    memory: {cap_bytes: null}                                     # per-GPU cap, overrides the GPU's HBM
    objective: {kind: makespan}
    solver: {planner: heuristic, time_limit_s: 30}
    simulator: {mode: flow, jitter: 0.0}
    loop: {tolerance: 0.01, patience: 2, max_iters: 6}

Every section but ``workload`` and ``cluster`` is optional; each option has a default
(:data:`OPTIONS`). Unknown keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from engine.core.comm import CommModel
from engine.core.documents import check_document, load_yaml
from engine.core.errors import InputError, nearest
from engine.core.ir import Workload
from engine.core.memory import memory_caps
from engine.core.options import LoopOptions, SimulatorOptions, SolverOptions, range_problem
from engine.workloads.pipeline import build_pipeline, load_graph
from engine.workloads.transformer import transformer_workload
from hardware_profiles import Cluster, build_cluster, load_profile

GIB = 1 << 30

# section -> option -> (default, accepted types). ``None`` defaults accept None too. The typed
# sections take theirs from the fields of their dataclass (engine.core.options).
TYPED_SECTIONS: dict[str, type] = {"solver": SolverOptions, "simulator": SimulatorOptions, "loop": LoopOptions}
OPTIONS: dict[str, dict[str, tuple[Any, tuple[type, ...]]]] = {
    "placement": {"stage_devices": (None, (list,))},
    "memory": {"cap_bytes": (None, (int,)), "cap_gib": (None, (int, float))},
    "objective": {"kind": ("makespan", (str,)), "lambda": (0.0, (int, float)),
                  "makespan_bound_us": (None, (int, float))},
    **{section: {f.name: (f.default, f.metadata["types"]) for f in fields(cls)} for section, cls in TYPED_SECTIONS.items()},
}
TOP_LEVEL = ("name", "seed", "workload", "cluster") + tuple(OPTIONS)
CLUSTER_KEYS = ("profile", "nodes", "overrides")
CHOICES = {
    ("objective", "kind"): ("makespan", "min_peak_memory", "weighted"),
    **{(section, f.name): f.metadata["choices"] for section, cls in TYPED_SECTIONS.items() for f in fields(cls)
       if f.metadata["choices"]},
}
RANGES = {(section, f.name): f.metadata["range"] for section, cls in TYPED_SECTIONS.items() for f in fields(cls)}
PIPELINE_KEYS = ("kind", "stages", "microbatches", "directions", "times_us", "activation_bytes", "send_bytes")
GRAPH_KEYS = ("kind", "path")


@dataclass
class Scenario:
    """A loaded scenario. ``objective`` is a dict with every default filled in; the solver,
    simulator and loop sections are typed (:mod:`engine.core.options`)."""

    path: Path | None
    name: str
    seed: int
    workload: Workload
    cluster: Cluster
    comm: CommModel
    memory_cap_bytes: int | None
    objective: dict[str, Any] = field(default_factory=dict)
    solver: SolverOptions = field(default_factory=SolverOptions)
    simulator: SimulatorOptions = field(default_factory=SimulatorOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    raw: dict[str, Any] = field(default_factory=dict)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    path = Path(path)
    return scenario_from_dict(load_yaml(path), path)


def scenario_from_dict(raw: Any, path: str | Path | None = None) -> Scenario:
    """Validate a parsed scenario; relative paths resolve against ``path``'s folder."""
    path = Path(path) if path is not None else None
    check_document(raw, path)
    try:
        return _build(copy.deepcopy(raw), path)
    except InputError as e:
        if e.source is None:
            raise InputError(path, e.field, e.reason) from None
        raise


def _build(raw: Any, path: Path | None) -> Scenario:
    if not isinstance(raw, dict):
        raise InputError(path, None, "a scenario must be a YAML mapping")
    for key in raw:
        if key not in TOP_LEVEL:
            raise InputError(path, str(key), "unknown field" + nearest(str(key), TOP_LEVEL))
    for key in ("workload", "cluster"):
        if key not in raw:
            raise InputError(path, key, "missing")
    base = path.parent if path is not None else Path.cwd()
    options = {section: _options(section, raw.get(section)) for section in OPTIONS}
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(path, "seed", f"must be an integer, got {seed!r}")

    cluster = _cluster(raw["cluster"], base)
    workload = _workload(raw["workload"], base, options["placement"], cluster)
    cap = options["memory"]["cap_bytes"]
    if options["memory"]["cap_gib"] is not None:
        cap = int(options["memory"]["cap_gib"] * GIB)
    if cap is not None:
        if cap <= 0:
            raise InputError(path, "memory.cap_bytes", f"must be > 0, got {cap}")
        workload.memory_cap_bytes = cap
    check_placement_fits(workload, cluster)
    return Scenario(path=path, name=str(raw.get("name", path.stem if path else "scenario")), seed=seed,
                    workload=workload, cluster=cluster, comm=CommModel(cluster), memory_cap_bytes=workload.memory_cap_bytes,
                    objective=options["objective"], solver=SolverOptions(**options["solver"]),
                    simulator=SimulatorOptions(**options["simulator"]), loop=LoopOptions(**options["loop"]), raw=raw)


def _options(section: str, given: Any) -> dict[str, Any]:
    spec = OPTIONS[section]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise InputError(None, section, "must be a mapping")
    out = {k: copy.deepcopy(default) for k, (default, _) in spec.items()}
    for key, value in given.items():
        if key not in spec:
            raise InputError(None, f"{section}.{key}", "unknown field" + nearest(str(key), tuple(spec)))
        default, types = spec[key]
        ok = (value is None and default is None) or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types))
        if not ok:
            names = "/".join(t.__name__ for t in types)
            raise InputError(None, f"{section}.{key}", f"must be {names}, got {value!r}")
        choices = CHOICES.get((section, key))
        if choices and value not in choices:
            raise InputError(None, f"{section}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = range_problem(RANGES.get((section, key), (0, None, False)), value)
            if problem:
                raise InputError(None, f"{section}.{key}", problem)
        out[key] = value
    return out


def _cluster(spec: Any, base: Path):
    if not isinstance(spec, dict):
        raise InputError(None, "cluster", "must be a mapping with 'profile'")
    for key in spec:
        if key not in CLUSTER_KEYS:
            raise InputError(None, f"cluster.{key}", "unknown field" + nearest(str(key), CLUSTER_KEYS))
    if "profile" not in spec:
        raise InputError(None, "cluster.profile", "missing")
    nodes = spec.get("nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise InputError(None, "cluster.nodes", f"must be an integer >= 1, got {nodes!r}")
    overrides = spec.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise InputError(None, "cluster.overrides", "must be a mapping of dotted profile paths to values")
    name = str(spec["profile"])
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute():
        name = str(base / name)
    profile = load_profile(name, overrides=overrides)
    return build_cluster(profile, nodes)


def _pipeline(spec: dict, base: Path, placement: dict, cluster) -> Workload:
    for key in spec:
        if key not in PIPELINE_KEYS:
            raise InputError(None, f"workload.{key}", "unknown field" + nearest(str(key), PIPELINE_KEYS))
    for key in ("stages", "microbatches", "times_us"):
        if key not in spec:
            raise InputError(None, f"workload.{key}", "missing")
    for key in ("stages", "microbatches", "directions", "activation_bytes", "send_bytes"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool)):
            raise InputError(None, f"workload.{key}", f"must be an integer, got {spec[key]!r}")
    times = spec["times_us"]
    if not isinstance(times, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in times.values()):
        raise InputError(None, "workload.times_us", "must map F, B (and W) to numbers of us")
    for k, v in times.items():
        if v < 0:
            raise InputError(None, f"workload.times_us.{k}", f"negative duration {v}")
    stage_devices = placement.get("stage_devices")
    if stage_devices is not None and not all(isinstance(d, int) and not isinstance(d, bool) for d in stage_devices):
        raise InputError(None, "placement.stage_devices", "must be a list of GPU indices")
    return build_pipeline(spec["stages"], spec["microbatches"], spec.get("directions", 1), times,
                          spec.get("activation_bytes", 0), spec.get("send_bytes", 0), stage_devices)


def _graph(spec: dict, base: Path, placement: dict, cluster) -> Workload:
    for key in spec:
        if key not in GRAPH_KEYS:
            raise InputError(None, f"workload.{key}", "unknown field" + nearest(str(key), GRAPH_KEYS))
    if "path" not in spec:
        raise InputError(None, "workload.path", "missing")
    p = Path(str(spec["path"]))
    return load_graph(p if p.is_absolute() else base / p)


# kind -> builder(spec, scenario folder, placement options, cluster) -> Workload
WORKLOAD_BUILDERS: dict[str, Callable[[dict, Path, dict, Any], Workload]] = {
    "pipeline": _pipeline,
    "graph": _graph,
    "transformer": transformer_workload,
}


def _workload(spec: Any, base: Path, placement: dict, cluster) -> Workload:
    if not isinstance(spec, dict):
        raise InputError(None, "workload", "must be a mapping with 'kind'")
    kind = spec.get("kind")
    if kind is None:
        raise InputError(None, "workload.kind", "missing")
    if kind not in WORKLOAD_BUILDERS:
        raise InputError(None, "workload.kind", f"unknown kind {kind!r}" + nearest(str(kind), tuple(WORKLOAD_BUILDERS)))
    return WORKLOAD_BUILDERS[kind](spec, base, placement, cluster)


def check_placement_fits(workload: Workload, cluster) -> None:
    """Every op has an eligible GPU in the cluster, and its allocation fits the cap there alone."""
    n = cluster.n_gpus
    caps = memory_caps(workload, cluster)
    for op_id, op in workload.ops.items():
        devs = workload.eligible(op_id, n)
        if not devs:
            assert op.devices is not None  # an op without ``devices`` may run on any of the cluster's GPUs
            raise InputError(None, f"ops[{op_id}].devices",
                             f"eligible on no GPU of the cluster (GPUs {list(op.devices)} but the cluster has {n})")
        if op.collective is not None and max(op.collective.group) >= n:
            raise InputError(None, f"ops[{op_id}].collective.group", f"GPU {max(op.collective.group)} not in the cluster ({n} GPUs)")
        fits = [d for d in devs if workload.static_memory_bytes.get(d, 0) + op.memory_bytes <= caps[d]]
        if not fits:
            d = devs[0]
            raise InputError(None, f"ops[{op_id}].memory_bytes",
                             f"memory can never fit: {op.memory_bytes} B + static {workload.static_memory_bytes.get(d, 0)} B "
                             f"> cap {caps[d]} B on every eligible GPU")



def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = 'a.b.c'`` (used by what-if sweeps)."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise InputError(None, dotted, f"{k!r} is not a mapping")
    node[keys[-1]] = value

