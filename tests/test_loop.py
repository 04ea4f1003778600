"""The simulator-in-the-loop refinement and what-if sweeps."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.core.comm import CommModel
from engine.core.errors import InputError
from engine.planners.validate import validate_plan
from engine.scenario.loader import load_scenario
from engine.study.loop import refine, update_comm
from engine.study.whatif import apply, combinations, parse_vary

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


def _figures(res):
    """(predicted, simulated) per iteration, rounded to 0.1 us as the loop's report prints them."""
    return [(round(it.predicted_us, 1), round(it.simulated_us, 1)) for it in res.iterations]


def test_quickstart_loop_reproduces_readme_figures():
    # README (The loop; bench_loop table): the first plan ships the experts to node 1, predicted
    # 7,230 us, simulated 13,897 us; fed back, the second plan keeps them local: 9,000 = 9,000 us,
    # in 2 iterations, best / first 0.648, final gap 0. With the feedback (update_comm) disabled
    # the re-solve returns the first plan again and the loop stops on patience at 13,897 us.
    sc = load_scenario(SCENARIOS / "quickstart.yaml")
    res = refine(sc, solver_options={"threads": 1})
    assert _figures(res) == [(7230.2, 13896.9), (9000.0, 9000.0)]
    assert res.best_k == 1 and res.converged and "within 1.00%" in res.reason
    assert res.iterations[1].gap == 0.0
    assert round(res.iterations[1].simulated_us / res.iterations[0].simulated_us, 3) == 0.648
    assert res.best_sim.makespan_us == 9000.0 and res.best_plan.makespan_us == 9000.0
    assert validate_plan(res.best_plan, sc.workload, sc.cluster, sc.comm, sc.memory_cap_bytes) == []
    assert {res.best_plan.placements[f"expert{i}"].device for i in range(4)} == {0, 1, 2, 3}
    # what iteration 0 observed: each shipped transfer 2,230.2 us alone, learnt as 7,230.2 us
    assert res.iterations[0].moved[0] == {"edge": "attn0->expert0", "from_us": pytest.approx(2230.2, abs=0.05),
                                          "to_us": pytest.approx(7230.2, abs=0.05)}


def test_contention_2node_loop_reproduces_readme_figures():
    # README: 22,786 -> 9,000 us in 2 iterations (best / first 0.395), final gap 0
    sc = load_scenario(SCENARIOS / "contention_2node.yaml")
    res = refine(sc, solver_options={"threads": 1})
    # iteration 0 ships all eight experts over node 0's one NIC: eight flows share it
    assert _figures(res) == [(7230.2, 22785.8), (9000.0, 9000.0)]
    assert res.best_k == 1 and res.converged and res.iterations[1].gap == 0.0
    assert round(res.iterations[1].simulated_us / res.iterations[0].simulated_us, 3) == 0.395
    assert validate_plan(res.best_plan, sc.workload, sc.cluster, sc.comm, sc.memory_cap_bytes) == []
    # the delay learnt for a shipped edge: 2,230.2 us contention-free, 13,896.9 us after the feedback
    assert sc.comm.delay("embed0", "expert0", 0, 8, 100_000_000) == pytest.approx(2230.2, abs=0.05)
    assert res.comm.delay("embed0", "expert0", 0, 8, 100_000_000) == pytest.approx(13896.9, abs=0.05)


def test_no_contention_stops_after_one_iteration():
    # README table: pipeline_p4_m8, heuristic, 1 iteration, 30,000 us, gap 0
    sc = load_scenario(SCENARIOS / "pipeline_p4_m8.yaml")
    res = refine(sc, planner="heuristic")
    assert _figures(res) == [(30000.0, 30000.0)]
    assert res.best_k == 0 and res.converged and res.iterations[0].gap == 0.0


