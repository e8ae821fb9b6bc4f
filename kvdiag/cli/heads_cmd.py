"""`kvdiag heads`: how many context tokens each layer × KV head needs (per-head context intensity)."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, quiet, say

EXAMPLES = """
For each layer × KV head and decode-like query: the fewest context tokens (before the first query)
that hold 50 / 90 / 99 % of the exact attention mass over the context, per query head and for the
GQA group's union, with mean / std / min / median / max over the queries. With --task the queries
are the gold answer's positions under teacher forcing, and the needle task is measured alongside as
the low-intensity control; with a prompt they are its last --queries positions.

\b
Examples:
  kvdiag heads --model smollm2-135m --task text2json --n 2 --target-tokens 1500 --out runs/heads
  kvdiag heads --model qwen2.5-coder-0.5b --task multineedle --n 4 --taus 0.9,0.99 --out runs/h2
  kvdiag heads --prompt-file doc.txt --queries 32 --layers 0,10,20 --out runs/h3
  kvdiag plot runs/heads        # redraw the figures from heads.parquet
"""


def register(app: typer.Typer) -> None:
    @app.command("heads", epilog=EXAMPLES)
    @friendly_errors
    def heads(
        out: Path = typer.Option(..., "--out", help="run directory for heads.parquet, calibration, figures"),
        model: str = typer.Option(
            "smollm2-135m", "--model", help="registered name, HF id, local dir or .gguf"
        ),
        task: str = typer.Option(None, "--task", help="a task of `kvdiag tasks`, e.g. text2json"),
        n: int = typer.Option(2, "--n", help="number of task samples (and of needle samples)"),
        target_tokens: int = typer.Option(2048, "--target-tokens", help="prompt length of task samples"),
        task_knob: list[str] = typer.Option(
            None, "--task-knob", help="knob=value of the task; may be repeated"
        ),
        seed: int = typer.Option(0, "--seed", help="sample seed"),
        no_needle_baseline: bool = typer.Option(
            False, "--no-needle-baseline", help="do not measure the needle task alongside --task"
        ),
        data_dir: Path = typer.Option(
            None, "--data-dir", help="folder holding the tasks' data folders (default $KVDIAG_DATA_DIR)"
        ),
        prompt_file: Path = typer.Option(None, "--prompt-file", help="text file with the prompt"),
        text: str = typer.Option(None, "--text", help="the prompt itself"),
        queries: int = typer.Option(
            64, "--queries", help="with a prompt: its last N positions are the queries"
        ),
        max_tokens: int = typer.Option(None, "--max-tokens", help="with a prompt: keep its first N tokens"),
        chat: bool = typer.Option(
            None,
            "--chat/--no-chat",
            help="chat template (default: for task samples when the tokenizer has one)",
        ),
        taus: str = typer.Option("0.5,0.9,0.99", "--taus", help="','-separated shares of the mass to cover"),
        calibration_tau: float = typer.Option(
            0.9, "--calibration-tau", help="the τ whose need heads_calibration.json keeps"
        ),
        layers: str = typer.Option("all", "--layers", help="'all' or comma-separated indices, e.g. 0,5,10"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16, float16"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
    ) -> None:
        """Per-head context intensity: tokens needed to cover 50 / 90 / 99 % of exact attention per layer ×
        KV head (GQA union), on a task vs the needle task or on a prompt; writes heads.parquet,
        heads_calibration.json (for head-wise budgets), manifest.json and figures."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.errors import KvdiagError
        from kvdiag.eval.heads import run_heads
        from kvdiag.eval.inputs import parse_task_knobs
        from kvdiag.plots.heads import plot_heads_run

        try:
            tau_list = [float(t) for t in taus.split(",") if t.strip()]
        except ValueError:
            raise KvdiagError(f"--taus {taus!r} is not a ','-separated list of numbers in (0, 1]") from None
        knobs = parse_task_knobs(task, task_knob) if task and task_knob else None
        if task_knob and not task:
            raise KvdiagError("--task-knob needs --task")
        result = run_heads(
            model, out, task=task, n=n, prompt=text, prompt_file=prompt_file, n_queries=queries, taus=tau_list,
            layers=layers, target_tokens=target_tokens, seed=seed, task_knobs=knobs, chat=chat,
            needle_baseline=not no_needle_baseline, data_dir=data_dir, device=device, dtype=dtype,
            max_tokens=max_tokens, calibration_tau=calibration_tau, overwrite=overwrite, progress=not quiet(),
        )  # fmt: skip
        figures = plot_heads_run(result["out"])
        summary = result["summary"]
        focus = summary[(summary.measure == "union") & (abs(summary.tau - calibration_tau) < 1e-9)]
        for name, rows in focus.groupby("task", sort=False):
            say(
                f"{name}: L0 ≈ {rows.n_context.mean():.0f}, median union need at τ = {calibration_tau:g}: "
                f"{rows.tokens_median.median():.1f} tokens ({100 * rows.fraction_median.median():.2f} % of L0) "
                f"for the median head, {rows.tokens_median.max():.0f} for the neediest"
            )
        say(f"{len(result['inputs'])} samples, {result['seconds']:.1f} s")
        say(f"table:       {result['table']}")
        say(f"calibration: {result['calibration']}")
        say(f"figures:     {result['out'] / 'figures'}/ ({len(figures)} files)")
