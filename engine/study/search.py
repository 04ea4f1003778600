"""``plansim search``: the fastest parallel configuration of a transformer on N GPUs that fits.

Stages (each configuration a task of :func:`engine.study.backends.run_tasks`):

1. **space** (:mod:`engine.study.search_space`): every configuration of the space;
2. **memory** and **rank** (:func:`engine.study.search_model.evaluate`): the workload's rules and
   the exact per-GPU memory drop what cannot run (counted per reason); every survivor gets its
   alpha-beta iteration time;
3. **validate** (:mod:`engine.study.search_validate`): the ``top`` fastest re-simulated with the
   flow model (contention), sorted by that time; the best one's pipeline order planned by the MIP
   within its time limit, its gain over the named schedule reported.

Every finished task's rows go into the results file at once (:mod:`engine.study.results`; rows
keyed by stage and configuration), so an interrupted search leaves a valid file and a re-run
with the same scenario and GPU count resumes where it stopped. Times in us, sizes in bytes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.core.errors import InputError
from engine.core.memory import memory_caps
from engine.scenario.loader import scenario_from_dict
from engine.study.backends import run_tasks
from engine.study.results import load_rows, row_key, save_rows
from engine.study.search_model import Evaluation, evaluate, workload_section
from engine.study.search_space import Config, configs, load_space
from engine.study.search_validate import flow_task, mip_task, throughput
from engine.workloads.transformer import spec_from_dict

# the stand-in workload the scenario's other sections are validated with (the transformer's own
# section is checked by the workload's rules per configuration)
_PLACEHOLDER = {"kind": "pipeline", "stages": 1, "microbatches": 1, "times_us": {"F": 1.0, "B": 1.0}}
CHUNK = 16  # configurations per memory/rank task
Progress = Callable[[str, int, int], None]


@dataclass
class Search:
    """A prepared search: the scenario (``raw``, its cluster sized for ``gpus``), the model's
    workload section ``base``, the per-GPU cap (bytes) and the configurations of the space."""

    raw: dict[str, Any]
    path: str
    name: str
    gpus: int
    gpus_per_node: int
    base: dict[str, Any]
    cap_bytes: int
    configs: list[Config]
    profile: Any = None

    @property
    def header(self) -> dict[str, Any]:
        return {"kind": "search", "scenario": self.name, "gpus": self.gpus}


def prepare(raw: Any, path: Path, gpus: int | None, space_path: Path | None) -> Search:
    """Check the scenario (a transformer workload), size its cluster for ``gpus`` (default: all of
    its GPUs) and enumerate the space; errors name the file and field."""
    if not isinstance(raw, dict) or not isinstance(raw.get("workload"), dict):
        raise InputError(path, "workload", "missing or not a mapping")
    base = raw["workload"]
    if base.get("kind") != "transformer":
        raise InputError(path, "workload.kind", f"search needs a transformer workload, got {base.get('kind')!r}")
    try:
        spec_from_dict({**base, "parallelism": {}, "micro_batch": 1})
    except InputError as e:
        raise InputError(path, e.field, e.reason) from None
    probe = {**copy.deepcopy(raw), "workload": dict(_PLACEHOLDER)}
    sc = scenario_from_dict(probe, path)
    per_node = sc.cluster.gpus_per_node
    gpus = sc.cluster.n_gpus if gpus is None else gpus
    if gpus < 1:
        raise InputError(None, "--gpus", f"must be >= 1, got {gpus}")
    probe["cluster"] = {**probe["cluster"], "nodes": math.ceil(gpus / per_node)}
    raw = {**copy.deepcopy(raw), "cluster": probe["cluster"]}
    cap = memory_caps(sc.workload, sc.cluster, sc.memory_cap_bytes)[0]
    space = load_space(space_path, gpus, per_node)
    found = list(configs(space, gpus))
    if not found:
        raise InputError(space_path, "--gpus" if space_path is None else None,
                         f"{gpus} GPUs have no factorisation tp x pp x dp with tp in {space['tp']} "
                         f"(GPUs per node: {per_node}) in the search space")
    return Search(raw, str(path), str(raw.get("name", path.stem)), gpus, per_node, base, cap, found, sc.cluster.profile)


@functools.lru_cache(maxsize=4)
def _cluster(cluster_json: str, path: str):
    return scenario_from_dict({"cluster": json.loads(cluster_json), "workload": dict(_PLACEHOLDER)}, path).cluster


def cluster_of(raw: dict[str, Any], path: str):
    """The cluster of ``raw`` (the scenario loader's, built once per worker process)."""
    return _cluster(json.dumps(raw["cluster"], sort_keys=True), path)


def rank_task(raw: dict[str, Any], path: str, cap: int, config_dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The memory and rank stages of a few configurations (:func:`engine.study.search_model.evaluate`)."""
    cluster = cluster_of(raw, path)
    return [evaluate(raw["workload"], Config.from_dict(c), cluster, cap).to_dict() for c in config_dicts]


@dataclass
class Results:
    """The search's results file: rows by (stage, configuration), saved after every change."""

    path: Path
    header: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, header: dict[str, Any]) -> "Results":
        return cls(path, header, load_rows(path, "key", "search", "--results", header))

    @staticmethod
    def key(stage: str, config: Config) -> dict[str, Any]:
        return {"stage": stage, **config.to_dict()}

    def get(self, stage: str, config: Config) -> dict[str, Any] | None:
        return self.rows.get(row_key(self.key(stage, config)))

    def add(self, stage: str, items: list[tuple[Config, dict[str, Any]]]) -> None:
        new = dict(self.rows)
        for config, value in items:
            k = self.key(stage, config)
            new[row_key(k)] = {"key": k, stage: value}
        save_rows(self.path, self.header, new.values(), "key")  # saved before counted (a Ctrl-C mid-write loses nothing)
        self.rows = new


def _stage(results: Results, stage: str, todo: list[tuple[Config, tuple]], fn, group: int, backend: str, jobs: int,
           address: str | None, progress: Progress | None, total: int) -> None:
    """Run ``fn`` over ``todo`` (configuration, arguments) in tasks of ``group`` configurations."""
    batches = [todo[i:i + group] for i in range(0, len(todo), group)]
    done = total - len(todo)
    if progress:
        progress(stage, done, total)
    if group == 1:
        args = [b[0][1] for b in batches]
    else:
        args = [b[0][1][:-1] + ([a[-1] for _, a in b],) for b in batches]
    for k, out in run_tasks(fn, args, backend=backend, jobs=jobs, address=address):
        items = list(zip([c for c, _ in batches[k]], out if group > 1 else [out]))
        results.add(stage, items)
        done += len(items)
        if progress:
            progress(stage, done, total)


def run_search(s: Search, results: Results, *, top: int = 10, max_ops: int, mip_time_limit_s: float | None,
               backend: str = "local", jobs: int = 1, address: str | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Every stage of the search (module docstring); the summary :func:`summary` describes."""
    t0 = time.perf_counter()
    todo: list[tuple[Config, tuple]] = [(c, (s.raw, s.path, s.cap_bytes, c.to_dict())) for c in s.configs if results.get("rank", c) is None]
    _stage(results, "rank", todo, rank_task, CHUNK, backend, jobs, address, progress, len(s.configs))
    evals = [Evaluation.from_dict(results.get("rank", c)["rank"]) for c in s.configs]  # type: ignore[index]
    ranked = sorted((e for e in evals if e.pruned is None), key=lambda e: (e.iteration_us, e.config))
    best = [e.config for e in ranked[:top]]
    todo = [(c, (s.raw, s.path, c.to_dict(), max_ops)) for c in best if results.get("flow", c) is None]
    _stage(results, "flow", todo, flow_task, 1, backend, jobs, address, progress, len(best))
    entries = [entry(s, e, results.get("flow", e.config)["flow"]) for e in ranked[:top]]  # type: ignore[index]
    entries.sort(key=lambda r: (r["iteration_us"], Config.from_dict(r["config"])))
    mip = None
    if entries and mip_time_limit_s is not None:
        winner = Config.from_dict(entries[0]["config"])
        if results.get("mip", winner) is None:
            _stage(results, "mip", [(winner, (s.raw, s.path, winner.to_dict(), max_ops, mip_time_limit_s))], mip_task,
                   1, "local", 1, None, progress, 1)
        mip = {"config": winner.to_dict(), **results.get("mip", winner)["mip"]}  # type: ignore[index]
    return summary(s, evals, entries, mip, time.perf_counter() - t0)


def entry(s: Search, ev: Evaluation, flow: dict[str, Any]) -> dict[str, Any]:
    """One row of ``top``: the flow model's figures, or the alpha-beta ones when it was skipped."""
    spec = spec_from_dict(workload_section(s.base, ev.config))
    if "figures" in flow:
        f = flow["figures"]
        parts = {k: v for k, v in f["breakdown_us"].items()}
        return {"config": ev.config.to_dict(), "iteration_us": f["makespan_us"], "alpha_beta_us": ev.iteration_us,
                "tokens_per_s_per_gpu": f["tokens_per_s_per_gpu"], "model_tflops_per_gpu": f["model_tflops_per_gpu"],
                "mfu": f["mfu"], "peak_memory_bytes": int(f["peak_memory_bytes"]), "validated": "flow",
                "bottleneck": bottleneck(parts), "breakdown_us": parts}
    return {"config": ev.config.to_dict(), "iteration_us": ev.iteration_us, "alpha_beta_us": ev.iteration_us,
            **throughput(spec, s.profile, ev.iteration_us), "peak_memory_bytes": ev.peak_memory_bytes,
            "validated": f"alpha_beta ({flow['skipped']})", "bottleneck": None, "breakdown_us": None}


def bottleneck(parts: dict[str, float]) -> str:
    """What the iteration spends most on besides compute: compute itself when it is the majority,
    else the largest of the exposed communication classes and the bubble."""
    if parts.get("compute", 0.0) >= 0.5 * sum(parts.values()):
        return "compute"
    rest = {k: v for k, v in parts.items() if k != "compute"}
    return max(sorted(rest), key=lambda k: rest[k])


def summary(s: Search, evals: list[Evaluation], entries: list[dict[str, Any]], mip: dict[str, Any] | None,
            wall_s: float) -> dict[str, Any]:
    """``{"searched", "pruned": {reason: count}, "top": [...], "mip", "gpus", "wall_s"}``."""
    pruned = Counter(e.pruned for e in evals if e.pruned is not None)
    return {"searched": len(evals), "pruned": dict(sorted(pruned.items())), "top": entries, "mip": mip,
            "gpus": s.gpus, "scenario": s.name, "survivors": sum(1 for e in evals if e.pruned is None),
            "wall_s": wall_s}


EXPLAIN_ALIASES = {"mb": "micro_batch", "micro-batch": "micro_batch", "recompute": "recompute"}


def parse_config(text: str, gpus: int) -> Config:
    """``tp=8,pp=4,vpp=2,mb=1,recompute=selective,schedule=interleaved`` -> :class:`Config`
    (``dp`` defaults to what the GPU count leaves; other fields to their neutral value)."""
    values: dict[str, Any] = {}
    fields = Config().to_dict()
    for part in (p for p in text.replace(" ", ",").split(",") if p):
        key, sep, value = part.partition("=")
        key = EXPLAIN_ALIASES.get(key.strip(), key.strip())
        if not sep or key not in fields:
            raise InputError(None, "--explain", f"expected KEY=VALUE with KEY one of {', '.join(fields)}, got {part!r}")
        kind = type(fields[key])
        if kind is bool:
            values[key] = value.strip().lower() in ("1", "true", "yes")
        elif kind is int:
            if not value.strip().isdigit() or int(value) < 1:
                raise InputError(None, f"--explain {key}", f"must be an integer >= 1, got {value!r}")
            values[key] = int(value)
        else:
            values[key] = value.strip()
    if "dp" not in values:
        rest = values.get("tp", 1) * values.get("pp", 1) * values.get("cp", 1)
        if gpus % rest:
            raise InputError(None, "--explain", f"tp x pp x cp = {rest} does not divide the {gpus} GPUs")
        values["dp"] = gpus // rest
    config = Config(**values)
    if config.gpus != gpus:
        raise InputError(None, "--explain", f"tp x pp x dp x cp = {config.gpus}, not the {gpus} GPUs searched")
    return config


def explain(s: Search, config: Config, max_ops: int) -> dict[str, Any]:
    """For one configuration: why it is dropped, or its memory per pipeline rank (static and peak,
    bytes), its alpha-beta iteration, and the flow model's iteration breakdown and memory breakdown."""
    ev = evaluate(s.base, config, cluster_of(s.raw, s.path), s.cap_bytes)
    out: dict[str, Any] = {"config": config.to_dict(), "label": config.label(), "cap_bytes": s.cap_bytes,
                           "evaluation": ev.to_dict()}
    if ev.pruned is None or ev.pruned.startswith("memory"):
        flow = flow_task(s.raw, s.path, config.to_dict(), max_ops) if ev.pruned is None else {"skipped": ev.pruned}
        out["flow"] = flow
    return out
