"""`kvdiag methods`: every registered offloading method, its knobs with their defaults, and its paper."""

from __future__ import annotations

import typer


def _summary(name: str) -> str:
    """The first paragraph of the method's docstring, on one line (list_methods gives only its first line)."""
    import inspect

    from kvdiag.methods import get_method

    doc = inspect.getdoc(type(get_method(name))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def register(app: typer.Typer) -> None:
    @app.command("methods")
    def methods(as_json: bool = typer.Option(False, "--json", help="print the list as JSON")) -> None:
        """List the methods kvdiag reproduces. Use a knob in a spec as NAME:knob=value,knob=value."""
        from kvdiag.methods import list_methods

        rows = list_methods()
        if as_json:
            import json

            typer.echo(json.dumps(rows, indent=1, default=str))
            return
        for row in rows:
            typer.echo(f"{row['name']}: {_summary(row['name'])}")
            typer.echo(f"    paper: {row['paper']}")
            knobs = ", ".join(
                f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in row["knobs"].items()
            )
            typer.echo(f"    knobs: {knobs or '(none)'}")
