"""``plansim search``: the fastest parallel configuration of a transformer scenario that fits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from engine.cli.common import OutputPath, emit_json, human_bytes, table
from engine.core.documents import load_yaml
from engine.core.errors import write_atomic
from engine.study.backends import BACKENDS
from engine.study.search import Results, Search, explain, parse_config, prepare, run_search
from engine.study.search_space import Config
from engine.study.search_validate import DEFAULT_MAX_OPS

CSV_FIELDS = ("iteration_us", "alpha_beta_us", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu",
              "peak_memory_bytes", "bottleneck", "validated")


class StageProgress:
    """One self-overwriting stderr line per update: stage, done / total, ETA from this stage's rate."""

    def __init__(self) -> None:
        self.stage = ""
        self.t0 = 0.0
        self.first = 0
        self.shown = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.t0, self.first = stage, now, done
            if self.shown:
                click.echo("", err=True)
        rate = (done - self.first) / (now - self.t0) if now > self.t0 and done > self.first else 0.0
        eta = f"ETA {(total - done) / rate:,.0f} s" if rate > 0 else "ETA -"
        click.echo(f"\r  {stage:<5} {done:,}/{total:,}  {eta}   ", err=True, nl=False)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            click.echo("", err=True)


@click.command("search")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gpus", type=click.IntRange(min=1), help="GPU count to search [default: the scenario's cluster].")
@click.option("--top", "top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Configurations re-simulated with the flow model.")
@click.option("--space", "space_path", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML: a list of values per field (tp, pp, dp, vpp, micro_batch, recompute, schedule, ...).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Tasks run in parallel.")
@click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True,
              help="Where tasks run: this machine, or Ray (pip install 'plansim[ray]').")
@click.option("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT, auto) [default: start a local one].")
@click.option("--results", type=OutputPath(),
              help="Results file to resume from and add to [default: search-<scenario>-<gpus>.json].")
@click.option("--csv", "csv_path", type=OutputPath(), help="Also write the top table as CSV.")
@click.option("--max-ops", type=click.IntRange(min=1), default=DEFAULT_MAX_OPS, show_default=True,
              help="Largest op graph the flow model and the MIP simulate; bigger configurations keep their alpha-beta figures.")
@click.option("--time-limit", "time_limit_s", type=click.FloatRange(min=0, min_open=True),
              help="MIP time limit for the best configuration's pipeline order, seconds [default: the scenario's solver.time_limit_s].")
@click.option("--no-mip", is_flag=True, help="Skip the MIP stage.")
@click.option("--explain", "explain_config", metavar="CONFIG",
              help="Explain one configuration instead, e.g. tp=8,pp=4,mb=1,recompute=selective,schedule=1f1b.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def search_cmd(scenario, gpus, top, space_path, jobs, backend, address, results, csv_path, max_ops, time_limit_s, no_mip,
               explain_config, as_json):
    """Search the parallel configurations of SCENARIO's transformer on its GPUs: drop what does not
    fit, rank the rest by alpha-beta simulation, re-simulate the best with the flow model."""
    s = prepare(load_yaml(scenario), scenario, gpus, space_path)
    if explain_config is not None:
        _explain(s, parse_config(explain_config, s.gpus), max_ops, as_json)
        return
    results = results or Path(f"search-{scenario.stem}-{s.gpus}.json")
    store = Results.open(results, s.header)
    if store.rows and not as_json:
        click.echo(f"resuming: {len(store.rows)} results already in {results}", err=True)
    limit = None if no_mip else (time_limit_s or float((s.raw.get("solver") or {}).get("time_limit_s", 30.0)))
    progress = StageProgress() if sys.stderr.isatty() else None
    try:
        out = run_search(s, store, top=top, max_ops=max_ops, mip_time_limit_s=limit, backend=backend, jobs=jobs,
                         address=address, progress=progress)
    except KeyboardInterrupt:
        if progress:
            progress.done()
        saved = f"{len(store.rows)} results saved in {results}; run the same command again to resume" \
            if store.rows else "nothing saved"
        click.echo(f"plansim: interrupted: {saved}", err=True)
        raise SystemExit(130)
    if progress:
        progress.done()
    out["results_path"] = str(results)
    if csv_path is not None:
        write_atomic(csv_path, to_csv(out["top"]))
    if as_json:
        emit_json(out)
        return
    _print(s, out)
    click.echo(f"results in {results}" + (f", CSV in {csv_path}" if csv_path else ""))


def to_csv(top: list[dict]) -> str:
    keys = list(Config().to_dict())
    lines = [",".join(keys + list(CSV_FIELDS))]
    for r in top:
        lines.append(",".join([str(r["config"][k]) for k in keys] + ["" if r[f] is None else str(r[f]) for f in CSV_FIELDS]))
    return "\n".join(lines) + "\n"


def _print(s: Search, out: dict) -> None:
    click.echo(f"{s.name} on {s.gpus} GPUs: {out['searched']:,} configurations, {out['survivors']:,} fit "
               f"(cap {human_bytes(s.cap_bytes)} per GPU)")
    for reason, n in out["pruned"].items():
        click.echo(f"  dropped {n:,}: {reason}")
    click.echo(table(["configuration", "iteration ms", "tokens/s/GPU", "TFLOP/s/GPU", "MFU", "peak memory", "bottleneck",
                      "model"],
                     [[Config.from_dict(r["config"]).label(), r["iteration_us"] / 1e3, r["tokens_per_s_per_gpu"],
                       r["model_tflops_per_gpu"], f"{r['mfu']:.1%}", human_bytes(r["peak_memory_bytes"]),
                       r["bottleneck"] or "-", r["validated"].split(" ")[0]] for r in out["top"]]))
    mip = out.get("mip")
    if mip:
        label = Config.from_dict(mip["config"]).label()
        if "skipped" in mip:
            click.echo(f"MIP order of {label}: skipped ({mip['skipped']})")
        else:
            click.echo(f"MIP order of {label}: {mip['mip_us'] / 1e3:,.1f} ms against {mip['named_us'] / 1e3:,.1f} ms for "
                       f"{mip['schedule']} ({mip['gain']:+.1%}, {mip['status']})")
    click.echo(f"searched in {out['wall_s']:.1f} s")


def _explain(s: Search, config: Config, max_ops: int, as_json: bool) -> None:
    out = explain(s, config, max_ops)
    if as_json:
        emit_json(out)
        return
    ev = out["evaluation"]
    click.echo(f"{out['label']} on {s.gpus} GPUs (cap {human_bytes(s.cap_bytes)} per GPU)")
    if ev["pruned"] is not None:
        click.echo(f"dropped: {ev['pruned']}: {ev['detail']}")
    if ev["peak_by_rank"]:
        click.echo(table(["pipeline rank", "static", "peak", "activations"],
                         [[p, human_bytes(st), human_bytes(pk), human_bytes(pk - st)]
                          for p, (st, pk) in enumerate(zip(ev["static_by_rank"], ev["peak_by_rank"]))]))
    if ev["pruned"] is None:
        click.echo(f"alpha-beta iteration: {ev['iteration_us'] / 1e3:,.2f} ms")
    flow = out.get("flow") or {}
    if "figures" in flow:
        f = flow["figures"]
        click.echo(f"flow-model iteration: {f['makespan_us'] / 1e3:,.2f} ms, {f['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
                   f"{f['model_tflops_per_gpu']:,.1f} TFLOP/s/GPU, MFU {f['mfu']:.1%}")
        total = f["makespan_us"]
        click.echo(table(["iteration part", "ms", "share"],
                         [[k, v / 1e3, f"{v / total:.1%}"] for k, v in f["breakdown_us"].items()]))
        click.echo(table(["memory of the peak GPU", "bytes"],
                         [[k, human_bytes(v)] for k, v in f["memory_breakdown_bytes"].items()]
                         + [["peak", human_bytes(f["peak_memory_bytes"])]]))
    elif "skipped" in flow:
        click.echo(f"flow model: skipped ({flow['skipped']})")


commands = [search_cmd]
