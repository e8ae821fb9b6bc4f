"""`kvdiag tasks`: every benchmark task, its metric, whether its data is found, and its knobs."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors


def register(app: typer.Typer) -> None:
    @app.command("tasks")
    @friendly_errors
    def tasks(
        data_dir: Path = typer.Option(
            None, "--data-dir", help="folder holding the tasks' data folders (default $KVDIAG_DATA_DIR)"
        ),
        as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
    ) -> None:
        """List the tasks `kvdiag eval --task` runs. Set a knob with --task-knob knob=value."""
        from kvdiag.tasks import list_tasks

        rows = list_tasks(None if data_dir is None else str(data_dir))
        if as_json:
            import json

            typer.echo(json.dumps(rows, indent=1, default=str))
            return
        for row in rows:
            typer.echo(f"{row['name']}: {row['description']}")
            if row["data_found"]:
                found = "found"
            elif row["name"] in ("needle", "multineedle"):
                found = (
                    "not found: uses the built-in haystack and generated needles (--data-dir for NeedleBench)"
                )
            else:
                found = "not found: pass --data-dir or set KVDIAG_DATA_DIR"
            typer.echo(
                f"    metric: {row['metric']} (0-100, higher is better, {row['aggregation']} over samples)"
            )
            typer.echo(f"    data: {found}")
            knobs = ", ".join(
                f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in row["knobs"].items()
            )
            typer.echo(f"    knobs: {knobs or '(none)'}")
