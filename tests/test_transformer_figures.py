"""Figures users compare (tokens/s, model TFLOP/s, MFU, the iteration breakdown, memory) from
``plansim simulate --json`` on a transformer workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.scenario.loader import load_scenario
from engine.workloads.transformer import rank_params, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
GPT1B = ROOT / "scenarios" / "transformer_gpt1b_h100.yaml"
KEYS = {"makespan_us", "tokens_per_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu", "breakdown_us",
        "peak_memory_bytes", "memory_breakdown_bytes"}


def test_simulate_json_reports_the_figures_with_megatron_model_flops():
    res = CliRunner().invoke(main, ["simulate", str(GPT1B), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert KEYS <= set(out) and "bubble_us" in out and "planner" in out  # the older keys stay
    t = out["makespan_us"] * 1e-6  # s
    # 16 sequences x 2,048 tokens on tp 2 x pp 2 x dp 2 = 8 GPUs
    assert out["tokens_per_s"] == pytest.approx(16 * 2048 / t)
    assert out["tokens_per_s_per_gpu"] == pytest.approx(16 * 2048 / t / 8)
    # Narayanan et al. 2021: 72 B s l h^2 (1 + s / (6h) + V / (12 l h)) FLOPs per iteration
    B, s, L, h, V = 16, 2048, 24, 2048, 50304
    flops = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert out["model_tflops_per_gpu"] == pytest.approx(flops / t / 8 / 1e12)
    assert out["mfu"] == pytest.approx(flops / t / 8 / 989.5e12)  # h100-sxm dense bf16
    parts = out["breakdown_us"]
    assert set(parts) == {"compute", "tp", "dp", "pp", "ep", "cp", "bubble"}
    assert sum(parts.values()) == pytest.approx(out["makespan_us"])
    assert parts["tp"] > 0 and parts["dp"] > 0 and parts["ep"] == parts["cp"] == 0.0
    # memory of the peak GPU: 18 B per parameter (bf16 weights, fp32 grads, fp32 master + Adam m, v)
    mem = out["memory_breakdown_bytes"]
    sc = load_scenario(GPT1B)
    spec = spec_from_dict(sc.raw["workload"])
    params = set(rank_params(spec))
    assert mem["weights"] // 2 in params
    n = mem["weights"] // 2
    assert (mem["grads"], mem["optimizer"]) == (4 * n, 12 * n)
    assert mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"] == out["peak_memory_bytes"]
