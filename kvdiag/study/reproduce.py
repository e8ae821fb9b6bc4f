"""`kvdiag reproduce`: the study of arXiv 2604.08426 on one model, end to end, resumable.

    from kvdiag.study.reproduce import run_reproduce
    run_reproduce("qwen2.5-coder-0.5b", "runs/reproduce", quick=True)   # CPU, ~15-20 min
    # runs/reproduce/report.md, its figures, and one sub-run directory per stage

Stages, each its own run directory under `out` (`kvdiag plot` redraws any of them):
- spectrum/        `run_spectrum` on a Text2JSON prompt: key spectra and ShadowKV's low-rank damage;
- recall/          `run_recall` on a Text2JSON prompt: the study's configurations (below) at every
                   budget of `STUDY_BUDGETS` ∪ a sweep, recall, attention mass and error decomposition;
- eval_<task>/     `run_eval` for text2json, multineedle, html2tsv (LongProc's real pages when the
                   data is found, else html2tsv_synthetic; the report says which) and needle, each with
                   exact and the study's configurations at their budgets (`study_methods`).
Then report.md (`kvdiag.study.report`): configuration, per-task tables, the recall table at the study's
budgets, figures, and **Findings**, one verdict per claim of the study, decided from paired bootstrap
intervals (`kvdiag.study.claims`); beside it findings.json and predictions/<task>.jsonl, the
machine-readable results (`kvdiag.study.findings`; `kvdiag rescore` re-scores them).

The study's configurations (reference/METHODS.md): ShadowKV defaults at 1.5625 % and at 15.625 %
(10× budget); ArkVale `ArkVale.study()` at 0.78125 %; LRQK `LRQK.study(family)` (qwen rank for Qwen
models, else llama) at 0.258 % active tokens; InfiniGen `InfiniGen.study()` (top-k, no threshold) at
its release budget 0.2; YAKV defaults at 3.125 %; the oracle at 3.125 %.

Resuming, and a reproduction as several short jobs: a stage whose sub-run finished with the same stage
config (recorded in `out`/manifest.json) is skipped; eval sub-runs resume cell by cell and grow by
samples (`--n` larger than before); any other change of configuration in the same `out` is refused,
naming the field. `stages=` (`--stages text2json,needle`) runs a subset now and leaves the rest for a
later call; `max_minutes=` (`--max-minutes 8`) starts no stage and no eval cell after that many minutes,
so a job of M minutes needs M plus the longest cell (and the model load) of wall time. report.md is
written by the call that finds every stage done. Every stage prints one line when it starts and one
when it ends.

Quick mode (`quick_config`), sized for a 2-core CPU in about 15-20 minutes with qwen2.5-coder-0.5b
(prefill ~11 s per 1.2K-token prompt, decode ~0.15 s per token exact and ~0.2 s in the simulator):
- prompts of ~1200 tokens (the generated tasks' `target_tokens`), so a prompt costs seconds;
- text2json with 4 entities and 2 distractors (exact scores ~36 there; 10 entities need longer
  answers than the CPU can afford), n = 2, at most 128 new tokens (the gold answer is ~104 tokens;
  runaway generations stop at the cap and count in the hit-cap share);
- needle: n = 2, at most 24 new tokens (the answer sentence is ~13);
- multineedle with 5 needles (depths 0, 25, 50, 75, 100 %), n = 1, at most 88 new tokens (~67 gold);
- html2tsv_synthetic with 4 items, n = 1, at most 112 new tokens (~91 gold): LongProc's real pages
  are 2K-11K tokens, and the 0.5B model scored 0 on them even with exact attention;
- spectrum on all layers; recall on every 4th layer (2, 6, ..., 22 of 24), 32 query positions;
- ShadowKV's 48 outlier chunks (384 tokens, 0.29 % of a 128K prompt) would be a third of a 1.2K
  prompt: quick scales them to the same 0.29 % of the prompt, at least one chunk (1 chunk here).
  Its 32-token local window is kept (2.6 % of such a prompt).
The GPU mode (`gpu_config`, the default without --quick) runs 20-50 samples per task on 12K-16K-token
prompts, LongProc's real pages, all layers; see `kvdiag.study.configs` for it, YAML files and
`--task-knob task:knob=value` overrides.

Under torchrun (`torchrun --nproc-per-node N --no-python -- kvdiag reproduce ...`) rank 0 decides
which stages run (and prints), the eval stages share their samples among the ranks
(`kvdiag.eval.distributed`), and spectrum, recall and the report run on rank 0 while the others wait:
the same run directory as one process writes, with the eval cells split N ways.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

from kvdiag.errors import KvdiagError
from kvdiag.study.calibrate import Calibration
from kvdiag.study.configs import (  # noqa: F401  (re-exported: reproduce's public names)
    CONFIGS,
    HTML_TASKS,
    OUTLIER_SHARE,
    RECALL_SWEEP,
    ROLE_TITLES,
    STUDY_BUDGETS,
    ReproduceConfig,
    StudyMethod,
    TaskPlan,
    gpu_config,
    load_config,
    model_family,
    quick_config,
    roles_of,
    study_methods,
    unique_methods,
)
from kvdiag.study.plans import (  # noqa: F401  (fit_plans and select_stages: part of reproduce's API)
    adapt_plan,
    analysis_prompt,
    fit_plans,
    html2tsv_task,
    model_layers,
    reads_data,
    select_stages,
)

log = logging.getLogger(__name__)

# --- the pipeline -----------------------------------------------------------------------------------


def _comparable(top: dict) -> dict:
    """A reproduce config without what may change between jobs: the data folder's path (the eval
    stages check the prompts themselves), the configuration's name (its content is compared) and each
    task's n (eval runs grow by samples)."""
    return {**{k: v for k, v in top.items() if k not in ("data_dir", "name", "quick", "shard_by")},
            "tasks": [{k: v for k, v in t.items() if k != "n"} for t in top.get("tasks", [])]}  # fmt: skip


