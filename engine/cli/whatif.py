"""``plansim whatif``: the loop (or one simulation) over combinations of changed settings."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.cli.common import OptionValue, OutputPath, emit_json, human_bytes, table
from engine.core.documents import load_yaml
from engine.core.errors import write_atomic
from engine.core.options import SolverOptions
from engine.study.backends import BACKENDS, run_tasks
from engine.study.whatif import (
    build_all,
    combinations,
    combo_key,
    load_results,
    parse_vary,
    run_one,
    save_results,
    sorted_rows,
    to_csv,
)


@click.command("whatif")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--vary", "varies", multiple=True, required=True, metavar="KEY=V1,V2",
              help="A dotted scenario or profile key and its values, e.g. cluster.nodes=1,2,4 (repeatable).")
@click.option("--no-solve", is_flag=True, help="Plan with the heuristic and simulate once; no loop.")
@click.option("--time-limit", "time_limit_s", type=OptionValue(SolverOptions, "time_limit_s"), help="MIP time limit per solve, seconds.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Combinations run in parallel.")
@click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True,
              help="Where combinations run: this machine, or Ray (pip install 'plansim[ray]').")
@click.option("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT, auto) [default: start a local one].")
@click.option("--results", type=OutputPath(),
              help="Results file to resume from and add to [default: whatif-<scenario>.json].")
@click.option("--csv", "csv_path", type=OutputPath(), help="Also write the table as CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def whatif_cmd(scenario, varies, no_solve, time_limit_s, jobs, backend, address, results, csv_path, as_json):
    """Run SCENARIO for every combination of --vary values; print them by simulated makespan."""
    raw = load_yaml(scenario)
    vary = parse_vary(varies)
    keys = [k for k, _ in vary]
    combos = combinations(vary)
    raws = build_all(raw, scenario, combos)
    results = results or Path(f"whatif-{scenario.stem}.json")
    done = load_results(results)
    rows = [done[combo_key(c)] for c in combos if combo_key(c) in done]
    todo = [(c, r) for c, r in zip(combos, raws) if combo_key(c) not in done]
    solver_options = {"time_limit_s": time_limit_s}
    if rows and not as_json:
        click.echo(f"resuming: {len(rows)} of {len(combos)} combinations already in {results}", err=True)

    def finish(combo, figures):
        row = {"vary": combo, **figures}
        # saved before it is counted, so a Ctrl-C during the write never reports a row the file lacks
        save_results(results, scenario.name, rows + [row], len(combos))
        rows.append(row)

    try:
        with click.progressbar(length=len(todo), label="what-if", file=sys.stderr) as bar:
            work = [(r, str(scenario), no_solve, solver_options) for _, r in todo]
            for k, figures in run_tasks(run_one, work, backend=backend, jobs=jobs, address=address):
                finish(todo[k][0], figures)
                bar.update(1)
    except KeyboardInterrupt:
        saved = f"{len(rows)} of {len(combos)} combinations saved in {results}; run the same command again to resume" \
            if rows else "nothing saved"
        click.echo(f"plansim: interrupted: {saved}", err=True)
        raise SystemExit(130)

    ordered = sorted_rows(rows)
    if csv_path is not None:
        write_atomic(csv_path, to_csv(ordered, keys))
    if as_json:
        emit_json({"scenario": scenario.name, "results_path": str(results), "rows": ordered})
        return
    click.echo(table(keys + ["simulated us", "predicted us", "bubble", "peak memory", "iters", "wall s"],
                     [[str(r["vary"][k]) for k in keys] + [r["simulated_us"], r["predicted_us"], f"{r['bubble_ratio']:.1%}",
                      human_bytes(r["peak_memory_bytes"]), r["iterations"], r["wall_s"]] for r in ordered]))
    click.echo(f"results in {results}" + (f", CSV in {csv_path}" if csv_path else ""))


commands = [whatif_cmd]