def test_converged_describes_the_returned_plan_not_the_last_iteration():
    # moe_branchy with the heuristic, 6 iterations: the last (k=5) agrees with the simulator
    # (gap 0.28%) but simulates slower than k=4 (12,329.4 vs 12,190.6 us), which the loop
    # returns; that plan's prediction is 1.25% off, so the result has not converged.
    sc = load_scenario(SCENARIOS / "moe_branchy.yaml")
    res = refine(sc, planner="heuristic", update="both", max_iters=6)
    assert len(res.iterations) == 6 and res.best_k == 4
    last, best = res.iterations[-1], res.iterations[res.best_k]
    assert round(last.simulated_us, 1) == 12329.4 and last.gap <= 0.01
    assert round(best.simulated_us, 1) == 12190.6 and round(best.gap, 4) == 0.0125
    assert res.best_sim.makespan_us == best.simulated_us and res.best_plan.makespan_us == best.predicted_us
    assert not res.converged
    assert "best plan (iteration 4) is 1.25% off its prediction" in res.reason
    assert res.to_dict()["converged"] is False


def test_converged_tie_returns_the_plan_whose_prediction_holds():
    # moe_branchy with the heuristic and update=class: iterations 1-3 all simulate 12,292.3 us; the
    # last agrees with the simulator (gap 0.69%), so the loop returns it and has converged (the
    # first of the three is 11.4% off its prediction).
    sc = load_scenario(SCENARIOS / "moe_branchy.yaml")
    res = refine(sc, planner="heuristic", update="class")
    assert [round(it.simulated_us, 1) for it in res.iterations] == [12431.2, 12292.3, 12292.3, 12292.3]
    assert round(res.iterations[1].gap, 3) == 0.114
    assert res.best_k == 3 and res.converged and round(res.iterations[3].gap, 4) == 0.0069
    assert res.best_plan.makespan_us == res.iterations[3].predicted_us
    assert res.best_sim.makespan_us == res.iterations[3].simulated_us


def test_update_comm_class_and_edge_factors():
    cluster = SimpleNamespace(route_class=lambda a, b: "nic", transfer_time=lambda a, b, n: n / 10.0)
    sim = SimpleNamespace(edges={
        ("a", "b"): {"observed_us": 300.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000},
        ("c", "d"): {"observed_us": 100.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000}})
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


def test_update_comm_skips_free_edges_and_reports_the_largest_moves_first():
    # an edge the model says is free (same GPU or zero bytes: modelled 0 us) carries no ratio;
    # the moved list is sorted by |change|, largest first, then by name, and cut at ``top``
    cluster = SimpleNamespace(route_class=lambda a, b: "nic", transfer_time=lambda a, b, n: n / 10.0)
    sim = SimpleNamespace(edges={
        ("a", "b"): {"observed_us": 120.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000},
        ("c", "d"): {"observed_us": 400.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000},
        ("e", "f"): {"observed_us": 50.0, "modelled_us": 0.0, "src_device": 0, "dst_device": 0, "bytes": 0},
        ("g", "h"): {"observed_us": 200.0, "modelled_us": 100.0, "src_device": 0, "dst_device": 1, "bytes": 1000}})
    comm = CommModel(cluster)
    moved = update_comm(comm, sim, cluster, 1.0, "edge")
    assert ("e", "f") not in comm.edge_scale
    assert [m["edge"] for m in moved] == ["c->d", "g->h", "a->b"]
    assert [m["to_us"] for m in moved] == [pytest.approx(400.0), pytest.approx(200.0), pytest.approx(120.0)]
    assert len(update_comm(CommModel(cluster), sim, cluster, 1.0, "edge")) == 3
    assert [m["edge"] for m in update_comm(CommModel(cluster), sim, cluster, 1.0, "edge", top=1)] == ["c->d"]


