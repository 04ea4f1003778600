"""``plansim export --format torch-csv`` on transformer workloads: the CSV reads back as the
schedule's own per-rank actions and obeys torch pipelining's loader rules; the torchtitan settings
match the stage layout; layouts and names torchtitan cannot build are refused in one line."""

from __future__ import annotations

import copy

import pytest
import yaml
from click.testing import CliRunner

from engine.cli import main
from engine.core.errors import InputError
from engine.planners.registry import plan_scenario
from engine.planners.schedules.actions import Action, Overlap
from engine.planners.schedules.torch_csv import read_torch_csv, torch_actions, torch_csv
from engine.planners.schedules.torchtitan import check_schedule_name, csv_layout
from engine.planners.transformer_schedule import scenario_for_schedule, spec_for_schedule, transformer_schedule
from engine.scenario.loader import scenario_from_dict
from engine.workloads.transformer import spec_from_dict

# tp 2, pp 4, dp 2 on two 8-GPU H100 nodes; 8 layers, 8 micro-batches of 1 sequence per replica
BASE = {
    "name": "tiny_gpt", "seed": 0,
    "workload": {"kind": "transformer", "layers": 8, "hidden": 1024, "heads": 16, "seq_len": 1024, "vocab": 1024,
                 "global_batch": 16, "micro_batch": 1, "precision": "bf16",
                 "parallelism": {"tp": 2, "pp": 4, "dp": 2, "vpp": 1, "schedule": "1f1b"}},
    "cluster": {"profile": "h100-sxm", "nodes": 2},
}
NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipev")


def planned(name: str):
    sc = scenario_for_schedule(scenario_from_dict(copy.deepcopy(BASE), "tiny.yaml"), name)
    return sc, plan_scenario(sc, f"schedule:{name}")


def expand_step(step) -> list[tuple[int, str, int]]:
    """A library step as torch actions, the full backward split into I then W."""
    if isinstance(step, Overlap):
        return expand_step(step.forward) + expand_step(step.backward)
    assert isinstance(step, Action)
    kinds = {"F": ["F"], "B": ["I"], "W": ["W"], "BW": ["I", "W"]}[step.phase]
    return [(step.stage, k, step.microbatch) for k in kinds]


def expand_cell(cell) -> list[tuple[int, str, int]]:
    out = []
    for s, k, mb in cell:
        out += [(s, "I", mb), (s, "W", mb)] if k == "B" else [(s, k, mb)]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_csv_reads_back_as_the_schedules_per_rank_actions(name):
    sc, plan = planned(name)
    rows = read_torch_csv(torch_csv(plan, sc.workload))
    spec = spec_for_schedule(spec_from_dict(BASE["workload"]), name)
    schedule = transformer_schedule(spec, sc.workload, name)
    leads = sorted(schedule.ranks)
    assert len(rows) == len(leads) == 4
    for row, lead in zip(rows, leads):
        steps = schedule.ranks[lead]
        assert [a for cell in row for a in expand_cell(cell)] == [a for st in steps for a in expand_step(st)]
        assert sum(len(cell) == 2 for cell in row) == sum(isinstance(st, Overlap) for st in steps)


@pytest.mark.parametrize("name", NAMES)
def test_csv_obeys_torch_pipelinings_loader_rules(name):
    """What ``_validate_schedule`` checks when torch loads a CSV: one row per rank, each stage on
    one rank, m forwards per stage, as many I as W, B + I = m, F before its backward before W."""
    sc, plan = planned(name)
    rows = read_torch_csv(torch_csv(plan, sc.workload))
    m, stages = sc.workload.meta["microbatches"], sc.workload.meta["stages"]
    rank_of: dict[int, int] = {}
    seen: dict[int, dict[str, set[int]]] = {s: {k: set() for k in "FBIW"} for s in range(stages)}
    for r, row in enumerate(rows):
        for s, k, mb in (a for cell in row for a in cell):
            assert rank_of.setdefault(s, r) == r
            if k in "BI":
                assert mb in seen[s]["F"]
            if k == "W":
                assert mb in seen[s]["I"]
            seen[s][k].add(mb)
    for s in range(stages):
        assert seen[s]["F"] == set(range(m)) and seen[s]["I"] == seen[s]["W"]
        assert len(seen[s]["B"]) + len(seen[s]["I"]) == m and not seen[s]["B"] & seen[s]["I"]
    assert [rank_of[s] for s in range(stages)] == sc.workload.meta["stage_ranks"]


def test_a_plan_whose_tp_ranks_disagree_is_refused():
    sc, plan = planned("1f1b")
    seq = plan.order[1]  # TP rank 1 of pipeline rank 0, replica 0
    i, j = seq.index("F1.s0.t1.d0"), seq.index("F2.s0.t1.d0")
    seq[i], seq[j] = seq[j], seq[i]
    with pytest.raises(InputError) as e:
        torch_actions(plan, sc.workload)
    assert e.value.field == "order" and "GPU 1" in e.value.reason and "GPU 0" in e.value.reason


