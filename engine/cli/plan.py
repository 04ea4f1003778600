"""``plansim plan``: plan a scenario and print (or write) the plan."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import OptionValue, OutputPath, SolverProgress, emit_json, human_bytes, table
from engine.core.errors import write_atomic
from engine.core.ir import Plan, bubble_us, compute_busy_us
from engine.core.options import SolverOptions
from engine.planners.registry import plan_scenario
from engine.planners.transformer_schedule import scenario_for_planner
from engine.planners.validate import peak_memory
from engine.scenario.loader import load_scenario


def plan_summary(plan: Plan, scenario, plan_path: str | None) -> dict:
    """The figures ``plansim plan --json`` prints (times in us, memory in bytes)."""
    wl = scenario.workload
    if plan.makespan_us is None:  # Plan.__post_init__ fills it in
        raise ValueError(f"plan {plan.workload!r} has no makespan")
    makespan = float(plan.makespan_us)
    bubble = bubble_us(plan, wl)
    out = {
        "scenario": scenario.name,
        "planner": plan.planner,
        "status": plan.status,
        "makespan_us": makespan,
        "bubble_us": bubble,
        "bubble_ratio": bubble / makespan if makespan > 0 else 0.0,
        "n_ops": len(wl),
        "busy_us": {str(d): v for d, v in sorted(compute_busy_us(plan, wl).items())},
        "peak_memory_bytes": {str(d): v for d, v in sorted(peak_memory(plan, wl).items())},
        "lower_bound_us": plan.lower_bound_us,
        "mip_gap": plan.mip_gap,
        "solve_s": plan.solve_s,
        "plan_path": plan_path,
        "nic_capacity": bool(plan.meta.get("nic_capacity", False)),
    }
    for key in ("solver", "n_ops_after_merge", "n_binaries"):
        if key in plan.meta:
            out[key] = plan.meta[key]
    return out


def print_summary(summary: dict) -> None:
    click.echo(f"{summary['scenario']}: planner {summary['planner']} ({summary['status']}), {summary['n_ops']} ops")
    click.echo(f"makespan {summary['makespan_us']:,.1f} us   bubble {summary['bubble_us']:,.1f} us "
               f"({100 * summary['bubble_ratio']:.1f}%)   solve {summary['solve_s']:.2f} s")
    if summary.get("lower_bound_us") is not None:
        gap = summary.get("mip_gap")
        click.echo(f"lower bound {summary['lower_bound_us']:,.1f} us" + (f"   gap {100 * gap:.2f}%" if gap is not None else ""))
    rows = [(f"GPU {d}", summary["busy_us"].get(d, 0.0), human_bytes(summary["peak_memory_bytes"].get(d, 0)))
            for d in sorted(summary["busy_us"], key=int)]
    click.echo(table(["device", "busy us", "peak memory"], rows))
    if summary.get("plan_path"):
        click.echo(f"plan written to {summary['plan_path']}")


@click.command("plan")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=OutputPath(), help="Write the plan JSON here.")
@click.option("--planner", help="heuristic, mip or schedule:<name> (default: the scenario's solver.planner).")
@click.option("--solver", "solver_name", help="MIP solver name (highs, gurobi, cplex, scip, cbc).")
@click.option("--time-limit", "time_limit_s", type=OptionValue(SolverOptions, "time_limit_s"), help="MIP time limit in seconds.")
@click.option("--gap", type=OptionValue(SolverOptions, "gap"), help="MIP relative gap at which to stop.")
@click.option("--merge", help="Coarsening before the MIP: auto, none or a target op count.")
@click.option("--nic-capacity", is_flag=True,
              help="MIP: transfers across nodes cannot overlap on one NIC direction (default: solver.nic_capacity).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_cmd(scenario, output, planner, solver_name, time_limit_s, gap, merge, nic_capacity, as_json):
    """Plan SCENARIO and print makespan, bubble, busy time and peak memory per GPU."""
    # schedule:NAME on a transformer plans the model built for NAME (stage placement, gradient edges)
    sc = scenario_for_planner(load_scenario(scenario), planner)
    progress = None if as_json else SolverProgress()
    try:
        plan = plan_scenario(sc, planner, name=solver_name, time_limit_s=time_limit_s, gap=gap, merge=merge,
                             nic_capacity=True if nic_capacity else None, progress=progress)
    finally:
        if progress is not None:
            progress.done()
    if output is not None:
        write_atomic(output, plan.to_json())
    summary = plan_summary(plan, sc, str(output) if output is not None else None)
    if as_json:
        emit_json(summary)
    else:
        print_summary(summary)


commands = [plan_cmd]
