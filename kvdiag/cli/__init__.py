"""kvdiag command line: a typer app, one module per subcommand, heavy imports inside command bodies.

Known errors (`KvdiagError`) print as one line and exit with status 2 (under torchrun,
one line per rank, tagged with it); set KVDIAG_DEBUG=1 for the
traceback. The global `--quiet` (before the subcommand) turns off progress bars and the summary a
command prints when it succeeds; errors and warnings still print.
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


_STATE = {"quiet": False}


@app.callback()
def _global_options(
    ctx: typer.Context,
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="no progress bars and no summary (errors and warnings still print)"
    ),
) -> None:
    """Options that apply to every command; give them before the command: `kvdiag --quiet spectrum ...`."""
    _STATE["quiet"] = quiet
    if quiet:
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        if was_enabled:
            ctx.call_on_close(hf_logging.enable_progress_bar)


def quiet() -> bool:
    """Whether --quiet was given: commands pass `progress=not quiet()` and print no summary."""
    return _STATE["quiet"]


def say(message: str = "", err: bool = False) -> None:
    """Print a command's summary line, unless --quiet."""
    if not _STATE["quiet"]:
        typer.echo(message, err=err)


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5': the layers a run used (--layers resolved, negative indices counted from
    the end)."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


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
    """Every module `kvdiag/cli/*_cmd.py` defines `register(app)`: a new file is a new subcommand.
    Idempotent: a second call (tests, embedding applications) registers nothing twice."""
    if app.registered_commands or app.registered_groups:
        return
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
    try:
        app()
    except SystemExit as done:  # typer ends every command so
        from kvdiag.eval.distributed import exit_rank

        exit_rank(done.code)  # under torchrun: no return (see its docstring)
        raise


if __name__ == "__main__":
    sys.exit(main())
