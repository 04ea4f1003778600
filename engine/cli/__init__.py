"""The ``plansim`` command line: a click group whose commands live one per module here.

Every command turns :class:`engine.core.errors.InputError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from engine.core.errors import InputError
from engine.core.interrupt import raise_on_sigterm

# command name -> the module of engine.cli that defines it (in its ``commands`` list). A command's
# module is imported only when that command runs: importing them all (Pyomo, SciPy, SimPy) doubles
# the start-up of every command (0.95 s against 0.48 s for ``plansim --help`` on this machine).
COMMANDS = {
    "plan": "plan",
    "check": "inspect",
    "trace": "inspect",
    "gen-graph": "inspect",
    "profiles": "profiles",
    "simulate": "simulate",
    "collective": "simulate",
    "compare": "compare",
    "export": "compare",
    "loop": "loop",
    "whatif": "whatif",
    "calibrate": "calibrate",
}


class PlansimGroup(click.Group):
    """A group that loads each command's module on first use and reports bad input in one line
    with exit code 2, never a traceback."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        module = COMMANDS.get(name)
        if module is None:
            return None
        return {c.name: c for c in importlib.import_module(f"engine.cli.{module}").commands}[name]

    def main(self, *args, **kwargs):
        """Click's usage errors as one line too (``plansim: error: ...``, exit 2), not click's
        usage + hint + error block."""
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as err:
            click.echo(f"plansim: error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("plansim: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)  # click returns ctx.exit's code

    def invoke(self, ctx):
        raise_on_sigterm()
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # ``plansim ... | head``: the reader left; stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except InputError as err:
            click.echo(f"plansim: error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("plansim: interrupted", err=True)
            sys.exit(130)


@click.group(cls=PlansimGroup)
@click.version_option(package_name="plansim")
def main():
    """Plan operator-level parallelism as a MIP and check it in a cluster simulator."""
