"""``plansim simulate`` and ``plansim collective`` through the CLI."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine.cli import main
from hardware_profiles import build_cluster, load_profile
from simulator.collectives import collective_time

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def scenario(tmp_path, name="s.yaml", **changes):
    raw = {"name": "pipe", "seed": 3,
           "workload": {"kind": "pipeline", "stages": 4, "microbatches": 8,
                        "times_us": {"F": 500, "B": 1000}, "activation_bytes": 1 << 30, "send_bytes": 64 << 20},
           "cluster": {"profile": "h100-sxm", "nodes": 1}}
    raw.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_collective_prints_nccl_tests_figures():
    res = run("collective", "--profile", "h100-sxm", "--nodes", 1, "--gpus-per-node", 8, "--op", "all_gather",
              "--bytes", "1GiB", "--algo", "ring", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    t = collective_time(build_cluster(load_profile("h100-sxm"), 1), "all_gather", 1 << 30, range(8), "ring")
    assert out["time_us"] == pytest.approx(t, rel=1e-9)
    assert out["algbw_gbs"] == pytest.approx((1 << 30) / t / 1e3)
    assert out["busbw_gbs"] == pytest.approx(out["algbw_gbs"] * 7 / 8)
    res = json.loads(run("collective", "--nodes", 2, "--gpus-per-node", 1, "--op", "sendrecv", "--bytes",
                         "256MiB", "--json").output)
    assert res["op"] == "send_recv" and res["busbw_gbs"] == res["algbw_gbs"]
    res = json.loads(run("collective", "--nodes", 1, "--op", "all_reduce", "--bytes", "4GiB", "--json").output)
    assert res["algo"] == "nvls" and res["busbw_gbs"] == pytest.approx(res["algbw_gbs"] * 1.75)
    human = run("collective", "--nodes", 2, "--op", "alltoall", "--bytes", "1GiB")
    assert human.exit_code == 0 and "busbw" in human.output


@pytest.mark.parametrize("args,msg", [
    (["--bytes", "12XB"], "cannot read size"),
    (["--gpus-per-node", "9"], "must be 1..8"),
    (["--op", "gather"], "unknown collective"),
    (["--algo", "tree", "--op", "all_gather"], "no algorithm"),
])
def test_collective_bad_input_is_one_line(args, msg):
    res = run("collective", *args)
    assert res.exit_code == 2
    assert msg in res.output and len(res.output.strip().splitlines()) == 1


def test_simulate_json_and_deterministic_trace(tmp_path):
    sc = scenario(tmp_path)
    res = run("simulate", sc, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    for key in ("makespan_us", "bubble_us", "bubble_ratio", "peak_memory_bytes", "oom", "events", "sim_wall_s",
                "link_utilization"):
        assert key in out
    assert out["oom"] is False and out["events"] > 0 and out["peak_memory_bytes"] >= 4 << 30
    assert out["bubble_ratio"] == pytest.approx(out["bubble_us"] / out["makespan_us"])
    assert out["link_utilization"][0]["link"].startswith(("gpu", "nvsw"))
    traces = []
    for i in range(2):
        trace, result = tmp_path / f"t{i}.json", tmp_path / f"r{i}.json"
        res = run("simulate", sc, "--trace", trace, "--out", result, "--jitter", 0.02, "--seed", 5)
        assert res.exit_code == 0, res.output
        traces.append((trace.read_bytes(), result.read_bytes()))
    assert traces[0] == traces[1]
    doc = json.loads(traces[0][0])
    phs = {ev["ph"] for ev in doc["traceEvents"]}
    assert {"M", "X", "C"} <= phs
    names = {ev["args"]["name"] for ev in doc["traceEvents"] if ev["ph"] == "M" and ev["name"] == "thread_name"}
    assert names == {"compute", "comm"}
    assert any(ev["ph"] == "C" and ev["name"] == "memory" for ev in doc["traceEvents"])
    assert any(ev["ph"] == "C" and "->" in ev["name"] for ev in doc["traceEvents"])
    assert json.loads(traces[0][1])["seed"] == 5


def test_simulate_a_given_plan_and_bad_plans(tmp_path):
    sc = scenario(tmp_path)
    plan_path = tmp_path / "plan.json"
    assert run("plan", sc, "-o", plan_path).exit_code == 0
    res = run("simulate", sc, "--plan", plan_path, "--json", "--mode", "alpha_beta")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["makespan_us"] == pytest.approx(out["predicted_makespan_us"], rel=1e-9)
    other = scenario(tmp_path, "other.yaml", workload={"kind": "pipeline", "stages": 4, "microbatches": 4,
                                                      "times_us": {"F": 1, "B": 1}})
    res = run("simulate", other, "--plan", plan_path)
    assert res.exit_code == 2
    assert str(plan_path) in res.output and "not in workload" in res.output
    assert len(res.output.strip().splitlines()) == 1
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    res = run("simulate", sc, "--plan", broken)
    assert res.exit_code == 2 and "invalid JSON" in res.output


def test_simulate_out_of_memory_exits_2_unless_allowed(tmp_path):
    sc = scenario(tmp_path, memory={"cap_gib": 3.5})
    plan_path = tmp_path / "plan.json"
    big = scenario(tmp_path, "big.yaml")
    assert run("plan", big, "-o", plan_path).exit_code == 0  # planned without the cap: 4 GiB on GPU 0
    res = run("simulate", sc, "--plan", plan_path)
    assert res.exit_code == 2
    assert "out of memory on GPU 0" in res.output and "--allow-oom" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = run("simulate", sc, "--plan", plan_path, "--allow-oom", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["oom"] is True


def test_shipped_quickstart_simulates():
    res = run("simulate", ROOT / "scenarios" / "quickstart.yaml", "--json", "--no-symmetry")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["symmetry"]["enabled"] is False and out["makespan_us"] > 0
