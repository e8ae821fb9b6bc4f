"""`kvdiag reproduce`: the study of arXiv 2604.08426 on one model: spectra, recall, four tasks, report."""

from __future__ import annotations

from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, quiet, say

EXAMPLES = """
Runs spectrum/, recall/ and eval_<task>/ sub-runs (text2json, multineedle, html2tsv or
html2tsv_synthetic, needle) into --out with the study's method configurations at their budgets,
then writes report.md with tables, figures and a verdict per claim of the study (paired bootstrap
intervals against exact), findings.json and predictions/<task>.jsonl. Re-running with the same --out
skips finished stages and resumes unfinished ones cell by cell; a larger --n adds samples.
--overwrite starts afresh (the new run replaces the old one only once it has finished); an --out
holding another kind of run is refused.

Several short jobs: --max-minutes M starts no stage and no eval cell after M minutes (give the job M
plus the longest cell of slack), --stages runs some stages now and the rest later; the call that
finds every stage done writes the report (--partial-report: also one that does not, marked partial,
from what has finished).

Several GPUs: `torchrun --nproc-per-node N --no-python -- kvdiag reproduce ...` shares each eval
stage's samples among N ranks (cuda:LOCAL_RANK each with --device cuda); rank 0 runs spectrum,
recall and the report while the others wait (KVDIAG_DIST_TIMEOUT_S, default 3600 s, bounds a wait).

Configurations: --quick (= --config quick, a 2-core CPU), --config gpu (the default: one H200), or
--config FILE.yaml (see kvdiag.study.configs); --task-knob task:knob=value overrides a task's knob.

\b
Examples:
  kvdiag reproduce --quick --out runs/reproduce          # qwen2.5-coder-0.5b on a CPU, ~15-20 min
  kvdiag reproduce --quick --out runs/reproduce --figures-dir figures   # + export report and PNGs
  kvdiag reproduce --config gpu --device cuda --data-dir /data --out runs/gpu
      --task-knob text2json:n_entities=8 --max-minutes 8    # repeat until it says "report:"
  kvdiag reproduce --config gpu --device cuda --data-dir /data --out runs/gpu --stages spectrum,recall
  torchrun --nproc-per-node 2 --no-python -- kvdiag reproduce --config gpu --device cuda
      --data-dir /data --out runs/gpu2
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
        config: str = typer.Option(
            None, "--config", help="quick, gpu (default without --quick) or a YAML file"
        ),
        task_knob: list[str] = typer.Option(
            None, "--task-knob", help="task:knob=value, e.g. text2json:n_entities=8; may be repeated"
        ),
        stages: str = typer.Option(
            None,
            "--stages",
            help="','-separated stages to run now: spectrum, recall, text2json, ... (default all)",
        ),
        max_minutes: float = typer.Option(
            None,
            "--max-minutes",
            help="start no stage or eval cell after this many minutes; re-run to continue",
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
        partial_report: bool = typer.Option(
            False, "--partial-report", help="write report.md from the finished stages when some are left"
        ),
    ) -> None:
        """Reproduce arXiv 2604.08426 on one model and write DIR/report.md."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.errors import KvdiagError
        from kvdiag.study.configs import load_config, override_knobs
        from kvdiag.study.reproduce import run_reproduce

        if quick and config not in (None, "quick"):
            raise KvdiagError(f"--quick and --config {config} contradict each other; give one")
        chosen = override_knobs(load_config("quick" if quick else config or "gpu"), task_knob or [])
        result = run_reproduce(
            model or "qwen2.5-coder-0.5b", out, device=device, data_dir=data_dir, n=n, config=chosen,
            figures_dir=figures_dir,
            stages=None if stages is None else [s for s in stages.split(",") if s.strip()],
            max_minutes=max_minutes, echo=lambda line: say(line, err=True), overwrite=overwrite,
            progress=not quiet(), partial_report=partial_report,
        )  # fmt: skip
        print_outcome(result)


def print_outcome(result: dict) -> None:
    """What `kvdiag reproduce` prints at the end (nothing with --quiet; under torchrun only rank 0)."""
    from kvdiag.eval.distributed import ranks

    if not ranks().main:
        return
    if result["complete"]:
        say(f"{result['report']} ({result['seconds']:.0f} s)")
    elif result.get("report"):
        say(f"{result['report']} (partial: {', '.join(result['remaining'])} left; {result['seconds']:.0f} s)")
    else:
        say(f"partial: {', '.join(result['remaining'])} left ({result['seconds']:.0f} s); run again")
