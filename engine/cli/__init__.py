"""The ``plansim`` command line: a click group whose commands live one per module here.

Every command turns :class:`engine.core.errors.InputError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from engine.core.errors import InputError

# Modules of engine.cli that define ``commands`` (a list of click commands).
COMMAND_MODULES = [
    "plan",
    "inspect",
    "profiles",
    "simulate",
    "compare",
    "loop",
    "whatif",
    "calibrate",
]


class PlansimGroup(click.Group):
    """A group that reports bad input in one line with exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
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


for _name in COMMAND_MODULES:
    for _cmd in importlib.import_module(f"engine.cli.{_name}").commands:
        main.add_command(_cmd)
