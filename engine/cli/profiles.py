"""``plansim profiles``: list the shipped hardware profiles, or show one in full."""

from __future__ import annotations

import click

from engine.cli.common import emit_json, table
from hardware_profiles import list_profiles, load_profile


def _num(v):
    """A datasheet figure for a table cell: no ``.0`` on whole numbers, ``-`` when absent."""
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else v


@click.command("profiles")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def profiles_cmd(name: str | None, as_json: bool) -> None:
    """List shipped hardware profiles with key figures, or print profile NAME (a name or a YAML path)."""
    if name is not None:
        profile = load_profile(name)
        if as_json:
            emit_json(profile.to_dict())
        else:
            click.echo(profile.to_yaml(), nl=False)
        return
    summaries = [load_profile(n).summary() for n in list_profiles()]
    if as_json:
        emit_json({"profiles": summaries})
        return
    rows = [(s["name"], s["gpu"], _num(s["memory_gib"]), _num(s["hbm_gbs"]), _num(s["bf16_tflops"]),
             _num(s["fp8_tflops"]), s["gpus_per_node"], _num(s["nvlink_gbs"]), "yes" if s["nvls"] else "no",
             f"{s['nics']} x {_num(s['nic_gbps'])}")
            for s in summaries]
    click.echo(table(["profile", "GPU", "HBM GiB", "HBM GB/s", "bf16 TFLOP/s", "fp8 TFLOP/s", "GPUs/node",
                      "NVLink GB/s/dir", "NVLS", "NICs x Gb/s"], rows))


commands = [profiles_cmd]
