"""`kvdiag bench`: one decode step of one layer through the offload runtime vs its floor and baselines,
and the end-to-end decode of a whole random-weight model (full attention vs the runtime)."""

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
        parts: str = typer.Option(
            "step,e2e", "--parts", help="step (one layer's kernel step), e2e (whole-model decode)"
        ),
        e2e_steps: int = typer.Option(16, "--e2e-steps", help="decode steps timed per end-to-end case"),
        max_batch: int = typer.Option(
            64, "--max-batch", help="cap of the largest-batch search at the longest length"
        ),
        smoke: bool = typer.Option(False, "--smoke", help="tiny shapes on the CPU (Triton interpreter)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
    ) -> None:
        """Time the runtime's kernel step (scoring, top-k, host gather, attention; CUDA graphs) per
        layer against resident bytes / HBM + fetched bytes / host link, full attention (SDPA) and the
        plain-PyTorch path, with the ceilings re-measured; then decode a whole random-weight model with
        Llama-3.1-8B's configuration end to end (full attention vs each method: tokens/s, peak GPU
        memory, the largest batch at the longest length); bench.parquet, manifest.json, figures."""
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

        chosen = {p.strip() for p in parts.split(",") if p.strip()}
        if not chosen or chosen - {"step", "e2e"}:
            raise KvdiagError(f"--parts {parts!r}: use step, e2e or both (','-separated)")
        if e2e_steps < 2 or max_batch < 1:
            raise KvdiagError(f"--e2e-steps must be ≥ 2 and --max-batch ≥ 1 (got {e2e_steps}, {max_batch})")
        result = run_bench(out, ints(lengths, "lengths"), ints(batch, "batch"),
                           [m.strip() for m in methods.split(",") if m.strip()], smoke=smoke, overwrite=overwrite,
                           progress=not quiet(), step="step" in chosen, e2e="e2e" in chosen, e2e_steps=e2e_steps,
                           max_batch_cap=max_batch)  # fmt: skip
        figures = plot_bench_run(out)
        for line in result["summary"]:
            say(line)
        say(f"{out}: bench.parquet, manifest.json, {len(figures)} figure files")
