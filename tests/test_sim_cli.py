"""``plansim simulate`` and ``plansim collective`` through the CLI."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine.cli import main
from engine.planners.pipeline_time import one_f_one_b_order, semi_active_plan
from engine.planners.registry import plan_scenario
from engine.scenario.loader import load_scenario
from engine.scenario.simulation import simulate_scenario
from engine.workloads.transformer import spec_from_dict
from hardware_profiles import build_cluster, load_profile
from simulator.collectives import collective_time

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"

# Contention-free transfer times by hand from the h100-sxm profile (hardware_profiles/h100-sxm.yaml;
# bandwidth in bytes/us = GB/s x 1000 or Gb/s x 125, times the link's efficiency; time = hop
# latencies + comm.message_overhead_us 5 + bytes / the slowest link's bandwidth).
# Inside a node: GPU -> NVSwitch -> GPU, 2 NVLink hops of 0.5 us, 450 GB/s x 0.8 = 360,000 bytes/us.
NVLINK_BW = 450 * 1000 * 0.8
NVLINK_LAT = 2 * 0.5 + 5.0
# Across nodes on one leaf: GPU -PCIe- NIC -NIC link- leaf -NIC link- NIC -PCIe- GPU, hops of
# 0.5 + 1.0 + 1.0 + 0.5 us; PCIe 64 GB/s x 0.8 = 51,200, NIC 400 Gb/s x 125 x 0.9 = 45,000 bytes/us,
# so the NIC links bound it.
NIC_BW = 400 * 125 * 0.9
NIC_LAT = 0.5 + 1.0 + 1.0 + 0.5 + 5.0


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
    # The heuristic's upward ranks fall layer by layer (F of stage 0 > F of stage 1 > ... > B of
    # stage 3 > ... > B of stage 0), so it places every forward before any backward: GPipe. With
    # F = 500, B = 1000 (full backward, no W), c = one 64 MiB send over NVLink, the last stage's
    # first forward starts at 3(F+c), its forwards and backwards run back to back (8F + 8B), and
    # the last micro-batch's backward then crosses 3 more stages: 3(c+B). Each send is alone on its
    # links (forward sends are c = 192 us < F apart, backward ones come later), so the simulation
    # has no contention and reproduces the plan.
    c = NVLINK_LAT + (64 << 20) / NVLINK_BW
    assert c == pytest.approx(build_cluster(load_profile("h100-sxm"), 1).transfer_time(0, 1, 64 << 20))
    makespan = 3 * (500 + c) + 8 * 500 + 8 * 1000 + 3 * (c + 1000)
    assert out["makespan_us"] == pytest.approx(makespan, rel=1e-9)
    assert out["predicted_makespan_us"] == pytest.approx(makespan, rel=1e-9)
    # every GPU computes 8 x (F + B) = 12,000 us
    assert out["bubble_us"] == pytest.approx(makespan - 12_000, rel=1e-9)
    assert out["bubble_ratio"] == pytest.approx(out["bubble_us"] / out["makespan_us"])
    # all 8 forwards of a stage run before its first backward frees anything: 8 x 1 GiB live
    assert out["oom"] is False and out["peak_memory_bytes"] == 8 << 30
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
    assert run("plan", big, "-o", plan_path).exit_code == 0  # planned without the cap: 8 GiB on every GPU
    # GPU 0 runs F0..F7.s0 back to back (500 us each) before any backward: the 4th forward, F3.s0
    # at 3 x 500 = 1500 us, finds 3 GiB live and takes it to 4 GiB, 0.5 GiB over the 3.5 GiB cap.
    # F3..F7 go over on each of the 4 GPUs: 20 OOM events, the first named and 19 more.
    res = run("simulate", sc, "--plan", plan_path)
    assert res.exit_code == 2
    assert "out of memory on GPU 0 at 1500 us: op F3.s0 allocates 1.000 GiB, 0.500 GiB over the 3.500 GiB cap" \
        in res.output
    assert "(19 more OOM events)" in res.output and "--allow-oom" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = run("simulate", sc, "--plan", plan_path, "--allow-oom", "--json")
    assert res.exit_code == 0
    out = json.loads(res.output)
    assert out["oom"] is True and out["peak_memory_bytes"] == 8 << 30
    assert out["oom_events"][0] == {"device": 0, "op": "F3.s0", "time_us": 1500.0, "bytes": 1 << 30,
                                    "bytes_over": 1 << 29, "cap_bytes": 7 << 29}


def test_shipped_quickstart_simulates_to_the_hand_computed_contention(tmp_path):
    """quickstart: 4 x (attn 1000 us -> dense 4000 us on GPU i of node 0, attn -> expert 4000 us
    anywhere, 100 MB); 2 nodes of 4 GPUs, one NIC each. Figures by hand (NIC_BW, NIC_LAT above)."""
    plan_path = tmp_path / "heuristic.json"
    assert run("plan", QUICKSTART, "--planner", "heuristic", "-o", plan_path).exit_code == 0
    plan = json.loads(plan_path.read_text())["placements"]
    # Contention-free, an expert ends earliest on an idle GPU of node 1: attn ends at 1000, the
    # transfer takes t = NIC_LAT + 1e8 / NIC_BW = 8 + 2222.2 us, the expert 4000 more (on node 0 it
    # would wait for a dense op: 1000 + 4000 + 4000 = 9000 us). One expert per node-1 GPU.
    t = NIC_LAT + 1e8 / NIC_BW
    predicted = 1000 + t + 4000
    assert sorted(plan[f"expert{i}"]["device"] for i in range(4)) == [4, 5, 6, 7]
    assert all(plan[f"expert{i}"]["start"] == pytest.approx(1000 + t, rel=1e-9) for i in range(4))
    # In the simulator the four transfers start together at 1000 us and all cross node 0's one NIC
    # (nic0.0 -> leaf0 -> nic1.0): max-min fair, each gets NIC_BW / 4 (PCIe is not the bottleneck),
    # so each moves its 1e8 bytes in 4 x 2222.2 us; contention adds 3 x 2222.2 = 6666.7 us.
    contended = NIC_LAT + 1e8 / (NIC_BW / 4)
    simulated = 1000 + contended + 4000
    results = {}
    for flags in ((), ("--no-symmetry",)):
        res = run("simulate", QUICKSTART, "--json", "-o", tmp_path / "r.json", *flags)
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["planner"] == "heuristic" and out["symmetry"]["enabled"] is not bool(flags)
        assert out["predicted_makespan_us"] == pytest.approx(predicted, rel=1e-9)
        assert out["makespan_us"] == pytest.approx(simulated, rel=1e-9)
        # node 0's GPUs compute attn + dense = 5000 us, the most of any GPU
        assert out["bubble_us"] == pytest.approx(simulated - 5000, rel=1e-9)
        links = {r["link"]: r for r in out["link_utilization"]}
        # the NIC link carries all 4 x 1e8 bytes, busy 4e8 / NIC_BW us of the makespan
        assert links["nic0.0->leaf0"]["bytes"] == 4 * 10**8
        assert links["nic0.0->leaf0"]["utilization"] == pytest.approx(4e8 / NIC_BW / simulated, rel=1e-9)
        full = json.loads((tmp_path / "r.json").read_text())
        results[flags] = (full["ops"], full["devices"], full["edges"])
        assert full["ops"]["expert0"]["start_us"] == pytest.approx(1000 + contended, rel=1e-9)
        assert all(e["observed_us"] == pytest.approx(contended, rel=1e-9) for e in full["edges"].values())
    # the four attn -> expert chains run in lock-step: simulating one per class changes nothing
    assert results[()] == results[("--no-symmetry",)]
    # without link sharing (alpha_beta) every transfer takes its contention-free time: the plan's
    res = run("simulate", QUICKSTART, "--json", "--plan", plan_path, "--mode", "alpha_beta")
    assert json.loads(res.output)["makespan_us"] == pytest.approx(predicted, rel=1e-9)


def test_pipeline_without_communication_simulates_to_its_plan(tmp_path):
    """pipeline_p4_m8: p=4, m=8, F=B=W=1000 us, no sends, no memory. The heuristic's plan (30,000
    us, derived in test_scenario_cli) is semi-active and nothing is shared, so the simulation
    reproduces it exactly; bubble = makespan - max busy = 30,000 - 8 x 3000."""
    res = run("simulate", ROOT / "scenarios" / "pipeline_p4_m8.yaml", "--json", "-o", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["makespan_us"] == out["predicted_makespan_us"] == 30_000
    assert out["bubble_us"] == 30_000 - 24_000 and out["bubble_ratio"] == pytest.approx(0.2)
    assert out["link_utilization"] == [] and out["peak_memory_bytes"] == 0
    devices = json.loads((tmp_path / "r.json").read_text())["devices"]
    assert {d: (v["busy_us"], v["bubble_us"]) for d, v in devices.items()} == {
        str(g): (24_000, 6_000) for g in range(4)}


GPT1B = ROOT / "scenarios" / "transformer_gpt1b_h100.yaml"


def test_simulate_runs_the_transformer_workloads_named_schedule():
    """``parallelism.schedule: 1f1b`` is what ``plansim simulate`` runs: Megatron's 1F1B order
    (semi-active), not the heuristic's plan, which runs every forward before any backward."""
    res = run("simulate", str(GPT1B), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["planner"] == "schedule:1f1b"
    sc = load_scenario(GPT1B)
    order = one_f_one_b_order(spec_from_dict(sc.raw["workload"]), sc.workload)
    one_f_one_b = simulate_scenario(sc, semi_active_plan(sc.workload, order, sc.cluster, sc.comm))
    assert out["makespan_us"] == pytest.approx(one_f_one_b.makespan_us)
    # 1F1B keeps at most pp micro-batches in flight on the first stage; the heuristic's
    # all-forwards-first plan is a third slower here (330,451 against 226,559 us)
    heuristic = simulate_scenario(sc, plan_scenario(sc, "heuristic"))
    assert out["makespan_us"] < 0.75 * heuristic.makespan_us


def test_a_transformer_schedule_that_does_not_fit_is_refused_in_one_line(tmp_path):
    raw = yaml.safe_load(GPT1B.read_text())
    raw["workload"]["parallelism"]["schedule"] = "dualpipe"
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = run("simulate", str(path))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "workload.parallelism.schedule" in lines[0] and "dualpipe" in lines[0], res.output


def test_a_transformer_schedule_over_the_memory_cap_is_infeasible_in_one_line(tmp_path):
    # 1F1B keeps pp micro-batches in flight on the first stage: 9.5 GiB is below its peak there
    raw = yaml.safe_load(GPT1B.read_text())
    raw["memory"] = {"cap_gib": 9.5}
    path = tmp_path / "capped.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = run("simulate", str(path))
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "memory.cap_bytes" in line and "schedule 1f1b needs" in line


def test_a_transformer_planned_with_an_unknown_schedule_is_refused():
    """(Another known schedule than the one the workload was built for plans the model built for
    it: tests/test_transformer_schedules.py.)"""
    res = run("plan", str(GPT1B), "--planner", "schedule:nope")
    assert res.exit_code == 2 and "solver.planner" in res.output and len(res.output.strip().splitlines()) == 1, res.output
