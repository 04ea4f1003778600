"""What-if sweeps: the same scenario over combinations of changed settings.

``--vary KEY=V1,V2,...`` names a dotted path into the scenario (``cluster.nodes``,
``solver.time_limit_s``, ``workload.microbatches``) or into the cluster's profile
(``cluster.fabric.oversubscription``, ``cluster.node.nic_gbps``; ``profile`` is short for
``cluster.profile``). Values are read as YAML scalars. Every combination is built and validated
before anything runs, so a bad key or value fails at once, naming it.

Each finished combination is added to a results file (JSON, rewritten atomically), so an
interrupted sweep leaves a valid partial file and a re-run skips what is already there.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from engine.core.errors import InputError
from engine.planners.registry import default_simulation_planner, plan_scenario
from engine.scenario.loader import scenario_from_dict, set_dotted
from engine.scenario.simulation import simulate_scenario
from engine.study.loop import refine
from engine.study.results import load_rows, row_key, save_rows

RESULT_FIELDS = ("simulated_us", "predicted_us", "bubble_us", "bubble_ratio", "peak_memory_bytes", "iterations",
                 "converged", "wall_s")


def parse_vary(specs: Iterable[str]) -> list[tuple[str, list[Any]]]:
    """``["cluster.nodes=1,2"]`` -> ``[("cluster.nodes", [1, 2])]`` with keys normalised."""
    out: list[tuple[str, list[Any]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise InputError(None, f"--vary {spec}", "expected KEY=V1,V2,...")
        if key == "profile":
            key = "cluster.profile"
        parsed = []
        for token in values.split(","):
            try:
                parsed.append(yaml.safe_load(token.strip()))
            except yaml.YAMLError:
                raise InputError(None, f"--vary {key}", f"cannot read value {token!r}") from None
        if any(k == key for k, _ in out):
            raise InputError(None, f"--vary {key}", "given twice")
        out.append((key, parsed))
    return out


def apply(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the raw scenario with ``key`` set to ``value``."""
    raw = copy.deepcopy(raw)
    parts = key.split(".")
    if parts[0] == "cluster" and len(parts) > 1 and parts[1] not in ("profile", "nodes"):
        profile_key = ".".join(parts[2:] if parts[1] == "overrides" else parts[1:])
        raw.setdefault("cluster", {}).setdefault("overrides", {})[profile_key] = value
    else:
        set_dotted(raw, key, value)
    return raw


def combinations(vary: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination, in the order the values were given (last key varies fastest)."""
    keys = [k for k, _ in vary]
    return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in vary))]


def combo_key(combo: dict[str, Any]) -> str:
    return row_key(combo)


def build_all(raw: dict[str, Any], path: Path, combos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate every combination up front; return the raw scenarios. Errors name the key."""
    out = []
    for combo in combos:
        r = raw
        for key, value in combo.items():
            r = apply(r, key, value)
        try:
            scenario_from_dict(r, path)
        except InputError as e:
            changed = ", ".join(f"{k}={v}" for k, v in combo.items())
            raise InputError(path, f"--vary {_culprit(combo, e)}", f"{e.field or ''}: {e.reason} (with {changed})") from None
        out.append(r)
    return out


def _culprit(combo: dict[str, Any], err: InputError) -> str:
    field = err.field or ""
    for key in combo:
        tail = key.split(".", 1)[-1]
        if tail in field or key in field or field in key:
            return key
    return next(iter(combo))


def run_one(raw: dict[str, Any], path: str, no_solve: bool, solver_options: dict[str, Any]) -> dict[str, Any]:
    """Plan (loop, or heuristic + one simulation with ``no_solve``) one combination; its figures."""
    t0 = time.perf_counter()
    sc = scenario_from_dict(raw, path)
    converged: bool | None
    if no_solve:
        plan = plan_scenario(sc, default_simulation_planner(sc))
        sim = simulate_scenario(sc, plan)
        iterations, converged = 1, None
    else:
        res = refine(sc, solver_options=solver_options)
        sim, plan = res.best_sim, res.best_plan
        iterations, converged = len(res.iterations), res.converged
    if plan.makespan_us is None:  # Plan.__post_init__ fills it in
        raise ValueError(f"plan {plan.workload!r} has no makespan")
    predicted = float(plan.makespan_us)
    return {"simulated_us": sim.makespan_us, "predicted_us": predicted, "bubble_us": sim.bubble_us,
            "bubble_ratio": sim.bubble_ratio, "peak_memory_bytes": sim.peak_memory_bytes, "iterations": iterations,
            "converged": converged, "wall_s": time.perf_counter() - t0}


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier (possibly interrupted) sweep, keyed by :func:`combo_key`."""
    return load_rows(path, "vary", "what-if", "--results")


def save_results(path: Path, scenario: str, rows: list[dict[str, Any]], total: int) -> None:
    save_rows(path, {"scenario": scenario, "total": total}, rows, "vary")


def sorted_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by simulated makespan, ties by combination."""
    return sorted(rows, key=lambda r: (r["simulated_us"], combo_key(r["vary"])))


def to_csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    lines = [",".join(keys + list(RESULT_FIELDS))]
    for r in rows:
        lines.append(",".join([json.dumps(r["vary"][k]) if not isinstance(r["vary"][k], str) else r["vary"][k] for k in keys]
                              + ["" if r[f] is None else str(r[f]) for f in RESULT_FIELDS]))
    return "\n".join(lines) + "\n"
