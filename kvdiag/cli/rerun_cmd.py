"""`kvdiag rerun RUN_DIR`: run again what made RUN_DIR, from its manifest (command + config)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

from kvdiag.cli import friendly_errors, quiet, say
from kvdiag.errors import KvdiagError

EXAMPLES = """
The run's command is repeated with the configuration its manifest.json recorded: the same model,
prompt (the run's prompt.txt, checked against the recorded SHA-256), layers, methods, budgets, task
knobs, samples and seed. Without --out the new run goes into RUN_DIR itself, under the usual rules:
eval and reproduce resume there (finishing what an interrupted run left undone), spectrum and recall
need --overwrite. Differences in versions or git commit against the recorded run are printed.

\b
Examples:
  kvdiag rerun runs/smol --out runs/smol-again          # then compare the tables
  kvdiag rerun runs/t2j                                 # resume an interrupted eval
  kvdiag rerun runs/gpu-run --device cpu --out runs/cpu-run
"""


def _prompt(run_dir: Path, config: dict) -> dict:
    """The prompt arguments of a spectrum / recall run: its prompt.txt, else the built-in sample or
    the task sample (both deterministic), checked against the recorded prompt hash."""
    source = str(config.get("prompt_source", ""))
    if config.get("task"):
        return {"task": config["task"]}
    saved = run_dir / "prompt.txt"
    if saved.is_file():
        expected = config.get("prompt_sha256")
        if expected and hashlib.sha256(saved.read_bytes()).hexdigest() != expected:
            raise KvdiagError(f"{saved} does not match the prompt SHA-256 recorded in the manifest")
        return {"prompt_file": saved}
    if source == "built-in sample":
        return {}
    raise KvdiagError(
        f"{run_dir} does not hold the prompt it analysed (no prompt.txt: the run predates it; its source "
        f"was {source or 'unknown'}); run the command again by hand"
    )


def rerun_arguments(run_dir: Path, manifest: dict, device: str | None = None) -> dict:
    """The keyword arguments of the pipeline function (`run_spectrum`, `run_recall`, `run_eval`,
    `run_reproduce`) that repeat the run recorded in `manifest` (without `out`)."""
    kind, config = manifest["command"], manifest.get("config") or {}
    device = device or config.get("device", "cpu")
    if kind in ("spectrum", "recall"):
        args = {
            "model": config["model"],
            "layers": config["layers"],
            "device": device,
            "n_queries": config["queries"],
        }
        if manifest.get("trace"):
            args["trace"] = manifest["trace"]
        else:
            args.update(dtype=config.get("dtype"), max_tokens=config.get("max_tokens"), chat=bool(config.get("chat")),
                        save_trace=bool(manifest.get("trace_saved")), **_prompt(run_dir, config))  # fmt: skip
        if kind == "spectrum":
            args["center"] = bool(config.get("centered"))
        else:
            args["methods"] = [m["label"] for m in config["methods"]]
            args["budgets"] = [b["given"] for b in config["budgets"]]
            args["cache_tokens"] = config.get("cache_tokens")
        return args
    if kind == "eval":  # every recorded config key that run_eval takes (methods as "label@budget")
        import inspect

        from kvdiag.eval.harness import run_eval

        takes = set(inspect.signature(run_eval).parameters) - {"out", "overwrite", "progress", "figures"}
        args = {k: v for k, v in config.items() if k in takes}
        knobs = dict(args.pop("task_knobs", None) or {})
        return {**args, "task_knobs": knobs, "data_dir": knobs.pop("data_dir", None), "device": device}
    if kind == "reproduce":  # the configuration as recorded (a name, a YAML file or --task-knob changes)
        from kvdiag.study.configs import ReproduceConfig, config_from_dict

        fields = {k: config[k] for k in ReproduceConfig.__dataclass_fields__ if k in config}
        return {"model": config["model"], "device": device, "data_dir": config.get("data_dir"),
                "config": config_from_dict(fields, where=f"{run_dir}/manifest.json")}  # fmt: skip
    raise KvdiagError(f"{run_dir} holds a {kind!r} run, which kvdiag rerun does not know how to repeat")


def version_notes(manifest: dict) -> list[str]:
    """Where this installation differs from the one that made the run (versions, git commit)."""
    from kvdiag.runs import git_hash, versions

    now = {**versions(), "git": git_hash()}
    then = {**(manifest.get("versions") or {}), "git": manifest.get("git")}
    keys = ("kvdiag", "torch", "transformers", "triton", "cuda", "gpu", "python", "git")
    return [
        f"{k} {then.get(k)} then, {now.get(k)} now" for k in keys if k in then and then.get(k) != now.get(k)
    ]


def register(app: typer.Typer) -> None:
    @app.command("rerun", epilog=EXAMPLES)
    @friendly_errors
    def rerun(
        run_dir: Path = typer.Argument(..., help="a run directory written by a kvdiag command"),
        out: Path = typer.Option(None, "--out", help="where the new run goes (default: RUN_DIR itself)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in --out"),
        device: str = typer.Option(None, "--device", help="run on this device instead of the recorded one"),
    ) -> None:
        """Repeat the command that wrote RUN_DIR with the configuration its manifest recorded."""
        import matplotlib

        matplotlib.use("Agg")
        from kvdiag.runs import read_manifest

        manifest = read_manifest(run_dir)
        kind = manifest["command"]
        args = rerun_arguments(Path(run_dir), manifest, device)
        out = Path(run_dir) if out is None else out
        notes = version_notes(manifest)
        if notes:
            say(f"note: {run_dir} was made with other software: {'; '.join(notes)}", err=True)
        common = {"overwrite": overwrite, "progress": not quiet()}
        if kind == "spectrum":
            from kvdiag.analysis.spectrum import run_spectrum
            from kvdiag.cli.spectrum_cmd import print_summary

            print_summary(run_spectrum(out=out, **args, **common))
        elif kind == "recall":
            from kvdiag.analysis.recall import run_recall
            from kvdiag.cli.recall_cmd import print_summary

            print_summary(run_recall(out=out, **args, **common))
        elif kind == "eval":
            from kvdiag.cli.eval_cmd import print_summary
            from kvdiag.eval.harness import run_eval

            print_summary(run_eval(out=out, **args, **common))
        else:
            from kvdiag.cli.reproduce_cmd import print_outcome
            from kvdiag.study.reproduce import run_reproduce

            print_outcome(run_reproduce(out=out, echo=lambda line: say(line, err=True), **args, **common))
