"""`kvdiag plot RUN_DIR`: redraw a run's figures from its saved tables."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, say


def register(app: typer.Typer) -> None:
    @app.command("plot")
    @friendly_errors
    def plot(run_dir: Path = typer.Argument(..., help="a run directory written by a kvdiag command")) -> None:
        """Redraw the figures of RUN_DIR from its tables (PNG and PDF under RUN_DIR/figures)."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.plots import plot_run

        for path in plot_run(run_dir):
            say(str(path))
