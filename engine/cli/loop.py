"""``plansim loop``: plan, simulate, feed the observed contention back, plan again."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import OptionValue, OutputPath, emit_json, human_bytes, table
from engine.core.errors import write_atomic
from engine.core.options import LoopOptions, SolverOptions
from engine.scenario.loader import load_scenario
from engine.scenario.simulation import simulate_scenario
from engine.study.loop import UPDATE_MODES, Iteration, refine
from engine.study.plotting import plot_loop, require_matplotlib
from simulator.trace import write_trace


def _print_progress(it: Iteration) -> None:
    click.echo(f"  iteration {it.k}: predicted {it.predicted_us:,.1f} us, simulated {it.simulated_us:,.1f} us "
               f"(gap {it.gap:.2%}), solve {it.solve_s:.1f} s", err=True)


def print_report(result, scenario_name: str) -> None:
    rows = [(it.k, it.predicted_us, it.simulated_us, f"{it.gap:.2%}", it.bubble_us, human_bytes(it.peak_memory_bytes),
             it.solve_s, it.sim_s, it.status) for it in result.iterations]
    click.echo(table(["k", "predicted us", "simulated us", "gap", "bubble us", "peak memory", "solve s", "sim s",
                      "status"], rows))
    for it in result.iterations:
        if it.moved:
            moved = ", ".join(f"{m['edge']} {m['from_us']:,.1f}->{m['to_us']:,.1f} us" for m in it.moved[:3])
            click.echo(f"after {it.k}: delays moved most: {moved}")
    best = result.iterations[result.best_k]
    first = result.iterations[0]
    gain = 1 - best.simulated_us / first.simulated_us if first.simulated_us > 0 else 0.0
    click.echo(f"{scenario_name}: best plan from iteration {result.best_k}: simulated {best.simulated_us:,.1f} us "
               f"({gain:.1%} below iteration 0); {'converged' if result.converged else 'not converged'}: {result.reason}")


@click.command("loop")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=OutputPath(), help="Write the best plan JSON here.")
@click.option("--planner", help="heuristic, mip or schedule:<name> (default: the scenario's solver.planner).")
@click.option("--time-limit", "time_limit_s", type=OptionValue(SolverOptions, "time_limit_s"), help="MIP time limit per iteration, seconds.")
@click.option("--max-iters", type=OptionValue(LoopOptions, "max_iters"), help="Override loop.max_iters.")
@click.option("--tolerance", type=OptionValue(LoopOptions, "tolerance"), help="Override loop.tolerance (relative).")
@click.option("--update", type=click.Choice(UPDATE_MODES), help="Override loop.update.")
@click.option("--trace", type=OutputPath(), help="Chrome trace of the best plan's simulation.")
@click.option("--plot", type=OutputPath(), help="PNG: predicted vs simulated makespan per iteration.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def loop_cmd(scenario, output, planner, time_limit_s, max_iters, tolerance, update, trace, plot, as_json):
    """Refine SCENARIO's plan with the contention the simulator observes, until they agree."""
    sc = load_scenario(scenario)
    if plot is not None:
        require_matplotlib()
    result = refine(sc, planner=planner, progress=None if as_json else _print_progress,
                    solver_options={"time_limit_s": time_limit_s}, max_iters=max_iters, tolerance=tolerance,
                    update=update)
    if output is not None:
        write_atomic(output, result.best_plan.to_json())
    if trace is not None:
        write_trace(simulate_scenario(sc, result.best_plan, timeline=True), sc.workload, sc.cluster, trace)
    if plot is not None:
        plot_loop(result, plot, sc.name)
    if as_json:
        emit_json(result.to_dict(str(output) if output is not None else None))
    else:
        print_report(result, sc.name)


commands = [loop_cmd]
