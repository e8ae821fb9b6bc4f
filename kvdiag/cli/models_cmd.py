"""`kvdiag models`: the models kvdiag knows; `kvdiag models export|import`: move an offline model to a
machine without internet (see `kvdiag.models.transfer`)."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors

EXAMPLES = """
\b
Examples:
  kvdiag models                                        # list (--json: machine-readable)
  kvdiag models export qwen2.5-coder-0.5b /media/usb --part-mib 60
  kvdiag models import /media/usb                      # on the offline machine

The model cache ($KVDIAG_CACHE, default ~/.cache/kvdiag/models) is a plain folder: copying it
whole to another machine works too.
"""


def _list(as_json: bool = False) -> None:
    from kvdiag.models import list_models

    if as_json:
        import json

        typer.echo(json.dumps(list_models(), indent=1, default=str))
        return
    header = f"{'name':20s} {'arch':8s} {'layers':>6s} {'heads':>5s} {'kv':>3s} {'d':>4s} {'context':>7s} cached  source"
    typer.echo(header)
    for row in list_models():
        typer.echo(
            f"{row['name']:20s} {row['architecture']:8s} {row.get('layers', '?'):>6} {row.get('q_heads', '?'):>5} "
            f"{row.get('kv_heads', '?'):>3} {row.get('head_dim', '?'):>4} {row.get('context_length', '?'):>7} "
            f"{'yes' if row['cached'] else 'no':6s}  {row['source']}"
        )


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, epilog=EXAMPLES)

    @models_app.callback()
    def models(
        ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print the list as JSON")
    ) -> None:
        """List known models: architecture, layers, heads, KV heads, head_dim, context, source, cached.

        Any Hugging Face id, local checkpoint directory or .gguf file works too, wherever --model is taken.
        """
        if ctx.invoked_subcommand is None:
            _list(as_json)

    @models_app.command("export", epilog=EXAMPLES)
    @friendly_errors
    def export(
        name: str = typer.Argument(..., help="a registered offline model, e.g. qwen2.5-coder-0.5b"),
        dest: Path = typer.Argument(..., help="folder to write NAME.part000... and NAME.manifest.json into"),
        part_mib: float = typer.Option(60, "--part-mib", help="largest part, in MiB"),
    ) -> None:
        """Write an offline model's GGUF file as SHA-256-checked parts, for `kvdiag models import`."""
        from kvdiag.models.transfer import export_model

        manifest = export_model(name, dest, part_mib=part_mib)
        typer.echo(f"{manifest} (copy the whole folder; then `kvdiag models import {dest}`)")

    @models_app.command("import", epilog=EXAMPLES)
    @friendly_errors
    def import_(
        src: Path = typer.Argument(..., help="folder written by `kvdiag models export`"),
        name: str = typer.Option(None, "--model", help="which model, when the folder holds several"),
        no_convert: bool = typer.Option(
            False, "--no-convert", help="only place the GGUF in the cache (converted on first load)"
        ),
    ) -> None:
        """Check every part's and the whole file's SHA-256, assemble the GGUF into the model cache and
        convert it, so that the model loads offline."""
        from kvdiag.models.transfer import import_model

        path = import_model(src, name, convert=not no_convert)
        typer.echo(f"{path}{'' if no_convert else ' (converted)'}")

    app.add_typer(models_app, name="models")
