"""Scenarios and the CLI end to end: good runs, and every kind of bad input in one line, exit 2."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
PIPE = {"kind": "pipeline", "stages": 4, "microbatches": 8, "directions": 1,
        "times_us": {"F": 1000, "B": 1000, "W": 1000}, "activation_bytes": 0, "send_bytes": 0}


def write_scenario(tmp_path, **changes):
    raw = {"name": "t", "workload": dict(PIPE), "cluster": {"profile": "h100-sxm", "nodes": 1}}
    raw.update(changes)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_plan_p4_m8_unit_pipeline_is_valid_and_written(tmp_path):
    out = tmp_path / "plan.json"
    res = run("plan", ROOT / "scenarios" / "pipeline_p4_m8.yaml", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["n_ops"] == 96 and summary["status"] == "heuristic" and summary["plan_path"] == str(out)
    # One stage does 8 x (F + B + W) = 24 ms of work, so the optimum is 27 ms (p-1 fills and
    # drains). The heuristic gives 30 ms, by hand (units of 1000 us): its upward ranks are
    # F.s0 9 > F.s1 8 > F.s2 7 > F.s3 6 > B.s3 5 > ... > B.s0 2 > W 1, and each layer is ready once
    # the one above is placed, so it places all F, then all B, then all W (GPipe order):
    # F(m, s) runs at [m+s, m+s+1], B(m, s) at [14-s+m, 15-s+m], and the W of stage s, ready only
    # after its B, at [22-s, 30-s] (the idle gap [s+8, 14-s] before the Bs is before any W is
    # ready). Stage 0 ends last, at 30.
    assert summary["makespan_us"] == 30_000
    assert summary["busy_us"] == {str(g): 24_000 for g in range(4)}
    assert summary["bubble_us"] == 30_000 - 24_000
    plan = json.loads(out.read_text())["placements"]
    assert [(plan[f"F{m}.s0"]["start"], plan[f"B{m}.s0"]["start"], plan[f"W{m}.s0"]["start"]) for m in (0, 7)] == [
        (0, 14_000, 22_000), (7_000, 21_000, 29_000)]
    check = run("check", out, ROOT / "scenarios" / "pipeline_p4_m8.yaml")
    assert check.exit_code == 0, check.output


QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
# Contention-free time of one expert's 100 MB across the 2 nodes (h100-sxm: hops PCIe 0.5 + NIC
# 1.0 + NIC 1.0 + PCIe 0.5 us, message overhead 5 us, slowest link the NIC at 400 Gb/s x 125 x 0.9
# = 45,000 bytes/us; see tests/test_sim_cli.py).
QUICKSTART_SEND_US = 8.0 + 1e8 / 45_000


def test_quickstart_mip_is_optimal_with_zero_gap_and_passes_check(tmp_path):
    """quickstart (4 x attn 1000 -> dense 4000 on GPU i of node 0, attn -> expert 4000 anywhere,
    100 MB; 2 nodes of 4 GPUs) with its own planner, the MIP. Optimum by hand: an expert on node 0
    shares a GPU with attn + dense, so that GPU works 9000 us; an expert on node 1 cannot start
    before attn ends + the transfer, 1000 + 2230.2 us, and ends 4000 later; two experts on one
    node-1 GPU end 4000 later still. So the optimum is one expert per node-1 GPU, 7230.2 us, and the
    MIP's bound proves it: status optimal, lower bound = makespan, gap 0."""
    out = tmp_path / "plan.json"
    res = run("plan", QUICKSTART, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    optimum = 1000 + QUICKSTART_SEND_US + 4000
    assert summary["planner"] == "mip" and summary["status"] == "optimal"
    assert summary["makespan_us"] == pytest.approx(optimum, rel=1e-9)
    assert summary["lower_bound_us"] == pytest.approx(optimum, rel=1e-9) and summary["mip_gap"] == 0.0
    # node 0's GPUs do attn + dense = 5000 us, node 1's one expert each
    assert summary["busy_us"] == pytest.approx({**{str(g): 5000 for g in range(4)}, **{str(g): 4000 for g in range(4, 8)}})
    assert summary["bubble_us"] == pytest.approx(optimum - 5000, rel=1e-9)
    placements = json.loads(out.read_text())["placements"]
    assert sorted(placements[f"expert{i}"]["device"] for i in range(4)) == [4, 5, 6, 7]
    check = run("check", out, QUICKSTART)
    assert check.exit_code == 0, check.output


def test_quickstart_runs_readable(tmp_path):
    res = run("plan", QUICKSTART)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()  # stderr carries the solver's progress
    assert lines[0] == "quickstart: planner mip (optimal), 12 ops"
    assert lines[1].startswith("makespan 7,230.2 us   bubble 2,230.2 us (30.8%)")
    assert lines[2] == "lower bound 7,230.2 us   gap 0.00%"
    assert "GPU 3" in res.stdout and "GPU 7" in res.stdout


def test_check_reports_a_broken_plan(tmp_path):
    out = tmp_path / "plan.json"
    sc = ROOT / "scenarios" / "pipeline_p4_m8.yaml"
    assert run("plan", sc, "-o", out).exit_code == 0
    plan = json.loads(out.read_text())
    plan["placements"]["F0.s1"]["start"] = 0.0  # before F0.s0 has ended
    plan["placements"]["F0.s1"]["end"] = 1000.0
    out.write_text(json.dumps(plan))
    res = run("check", out, sc)
    assert res.exit_code == 1 and "F0.s1" in res.output


def test_trace_and_gen_graph(tmp_path):
    plan = tmp_path / "plan.json"
    g = tmp_path / "g.json"
    assert run("gen-graph", "--kind", "moe", "--ops", "30", "--seed", "3", "-o", g).exit_code == 0
    sc = write_scenario(tmp_path, workload={"kind": "graph", "path": str(g)})
    assert run("plan", sc, "-o", plan).exit_code == 0
    trace = tmp_path / "t.json"
    res = run("trace", plan, "-o", trace, "--scenario", sc)
    assert res.exit_code == 0, res.output
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == len(json.loads(g.read_text())["ops"])


def _graph(tmp_path, data):
    g = tmp_path / "g.json"
    g.write_text(data if isinstance(data, str) else json.dumps(data))
    return {"kind": "graph", "path": str(g)}


BAD = {
    "malformed yaml": (lambda t: _raw(t, "workload: [1, 2\n"), "invalid YAML"),
    "missing workload": (lambda t: _raw(t, "cluster: {profile: h100-sxm}\n"), "workload: missing"),
    "unknown top-level field": (lambda t: write_scenario(t, solvr={}), "solvr: unknown field (did you mean 'solver'?)"),
    "unknown option": (lambda t: write_scenario(t, solver={"time_limit": 3}), "solver.time_limit: unknown field (did you mean 'time_limit_s'?)"),
    "unknown pipeline field": (lambda t: write_scenario(t, workload={**PIPE, "stage": 4}), "workload.stage: unknown field"),
    "negative duration": (lambda t: write_scenario(t, workload={**PIPE, "times_us": {"F": -1, "B": 1}}), "workload.times_us.F: negative duration"),
    "unknown profile": (lambda t: write_scenario(t, cluster={"profile": "h900"}), "h900"),
    "unknown kind": (lambda t: write_scenario(t, workload={"kind": "pipe"}), "workload.kind: unknown kind 'pipe'"),
    "cycle": (lambda t: write_scenario(t, workload=_graph(t, {"ops": [{"id": "a", "duration_us": 1}, {"id": "b", "duration_us": 1}],
                                                              "edges": [{"src": "a", "dst": "b"}, {"src": "b", "dst": "a"}]})), "cycle"),
    "malformed graph json": (lambda t: write_scenario(t, workload=_graph(t, "{\"ops\": [")), "invalid JSON"),
    "graph op missing duration": (lambda t: write_scenario(t, workload=_graph(t, {"ops": [{"id": "a"}]})), "ops[0].duration_us: missing"),
    "eligible on no GPU": (lambda t: write_scenario(t, workload=_graph(t, {"ops": [{"id": "a", "duration_us": 1, "devices": [99]}]})), "ops[a].devices: eligible on no GPU"),
    "memory never fits": (lambda t: write_scenario(t, workload={**PIPE, "activation_bytes": 10}, memory={"cap_bytes": 5}), "memory can never fit"),
    "stage on missing GPU": (lambda t: write_scenario(t, placement={"stage_devices": [0, 1, 2, 9]}), "eligible on no GPU"),
}


def _raw(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    make, expected = BAD[case]
    sc = make(tmp_path)
    out = tmp_path / "out" / "plan.json"
    res = CliRunner().invoke(main, ["plan", str(sc), "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plansim: error: "), res.output
    assert expected in lines[0]
    assert not out.exists()


def test_missing_scenario_file(tmp_path):
    res = run("plan", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "file not found" in res.output