def test_loop_cli_json(tmp_path):
    # the README's main command, `plansim loop scenarios/quickstart.yaml`, as JSON
    out = tmp_path / "best.json"
    res = CliRunner().invoke(main, ["loop", str(SCENARIOS / "quickstart.yaml"), "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {"iterations", "best", "converged", "reason"} <= set(d)
    assert {"k", "predicted_us", "simulated_us", "bubble_us", "solve_s", "sim_s"} <= set(d["iterations"][0])
    assert [(round(it["predicted_us"], 1), round(it["simulated_us"], 1)) for it in d["iterations"]] == [
        (7230.2, 13896.9), (9000.0, 9000.0)]
    assert d["best"]["k"] == 1 and d["best"]["simulated_us"] == d["best"]["predicted_us"] == 9000.0
    assert d["converged"] is True
    assert d["best"]["plan_path"] == str(out)
    assert json.loads(out.read_text())["makespan_us"] == 9000.0


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
            "--vary", "workload.stages=4,2", "--no-solve", "--results", str(results)]
    first = CliRunner().invoke(main, args + ["--json", "--csv", str(csv)])
    assert first.exit_code == 0, first.output
    rows = json.loads(first.stdout)["rows"]
    assert len(rows) == 4
    assert [r["simulated_us"] for r in rows] == sorted(r["simulated_us"] for r in rows)
    # the heuristic plans these unit pipelines as 1F1B: (m + p - 1) (F + B) + m W
    assert {(r["vary"]["workload.microbatches"], r["vary"]["workload.stages"]): r["simulated_us"] for r in rows} == {
        (8, 4): 30_000, (8, 2): 26_000, (4, 4): 18_000, (4, 2): 14_000}
    assert len(csv.read_text().splitlines()) == 5
    saved = json.loads(results.read_text())
    assert saved["done"] == saved["total"] == 4 and len(saved["rows"]) == 4
    # an interrupted sweep: keep two rows, as a Ctrl-C after two combinations would, marked with
    # an impossible wall time so a re-run that recomputed them would show
    saved["rows"], saved["done"] = saved["rows"][:2], 2
    for r in saved["rows"]:
        r["wall_s"] = -1.0
    results.write_text(json.dumps(saved))
    again = CliRunner().invoke(main, args)  # the readable report: the resume line goes to stderr
    assert again.exit_code == 0, again.output
    assert f"resuming: 2 of 4 combinations already in {results}" in again.stderr
    final = json.loads(results.read_text())
    assert final["done"] == final["total"] == 4
    by_key = {json.dumps(r["vary"], sort_keys=True): r for r in final["rows"]}
    for r in saved["rows"]:  # kept verbatim, not run again
        assert by_key[json.dumps(r["vary"], sort_keys=True)] == r
    assert sorted(r["wall_s"] > 0 for r in final["rows"]) == [False, False, True, True]  # two were run now
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k != "wall_s"}, sort_keys=True) for r in rs)
    assert strip(final["rows"]) == strip(rows)
    # nothing left to run: --json prints the saved rows, sorted by simulated makespan
    third = CliRunner().invoke(main, args + ["--json"])
    assert third.exit_code == 0, third.output
    assert json.loads(third.stdout)["rows"] == sorted(final["rows"], key=lambda r: r["simulated_us"])


def _default_sigint():
    # a run started in the background inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt; give the child the default disposition so Ctrl-C behaves as in a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_whatif_ctrl_c_leaves_valid_partial_file_and_resumes(tmp_path):
    results = tmp_path / "r.json"
    # m = 8 runs in milliseconds; each of m = 250, 251, 252 takes about half a second (12,000 ops
    # planned and simulated), so a signal sent once the first row is saved lands mid-sweep
    ms = [8, 250, 251, 252]
    cmd = [sys.executable, "-m", "engine.cli", "whatif", str(SCENARIOS / "pipeline_p4_m8.yaml"),
           "--vary", "workload.microbatches=" + ",".join(map(str, ms)), "--results", str(results)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    # the event: the results file is first written when the first combination is saved
    deadline = time.monotonic() + 120
    while not results.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no results file before the sweep ended (rc {proc.wait()}): {proc.stderr.read()}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = json.loads(results.read_text())  # valid JSON
    assert saved["total"] == len(ms) and 1 <= saved["done"] == len(saved["rows"]) < len(ms)
    assert sorted(r["vary"]["workload.microbatches"] for r in saved["rows"]) == ms[:saved["done"]]
    line = re.search(r"plansim: interrupted: (\d+) of (\d+) combinations saved in (.+); "
                     r"run the same command again to resume", err)
    assert line, err
    assert (int(line[1]), int(line[2])) == (saved["done"], len(ms))
    assert Path(line[3]) == results and Path(line[3]).is_file()

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_default_sigint)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {saved['done']} of {len(ms)} combinations already in {results}" in again.stderr
    final = json.loads(results.read_text())
    assert final["done"] == final["total"] == len(ms)
    assert all(r in final["rows"] for r in saved["rows"])  # the saved rows kept as they were, not run again
    # 1F1B on the unit pipeline: (m + 3) (F + B) + m W = 3,000 m + 6,000 us
    assert {r["vary"]["workload.microbatches"]: r["simulated_us"] for r in final["rows"]} == {
        m: 3000 * m + 6000 for m in ms}


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
