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
    # one stage does 8 x (F + B + W) = 24 ms of work; nothing can be shorter, and p-1 fills
    # and drains make the optimum 27 ms
    assert 27_000 <= summary["makespan_us"] <= 40_000
    assert summary["bubble_us"] == pytest.approx(summary["makespan_us"] - 24_000)
    check = run("check", out, ROOT / "scenarios" / "pipeline_p4_m8.yaml")
    assert check.exit_code == 0, check.output


def test_quickstart_runs_readable(tmp_path):
    res = run("plan", ROOT / "scenarios" / "quickstart.yaml")
    assert res.exit_code == 0, res.output
    assert "makespan" in res.output and "GPU 3" in res.output


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
