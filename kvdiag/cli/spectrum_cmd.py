"""`kvdiag spectrum`: key rank spectra and low-rank damage of a model on a prompt, with figures."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import format_layers, friendly_errors, quiet, say

EXAMPLES = """
Without --text or --prompt-file the built-in context-intensive sample text is used (as many of its
records as fit the model's context). --layers takes 'all' or indices; negative ones count from the
end (-1 is the last layer). --save-trace keeps the capture in DIR/trace; --trace DIR analyses such a
capture again without loading the model. An --out that already holds a run is refused unless
--overwrite (the new run replaces it only once it has finished).

\b
Examples:
  kvdiag spectrum --out runs/smol                      # default model, built-in sample text
  kvdiag spectrum --model qwen2.5-coder-0.5b --prompt-file doc.txt --layers 0,6,12 --out runs/qwen
  kvdiag spectrum --prompt-file notes.txt --encoding latin-1 --layers -1 --save-trace --out runs/last
  kvdiag spectrum --trace runs/last --center --out runs/last-centred   # reuse the capture
  kvdiag spectrum --model meta-llama/Llama-3.1-8B-Instruct --device cuda --max-tokens 32768 --out runs/llama
"""


def register(app: typer.Typer) -> None:
    @app.command("spectrum", epilog=EXAMPLES)
    @friendly_errors
    def spectrum(
        out: Path = typer.Option(..., "--out", help="run directory for tables, manifest and figures"),
        model: str = typer.Option(
            None, "--model", help="registered name, HF id, local dir or .gguf (default smollm2-135m)"
        ),
        prompt_file: Path = typer.Option(None, "--prompt-file", help="text file with the prompt"),
        encoding: str = typer.Option("utf-8", "--encoding", help="text encoding of --prompt-file"),
        text: str = typer.Option(None, "--text", help="the prompt itself"),
        layers: str = typer.Option(
            "all", "--layers", help="'all' or comma-separated indices, e.g. 0,5,10 (-1 = the last layer)"
        ),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option(
            None, "--dtype", help="float32 (CPU default), bfloat16 (CUDA default), float16"
        ),
        max_tokens: int = typer.Option(None, "--max-tokens", help="keep only the first N prompt tokens"),
        chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
        queries: int = typer.Option(64, "--queries", help="last prompt positions used for low-rank damage"),
        center: bool = typer.Option(
            False, "--center", help="centre keys before the SVD (default: uncentred)"
        ),
        save_trace: bool = typer.Option(False, "--save-trace", help="also save the capture in DIR/trace"),
        trace: Path = typer.Option(
            None, "--trace", help="analyse a capture saved with --save-trace (its dir or its run dir)"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
    ) -> None:
        """Singular-value spectra of keys (joint and per KV head, pre and post RoPE) and what a
        rank-r SVD of pre-RoPE keys (ShadowKV) does to attention. Without a prompt, a built-in
        context-intensive sample text is used."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.analysis.spectrum import run_spectrum

        result = run_spectrum(
            model, out, prompt=text, prompt_file=prompt_file, layers=layers, device=device, dtype=dtype,
            max_tokens=max_tokens, chat=chat, n_queries=queries, center=center, encoding=encoding,
            trace=trace, save_trace=save_trace, overwrite=overwrite, progress=not quiet(),
        )  # fmt: skip
        print_summary(result)


def print_summary(result: dict) -> None:
    """Draw the run's figures, then print what `kvdiag spectrum` prints when it succeeds (nothing with
    --quiet)."""
    from kvdiag.plots import plot_run

    figures = plot_run(result["out"])
    say(f"{result['n_tokens']} tokens, layers {format_layers(result['layers'])}, {result['seconds']:.1f} s")
    say(f"tables:  {', '.join(str(p) for p in result['tables'])}")
    say(f"figures: {result['out'] / 'figures'}/ ({len(figures)} files)")
