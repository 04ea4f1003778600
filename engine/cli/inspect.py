"""``plansim check``, ``plansim trace`` and ``plansim gen-graph``: look at and make inputs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.cli.common import OutputPath, emit_json
from engine.core.documents import read_text
from engine.core.errors import InputError, write_atomic
from engine.core.ir import Plan
from engine.planners.validate import validate_plan
from engine.scenario.loader import load_scenario
from engine.workloads.graphgen import GRAPH_KINDS, generate


def read_plan(path: Path) -> Plan:
    return Plan.from_json(read_text(path), str(path))


def plan_chrome_trace(plan: Plan, workload=None) -> dict:
    """A Chrome trace of a plan: one process per GPU, one thread per stream (us timestamps)."""
    events = []
    for d in plan.devices:
        events.append({"name": "process_name", "ph": "M", "pid": d, "tid": 0, "args": {"name": f"GPU {d}"}})
        for tid, stream in enumerate(("compute", "comm")):
            events.append({"name": "thread_name", "ph": "M", "pid": d, "tid": tid, "args": {"name": stream}})
    for op_id, p in sorted(plan.placements.items(), key=lambda kv: (kv[1].device, kv[1].start, kv[0])):
        op = workload.op(op_id) if workload is not None else None
        tid = 1 if op is not None and op.kind == "comm" else 0
        args = {"op": op_id}
        if op is not None and op.phase:
            args["phase"] = op.phase
        events.append({"name": op_id, "cat": (op.phase or op.kind) if op else "op", "ph": "X", "pid": p.device,
                       "tid": tid, "ts": p.start, "dur": p.end - p.start, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"planner": plan.planner, "makespan_us": plan.makespan_us}}


@click.command("check")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_cmd(plan_path, scenario, as_json):
    """Validate PLAN against SCENARIO: precedence + comm delay, overlap, eligibility, memory.

    Exits 0 when the plan is valid, 1 when it has violations (each printed on one line).
    """
    sc = load_scenario(scenario)
    plan = read_plan(plan_path)
    violations = validate_plan(plan, sc.workload, sc.cluster, sc.comm, sc.memory_cap_bytes)
    if as_json:
        emit_json({"valid": not violations, "violations": violations})
    elif violations:
        for v in violations:
            click.echo(v)
        click.echo(f"{len(violations)} violation(s)")
    else:
        click.echo(f"{plan_path}: valid ({len(plan.placements)} ops, makespan {plan.makespan_us:,.1f} us)")
    raise SystemExit(1 if violations else 0)


@click.command("trace")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=OutputPath(),
              help="Chrome-trace JSON to write (open it in Perfetto).")
@click.option("--scenario", type=click.Path(dir_okay=False, path_type=Path),
              help="The plan's scenario, to label streams and phases.")
def trace_cmd(plan_path, output, scenario):
    """Write PLAN's timeline as a Chrome trace, one track per GPU."""
    plan = read_plan(plan_path)
    workload = load_scenario(scenario).workload if scenario else None
    if workload is not None:
        unknown = sorted(set(plan.placements) - set(workload.ops))
        if unknown:
            raise InputError(plan_path, f"placements.{unknown[0]}", "op not in the scenario's workload")
    write_atomic(output, json.dumps(plan_chrome_trace(plan, workload), sort_keys=True))
    click.echo(f"trace written to {output}")


@click.command("gen-graph")
@click.option("--kind", type=click.Choice(GRAPH_KINDS), default="layered", show_default=True)
@click.option("--ops", "n_ops", type=click.IntRange(min=1), default=50, show_default=True, help="Number of ops.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gpus", type=click.IntRange(min=1), help="GPUs to draw eligible subsets from.")
@click.option("--eligible", type=click.IntRange(min=1), help="Each op may run on this many random GPUs (needs --gpus).")
@click.option("--edge-bytes", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--memory-bytes", type=click.IntRange(min=0), default=0, show_default=True, help="Allocated by every op.")
@click.option("--experts", type=click.IntRange(min=1), default=4, show_default=True, help="Experts per MoE block.")
@click.option("-o", "--output", required=True, type=OutputPath())
def gen_graph_cmd(kind, n_ops, seed, gpus, eligible, edge_bytes, memory_bytes, experts, output):
    """Generate a random branchy op graph (graph workload JSON)."""
    graph = generate(kind, n_ops, seed, gpus=gpus, eligible=eligible, edge_bytes=edge_bytes,
                     memory_bytes=memory_bytes, experts=experts)
    write_atomic(output, json.dumps(graph, indent=1, sort_keys=True) + "\n")
    click.echo(f"{len(graph['ops'])} ops, {len(graph['edges'])} edges written to {output}")


commands = [check_cmd, trace_cmd, gen_graph_cmd]
