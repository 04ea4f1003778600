"""``plansim simulate`` (run a plan in the cluster simulator) and ``plansim collective`` (time one
collective the way nccl-tests reports it)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from engine.cli.common import OptionValue, OutputPath, emit_json, human_bytes, table
from engine.core.documents import read_text
from engine.core.errors import InputError, write_atomic
from engine.core.ir import Plan
from engine.core.options import SimulatorOptions
from engine.planners.registry import default_simulation_planner, plan_scenario
from engine.scenario.loader import load_scenario
from engine.scenario.simulation import simulate_scenario
from engine.workloads.transformer import spec_from_dict
from engine.workloads.transformer_figures import transformer_figures
from hardware_profiles import build_cluster, load_profile
from simulator.collectives import bus_factor, choose_algo, normalize_op
from simulator.simulate import simulate_collective
from simulator.trace import write_trace

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'1GiB' -> 1073741824, '256MiB', '4096', '1e9', '2GB' (decimal) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(None, "--bytes", f"cannot read size {text!r} (e.g. 4096, 256MiB, 1GiB, 2GB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 0 or value != int(value):
        raise InputError(None, "--bytes", f"size {text!r} is not a whole number of bytes")
    return int(value)


def _load_plan(path: Path) -> Plan:
    return Plan.from_json(read_text(path), source=str(path))


@click.command("simulate")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Plan JSON to simulate (default: a transformer workload's parallelism.schedule, else the heuristic's plan).")
@click.option("--trace", "trace_path", type=OutputPath(),
              help="Write a Chrome-trace JSON (Perfetto) here.")
@click.option("-o", "--out", "out_path", type=OutputPath(),
              help="Write the full result JSON here (deterministic: no wall time).")
@click.option("--seed", type=int, help="Seed of the jitter (default: the scenario's seed).")
@click.option("--jitter", type=OptionValue(SimulatorOptions, "jitter"), help="Log-sd of the lognormal factor on op durations (e.g. 0.02).")
@click.option("--mode", type=click.Choice(["flow", "alpha_beta"]), help="Network model (default: the scenario's).")
@click.option("--allow-oom", is_flag=True, default=None, help="Record out-of-memory events and simulate on.")
@click.option("--no-symmetry", is_flag=True, help="Simulate every op (no symmetry reduction).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def simulate_cmd(scenario, plan_path, trace_path, out_path, seed, jitter, mode, allow_oom, no_symmetry, as_json):
    """Simulate a plan of SCENARIO: makespan, bubble, memory, link utilisation."""
    sc = load_scenario(scenario)
    if plan_path is not None:
        plan = _load_plan(plan_path)
    else:
        plan = plan_scenario(sc, default_simulation_planner(sc))
    try:
        result = simulate_scenario(sc, plan, seed=seed, timeline=trace_path is not None, jitter=jitter, mode=mode,
                                   allow_oom=allow_oom, symmetry=False if no_symmetry else None)
    except InputError as e:
        if e.source is None and plan_path is not None and (e.field or "").startswith("plan"):
            raise InputError(plan_path, e.field, e.reason) from None
        raise
    if trace_path is not None:
        write_trace(result, sc.workload, sc.cluster, trace_path)
    if out_path is not None:
        write_atomic(out_path, result.to_json(timing=False))
    summary = {"scenario": sc.name, "planner": plan.planner, **result.summary()}
    figures = None
    if sc.workload.meta.get("kind") == "transformer":
        figures = transformer_figures(spec_from_dict(sc.raw["workload"]), sc.cluster.profile, sc.workload, result)
        summary.update(figures.to_dict())
    if as_json:
        emit_json(summary)
        return
    pred = summary["predicted_makespan_us"]
    click.echo(f"{sc.name}: plan by {plan.planner}, {len(sc.workload)} ops, mode {result.mode}")
    click.echo(f"makespan {result.makespan_us:,.1f} us" + (f" (plan predicted {pred:,.1f} us)" if pred else "")
               + f"   bubble {result.bubble_us:,.1f} us ({100 * result.bubble_ratio:.1f}%)")
    click.echo(f"peak memory {human_bytes(result.peak_memory_bytes)}   OOM events {len(result.oom_events)}   "
               f"{result.events:,} events in {result.sim_wall_s:.2f} s")
    if figures is not None:
        click.echo(f"tokens/s {figures.tokens_per_s:,.0f} ({figures.tokens_per_s_per_gpu:,.1f} per GPU)   "
                   f"model TFLOP/s per GPU {figures.model_tflops_per_gpu:.1f}   MFU {100 * figures.mfu:.1f}%")
        click.echo(table(["breakdown", "us"], list(figures.breakdown_us.items())))
        click.echo(table(["memory (peak GPU)", "bytes"],
                         [(k, human_bytes(v)) for k, v in figures.memory_breakdown_bytes.items()]))
    rows = [(f"GPU {d}", v["busy_us"], v["bubble_us"], human_bytes(v["peak_memory_bytes"]))
            for d, v in list(result.devices.items())[:16]]
    click.echo(table(["device", "busy us", "bubble us", "peak memory"], rows))
    if summary["link_utilization"]:
        click.echo(table(["link", "utilisation", "bytes"],
                         [(r["link"], f"{100 * r['utilization']:.1f}%", human_bytes(r["bytes"]))
                          for r in summary["link_utilization"]]))
    for path, what in ((trace_path, "trace"), (out_path, "result")):
        if path is not None:
            click.echo(f"{what} written to {path}")


@click.command("collective")
@click.option("--profile", default="h100-sxm", show_default=True, help="Hardware profile name or YAML path.")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpus-per-node", type=int, help="GPUs of each node in the group (default: all).")
@click.option("--op", "op_name", default="all_reduce", show_default=True,
              help="all_reduce, all_gather, reduce_scatter, all_to_all (alltoall), broadcast, send_recv (sendrecv).")
@click.option("--bytes", "size", default="1GiB", show_default=True,
              help="nccl-tests 'size': the whole buffer (e.g. 256MiB, 1GiB).")
@click.option("--algo", default="auto", show_default=True, help="auto, ring, tree, nvls or direct.")
@click.option("--mode", type=click.Choice(["flow", "alpha_beta"]), default="flow", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Profile override in datasheet units, e.g. node.nvlink_efficiency=0.75 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def collective_cmd(profile, nodes, gpus_per_node, op_name, size, algo, mode, overrides, as_json):
    """Time one collective on an idle cluster, with nccl-tests' algbw and busbw conventions."""
    import yaml

    over = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(None, "--set", f"expected KEY=VALUE, got {item!r}")
        over[key.strip()] = yaml.safe_load(value)
    cluster = build_cluster(load_profile(profile, overrides=over or None), nodes)
    per = cluster.gpus_per_node
    g = per if gpus_per_node is None else gpus_per_node
    if not 1 <= g <= per:
        raise InputError(None, "--gpus-per-node", f"must be 1..{per} for profile {cluster.profile.name!r}, got {g}")
    ranks = [n * per + k for n in range(nodes) for k in range(g)]
    nbytes = parse_bytes(size)
    op = normalize_op(op_name)
    name = choose_algo(cluster, op, ranks, algo)
    t = simulate_collective(cluster, op, nbytes, ranks, algo, mode)
    algbw = nbytes / t / 1e3 if t > 0 else 0.0
    out = {"op": op, "algo": name, "bytes": nbytes, "ranks": len(ranks), "nodes": nodes, "gpus_per_node": g,
           "profile": cluster.profile.name, "mode": mode, "time_us": t, "algbw_gbs": algbw,
           "busbw_gbs": algbw * bus_factor(op, len(ranks))}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"{op} ({name}) of {human_bytes(nbytes)} over {len(ranks)} GPUs ({nodes} x {g}) on "
                   f"{out['profile']}: {t:,.1f} us   algbw {algbw:.2f} GB/s   busbw {out['busbw_gbs']:.2f} GB/s")


commands = [simulate_cmd, collective_cmd]
