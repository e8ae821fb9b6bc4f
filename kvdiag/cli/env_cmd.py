"""`kvdiag env`: versions of everything that changes numbers, for bug reports."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("env")
    def env() -> None:
        """Print python, torch, transformers, triton, CUDA and GPU versions."""
        from kvdiag.runs import versions

        for key, value in versions().items():
            typer.echo(f"{key:13s} {value if value is not None else '-'}")
