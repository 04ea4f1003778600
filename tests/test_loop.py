"""The simulator-in-the-loop refinement and what-if sweeps."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from engine.cli import main
from engine.cost import CommModel
from engine.errors import InputError
from engine.loop import refine, update_comm
from engine.scenario import load_scenario
from engine.validate import validate_plan
from engine.whatif import apply, combinations, parse_vary

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


def test_contention_2node_loop_beats_first_plan_and_converges():
    sc = load_scenario(SCENARIOS / "contention_2node.yaml")
    res = refine(sc, solver_options={"threads": 1})
    first, best = res.iterations[0], res.iterations[res.best_k]
    # iteration 0 ships all eight experts over node 0's one NIC: eight flows share it
    assert first.simulated_us > 2 * first.predicted_us
    assert best.simulated_us <= 0.9 * first.simulated_us
    assert res.converged and res.iterations[-1].gap <= 0.02
    assert validate_plan(res.best_plan, sc.workload, sc.cluster, sc.comm, sc.memory_cap_bytes) == []
    # the contention factor learnt for a shipped edge is about the number of flows sharing the NIC
    learnt = res.comm.delay("embed0", "expert0", 0, 8, 100_000_000)
    assert learnt > 3 * sc.comm.delay("embed0", "expert0", 0, 8, 100_000_000)


def test_no_contention_stops_after_one_iteration():
    sc = load_scenario(SCENARIOS / "pipeline_p4_m8.yaml")
    res = refine(sc, planner="heuristic")
    assert len(res.iterations) == 1 and res.converged
    assert res.iterations[0].gap <= 0.001


def test_quickstart_loop_keeps_best_and_never_worse():
    sc = load_scenario(SCENARIOS / "quickstart.yaml")
    res = refine(sc, solver_options={"threads": 1})
    sims = [it.simulated_us for it in res.iterations]
    assert res.iterations[res.best_k].simulated_us == min(sims) <= sims[0]
    assert res.best_sim.makespan_us == min(sims)


def test_update_comm_class_and_edge_factors():
    cluster = SimpleNamespace(route_class=lambda a, b: "nic", transfer_time=lambda a, b, n: n / 10.0)
    sim = SimpleNamespace(edges={
        "a->b": {"observed_us": 300.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000},
        "c->d": {"observed_us": 100.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000}})
    comm = CommModel(cluster)
    update_comm(comm, sim, cluster, 1.0, "class")
    assert comm.class_scale == {"nic": 2.0} and comm.edge_scale == {}
    comm = CommModel(cluster)
    update_comm(comm, sim, cluster, 0.5, "edge")
    assert comm.edge_scale == {("a", "b"): 2.0, ("c", "d"): 1.0}
    comm = CommModel(cluster)
    moved = update_comm(comm, sim, cluster, 1.0, "both")
    assert comm.class_scale["nic"] == 2.0 and comm.edge_scale[("a", "b")] == 1.5
    assert comm.delay("a", "b", 0, 1, 1000) == pytest.approx(300.0) and comm.delay("c", "d", 0, 1, 1000) == pytest.approx(100.0)
    assert moved[0] == {"edge": "a->b", "from_us": 100.0, "to_us": pytest.approx(300.0)}


def test_loop_cli_json(tmp_path):
    out = tmp_path / "best.json"
    res = CliRunner().invoke(main, ["loop", str(SCENARIOS / "quickstart.yaml"), "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert {"iterations", "best", "converged", "reason"} <= set(d)
    assert {"k", "predicted_us", "simulated_us", "bubble_us", "solve_s", "sim_s"} <= set(d["iterations"][0])
    assert d["best"]["plan_path"] == str(out) and out.exists()


def test_vary_parsing_and_keys():
    vary = parse_vary(["cluster.nodes=1,2", "profile=h100-sxm,h800-sxm", "cluster.fabric.oversubscription=1,2.5"])
    assert vary == [("cluster.nodes", [1, 2]), ("cluster.profile", ["h100-sxm", "h800-sxm"]),
                    ("cluster.fabric.oversubscription", [1, 2.5])]
    assert len(combinations(vary)) == 8
    raw = apply({"cluster": {"profile": "h100-sxm"}}, "cluster.fabric.oversubscription", 2)
    assert raw["cluster"]["overrides"] == {"fabric.oversubscription": 2}
    with pytest.raises(InputError):
        parse_vary(["cluster.nodes"])


@pytest.mark.parametrize("vary, named", [
    ("cluster.fabric.oversubscripton=1,2", "cluster.fabric.oversubscripton"),
    ("cluster.nodes=1,zero", "cluster.nodes"),
    ("solver.time_limt_s=1", "solver.time_limt_s"),
])
def test_whatif_bad_vary_fails_before_running(tmp_path, vary, named):
    results = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["whatif", str(SCENARIOS / "pipeline_p4_m8.yaml"), "--vary", vary,
                                    "--results", str(results), "--no-solve"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("plansim: error:") and named in line
    assert not results.exists()


def test_whatif_runs_sorts_and_resumes(tmp_path):
    results, csv = tmp_path / "r.json", tmp_path / "r.csv"
    args = ["whatif", str(SCENARIOS / "pipeline_p4_m8.yaml"), "--vary", "workload.microbatches=8,4",
            "--vary", "workload.stages=4,2", "--no-solve", "--results", str(results), "--json"]
    first = CliRunner().invoke(main, args + ["--csv", str(csv)])
    assert first.exit_code == 0, first.output
    rows = json.loads(first.output[first.output.index("{"):])["rows"]
    assert len(rows) == 4
    assert [r["simulated_us"] for r in rows] == sorted(r["simulated_us"] for r in rows)
    # the heuristic plans these unit pipelines as 1F1B: (m + p - 1) (F + B) + m W
    assert {(r["vary"]["workload.microbatches"], r["vary"]["workload.stages"]): r["simulated_us"] for r in rows} == {
        (8, 4): 30_000, (8, 2): 26_000, (4, 4): 18_000, (4, 2): 14_000}
    assert len(csv.read_text().splitlines()) == 5
    # an interrupted sweep: keep two rows, as a Ctrl-C after two combinations would
    saved = json.loads(results.read_text())
    saved["rows"] = saved["rows"][:2]
    results.write_text(json.dumps(saved))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "resuming" not in again.output or "2 of 4" in again.output
    rerun = json.loads(again.output[again.output.index("{"):])["rows"]
    strip = lambda rs: sorted((json.dumps({k: v for k, v in r.items() if k != "wall_s"}, sort_keys=True) for r in rs))
    assert strip(rerun) == strip(rows)
    kept = {json.dumps(r, sort_keys=True) for r in saved["rows"]}
    assert kept <= {json.dumps(r, sort_keys=True) for r in rerun}  # the saved rows were not run again


def test_whatif_ctrl_c_leaves_valid_partial_file_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    results = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "engine.cli", "whatif", str(SCENARIOS / "pipeline_p4_m8.yaml"),
           "--vary", "workload.microbatches=8,16,32,64,128,256", "--vary", "solver.planner=heuristic",
           "--results", str(results)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not results.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    saved = json.loads(results.read_text())  # valid JSON whenever it was interrupted
    assert 1 <= saved["done"] == len(saved["rows"]) <= 6
    if saved["done"] < 6:
        assert proc.returncode == 130 and "run the same command again to resume" in err
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(results.read_text())["done"] == 6


def test_loop_writes_trace_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"
    res = CliRunner().invoke(main, ["loop", str(SCENARIOS / "quickstart.yaml"), "--trace", str(trace),
                                    "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    # the best plan keeps the 4 experts local: every op on GPUs 0-3
    assert {e["name"] for e in events if e["ph"] == "X"} >= {f"expert{i}" for i in range(4)}
    assert all(e["pid"] in (0, 1, 2, 3) for e in events if e["ph"] == "X" and e["name"].startswith("expert"))
