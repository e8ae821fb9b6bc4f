"""`kvdiag models`: the models kvdiag knows, their shapes, source and cache state."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(as_json: bool = typer.Option(False, "--json", help="print the list as JSON")) -> None:
        """List known models: architecture, layers, heads, KV heads, head_dim, context, source, cached.

        Any Hugging Face id, local checkpoint directory or .gguf file works too, wherever --model is taken.
        """
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
