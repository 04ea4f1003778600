"""Output helpers shared by the commands: JSON for machines, aligned tables for people."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from engine.core.options import range_problem


class OptionValue(click.ParamType):
    """A number for a command-line option that overrides a scenario field: the field's own type
    and range rule (:func:`engine.core.options.range_problem`), so both places refuse alike."""

    def __init__(self, options_class: type, name: str):
        meta = {f.name: f.metadata for f in fields(options_class)}[name]
        self.integer = meta["types"] == (int,)
        self.range = meta["range"]
        self.name = "integer" if self.integer else "float"

    def convert(self, value, param, ctx):
        try:
            number = int(value) if self.integer else float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        problem = range_problem(self.range, number)
        if problem:
            self.fail(problem, param, ctx)
        return number


class OutputPath(click.Path):
    """A file the command will write: refused at parse time, before any work, when it is a
    directory or its folder cannot be written (the nearest existing folder, if it must be made)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        if path.exists() and not os.access(path, os.W_OK):
            self.fail(f"{path}: cannot write: permission denied", param, ctx)
        folder = path.parent if str(path.parent) else Path(".")
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            self.fail(f"{path}: cannot write: {folder} is not a folder", param, ctx)
        try:  # os.access says yes to root on a read-only file system: try it
            fd, probe = tempfile.mkstemp(prefix=".plansim-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            self.fail(f"{path}: cannot write into {folder}: {e.strerror or e}", param, ctx)
        return path


def emit_json(obj: Any) -> None:
    """Print one JSON object (sorted keys, so output is byte-identical run to run)."""
    click.echo(json.dumps(obj, indent=1, sort_keys=True, default=_jsonable))


def _jsonable(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:,.3f}" if abs(c) < 100 else f"{c:,.1f}"
    if isinstance(c, int) and not isinstance(c, bool):
        return f"{c:,}"
    return str(c)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class SolverProgress:
    """A progress display for people: one self-overwriting stderr line per solver callback
    (elapsed s, incumbent and bound in us); :meth:`done` ends the line if one was drawn."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, elapsed: float, incumbent: float | None, bound: float | None) -> None:
        inc = f"{incumbent:,.1f}" if incumbent is not None else "-"
        bnd = f"{bound:,.1f}" if bound is not None else "-"
        gap = f"{100 * (incumbent - bound) / incumbent:.2f}%" if incumbent and bound is not None else "-"
        click.echo(f"\r  MIP {elapsed:6.1f} s   incumbent {inc}   bound {bnd}   gap {gap}   ", err=True, nl=False)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            click.echo("", err=True)
