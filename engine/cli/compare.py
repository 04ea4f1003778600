"""``plansim compare`` (known pipeline schedules vs the heuristic vs the MIP, each simulated) and
``plansim export`` (a plan's per-rank order as PyTorch pipelining CSV, and the torchtitan settings
to run it with)."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import OptionValue, OutputPath, emit_json, human_bytes, table
from engine.cli.inspect import read_plan
from engine.core.errors import InputError, write_atomic
from engine.core.options import SolverOptions
from engine.planners.schedules.library import SCHEDULE_NAMES
from engine.planners.schedules.torch_csv import read_torch_csv, torch_csv
from engine.planners.schedules.torchtitan import SCHEDULE_STYLES, csv_layout, torchtitan_settings
from engine.planners.transformer_schedule import is_transformer, scenario_for_plan
from engine.scenario.loader import load_scenario
from engine.study.compare import compare

ROW_ORDER = SCHEDULE_NAMES + ("heuristic", "mip")
PHASE_COLOURS = {"F": "#4c78a8", "B": "#f58518", "W": "#54a24b", "BW": "#e45756", "F&B": "#b279a2"}


def parse_schedules(text: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list of schedule names."""
    if text.strip() == "all":
        return SCHEDULE_NAMES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if n not in SCHEDULE_NAMES:
            raise InputError(None, "--schedules", f"unknown schedule {n!r}; one of all, {', '.join(SCHEDULE_NAMES)}")
    return names


