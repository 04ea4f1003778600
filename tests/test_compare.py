"""``plansim compare`` and ``plansim export --format torch-csv`` end to end through the CLI."""

import copy
import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from oracles import unit_pipeline_optimum

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "scenarios" / "pipeline_p4_m8.yaml"
DUALPIPE = ROOT / "scenarios" / "dualpipe_pp8_mb20.yaml"
# torch.distributed.pipelining's action strings: [stage][type][microbatch], or an overlapped pair
ACTION = re.compile(r"(\d+)(F|I|W|B)(\d+)")
PAIR = re.compile(r"\((\d+F\d+);(\d+B\d+)\)OVERLAP_F_B")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(tmp_path, raw, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def parse(cell):
    """The (stage, type, microbatch) actions a cell names (two for an overlapped pair)."""
    m = PAIR.fullmatch(cell)
    parts = [m.group(1), m.group(2)] if m else [cell]
    out = []
    for part in parts:
        a = ACTION.fullmatch(part)
        assert a, f"not a torch pipelining action: {cell!r}"
        out.append((int(a.group(1)), a.group(2), int(a.group(3))))
    return out


def export(tmp_path, scenario, planner):
    plan = tmp_path / "plan.json"
    res = run("plan", scenario, "--planner", planner, "-o", plan)
    assert res.exit_code == 0, res.output
    out = tmp_path / "order.csv"
    res = run("export", plan, "--scenario", scenario, "--format", "torch-csv", "-o", out)
    assert res.exit_code == 0, res.output
    return read_csv(out)


def test_export_1f1b_is_torch_pipelining_csv(tmp_path):
    rows = export(tmp_path, UNIT, "schedule:1f1b")
    assert rows[0] == ["0F0", "0F1", "0F2", "0F3", "0B0", "0F4", "0B1", "0F5", "0B2", "0F6", "0B3", "0F7", "0B4",
                       "0B5", "0B6", "0B7"]
    assert rows[3][:4] == ["3F0", "3B0", "3F1", "3B1"]
    for r, row in enumerate(rows):  # one row per rank, each (stage, pass, micro-batch) once
        acts = [a for cell in row for a in parse(cell)]
        assert sorted(acts) == sorted((r, t, mb) for t in "BF" for mb in range(8))


def test_export_zero_bubble_splits_backward_into_i_and_w(tmp_path):
    rows = export(tmp_path, UNIT, "schedule:zb-h1")
    last = [a for cell in rows[3] for a in parse(cell)]
    assert last[:4] == [(3, "F", 0), (3, "I", 0), (3, "F", 1), (3, "I", 1)]
    assert {t for _, t, _ in last} == {"F", "I", "W"}
    assert sum(t == "W" for _, t, _ in last) == 8 and last[-1] == (3, "W", 7)


def test_export_dualpipev_writes_overlapped_pairs(tmp_path):
    raw = {"name": "v", "cluster": {"profile": "h100-sxm", "nodes": 1},
           "workload": {"kind": "pipeline", "stages": 8, "microbatches": 8, "times_us": {"F": 5, "B": 5, "W": 5}},
           "placement": {"stage_devices": [0, 1, 2, 3, 3, 2, 1, 0]}}
    rows = export(tmp_path, write(tmp_path, raw), "schedule:dualpipev")
    assert len(rows) == 4
    pairs = [cell for row in rows for cell in row if PAIR.fullmatch(cell)]
    assert pairs and all(parse(c)[0][1] == "F" and parse(c)[1][1] == "B" for c in pairs)
    for r, row in enumerate(rows):  # rank r holds stages r and 7-r of the V
        acts = [a for cell in row for a in parse(cell)]
        assert {s for s, _, _ in acts} == {r, 7 - r}
        for stage in (r, 7 - r):
            fwd = [mb for s, t, mb in acts if s == stage and t == "F"]
            assert fwd == list(range(8))


def test_export_refuses_bidirectional_and_foreign_plans(tmp_path):
    plan = tmp_path / "dp.json"
    assert run("plan", DUALPIPE, "-o", plan).exit_code == 0
    res = run("export", plan, "--scenario", DUALPIPE, "-o", tmp_path / "x.csv")
    assert res.exit_code == 2 and "bidirectional" in res.output and "Traceback" not in res.output
    res = run("export", plan, "--scenario", UNIT, "-o", tmp_path / "x.csv")
    assert res.exit_code == 2 and str(plan) in res.output
    assert not (tmp_path / "x.csv").exists()


def test_compare_json_schema_and_published_figures():
    res = run("compare", UNIT, "--no-mip", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    names = {"gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipe", "dualpipev", "heuristic"}
    assert set(out["schedules"]) == names and out["skipped"] == {}
    for row in out["schedules"].values():
        assert set(row) == {"makespan_us", "bubble_us", "bubble_ratio", "peak_memory_bytes", "solve_s"}
        assert row["bubble_ratio"] == pytest.approx(row["bubble_us"] / row["makespan_us"])
    s = out["schedules"]  # p = 4, m = 8, F = B = W = 1 ms
    assert s["1f1b"]["bubble_us"] == pytest.approx(3 * 3000) and s["gpipe"]["bubble_us"] == pytest.approx(3 * 3000)
    assert s["zb-h1"]["bubble_us"] == pytest.approx(3 * 1000)
    assert s["dualpipe"]["bubble_us"] == pytest.approx(1 * 2000)
    assert s["interleaved"]["bubble_us"] == pytest.approx(3 * 3000 / 2)


def test_compare_names_schedules_that_do_not_apply(tmp_path):
    raw = yaml.safe_load(UNIT.read_text())
    raw["workload"]["microbatches"] = 6
    res = run("compare", write(tmp_path, raw), "--no-mip", "--no-heuristic", "--json", "--schedules", "interleaved,1f1b,dualpipe")
    out = json.loads(res.output)
    assert set(out["schedules"]) == {"1f1b"}
    assert "multiple of 4" in out["skipped"]["interleaved"] and "at least 2p" in out["skipped"]["dualpipe"]


def test_compare_mip_matches_zb_h1_at_its_memory(tmp_path, monkeypatch):
    """One direction, p = 4, m = 8, 1 GiB activations: the MIP, capped at ZB-H1's peak, proves
    ZB-H1's 27 ms optimal (3m + p - 1 units). The MIP is warm-started from ZB-H1, so only its
    status and source tell a solve from a copy of the warm start."""
    import engine.study.compare

    plans = []
    real = engine.study.compare.plan_mip
    monkeypatch.setattr(engine.study.compare, "plan_mip", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    raw = yaml.safe_load(UNIT.read_text())
    raw["workload"]["activation_bytes"] = 1 << 30
    raw["solver"] = {"time_limit_s": 20, "threads": 1}
    res = run("compare", write(tmp_path, raw), "--json", "--schedules", "1f1b,zb-h1", "--mip-cap", "zb-h1")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    s = out["schedules"]
    assert out["mip_memory_cap_bytes"] == s["zb-h1"]["peak_memory_bytes"] == 4 << 30
    assert s["mip"]["makespan_us"] == pytest.approx(unit_pipeline_optimum(4, 8) * 1000) == s["zb-h1"]["makespan_us"]
    assert s["mip"]["peak_memory_bytes"] <= s["zb-h1"]["peak_memory_bytes"]
    [plan] = plans
    assert (plan.status, plan.meta["source"], plan.meta["compare_warm_start"]) == ("optimal", "solver", "zb-h1")
    assert plan.lower_bound_us == pytest.approx(unit_pipeline_optimum(4, 8) * 1000)


def test_compare_bad_input_is_one_line(tmp_path):
    res = run("compare", UNIT, "--schedules", "1f1b,zb-h9", "--no-mip")
    assert res.exit_code == 2 and "zb-h9" in res.output and "Traceback" not in res.output
    res = run("compare", UNIT, "--mip-cap", "interleaved", "--schedules", "1f1b", "--no-heuristic")
    assert res.exit_code == 2 and "interleaved" in res.output


def test_compare_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "g.png"
    res = run("compare", UNIT, "--no-mip", "--schedules", "1f1b,dualpipe", "--plot", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    res = run("compare", UNIT, "--no-mip", "--plot", tmp_path / "g.png")
    assert res.exit_code == 2 and "matplotlib" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "g.png").exists()


# A small transformer (tp 1, pp 2, dp 1 on one H100 node; 4 layers, 8 micro-batches), simulated
# without contention so each schedule's simulated figures are its op-level plan's own.
TINY_GPT = {
    "name": "tiny_gpt", "seed": 0,
    "workload": {"kind": "transformer", "layers": 4, "hidden": 1024, "heads": 16, "seq_len": 1024, "vocab": 1024,
                 "global_batch": 8, "micro_batch": 1, "precision": "bf16", "activation_recompute": "none",
                 "parallelism": {"tp": 1, "pp": 2, "dp": 1, "vpp": 1, "schedule": "1f1b"}},
    "cluster": {"profile": "h100-sxm", "nodes": 1},
    "simulator": {"mode": "alpha_beta"},
}


def test_compare_runs_every_schedule_on_a_transformer():
    from engine.planners.validate import peak_memory, validate_plan
    from engine.scenario.loader import scenario_from_dict
    from engine.study.compare import compare

    sc = scenario_from_dict(TINY_GPT, "tiny.yaml")
    out = compare(sc, mip=False)
    names = {"gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipev", "heuristic"}
    assert set(out["schedules"]) == names
    assert set(out["skipped"]) == {"dualpipe"} and "two model replicas" in out["skipped"]["dualpipe"]
    entries = out["entries"]
    for name in names - {"heuristic"}:
        e = entries[name]
        wl, plan = e["workload"], e["plan"]
        assert validate_plan(plan, wl, sc.cluster, sc.comm, None) == [], name
        # each schedule runs on the model built for it: interleaved and the V schedules on 4 virtual stages
        assert wl.meta["parallelism"]["schedule"] == name
        assert wl.meta["stages"] == (4 if name in ("interleaved", "zb-v", "dualpipev") else 2)
        # no contention: the simulation reproduces the op-level plan
        assert e["row"]["makespan_us"] == pytest.approx(plan.makespan_us, rel=1e-9)
        assert e["row"]["peak_memory_bytes"] == max(peak_memory(plan, wl).values())
    # V layout: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2
    assert entries["zb-v"]["workload"].meta["stage_ranks"] == [0, 1, 1, 0]
    assert entries["interleaved"]["workload"].meta["stage_ranks"] == [0, 1, 0, 1]
    # GPipe keeps all m = 8 forwards of stage 0 live, 1F1B at most p = 2: 6 activations more on GPU 0
    act = entries["1f1b"]["workload"].ops["F0.s0"].memory_bytes
    gp = peak_memory(entries["gpipe"]["plan"], entries["gpipe"]["workload"])[0]
    one = peak_memory(entries["1f1b"]["plan"], entries["1f1b"]["workload"])[0]
    assert gp - one == 6 * act > 0
    s = out["schedules"]
    assert s["interleaved"]["bubble_us"] < s["1f1b"]["bubble_us"]
    assert s["zb-h1"]["makespan_us"] < s["1f1b"]["makespan_us"]
    # the MIP's default cap: the smallest peak (weights, gradients, optimizer states and activations)
    assert out["mip_memory_cap_bytes"] == min(r["peak_memory_bytes"] for n, r in s.items() if n != "heuristic")


def test_compare_table_on_a_transformer(tmp_path):
    res = run("compare", write(tmp_path, TINY_GPT), "--no-mip", "--schedules", "1f1b,zb-v,dualpipe")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    rows = {line.split()[0] for line in lines[3:] if line and not line.startswith(("dualpipe:", "-"))}
    assert {"1f1b", "zb-v", "heuristic"} <= rows
    assert any(line.startswith("dualpipe: not applicable: schedule dualpipe runs two model replicas") for line in lines)


def test_compare_mip_on_a_transformer_starts_from_its_schedule_and_keeps_the_cap():
    """The MIP plans the scenario's own transformer workload, warm-started from the best known
    schedule built on that workload (gpipe or 1f1b here), never worse than it, under the cap."""
    from engine.scenario.loader import scenario_from_dict
    from engine.study.compare import compare

    raw = copy.deepcopy(TINY_GPT)
    raw["solver"] = {"time_limit_s": 5, "threads": 1}
    sc = scenario_from_dict(raw, "tiny.yaml")
    out = compare(sc, ("1f1b", "zb-v"), heuristic=False)
    s = out["schedules"]
    assert set(s) == {"1f1b", "zb-v", "mip"}
    assert out["entries"]["mip"]["plan"].meta["compare_warm_start"] in ("gpipe", "1f1b")
    assert s["mip"]["makespan_us"] <= s["1f1b"]["makespan_us"] * (1 + 1e-9)
    assert s["mip"]["peak_memory_bytes"] <= out["mip_memory_cap_bytes"] == s["1f1b"]["peak_memory_bytes"]
