"""The search's memory and rank stages against the simulator: one representative GPU per pipeline
rank gives the alpha-beta simulation's iteration time and peak memory of the whole op graph."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from engine.core.documents import load_yaml
from engine.planners.registry import default_simulation_planner, plan_scenario
from engine.scenario.loader import scenario_from_dict
from engine.scenario.simulation import simulate_scenario
from engine.study.search_model import MEMORY_REASON, PRUNE_REASONS, STATIC_REASON, evaluate, workload_section
from engine.study.search_space import Config

ROOT = Path(__file__).resolve().parents[1]
GPT1B = ROOT / "scenarios" / "transformer_gpt1b_h100.yaml"
RAW = load_yaml(GPT1B)
BASE = RAW["workload"]
GIB = 1 << 30

CASES = [
    Config(tp=2, pp=2, dp=2, micro_batch=2, recompute="selective", schedule="1f1b"),
    Config(tp=1, pp=4, dp=2, recompute="none", schedule="1f1b"),
    Config(tp=2, pp=4, dp=1, recompute="full", schedule="zb-h1"),
    Config(tp=2, pp=2, dp=2, vpp=2, schedule="interleaved"),
    Config(tp=1, pp=4, dp=2, vpp=2, schedule="zb-v"),
    Config(tp=2, pp=4, dp=1, vpp=2, recompute="selective", schedule="dualpipev"),
    Config(tp=1, pp=4, dp=2, schedule="zb-h2"),
    Config(tp=1, pp=4, dp=2, schedule="gpipe"),
    Config(tp=8, pp=1, dp=1, micro_batch=2, schedule="1f1b"),
]


def _simulated(config: Config):
    raw = copy.deepcopy(RAW)
    raw["workload"] = workload_section(BASE, config)
    sc = scenario_from_dict(raw, GPT1B)
    return sc, simulate_scenario(sc, plan_scenario(sc, default_simulation_planner(sc)), mode="alpha_beta")


@pytest.mark.parametrize("config", CASES, ids=[c.label() for c in CASES])
def test_representative_equals_the_alpha_beta_simulation_of_every_op(config):
    sc, sim = _simulated(config)
    ev = evaluate(BASE, config, sc.cluster, 80 * GIB)
    assert ev.pruned is None
    assert ev.iteration_us == pytest.approx(sim.makespan_us, rel=1e-9)
    assert ev.peak_memory_bytes == sim.peak_memory_bytes


def test_gpipe_keeps_every_micro_batch_and_1f1b_pp_minus_rank():
    """Same order of work, same time; rank r holds m activations under GPipe, pp - r under 1F1B."""
    sc, _ = _simulated(CASES[1])
    one = evaluate(BASE, CASES[1], sc.cluster, 80 * GIB)
    gp = evaluate(BASE, CASES[7], sc.cluster, 80 * GIB)
    assert gp.iteration_us == pytest.approx(one.iteration_us)
    m, pp = 16 // 2, 4  # global batch 16 over micro-batch 1 x dp 2
    more = [g - o for g, o in zip(gp.peak_by_rank, one.peak_by_rank)]  # (m - (pp - r)) x one activation
    assert more[1] > 0 and more[1] * (m - (pp - 2)) == more[2] * (m - (pp - 1))


def test_pruned_by_reason():
    sc, _ = _simulated(CASES[0])
    c = CASES[0]
    static = evaluate(BASE, c, sc.cluster, 1 * GIB)
    assert static.pruned == STATIC_REASON
    fits_static = evaluate(BASE, c, sc.cluster, static.static_bytes + 1)
    assert fits_static.pruned == MEMORY_REASON and fits_static.peak_memory_bytes > fits_static.static_bytes
    assert evaluate(BASE, Config(tp=2, pp=2, dp=2, micro_batch=3), sc.cluster, 80 * GIB).pruned == \
        PRUNE_REASONS["workload.global_batch"]
    assert evaluate(BASE, Config(tp=1, pp=8, dp=1, vpp=2, schedule="interleaved"), sc.cluster, 80 * GIB).pruned == \
        PRUNE_REASONS["workload.layers"]
