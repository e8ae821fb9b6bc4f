"""`kvdiag recall`: top-k recall, attention mass and output-error decomposition of offloading methods."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import format_layers, friendly_errors, quiet, say

EXAMPLES = """
Method specs are "name" or "name:knob=value,knob=value"; several specs are separated by ';' in
--methods (quote it in the shell) or given as repeated --method options. Budgets are separated by
','; "0.03125" or "3.125%" is a fraction of the context L0 (the prompt before the first query), a
whole number such as "2048" is a token count ("1.0" is the whole context, "1" one token).
--layers takes 'all' or indices; negative ones count from the end (-1 is the last layer).
--save-trace keeps the capture in DIR/trace; --trace DIR analyses it again without loading the model
(e.g. other methods or budgets). An --out that already holds a run is refused unless --overwrite.

\b
Examples:
  kvdiag recall --out runs/recall                                   # smollm2-135m, all methods but exact
  kvdiag recall --methods 'oracle;shadowkv;yakv' --budgets 0.015625,0.03125,2048 --out runs/r1
  kvdiag recall --method oracle --method 'shadowkv:rank=320,chunk=8' --layers 0,10,20 --out runs/r2
  kvdiag recall --model tiny-llama --task text2json --max-tokens 1024 --out runs/r3
  kvdiag recall --methods oracle --save-trace --out runs/r4
  kvdiag recall --trace runs/r4 --methods 'quest;arkvale' --out runs/r5   # same capture, no model load
  kvdiag methods                                                    # every method, its knobs and defaults
"""


def split_specs(methods: str | None, method: list[str] | None) -> list[str] | None:
    """--methods 'a;b:k=1,j=2' plus repeated --method options -> specs (None: the default list)."""
    specs = [s.strip() for s in (methods or "").split(";") if s.strip()] + [s.strip() for s in method or []]
    if methods is not None or method:
        if not specs:
            from kvdiag.errors import KvdiagError
            from kvdiag.methods import method_names

            raise KvdiagError(f"the method list is empty; choose from {', '.join(method_names())}")
        return specs
    return None


def register(app: typer.Typer) -> None:
    @app.command("recall", epilog=EXAMPLES)
    @friendly_errors
    def recall(
        out: Path = typer.Option(..., "--out", help="run directory for recall.parquet, manifest and figures"),
        model: str = typer.Option(
            None, "--model", help="registered name, HF id, local dir or .gguf (default smollm2-135m)"
        ),
        prompt_file: Path = typer.Option(None, "--prompt-file", help="text file with the prompt"),
        encoding: str = typer.Option("utf-8", "--encoding", help="text encoding of --prompt-file"),
        text: str = typer.Option(None, "--text", help="the prompt itself"),
        task: str = typer.Option(
            None, "--task", help="take the prompt of a task's first sample (seed 0), e.g. text2json"
        ),
        methods: str = typer.Option(
            None, "--methods", help="';'-separated method specs (default: all registered but exact)"
        ),
        method: list[str] = typer.Option(None, "--method", help="one method spec; may be repeated"),
        budgets: str = typer.Option(
            "0.015625,0.03125,0.0625", "--budgets", help="','-separated fractions of L0 or token counts"
        ),
        layers: str = typer.Option(
            "all", "--layers", help="'all' or comma-separated indices, e.g. 0,5,10 (-1 = the last layer)"
        ),
        queries: int = typer.Option(64, "--queries", help="the last N prompt positions act as decode steps"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16, float16"),
        max_tokens: int = typer.Option(None, "--max-tokens", help="keep only the first N prompt tokens"),
        chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
        save_trace: bool = typer.Option(False, "--save-trace", help="also save the capture in DIR/trace"),
        trace: Path = typer.Option(
            None, "--trace", help="analyse a capture saved with --save-trace (its dir or its run dir)"
        ),
        cache_tokens: int = typer.Option(
            None,
            "--cache-tokens",
            help="GPU cache of recently fetched tokens per KV head for every method (default: each method's own)",
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
    ) -> None:
        """Which exact top-k tokens each method attends, how much exact attention mass it keeps and how
        its attention-output error splits into selection loss and key loss, per layer and KV head, with
        GPU-resident and fetched bytes. Without a prompt, a built-in context-intensive sample is used."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.analysis.recall import run_recall
        from kvdiag.methods import parse_budget

        specs = split_specs(methods, method)
        budget_list = [parse_budget(b) for b in budgets.split(",") if b.strip()]
        result = run_recall(
            model, out, methods=specs, budgets=budget_list, layers=layers, prompt=text,
            prompt_file=prompt_file, task=task, n_queries=queries, device=device, dtype=dtype,
            max_tokens=max_tokens, chat=chat, save_trace=save_trace, encoding=encoding, trace=trace,
            overwrite=overwrite, progress=not quiet(), cache_tokens=cache_tokens,
        )  # fmt: skip
        print_summary(result)


def print_summary(result: dict) -> None:
    """Draw the run's figures, then print what `kvdiag recall` prints when it succeeds (nothing with
    --quiet)."""
    from kvdiag.plots import plot_run

    figures = plot_run(result["out"])
    say(
        f"{result['n_tokens']} tokens (context {result['n_context']}), layers {format_layers(result['layers'])}, "
        f"{result['rows']} rows, {result['seconds']:.1f} s"
    )
    say(f"table:   {result['table']}")
    say(f"figures: {result['out'] / 'figures'}/ ({len(figures)} files)")
