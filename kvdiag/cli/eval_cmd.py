"""`kvdiag eval`: a task's samples under exact attention and each method × budget, scored, resumable."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, quiet, say

EXAMPLES = """
Method specs are "name" or "name:knob=value,knob=value", optionally with the method's own budget
after '@' ("shadowkv@1.5625%", "arkvale:page_size=16@0.78125%"): such a method runs only at that
budget, the others at every --budgets value. Several specs are separated by ';' in --methods (quote
it in the shell: commas belong to the specs) or given as repeated --method options. 'exact' always
runs; --methods exact runs only it. Budgets are separated by ','; "0.03125" or "3.125%" is a
fraction of the prompt, "2048" a token count.

Several GPUs: `torchrun --nproc-per-node N --no-python -- kvdiag eval ...` shares the samples with
cells left out among N ranks (one GPU each with --device cuda); each rank appends to its own
predictions.rank{R}.jsonl and rank 0 merges them into the same run directory a single process
writes. Any world size (or none) resumes any other's run. More ranks than GPUs share them
round-robin: a small model's decode is bound by the host, so with --shard-by methods (each rank its
own method configurations) several ranks on one GPU finish sooner than one. The `--` keeps torchrun from reading
kvdiag's --n as an abbreviation of its own options.

Re-running with the same --out resumes: finished (sample, method, budget) cells in predictions.jsonl
are skipped, also after a kill. A run may grow: a larger --n, another method or another budget only
adds cells; a change that would alter existing cells (model, task knobs, seed, --target-tokens,
--max-new-tokens, chat, device, dtype, fidelity, a method whose knobs changed) is refused, naming
the field and both values. An --out holding another kind of run is refused; --overwrite starts
afresh (the new run replaces the old one only once it has finished).

\b
Examples:
  kvdiag eval --model tiny-llama --task needle --methods 'oracle;streaming' --n 2
      --target-tokens 600 --max-new-tokens 8 --out runs/smoke
  kvdiag eval --model qwen2.5-coder-0.5b --task text2json --task-knob n_entities=4
      --methods 'oracle;shadowkv:rank=20;yakv' --budgets 0.03125,0.0625 --n 3
      --target-tokens 1500 --max-new-tokens 200 --out runs/t2j
  kvdiag eval --model qwen2.5-coder-0.5b --task needle --methods
      'shadowkv@1.5625%;shadowkv@15.625%;yakv@3.125%;oracle@3.125%' --n 2 --out runs/needle
  kvdiag eval --model qwen2.5-coder-0.5b --task html2tsv --data-dir /work/shared/data
      --methods exact --n 2 --max-new-tokens 640 --out runs/html
  torchrun --nproc-per-node 2 --no-python -- kvdiag eval --model qwen2.5-coder-0.5b --task needle
      --methods 'oracle;yakv' --n 20 --device cuda --out runs/needle2
  kvdiag tasks        # the tasks, their knobs and whether their data is found
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", epilog=EXAMPLES)
    @friendly_errors
    def eval_(
        out: Path = typer.Option(
            ..., "--out", help="run directory (resumed when it holds this eval already)"
        ),
        task: str = typer.Option(..., "--task", help="a task of `kvdiag tasks`, e.g. text2json"),
        model: str = typer.Option(
            "smollm2-135m", "--model", help="registered name, HF id, local dir or .gguf"
        ),
        task_knob: list[str] = typer.Option(
            None, "--task-knob", help="knob=value of the task; may be repeated"
        ),
        methods: str = typer.Option(
            None,
            "--methods",
            help="';'-separated method specs, each optionally spec@budget (default: all registered methods)",
        ),
        method: list[str] = typer.Option(None, "--method", help="one method spec; may be repeated"),
        budgets: str = typer.Option(
            "0.03125,0.0625",
            "--budgets",
            help="','-separated fractions of the prompt or token counts (for specs without @budget)",
        ),
        n: int = typer.Option(4, "--n", help="number of samples"),
        target_tokens: int = typer.Option(2048, "--target-tokens", help="prompt length of generated samples"),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation cap per answer"),
        seed: int = typer.Option(0, "--seed", help="sample seed"),
        chat: bool = typer.Option(
            None, "--chat/--no-chat", help="use the chat template (default: when the tokenizer has one)"
        ),
        data_dir: Path = typer.Option(
            None, "--data-dir", help="folder holding the tasks' data folders (default $KVDIAG_DATA_DIR)"
        ),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto"),
        dtype: str = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16, float16"),
        no_fidelity: bool = typer.Option(
            False, "--no-fidelity", help="skip teacher-forced KL / top-1 agreement on the gold answer"
        ),
        batch_size: int = typer.Option(
            1,
            "--batch-size",
            help="samples decoded together per method × budget (same tokens as one at a time)",
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="replace the run in --out instead of resuming it"
        ),
        shard_by: str = typer.Option(
            "samples",
            "--shard-by",
            help="under torchrun: share out samples, or methods (for ranks sharing one GPU)",
        ),
    ) -> None:
        """Generate answers to a task's samples with exact attention and with each offloading method at
        each budget (in the accuracy simulator), score them, and write predictions.jsonl,
        results.parquet, manifest.json and figures. Ctrl-C keeps every finished cell."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.cli.recall_cmd import split_specs
        from kvdiag.eval.harness import run_eval
        from kvdiag.eval.inputs import parse_task_knobs
        from kvdiag.methods import parse_budget

        specs = split_specs(methods, method)
        budget_list = [parse_budget(b) for b in budgets.split(",") if b.strip()]
        try:
            result = run_eval(
                model, task, out, methods=specs, budgets=budget_list, task_knobs=parse_task_knobs(task, task_knob or []),
                n=n, target_tokens=target_tokens, max_new_tokens=max_new_tokens, seed=seed, chat=chat,
                data_dir=data_dir, device=device, dtype=dtype, fidelity=not no_fidelity, batch_size=batch_size,
                overwrite=overwrite, progress=not quiet(), shard_by=shard_by,
            )  # fmt: skip
        except KeyboardInterrupt:
            if overwrite:
                typer.echo(
                    f"the run in {out} is unchanged (--overwrite replaces it only when done)", err=True
                )
            else:
                typer.echo(
                    f"finished cells are kept in {out}/predictions*.jsonl; run the same command to resume",
                    err=True,
                )
            raise
        print_summary(result)


def print_summary(result: dict) -> None:
    """Draw the figures of a complete run, then print what `kvdiag eval` prints when it succeeds
    (nothing with --quiet; under torchrun only rank 0): the score table, budgets as asked ("3.125 %",
    "2048 tokens", "all" for exact) beside the tokens they meant."""
    from kvdiag.eval.distributed import ranks
    from kvdiag.eval.inputs import budget_label

    if not ranks().main:
        return
    if result["complete"]:
        from kvdiag.plots import plot_run

        plot_run(result["out"])
    summary = result["scores"].copy()
    summary["budget"] = [budget_label(b, m) for b, m in zip(summary.budget, summary.method)]
    summary["budget_tokens"] = summary.budget_tokens.round().astype(int)
    columns = ["method", "budget", "budget_tokens", "n", "score_mean", "score_stderr", "kl_mean",
               "hit_cap_rate"]  # fmt: skip
    say(summary[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    say(
        f"{result['cells']} cells ({result['new_cells']} run now), {result['seconds']:.1f} s; "
        f"{result['predictions']}, {result['table']}, {result['out'] / 'figures'}/"
    )
