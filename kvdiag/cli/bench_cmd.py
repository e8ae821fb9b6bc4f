"""`kvdiag bench`: one decode step of one layer through the offload runtime vs its floor and baselines."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, quiet, say


def register(app: typer.Typer) -> None:
    @app.command(
        "bench",
        epilog="Examples:\n\n  kvdiag bench --out runs/bench                      # on a GPU\n\n"
        "  kvdiag bench --out runs/bench-smoke --smoke        # CPU, Triton interpreter, seconds",
    )
    @friendly_errors
    def bench(
        out: Path = typer.Option(..., "--out", help="run directory to create"),
        lengths: str = typer.Option("32768,131072", "--lengths", help="','-separated prompt lengths"),
        batch: str = typer.Option("1,8", "--batch", help="','-separated batch sizes"),
        methods: str = typer.Option("yakv,shadowkv", "--methods", help="yakv (runtime variant), shadowkv"),
        smoke: bool = typer.Option(False, "--smoke", help="tiny shapes on the CPU (Triton interpreter)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
    ) -> None:
        """Time the runtime's kernel step (scoring, top-k, host gather, attention; CUDA graphs) per
        layer against resident bytes / HBM + fetched bytes / host link, full attention (SDPA) and the
        plain-PyTorch path, with the ceilings re-measured; bench.parquet, manifest.json, figures."""
        import torch

        from kvdiag.errors import KvdiagError

        if smoke and not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.bench.offload_step import run_bench
        from kvdiag.plots.bench import plot_bench_run

        def ints(text: str, what: str) -> list[int]:
            try:
                values = [int(x) for x in text.split(",") if x.strip()]
            except ValueError:
                raise KvdiagError(f"--{what} {text!r} must be ','-separated integers") from None
            if not values or min(values) < 1:
                raise KvdiagError(f"--{what} {text!r} must be ','-separated integers ≥ 1")
            return values

        result = run_bench(out, ints(lengths, "lengths"), ints(batch, "batch"),
                           [m.strip() for m in methods.split(",") if m.strip()], smoke=smoke, overwrite=overwrite, progress=not quiet())  # fmt: skip
        figures = plot_bench_run(out)
        for line in result["summary"]:
            say(line)
        say(f"{out}: bench.parquet, manifest.json, {len(figures)} figure files")