def export(tmp_path, name, *extra):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    plan = tmp_path / f"{name}.json"
    res = CliRunner().invoke(main, ["plan", str(path), "--planner", f"schedule:{name}", "-o", str(plan)])
    assert res.exit_code == 0, res.output
    out = tmp_path / f"{name}.csv"
    res = CliRunner().invoke(main, ["export", str(plan), "--scenario", str(path), "-o", str(out), *extra])
    return res, out


def settings_of(output: str) -> dict[str, str]:
    return dict(line.strip().split(" = ", 1) for line in output.splitlines() if " = " in line)


@pytest.mark.parametrize("name,schedule,per_stage", [("1f1b", "1F1B", 2), ("zb-h1", "1F1B", 2),
                                                     ("interleaved", "Interleaved1F1B", 1),
                                                     ("zb-v", "ZBVZeroBubble", 1), ("dualpipev", "ZBVZeroBubble", 1)])
def test_export_prints_the_torchtitan_settings_of_its_layout(tmp_path, name, schedule, per_stage):
    res, out = export(tmp_path, name)
    assert res.exit_code == 0, res.output
    s = settings_of(res.output)
    assert s["parallelism.pipeline_parallel_degree"] == "4"
    assert s["parallelism.pipeline_parallel_schedule"] == schedule
    assert s["parallelism.pipeline_parallel_schedule_csv"] == str(out)
    # 8 micro-batches of 1 sequence per data-parallel replica (global batch 16 over dp 2)
    assert s["parallelism.pipeline_parallel_microbatch_size"] == "1" and s["training.local_batch_size"] == "8"
    assert s["parallelism.pipeline_parallel_layers_per_stage"] == str(per_stage)
    assert s["parallelism.pipeline_parallel_first_stage_less_layers"] == "0"
    rows = read_torch_csv(out.read_text())
    pairs = sum(len(c) == 2 for row in rows for c in row)
    assert (pairs > 0) == (name == "dualpipev")
    assert ("OVERLAP_F_B pairs run forward then backward, one after the other" in res.output) == (pairs > 0)
    assert f"note: {pairs} OVERLAP_F_B" in res.output or pairs == 0


def test_export_refuses_a_torchtitan_schedule_of_another_layout(tmp_path):
    res, out = export(tmp_path, "zb-v", "--torchtitan-schedule", "Interleaved1F1B")
    assert res.exit_code == 2 and not out.exists()
    [line] = res.output.strip().splitlines()
    assert "--torchtitan-schedule" in line and "in a V" in line and "ZBVZeroBubble" in line
    res, out = export(tmp_path, "interleaved", "--torchtitan-schedule", "zbvzerobubble")
    assert res.exit_code == 2 and "looped" in res.output and not out.exists()
    res, out = export(tmp_path, "1f1b", "--torchtitan-schedule", "Interleaved1F1B")
    assert res.exit_code == 2 and "2 or more stages per rank, the CSV has 1" in res.output
    res, out = export(tmp_path, "zb-v", "--torchtitan-schedule", "dualpipev")
    assert res.exit_code == 0, res.output
    assert settings_of(res.output)["parallelism.pipeline_parallel_schedule"] == "DualPipeV"


def test_layout_rules():
    loop = [[((0, "F", 0),), ((2, "F", 0),)], [((1, "F", 0),), ((3, "F", 0),)]]
    vee = [[((0, "F", 0),), ((3, "F", 0),)], [((1, "F", 0),), ((2, "F", 0),)]]
    assert csv_layout(loop).style == "loop" and csv_layout(vee).style == "v"
    assert check_schedule_name("interleaved1f1b", csv_layout(loop)) == "Interleaved1F1B"
    with pytest.raises(InputError, match="in a V"):
        check_schedule_name("ZBVZeroBubble", csv_layout(loop))
    odd = [[((0, "F", 0),)], [((1, "F", 0),), ((2, "F", 0),)]]
    with pytest.raises(InputError) as e:
        csv_layout(odd)
    assert e.value.field == "placement.stage_devices" and "stage 2 on rank 1" in e.value.reason


def test_export_refuses_a_pipeline_layout_torchtitan_cannot_build(tmp_path):
    raw = {"name": "odd", "cluster": {"profile": "h100-sxm", "nodes": 1},
           "workload": {"kind": "pipeline", "stages": 3, "microbatches": 4, "times_us": {"F": 5, "B": 5, "W": 5}},
           "placement": {"stage_devices": [0, 1, 1]}}
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(raw))
    plan = tmp_path / "p.json"
    assert CliRunner().invoke(main, ["plan", str(path), "-o", str(plan)]).exit_code == 0
    out = tmp_path / "o.csv"
    res = CliRunner().invoke(main, ["export", str(plan), "--scenario", str(path), "-o", str(out)])
    assert res.exit_code == 2 and not out.exists()
    [line] = res.output.strip().splitlines()
    assert "placement.stage_devices" in line and "torchtitan builds stages looped" in line
    res = CliRunner().invoke(main, ["export", str(plan), "--scenario", str(path), "-o", str(out), "--torch-only"])
    assert res.exit_code == 0 and "torchtitan" not in res.output
    assert len(read_torch_csv(out.read_text())) == 2
