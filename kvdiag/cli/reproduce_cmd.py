"""`kvdiag reproduce`: the study of arXiv 2604.08426 on one model: spectra, recall, four tasks, report."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, quiet, say

EXAMPLES = """
Runs spectrum/, recall/ and eval_<task>/ sub-runs (text2json, multineedle, html2tsv or
html2tsv_synthetic, needle) into --out with the study's method configurations at their budgets,
then writes report.md with tables, figures and a verdict per claim of the study. Re-running with
the same --out skips finished stages and resumes unfinished ones; --overwrite starts afresh (the new
run replaces the old one only once it has finished). An --out holding another kind of run is refused.

\b
Examples:
  kvdiag reproduce --quick --out runs/reproduce          # qwen2.5-coder-0.5b on a CPU, ~15-20 min
  kvdiag reproduce --quick --out runs/reproduce --figures-dir figures   # + export report and PNGs
  kvdiag reproduce --model meta-llama/Llama-3.2-3B-Instruct --device cuda
      --data-dir /data --out runs/llama3b                 # full mode, for a GPU
  python -m kvdiag.study.reproduce --export runs/reproduce figures   # export only
"""


def register(app: typer.Typer) -> None:
    @app.command("reproduce", epilog=EXAMPLES)
    @friendly_errors
    def reproduce(
        out: Path = typer.Option(..., "--out", help="run directory (resumed when it holds this run)"),
        model: str = typer.Option(
            None, "--model", help="registered name, HF id or local dir (default: qwen2.5-coder-0.5b)"
        ),
        quick: bool = typer.Option(
            False, "--quick", help="CPU-sized: short prompts, few samples, every 4th layer in recall"
        ),
        n: int = typer.Option(None, "--n", help="samples per task (default: the mode's)"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        data_dir: Path = typer.Option(
            None, "--data-dir", help="folder holding the tasks' data folders (default $KVDIAG_DATA_DIR)"
        ),
        figures_dir: Path = typer.Option(
            None, "--figures-dir", help="also copy report.md and its PNGs there (e.g. figures)"
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace the run in --out instead of resuming it"
        ),
    ) -> None:
        """Reproduce arXiv 2604.08426 on one model and write DIR/report.md."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.study.reproduce import run_reproduce

        result = run_reproduce(
            model or "qwen2.5-coder-0.5b", out, quick=quick, device=device, data_dir=data_dir, n=n,
            figures_dir=figures_dir, echo=lambda line: say(line, err=True), overwrite=overwrite,
            progress=not quiet(),
        )  # fmt: skip
        say(f"{result['report']} ({result['seconds']:.0f} s)")
