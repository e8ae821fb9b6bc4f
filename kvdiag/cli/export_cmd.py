"""`kvdiag export RUN_DIR`: a run's tidy tables as CSV (or TSV / JSON lines), for spreadsheets and R."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, say

FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None}

EXAMPLES = """
Every table of the run (*.parquet, also in the stages of a reproduce run) is written beside it, or
under --to with the same relative path, as NAME.csv; an eval run also gets scores.csv, its summary
per method × budget (mean score ± stderr, attended tokens, bytes, fidelity).

\b
Examples:
  kvdiag export runs/smol                       # runs/smol/spectrum.csv, spectrum_summary.csv, ...
  kvdiag export runs/t2j --format tsv --to /tmp/t2j
"""


def export_tables(run_dir: Path, fmt: str = "csv", dest: Path | None = None) -> list[Path]:
    """Write every table of a run directory in `fmt` (csv, tsv, jsonl) under `dest` (default: beside
    each table); an eval run's score summary becomes scores.<fmt>. Returns the written paths."""
    import io

    from kvdiag.errors import KvdiagError, unknown_name_error
    from kvdiag.runs import atomic_write_bytes, read_manifest, read_table

    if fmt not in FORMATS:
        raise unknown_name_error("export format", fmt, FORMATS)
    run_dir = Path(run_dir)
    read_manifest(run_dir)  # a missing folder, a folder that is not a run, a damaged manifest: one line
    dest = run_dir if dest is None else Path(dest)
    tables = {
        path.relative_to(run_dir).with_suffix(f".{fmt}"): read_table(path)
        for path in sorted(run_dir.rglob("*.parquet"))
        if not any(part.startswith(".") for part in path.relative_to(run_dir).parts)  # staging dirs
    }
    for path in sorted(run_dir.rglob("results.parquet")):  # eval runs (also stages of a reproduce run)
        from kvdiag.eval.store import score_table

        if (path.parent / "manifest.json").exists() and read_manifest(path.parent)["command"] == "eval":
            table = tables[path.relative_to(run_dir).with_suffix(f".{fmt}")]
            tables[path.relative_to(run_dir).with_name(f"scores.{fmt}")] = score_table(table)
    if not tables:
        raise KvdiagError(f"{run_dir} holds no tables to export")
    written = []
    for rel, table in tables.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        if fmt == "jsonl":
            table.to_json(buffer, orient="records", lines=True, force_ascii=False)
        else:
            table.to_csv(buffer, index=False, sep=FORMATS[fmt])
        atomic_write_bytes(target, buffer.getvalue().encode("utf-8"))
        written.append(target)
    return written


def register(app: typer.Typer) -> None:
    @app.command("export", epilog=EXAMPLES)
    @friendly_errors
    def export(
        run_dir: Path = typer.Argument(..., help="a run directory written by a kvdiag command"),
        fmt: str = typer.Option("csv", "--format", help="csv, tsv or jsonl"),
        csv: bool = typer.Option(False, "--csv", help="the same as --format csv"),
        to: Path = typer.Option(None, "--to", help="write there instead of beside each table"),
    ) -> None:
        """Write the tables of RUN_DIR as CSV (or TSV / JSON lines) files."""
        from kvdiag.errors import KvdiagError

        if csv and fmt != "csv":
            raise KvdiagError(f"--csv and --format {fmt} disagree; give one of them")
        for path in export_tables(run_dir, fmt, to):
            say(str(path))
