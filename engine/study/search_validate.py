"""The validate stage of ``plansim search``: one configuration's whole op graph in the flow model
(contention), and the MIP's pipeline order against the named schedule's.

Each function takes the raw scenario (cluster, options) and the configuration, and returns plain
data (a task of :func:`engine.study.backends.run_tasks`, so it pickles to a worker). A
configuration whose graph would hold more than ``max_ops`` ops (:func:`op_count`; the workload
builds every TP rank and DP replica) is not simulated: the result says so and the search keeps
its alpha-beta figures. Times in us, sizes in bytes.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from engine.planners.registry import default_simulation_planner, plan_scenario
from engine.scenario.loader import Scenario, scenario_from_dict
from engine.scenario.simulation import simulate_scenario
from engine.study.search_model import workload_section
from engine.study.search_space import Config
from engine.workloads.transformer import TransformerSpec, spec_from_dict
from engine.workloads.transformer_costs import model_flops_per_iteration
from engine.workloads.transformer_figures import transformer_figures

DEFAULT_MAX_OPS = 200_000


def op_count(spec: TransformerSpec) -> int:
    """Ops the transformer builder makes for ``spec``: per micro-batch, virtual stage and replica,
    F, B, W on every TP rank (plus the two epilogues and two all-reduces with tp > 1), and the
    step-end ops (a few per GPU)."""
    par = spec.parallelism
    per = 3 * par.tp + (2 * par.tp + 2 if par.tp > 1 else 0)
    return spec.microbatches * spec.stages * par.dp * per + 3 * par.gpus


def config_scenario(raw: dict[str, Any], path: str, config: Config) -> Scenario:
    """The scenario ``raw`` with ``config`` written into its workload section."""
    r = copy.deepcopy(raw)
    r["workload"] = workload_section(raw["workload"], config)
    return scenario_from_dict(r, path)


def throughput(spec: TransformerSpec, profile: Any, iteration_us: float) -> dict[str, float]:
    """tokens/s per GPU, model TFLOP/s per GPU and MFU of an iteration of ``iteration_us`` (the
    formulas of :mod:`engine.workloads.transformer_figures`)."""
    gpus = spec.parallelism.gpus
    per_s = spec.global_batch * spec.seq_len / (iteration_us * 1e-6)
    flops = model_flops_per_iteration(spec) / (iteration_us * 1e-6) / gpus
    return {"tokens_per_s_per_gpu": per_s / gpus, "model_tflops_per_gpu": flops / 1e12,
            "mfu": flops / (profile.peak_flops_per_us(spec.dtype) * 1e6)}


def flow_task(raw: dict[str, Any], path: str, config_dict: dict[str, Any], max_ops: int) -> dict[str, Any]:
    """Simulate ``config``'s named schedule with the flow model: the figures of
    :func:`engine.workloads.transformer_figures.transformer_figures`, or ``skipped`` with the reason."""
    config = Config.from_dict(config_dict)
    spec = spec_from_dict(workload_section(raw["workload"], config))
    ops = op_count(spec)
    if ops > max_ops:
        return {"skipped": f"{ops} ops over --max-ops {max_ops}", "ops": ops}
    t0 = time.perf_counter()
    sc = config_scenario(raw, path, config)
    plan = plan_scenario(sc, default_simulation_planner(sc))
    sim = simulate_scenario(sc, plan, mode="flow")
    figures = transformer_figures(spec, sc.cluster.profile, sc.workload, sim).to_dict()
    return {"figures": figures, "ops": ops, "wall_s": time.perf_counter() - t0}


def mip_task(raw: dict[str, Any], path: str, config_dict: dict[str, Any], max_ops: int,
             time_limit_s: float) -> dict[str, Any]:
    """Plan ``config``'s pipeline order with the MIP (warm start: the named schedule, within
    ``time_limit_s``), simulate both with the flow model; ``gain`` = 1 - MIP / named."""
    config = Config.from_dict(config_dict)
    spec = spec_from_dict(workload_section(raw["workload"], config))
    ops = op_count(spec)
    if ops > max_ops:
        return {"skipped": f"{ops} ops over --max-ops {max_ops}", "ops": ops}
    t0 = time.perf_counter()
    sc = config_scenario(raw, path, config)
    named = plan_scenario(sc, default_simulation_planner(sc))
    mip = plan_scenario(sc, "mip", warm_plan=named, time_limit_s=time_limit_s, threads=1)
    named_us = simulate_scenario(sc, named, mode="flow").makespan_us
    mip_us = simulate_scenario(sc, mip, mode="flow").makespan_us
    return {"schedule": config.schedule, "named_us": named_us, "mip_us": mip_us, "gain": 1.0 - mip_us / named_us,
            "status": mip.status, "ops": ops, "wall_s": time.perf_counter() - t0}
