"""`kvdiag rescore`: score a reproduce run's exported predictions again and check the stored scores."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors

EXAMPLES = """
\b
Examples:
  kvdiag rescore figures              # the committed reference
  kvdiag rescore runs/reproduce       # a reproduce run
"""


def register(app: typer.Typer) -> None:
    @app.command("rescore", epilog=EXAMPLES)
    @friendly_errors
    def rescore(
        run_dir: Path = typer.Argument(..., help="a reproduce run, or the folder its report was exported to"),
    ) -> None:
        """Re-score predictions/<task>.jsonl with each task's own scorer and check every stored score and
        every per-method mean of findings.json; exit 1 on any disagreement."""
        from kvdiag.study.findings import rescore as rescore_run

        result = rescore_run(run_dir)
        for task, rows in result["tasks"].items():
            typer.echo(f"{task:20s} {rows} predictions")
        for line in result["mismatches"]:
            typer.echo(f"mismatch: {line}", err=True)
        if result["mismatches"]:
            typer.echo(f"{len(result['mismatches'])} disagreements in {result['rows']} predictions", err=True)
            raise typer.Exit(1)
        typer.echo(f"all {result['rows']} stored scores and every per-method mean agree with the scorers")