def plot_gantt(entries: dict, path: Path) -> None:
    """One Gantt chart per plan (rows = GPUs, colour = op phase), from the simulated op times."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise InputError(None, "--plot", "needs matplotlib: pip install 'plansim[plot]'") from None
    names = [n for n in ROW_ORDER if n in entries]
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 1.2 + 0.9 * len(names) * 2), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        e = entries[name]
        ops = e["workload"].ops
        bars: dict[str, list] = {}
        for o, (d, s, t) in sorted(e["sim"].op_times.items()):
            op = ops[o]
            if op.kind != "compute":
                continue
            bars.setdefault(op.phase if op.phase in PHASE_COLOURS else "other", []).append((d, s / 1e3, (t - s) / 1e3))
        for phase, items in sorted(bars.items()):
            for d, s, w in items:
                ax.broken_barh([(s, w)], (d - 0.4, 0.8), facecolors=PHASE_COLOURS.get(phase, "#9d9d9d"),
                               edgecolor="white", linewidth=0.3)
        gpus = sorted({d for d, _, _ in e["sim"].op_times.values()})
        ax.set_yticks(gpus)
        ax.set_yticklabels([f"GPU {g}" for g in gpus], fontsize=6)
        ax.invert_yaxis()
        row = e["row"]
        ax.set_title(f"{name}: makespan {row['makespan_us'] / 1e3:,.1f} ms, bubble {row['bubble_us'] / 1e3:,.1f} ms, "
                     f"peak {human_bytes(row['peak_memory_bytes'])}", fontsize=8)
        ax.tick_params(axis="x", labelsize=6)
    axes[-1, 0].set_xlabel("time (ms)")
    fig.legend(handles=[Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()], loc="upper right", fontsize=7, ncol=5)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, buf.getvalue())


@click.command("compare")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--schedules", "schedules", default="all", show_default=True,
              help=f"all, or a comma-separated list of: {', '.join(SCHEDULE_NAMES)}.")
@click.option("--mip-cap", "cap_from",
              help="MIP memory cap per GPU: a schedule name (its peak) or bytes. Default: the scenario's cap, "
                   "else the smallest peak among the known schedules.")
@click.option("--time-limit", "time_limit_s", type=OptionValue(SolverOptions, "time_limit_s"), help="MIP time limit in seconds (default: the scenario's).")
@click.option("--threads", type=OptionValue(SolverOptions, "threads"), help="HiGHS threads (default: the scenario's).")
@click.option("--no-mip", is_flag=True, help="Skip the MIP.")
@click.option("--no-heuristic", is_flag=True, help="Skip the heuristic.")
@click.option("--plot", "plot_path", type=OutputPath(),
              help="Draw every plan as a Gantt chart (PNG; needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compare_cmd(scenario, schedules, cap_from, time_limit_s, threads, no_mip, no_heuristic, plot_path, as_json):
    """Plan SCENARIO with every applicable known schedule, the heuristic and the MIP; simulate each.

    Known schedules run as a runtime executes them (each step one op, F&B overlap applied) on the
    layout they need for the scenario's model; the heuristic and the MIP plan the scenario's own
    workload, the MIP under a memory cap. Prints makespan, bubble, bubble ratio, peak activation
    memory per GPU and solve time (simulated figures).
    """
    names = parse_schedules(schedules)
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError(None, "--plot", "needs matplotlib: pip install 'plansim[plot]'") from None
    sc = load_scenario(scenario)
    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    result = compare(sc, names, heuristic=not no_heuristic, mip=not no_mip, cap_from=cap_from,
                     time_limit_s=time_limit_s, threads=threads, progress=say)
    if plot_path is not None:
        plot_gantt(result["entries"], plot_path)
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "entries"})
        return
    rows = [(n, r["makespan_us"], r["bubble_us"], f"{100 * r['bubble_ratio']:.2f}%", human_bytes(r["peak_memory_bytes"]),
             r["solve_s"]) for n in ROW_ORDER if (r := result["schedules"].get(n)) is not None]
    cap = result["mip_memory_cap_bytes"]
    click.echo(f"{sc.name}: simulated; MIP memory cap {human_bytes(cap) + ' per GPU' if cap is not None else 'none'}")
    click.echo(table(["plan", "makespan us", "bubble us", "bubble", "peak memory/GPU", "solve s"], rows))
    for n, why in result["skipped"].items():
        click.echo(f"{n}: not applicable: {why}")
    if plot_path is not None:
        click.echo(f"Gantt charts written to {plot_path}")


@click.command("export")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scenario", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The plan's scenario.")
@click.option("--format", "fmt", type=click.Choice(["torch-csv"]), default="torch-csv", show_default=True)
@click.option("--torchtitan-schedule", "titan_name",
              help=f"The torchtitan pipeline_parallel_schedule you will run the CSV with ({', '.join(SCHEDULE_STYLES)}); "
                   "refused when it builds another stage layout than the CSV's. Default: the one that matches.")
@click.option("--torch-only", is_flag=True,
              help="For plain torch.distributed.pipelining: any stage layout, no torchtitan settings.")
@click.option("-o", "--output", required=True, type=OutputPath())
def export_cmd(plan_path, scenario, fmt, titan_name, torch_only, output):
    """Write PLAN's per-rank order for a pipeline runtime (torch-csv: torch.distributed.pipelining's
    CSV schedule, one row per rank, e.g. 0F0,0I0,0W0) and print the torchtitan settings to run it
    with (refused when torchtitan cannot build its stage layout; --torch-only skips both). A transformer plan of another schedule than the scenario's parallelism.schedule (plansim
    plan --planner schedule:NAME) is read against the model built for that schedule."""
    sc = load_scenario(scenario)
    plan = read_plan(plan_path)
    transformer = is_transformer(sc)
    sc = scenario_for_plan(sc, plan)
    try:
        text = torch_csv(plan, sc.workload)
        layout = None if torch_only else csv_layout(read_torch_csv(text), "workload.parallelism" if transformer
                                                    else "placement.stage_devices")
    except InputError as e:
        plan_side = e.field is not None and e.field.startswith(("placements", "order"))
        raise InputError(plan_path if plan_side else scenario, e.field, e.reason) from None
    if torch_only and titan_name:
        raise InputError(None, "--torchtitan-schedule", "not used with --torch-only")
    meta = sc.workload.meta
    settings = None if layout is None else torchtitan_settings(
        layout, str(output), titan_name, meta["micro_batch"] if transformer else None,
        meta["layers"] if transformer else None)
    write_atomic(output, text)
    click.echo(f"{len(text.splitlines())} ranks written to {output}")
    if settings is not None:
        click.echo("torchtitan settings:")
        for line in settings.lines():
            click.echo(f"  {line}")


commands = [compare_cmd, export_cmd]
