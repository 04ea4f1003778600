"""``plansim calibrate``: fit the hardware model to measurements.

Subcommands:

* ``nccl-tests LOG... --profile P -o fitted.yaml``: link efficiencies and latencies, message
  overhead, per-collective efficiencies, NVLS share and buffer passes from nccl-tests logs;
* ``allreduce-lut LUT... --profile P -o fitted.yaml [--check LUT...]``: the same from vTrain-style
  all-reduce tables (``--check`` predicts other tables with the fit);
* ``compute --vtrain CSV --profile P -o fitted.yaml``: the compute-efficiency model from measured
  Megatron iteration times;
* ``kineto TRACE.json -o ops.csv``: per-kernel durations (and NCCL message sizes) of a trace.

``--holdout`` fits on part of the data and reports the error on the rest. The input profile is
never modified. Exit codes: 0 fitted; 1 the fit did not converge (the output file then holds the
input profile unchanged); 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from engine.calibration.collective_fit import _get, alternate_split, fit_collectives, points_from_lut, points_from_nccl
from engine.calibration.collective_model import CollectiveModel, mape
from engine.calibration.compute_check import check_with_simulator
from engine.calibration.compute_fit import IterationModel, fit_compute, random_split
from engine.calibration.kineto import ops_csv, read_kineto
from engine.calibration.nccl_tests import read_nccl_tests
from engine.calibration.report import error_pct, fitted_profile, plot_fit
from engine.calibration.vtrain import read_ar_lut, read_ground_truth
from engine.cli.common import OutputPath, emit_json, human_bytes, table
from engine.core.errors import InputError, write_atomic
from hardware_profiles import build_cluster, load_profile

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.group("calibrate")
def calibrate():
    """Fit the hardware model to measured traces and report prediction errors."""


def _load_profile(name: str):
    return load_profile(name)


def _finish(converged: bool, message: str, profile, fitted, out: Path | None, as_json: bool) -> None:
    """Write the fitted profile (the input one if the fit failed); exit 1 on failure."""
    if out is not None:
        write_atomic(out, (fitted if converged else profile).to_yaml())
    if not converged:
        click.echo(f"plansim: fit did not converge ({message}); kept the input profile"
                   + (f" in {out}" if out is not None else ""), err=True)
        sys.exit(1)
    if out is not None and not as_json:
        click.echo(f"wrote {out}")


# ----- collectives ------------------------------------------------------------------------------

def _collective_report(fit, title: str, plot: Path | None, as_json: bool, extra: dict | None = None) -> dict:
    meas = np.array([p.time_us for p in fit.points])
    err_b, err_a = error_pct(fit.before, meas), error_pct(fit.after, meas)
    params = {n: {"before": _get(fit.start, n), "after": _get(fit.params, n)} for n in fit.free}
    summary = {"converged": fit.converged, "message": fit.message, "points": len(fit.points),
               "fitted_on": int(fit.train.sum()), "held_out": int((~fit.train).sum()),
               "mape_before": {"all": fit.mape("before", "all"), "train": fit.mape("before", "train"),
                               "test": fit.mape("before", "test")},
               "mape_after": {"all": fit.mape("after", "all"), "train": fit.mape("after", "train"),
                              "test": fit.mape("after", "test")},
               "parameters": params, "curves": fit.per_curve(), **(extra or {})}
    if plot is not None:
        plot_fit(plot, meas, fit.before, fit.after, ~fit.train if (~fit.train).any() else None, title)
    if as_json:
        summary["per_point"] = [
            {"source": p.source, "line": p.line, "op": p.op, "bytes": p.size, "ranks": len(p.ranks), "nodes": p.nodes,
             "algo": a, "measured_us": float(m), "before_us": float(b), "after_us": float(af),
             "error_before_pct": float(eb), "error_after_pct": float(ea), "split": "train" if t else "test"}
            for p, a, m, b, af, eb, ea, t in zip(fit.points, fit.algorithms, meas, fit.before, fit.after, err_b,
                                                 err_a, fit.train)]
        emit_json(summary)
        return summary
    click.echo(table(["parameter", "before", "after"], [[n, v["before"], v["after"]] for n, v in params.items()]))
    click.echo()
    click.echo(table(["curve", "algo", "points", "MAPE before %", "MAPE after %", "max error after %"],
                     [[c["curve"], c["algorithm"], c["points"], c["mape_before"], c["mape_after"], c["max_error_after"]]
                      for c in summary["curves"]]))
    click.echo()
    mb, ma = summary["mape_before"], summary["mape_after"]
    line = f"MAPE before {mb['all']:.2f}% -> after {ma['all']:.2f}% over {len(fit.points)} points"
    if summary["held_out"]:
        line += f"; held out ({summary['held_out']} points): {mb['test']:.2f}% -> {ma['test']:.2f}%"
    click.echo(line)
    return summary


def _run_collective_fit(profile, points, holdout: bool, start=None, max_evals: int = 400):
    if not points:
        raise InputError(None, None, "no measurement the collective model covers")
    train = alternate_split(points) if holdout else None
    return fit_collectives(profile, points, train, start=start, max_nfev=max_evals)


_MAX_EVALS = click.option("--max-evals", type=click.IntRange(1), default=400, hidden=True,
                          help="Solver evaluation budget (tests use 1 to see a fit that does not converge).")


@calibrate.command("nccl-tests")
@click.argument("logs", nargs=-1, required=True, type=_PATH)
@click.option("--profile", "profile_name", required=True, help="Hardware profile (name or YAML) to start from.")
@click.option("-o", "--out", type=OutputPath(), help="Write the fitted profile (YAML) here.")
@click.option("--holdout", is_flag=True, help="Fit on every other size of each curve; report the rest.")
@click.option("--in-place", is_flag=True, help="Use the in-place timings (default: out-of-place).")
@click.option("--plot", type=_PATH, help="Write a measured-vs-predicted PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with every point).")
@_MAX_EVALS
def nccl_tests_cmd(logs, profile_name, out, holdout, in_place, plot, as_json, max_evals):
    """Fit collective costs to nccl-tests LOGS (all_reduce_perf, all_gather_perf, ...)."""
    profile = _load_profile(profile_name)
    parsed = [read_nccl_tests(p) for p in logs]
    points, notes = points_from_nccl(parsed, profile.node.gpus, "in-place" if in_place else "out-of-place")
    for n in notes:
        click.echo(f"note: {n}", err=True)
    fit = _run_collective_fit(profile, points, holdout, max_evals=max_evals)
    _collective_report(fit, f"nccl-tests on {profile.name}", plot, as_json, {"notes": notes})
    fitted = fitted_profile(profile, fit.params.overrides(), "nccl-tests") if fit.converged else profile
    _finish(fit.converged, fit.message, profile, fitted, out, as_json)


@calibrate.command("allreduce-lut")
@click.argument("luts", nargs=-1, required=True, type=_PATH)
@click.option("--profile", "profile_name", required=True, help="Hardware profile (name or YAML) to start from.")
@click.option("-o", "--out", type=OutputPath(), help="Write the fitted profile (YAML) here.")
@click.option("--check", "checks", multiple=True, type=_PATH, help="Predict this LUT with the fit (repeatable).")
@click.option("--buffer-passes", type=click.FloatRange(0, 20), default=None,
              help="Prior for comm.buffer_passes when the tables have one group size "
                   "(default: the profile's, or 1 if it has none).")
@click.option("--holdout", is_flag=True, help="Fit on every other size; report the rest.")
@click.option("--plot", type=_PATH, help="Write a measured-vs-predicted PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with every point).")
@_MAX_EVALS
def allreduce_lut_cmd(luts, profile_name, out, checks, buffer_passes, holdout, plot, as_json, max_evals):
    """Fit all-reduce costs to vTrain-style LUT CSVs (size, count, type, time(ns), busbw)."""
    profile = _load_profile(profile_name)
    points = [p for f in luts for p in points_from_lut(read_ar_lut(f))]
    if not points:
        raise InputError(luts[0], None, "no rows with a GPU count (name the file AR_GPU<n>_...)")
    start = CollectiveModel(profile, points[:1]).base.copy()
    if len({len(p.ranks) for p in points}) == 1:
        start.passes = buffer_passes if buffer_passes is not None else (profile.comm.buffer_passes or 1.0)
    fit = _run_collective_fit(profile, points, holdout, start=start, max_evals=max_evals)
    fitted = fitted_profile(profile, fit.params.overrides(), "all-reduce LUT") if fit.converged else profile
    checked = []
    for f in checks:
        pts = points_from_lut(read_ar_lut(f))
        if pts:
            model, model0 = CollectiveModel(fitted, pts), CollectiveModel(profile, pts)
            meas = [p.time_us for p in pts]
            checked.append({"file": str(f), "gpus": len(pts[0].ranks), "points": len(pts),
                            "mape_before": mape(model0.times(model0.base), meas),
                            "mape_after": mape(model.times(model.base), meas)})
    _collective_report(fit, f"all-reduce LUT on {profile.name}", plot, as_json, {"checks": checked})
    if checked and not as_json:
        click.echo(table(["check", "GPUs", "points", "MAPE before %", "MAPE after %"],
                         [[Path(c["file"]).name, c["gpus"], c["points"], c["mape_before"], c["mape_after"]]
                          for c in checked]))
    _finish(fit.converged, fit.message, profile, fitted, out, as_json)


# ----- compute ----------------------------------------------------------------------------------

@calibrate.command("compute")
@click.option("--vtrain", "vtrain_csv", required=True, type=_PATH, help="vTrain ground_truth_single.csv.")
@click.option("--profile", "profile_name", required=True, help="Hardware profile (name or YAML) to start from.")
@click.option("-o", "--out", type=OutputPath(), help="Write the fitted profile (YAML) here.")
@click.option("--holdout", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
              help="Share of runs held out (random, seeded) to report the error on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the hold-out split and the sample.")
@click.option("--check-sim", type=click.IntRange(0, 50), default=3, show_default=True,
              help="Runs to simulate to confirm the closed form (0: none).")
@click.option("--plot", type=_PATH, help="Write a measured-vs-predicted PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with every run).")
def compute_cmd(vtrain_csv, profile_name, out, holdout, seed, check_sim, plot, as_json):
    """Fit the compute-efficiency model to measured Megatron iteration times."""
    profile = _load_profile(profile_name)
    runs = read_ground_truth(vtrain_csv)
    gpus = max(r.gpus for r in runs)
    nodes = -(-gpus // profile.node.gpus)
    model = IterationModel(runs, build_cluster(profile, nodes))
    train = random_split(len(runs), 1.0 - holdout, seed) if holdout > 0 else None
    fit = fit_compute(model, train)
    fitted = fitted_profile(profile, fit.overrides(profile), "iteration times") if fit.converged else profile
    checks = check_with_simulator(runs, fitted, nodes, check_sim, seed) if check_sim and fit.converged else []
    meas = fit.measured()
    names = ("gpu.compute_efficiency", "gpu.gemm_half_gflop", "gpu.memory_efficiency", "gpu.kernel_overhead_us")
    summary = {"converged": fit.converged, "message": fit.message, "runs": len(runs), "fitted_on": int(fit.train.sum()),
               "held_out": int((~fit.train).sum()),
               "parameters": {n: {"before": b, "after": a} for n, b, a in zip(names, fit.start, fit.params)},
               "mape_before": {s: fit.mape("before", s) for s in ("all", "train", "test")},
               "mape_after": {s: fit.mape("after", s) for s in ("all", "train", "test")},
               "spearman_after": {s: fit.spearman("after", s) for s in ("all", "train", "test")},
               "simulator_check": checks}
    if plot is not None:
        plot_fit(plot, meas, fit.before, fit.after, ~fit.train if (~fit.train).any() else None,
                 f"iteration time on {profile.name}")
    if as_json:
        summary["per_run"] = [{"line": r.line, "gpus": r.gpus, "tp": r.tp, "dp": r.dp, "pp": r.pp,
                               "measured_us": float(m), "before_us": float(b), "after_us": float(a),
                               "error_after_pct": float(e), "split": "train" if t else "test"}
                              for r, m, b, a, e, t in zip(runs, meas, fit.before, fit.after,
                                                          error_pct(fit.after, meas), fit.train)]
        emit_json(summary)
    else:
        click.echo(table(["parameter", "before", "after"],
                         [[n, v["before"], v["after"]] for n, v in summary["parameters"].items()]))
        click.echo()
        for label, s in (("all runs", "all"), ("held out", "test")):
            if s == "test" and not summary["held_out"]:
                continue
            click.echo(f"{label}: MAPE {summary['mape_before'][s]:.2f}% -> {summary['mape_after'][s]:.2f}%, "
                       f"Spearman {summary['spearman_after'][s]:.3f}")
        if checks:
            click.echo(table(["run (line)", "tp x dp x pp", "ops", "closed form ms", "simulated ms", "diff %"],
                             [[c["line"], c["shape"], c["ops"], c["closed_us"] / 1e3, c["simulated_us"] / 1e3,
                               c["diff_pct"]] for c in checks]))
    _finish(fit.converged, fit.message, profile, fitted, out, as_json)


# ----- kineto -----------------------------------------------------------------------------------

@calibrate.command("kineto")
@click.argument("trace", type=_PATH)
@click.option("-o", "--out", type=OutputPath(), help="Write one CSV row per GPU activity here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def kineto_cmd(trace, out, as_json):
    """Extract per-kernel durations (and NCCL message sizes) from a Kineto/Chrome TRACE."""
    tr = read_kineto(trace)
    if out is not None:
        write_atomic(out, ops_csv(tr))
    streams = {}
    for k in tr.kernels:
        s = streams.setdefault((k.device, k.stream), {"kernels": 0, "busy_us": 0.0, "nccl": 0})
        s["kernels"] += 1
        s["busy_us"] += k.dur_us
        s["nccl"] += int(k.is_nccl)
    nccl = [{"name": k.name.split("(")[0], "collective": k.collective, "msg_bytes": k.msg_bytes, "dtype": k.dtype,
             "group_size": k.group_size, "dur_us": k.dur_us,
             "busbw_gbs": (k.msg_bytes / k.dur_us / 1e3 if k.msg_bytes and k.dur_us > 0 else None)}
            for k in tr.nccl()]
    summary = {"trace": str(trace), "activities": len(tr.kernels), "world_size": tr.world_size, "rank": tr.rank,
               "streams": [{"device": d, "stream": s, **v} for (d, s), v in sorted(streams.items(), key=lambda kv: str(kv[0]))],
               "nccl_kernels": len(nccl), "nccl_with_size": sum(1 for n in nccl if n["msg_bytes"] is not None),
               "nccl": nccl}
    if as_json:
        emit_json(summary)
        return
    click.echo(table(["device", "stream", "activities", "busy ms", "NCCL"],
                     [[s["device"], s["stream"], s["kernels"], s["busy_us"] / 1e3, s["nccl"]] for s in summary["streams"]]))
    click.echo()
    click.echo(table(["NCCL kernel", "collective", "message", "dtype", "group", "us"],
                     [[n["name"], n["collective"], human_bytes(n["msg_bytes"]) if n["msg_bytes"] is not None else "?",
                       n["dtype"], n["group_size"], n["dur_us"]] for n in nccl]))
    click.echo(f"\n{summary['nccl_with_size']} of {len(nccl)} NCCL kernels with a message size"
               + (f"; wrote {out}" if out is not None else ""))


commands = [calibrate]
