"""kvdiag command line: a typer app, one module per subcommand, heavy imports inside command bodies.

Known errors (`KvdiagError`) print as one line and exit with status 2 (under torchrun, one line per
rank, tagged with it); set KVDIAG_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import typer

from kvdiag.errors import KvdiagError

app = typer.Typer(
    name="kvdiag",
    help="Where KV-cache offloading and sparse-attention methods lose what long, context-intensive tasks need.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def friendly_errors(func):
    """Print a KvdiagError as one line (exit 2) unless KVDIAG_DEBUG is set."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KvdiagError as err:
            if os.environ.get("KVDIAG_DEBUG"):
                raise
            typer.echo(f"kvdiag: error{_rank_tag()}: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("kvdiag: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _rank_tag() -> str:
    """The tag " (rank R/W)" of an error line under torchrun, where every rank prints its own; else ""."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')}/{world})" if world.isdigit() and int(world) > 1 else ""


def _register() -> None:
    """Every module `kvdiag/cli/*_cmd.py` defines `register(app)`: a new file is a new subcommand."""
    import importlib
    import pkgutil

    import kvdiag.cli

    for info in sorted(pkgutil.iter_modules(kvdiag.cli.__path__), key=lambda m: m.name):
        if info.name.endswith("_cmd"):
            importlib.import_module(f"kvdiag.cli.{info.name}").register(app)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("KVDIAG_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    _register()
    app()


if __name__ == "__main__":
    sys.exit(main())