def _check_same_study(out: Path, old: dict, new: dict) -> None:
    before, now = _comparable(old), _comparable(new)
    for key in sorted(set(before) | set(now)):
        if before.get(key) == now.get(key):
            continue
        field, was, is_ = key, before.get(key), now.get(key)
        if key == "tasks" and [t["task"] for t in was or []] == [t["task"] for t in is_ or []]:
            for a, b in zip(was, is_):
                differing = [k for k in a if a[k] != b.get(k)]
                if differing:
                    field, was, is_ = (
                        f"tasks[{a['task']}].{differing[0]}",
                        a[differing[0]],
                        b.get(differing[0]),
                    )
                    break
        raise KvdiagError(
            f"cannot resume into {out}: its reproduce configuration has {field} = {was!r} and now {is_!r}; "
            "use the same options, a new --out or --overwrite (more samples per task, --n, may be added)"
        )


def run_reproduce(model: str, out, quick: bool = False, device: str | None = "cpu", data_dir=None,
                  n: int | None = None, config: ReproduceConfig | str | Path | None = None, figures_dir=None,
                  progress: bool = True, echo=print, stages=None, max_minutes: float | None = None,
                  overwrite: bool = False, partial_report: bool = False) -> dict:  # fmt: skip
    """Run the stages into `out` (skipping finished ones), then write out/report.md and findings.json.

    config: a `ReproduceConfig`, or a name ("quick", "gpu") or YAML file for `load_config`; None means
    "quick" with quick=True, else "gpu". n: samples per task (overrides the configuration's; a finished
    run grows by the extra samples). data_dir: the folder holding the tasks' data (LongProc HTML→TSV,
    NeedleBench). stages: run only these (`select_stages`), the others wait for a later call;
    max_minutes: start no stage, and no eval cell, after that many minutes (a cell or a spectrum /
    recall stage that started still finishes). A run that stopped early, or whose stages are not all
    done, writes no report: the same call continues it. figures_dir: also export the report, its PNGs,
    findings.json and predictions/ there (`kvdiag.study.report.export_report`). echo: where the
    per-stage progress lines go. overwrite: start afresh instead of resuming a reproduce run in `out`
    (or replace a run of another kind there); the new run is staged beside `out` and swapped in when
    it has finished (not under torchrun). partial_report: when stages are left, still write report.md
    and findings.json from what has finished (marked partial at the top and in findings.json: eval
    stages that stopped early count the samples they finished); the run stays resumable.
    Returns {"out", "report" (None until complete), "stages": {name: seconds or a word}, "seconds",
    "complete", "remaining"}.
    """
    call = dict(locals())
    from kvdiag.eval.distributed import barrier, from_main, rank_device, ranks
    from kvdiag.eval.harness import _context_length
    from kvdiag.methods import check_budget
    from kvdiag.models import resolve_device
    from kvdiag.runs import claim_run_dir, git_hash, replaces_run, replacing_run_dir, write_manifest
    from kvdiag.study.report import export_report, write_report

    start = time.perf_counter()
    if max_minutes is not None and (isinstance(max_minutes, bool) or not isinstance(max_minutes, int | float)
                                    or not max_minutes > 0):  # fmt: skip
        raise KvdiagError(f"--max-minutes must be a positive number, got {max_minutes!r}")
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    if config is None:
        config = CONFIGS["quick" if quick else "gpu"]()
    elif not isinstance(config, ReproduceConfig):
        config = load_config(config)
    quick = config.name == "quick"
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KvdiagError(f"--n must be an integer ≥ 1, got {n!r}")
        config = dataclasses.replace(config, tasks=[dataclasses.replace(t, n=n) for t in config.tasks])
    for b in config.recall_sweep:
        check_budget(b)
    device = resolve_device(device)
    me = ranks(device)  # under torchrun: eval stages are sharded, the others run on rank 0
    if not me.main:
        echo = _silent
    out = Path(out).expanduser()
    previous = claim_run_dir(out, "reproduce", overwrite=overwrite)
    if replaces_run(out, overwrite, me.distributed):
        with replacing_run_dir(out) as staging:
            result = run_reproduce(**{**call, "out": staging, "overwrite": False})
        report = result["report"] and out / Path(result["report"]).relative_to(staging)
        return {**result, "out": out, "report": report}
    _context_length(model)  # an unknown model name fails here, with did-you-mean help
    family = model_family(model)
    html_task = html2tsv_task(config, data_dir)
    plans = [adapt_plan(plan, html_task) for plan in config.tasks]
    plans, skipped = fit_plans(model, plans, echo, data_dir)
    calibration = None if config.calibration is None else Calibration.from_dict(config.calibration)
    stage_names = [
        *(["calibrate"] if calibration else []),
        "spectrum",
        "recall",
        *(f"eval_{p.task}" for p in plans),
    ]
    selected = select_stages(stage_names, stages)
    top = {"model": model, "device": device, "family": family, "html2tsv_task": html_task,
           "data_dir": None if data_dir is None else str(data_dir), "quick": quick, **config.to_json()}  # fmt: skip
    top["tasks"] = [dataclasses.asdict(p) for p in plans]
    if skipped:
        top["skipped_tasks"] = skipped
    if previous is not None:
        _check_same_study(out, previous["config"], top)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = dict((previous or {}).get("stages", {}))
    timings: dict[str, Any] = {}
    wanted: dict[str, dict] = {}  # stage -> its config in this call

    def save(status: str, **extra) -> None:
        if me.main:
            write_manifest(out, "reproduce", top, {"stages": records, "status": status, **extra})

    barrier(me, f"after reading {out / 'manifest.json'}")
    save("running")
    total = len(stage_names)

    def skip_reason(name: str, stage_config: dict, artefact: str) -> tuple[str, str] | None:
        """(word for timings, progress line) when the stage does not run now, else None."""
        record = records.get(name, {})
        if record.get("status") == "complete" and record.get("config") == stage_config and (out / name / artefact).exists():  # fmt: skip
            return "skipped", f"already in {out / name}, skipped"
        if name not in selected:
            return "not selected", "not selected, left for a later run"
        if deadline is not None and time.monotonic() >= deadline:
            return "not started", "time budget spent, left for the next run"
        return None

    def stage(
        name: str, stage_config: dict, artefact: str, run, every_rank: bool = False, plot: bool = True
    ) -> None:
        """Run one stage unless it is done, not selected or past the deadline (rank 0 decides for all
        ranks); an eval stage (every_rank) runs on every rank, the others on rank 0 while the rest wait."""
        number = stage_names.index(name) + 1
        wanted[name] = stage_config
        record = records.get(name, {})
        reason = from_main(
            me, skip_reason(name, stage_config, artefact) if me.main else None, f"before {name}"
        )
        if reason is not None:
            timings[name] = reason[0]
            echo(f"[{number}/{total}] {name}: {reason[1]}")
            return
        echo(f"[{number}/{total}] {name}: running ...")
        tic = time.perf_counter()
        finished = (run() is not False) if every_rank or me.main else None
        if not every_rank:
            finished = from_main(me, finished, f"after {name} (rank 0 runs it)")
        if finished and me.main and plot:  # the stage's figures, drawn from its tables
            from kvdiag.plots import plot_run

            plot_run(out / name)
        seconds = round(time.perf_counter() - tic, 1)
        timings[name] = seconds if finished else "partial"
        earlier = (
            (record.get("seconds") or 0) if record.get("status") == "partial" else 0
        )  # earlier jobs' share
        records[name] = {"config": stage_config, "status": "complete" if finished else "partial",
                         "seconds": round(seconds + earlier, 1), "git": git_hash()}  # fmt: skip
        save("running")
        if finished:
            echo(f"[{number}/{total}] {name}: done in {seconds:.0f} s -> {out / name}")
        else:
            echo(
                f"[{number}/{total}] {name}: stopped at the time budget after {seconds:.0f} s; run again to continue"
            )

    chosen = None  # the calibrated task's knobs and answer cap, once the calibrate stage has chosen them
    if calibration is not None:
        from kvdiag.study.calibrate import load_choice, run_calibration

        cal_plan = next(p for p in plans if p.task == calibration.task)
        cal_config = {"model": model, "device": device, "target_tokens": cal_plan.target_tokens,
                      **dataclasses.asdict(calibration)}  # fmt: skip
        stage("calibrate", cal_config, "calibration.json", lambda: run_calibration(
            model, calibration, cal_plan.target_tokens, out / "calibrate", device=device,
            data_dir=data_dir if reads_data(calibration.task) else None, progress=progress), every_rank=True,
            plot=False)  # fmt: skip
        done = records.get("calibrate", {})
        if done.get("status") == "complete" and done.get("config") == cal_config:
            chosen = from_main(me, (load_choice(out / "calibrate") or {}).get("chosen") if me.main else None,
                               "after reading the calibration")  # fmt: skip

    @functools.cache
    def text() -> str:  # built only when spectrum or recall runs
        return analysis_prompt(model, config.analysis_tokens, config.analysis_knobs)

    analysis = {"model": model, "device": device, "max_tokens": config.analysis_tokens,
                "prompt": "text2json sample 0 (seed 0)", "knobs": config.analysis_knobs}  # fmt: skip

    from kvdiag.analysis.spectrum import run_spectrum

    stage("spectrum", analysis, "manifest.json", lambda: run_spectrum(
        model, out / "spectrum", prompt=text(), device=rank_device(device, me), max_tokens=config.analysis_tokens,
        overwrite=True, progress=progress))  # fmt: skip

    from kvdiag.analysis.recall import run_recall

    n_layers = model_layers(model)
    stride = config.recall_layer_stride
    layers = "all" if stride <= 1 else list(range(stride // 2, n_layers, stride))
    recall_methods = unique_methods(
        study_methods(family, config.analysis_tokens if config.scale_outliers else None)
    )
    recall_budgets = sorted({*STUDY_BUDGETS.values(), *config.recall_sweep})
    recall_config = {**analysis, "layers": layers, "queries": config.recall_queries,
                     "methods": [m.label() for m in recall_methods], "budgets": recall_budgets}  # fmt: skip
    stage("recall", recall_config, "recall.parquet", lambda: run_recall(
        model, out / "recall", methods=recall_methods, budgets=recall_budgets, layers=layers, prompt=text(),
        n_queries=config.recall_queries, device=rank_device(device, me), max_tokens=config.analysis_tokens,
        overwrite=True, progress=progress))  # fmt: skip

    from kvdiag.eval.harness import run_eval

    roles = {}
    for index, plan in enumerate(plans):
        if calibration is not None and plan.task == calibration.task:
            if chosen is None:
                name = f"eval_{plan.task}"
                wanted[name], timings[name] = {"waits for": "calibrate"}, "not started"
                echo(f"[{stage_names.index(name) + 1}/{total}] {name}: waits for the calibrate stage")
                continue
            plan = plans[index] = dataclasses.replace(plan, knobs={**plan.knobs, **chosen["knobs"]},
                                                      max_new_tokens=chosen["max_new_tokens"])  # fmt: skip
        studied = study_methods(family, plan.target_tokens if config.scale_outliers else None)
        roles[plan.task] = roles_of(studied)
        eval_config = {**dataclasses.asdict(plan), "model": model, "device": device, "fidelity": config.fidelity,
                       "methods": [f"{s.label}@{s.budget!r}" for s in studied]}  # fmt: skip
        stage(f"eval_{plan.task}", eval_config, "results.parquet", lambda plan=plan, studied=studied: run_eval(
            model, plan.task, out / f"eval_{plan.task}", methods=[(s.method, s.budget) for s in studied],
            budgets=[], task_knobs=plan.knobs, n=plan.n, target_tokens=plan.target_tokens,
            max_new_tokens=plan.max_new_tokens, data_dir=data_dir if reads_data(plan.task) else None,
            device=device, fidelity=config.fidelity, progress=progress, deadline=deadline,
            batch_size=config.batch_size, idle_ranks_ok=True, shard_by=config.shard_by)["complete"],
            every_rank=True)  # fmt: skip

    remaining = [
        name for name in stage_names
        if records.get(name, {}).get("status") != "complete" or records[name].get("config") != wanted[name]
    ]  # fmt: skip
    if remaining and not partial_report:
        seconds = round(time.perf_counter() - start, 1)
        save("partial", seconds_last_run=seconds)
        echo(f"partial: {len(remaining)} of {total} stages left ({', '.join(remaining)}); run the same command "
             "again to continue (report.md is written once every stage is done)")  # fmt: skip
        return {"out": out, "report": None, "stages": timings, "seconds": seconds, "complete": False,
                "remaining": remaining}  # fmt: skip

    echo(f"report: writing {'a partial ' if remaining else ''}report.md and findings.json ...")
    mode = {"quick": "quick (CPU-sized)", "gpu": "gpu (one H200)", "custom": "custom configuration"}.get(
        config.name, f"configuration {config.name}"
    )
    info = {"model": model, "family": family, "quick": quick, "mode": mode, "device": device, "html2tsv_task": html_task,
            "config": top, "roles": roles, "tasks": [p.task for p in plans], "stages": records,
            "plans": [dataclasses.asdict(p) for p in plans],
            "recall_roles": roles_of(study_methods(family, config.analysis_tokens if config.scale_outliers else None)),
            "outlier_chunks": {p.task: study_methods(family, p.target_tokens if config.scale_outliers else None)[0]
                               .method.outlier_chunks for p in plans}, "unfinished": remaining}  # fmt: skip
    report = write_report(out, info) if me.main else None
    report = from_main(me, report, "after the report (rank 0 writes it)")
    seconds = round(time.perf_counter() - start, 1)
    save("partial" if remaining else "complete", seconds_last_run=seconds)
    echo(f"report: {report}" + (f" (partial: {', '.join(remaining)} not finished)" if remaining else ""))
    if figures_dir is not None and me.main:
        exported = export_report(out, figures_dir)
        echo(f"exported report, findings and {len(exported) - 1} more files to {figures_dir}")
    return {"out": out, "report": report, "stages": timings, "seconds": seconds, "complete": not remaining,
            "remaining": remaining}  # fmt: skip


def _silent(line: str) -> None:
    """The progress lines of ranks other than 0 (rank 0 prints them)."""


def main(argv: list[str] | None = None) -> int:
    """`python -m kvdiag.study.reproduce --export RUN_DIR DEST`: copy a reproduce run's report and PNGs."""
    import argparse

    from kvdiag.study.report import export_report

    parser = argparse.ArgumentParser(prog="python -m kvdiag.study.reproduce")
    parser.add_argument("--export", nargs=2, metavar=("RUN_DIR", "DEST"), required=True)
    args = parser.parse_args(argv)
    paths = export_report(*args.export)
    print(f"{len(paths)} files in {args.export[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
