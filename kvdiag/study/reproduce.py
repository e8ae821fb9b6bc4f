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
budgets, figures, and **Findings**, one verdict per claim of the study.

The study's configurations (reference/METHODS.md): ShadowKV defaults at 1.5625 % and at 15.625 %
(10× budget); ArkVale `ArkVale.study()` at 0.78125 %; LRQK `LRQK.study(family)` (qwen rank for Qwen
models, else llama) at 0.258 % active tokens; InfiniGen `InfiniGen.study()` (top-k, no threshold) at
its release budget 0.2; YAKV defaults at 3.125 %; the oracle at 3.125 %.

Resuming: a stage whose sub-run finished with the same stage config (recorded in `out`/manifest.json)
is skipped; eval sub-runs also resume cell by cell; a different configuration in the same `out` is
refused. Every stage prints one line when it starts and one when it ends.

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
  Its 32-token local window is kept (2.6 % of such a prompt). Full mode keeps upstream's defaults.
The full mode (`full_config`, for a GPU) runs more samples on 16K-token prompts, all layers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from kvdiag.errors import KvdiagError

log = logging.getLogger(__name__)

# study budgets: ShadowKV 2048 of 128K (and 10x), ArkVale, LRQK's active share, InfiniGen, YAKV/oracle
STUDY_BUDGETS = {"shadowkv": 0.015625, "shadowkv_10x": 0.15625, "arkvale": 0.0078125, "lrqk": 0.00258,
                 "infinigen": 0.2, "yakv": 0.03125, "yakv_centered": 0.03125, "oracle": 0.03125}  # fmt: skip
RECALL_SWEEP = (0.0078125, 0.015625, 0.03125, 0.0625, 0.125)
OUTLIER_SHARE = 48 * 8 / 131072  # ShadowKV's 384 outlier tokens of a 128K prompt (0.29 %)
ROLE_TITLES = {"shadowkv": "ShadowKV", "shadowkv_10x": "ShadowKV 10× budget", "arkvale": "ArkVale",
               "lrqk": "LRQK", "infinigen": "InfiniGen", "yakv": "YAKV",
               "yakv_centered": "YAKV, centred K/V (kvdiag addition)", "oracle": "oracle top-k"}  # fmt: skip


@dataclasses.dataclass
class TaskPlan:
    """One eval stage: a task, its knobs, how many samples, how long their prompts and answers."""

    task: str
    n: int
    target_tokens: int
    max_new_tokens: int
    knobs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReproduceConfig:
    """What `run_reproduce` runs (see `quick_config` / `full_config`)."""

    tasks: list[TaskPlan]
    analysis_tokens: int  # prompt length of the spectrum and recall stages (a Text2JSON sample)
    analysis_knobs: dict = dataclasses.field(default_factory=dict)  # its Text2JSON knobs
    recall_layer_stride: int = 1  # recall on layers stride//2, stride//2 + stride, ... (1: all)
    recall_queries: int = 64
    recall_sweep: tuple = RECALL_SWEEP
    scale_outliers: bool = False  # ShadowKV outlier chunks scaled to OUTLIER_SHARE of the prompt
    fidelity: bool = True
    html2tsv_real: bool = True  # use LongProc's real pages when the data is found

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def quick_config() -> ReproduceConfig:
    """CPU-sized (see the module docstring for each choice)."""
    return ReproduceConfig(
        tasks=[
            TaskPlan("text2json", 2, 1200, 128, {"n_entities": 4, "n_distractors": 2}),
            TaskPlan("multineedle", 1, 1200, 88, {"depths": [0.0, 25.0, 50.0, 75.0, 100.0]}),
            TaskPlan("html2tsv", 1, 1200, 112, {"n_items": 4}),
            TaskPlan("needle", 2, 1200, 24),
        ],
        analysis_tokens=1200, recall_layer_stride=4, recall_queries=32, scale_outliers=True,
        html2tsv_real=False,
    )  # fmt: skip


def full_config() -> ReproduceConfig:
    """GPU-sized: more samples, 16K-token prompts, the release's 1024-token cap on Text2JSON."""
    return ReproduceConfig(
        tasks=[
            TaskPlan("text2json", 50, 16384, 1024),
            TaskPlan("multineedle", 20, 16384, 320),
            TaskPlan("html2tsv", 20, 16384, 1024),
            TaskPlan("needle", 20, 16384, 64),
        ],
        analysis_tokens=16384,
    )  # fmt: skip


# --- the study's configurations ---------------------------------------------------------------------


@dataclasses.dataclass
class StudyMethod:
    role: str  # key of STUDY_BUDGETS / ROLE_TITLES
    method: Any  # kvdiag Method
    budget: float

    @property
    def label(self) -> str:
        from kvdiag.analysis.recall import method_label

        return method_label(self.method)


def model_family(model: str) -> str:
    """'qwen' for Qwen2/Qwen3 models, else 'llama' (LRQK's study rank), from the model's config."""
    from kvdiag.models import describe_model, known_models

    if model in known_models():
        arch = str(describe_model(model).get("architecture", ""))
    else:
        from transformers import AutoConfig

        arch = str(getattr(AutoConfig.from_pretrained(model), "model_type", ""))
    return "qwen" if "qwen" in arch.lower() else "llama"


def study_methods(family: str, prompt_tokens: int | None = None) -> list[StudyMethod]:
    """The study's configurations at their budgets; prompt_tokens: scale ShadowKV's outlier chunks to
    OUTLIER_SHARE of a prompt of that length (at least one chunk) instead of upstream's 48."""
    from kvdiag.methods import get_method
    from kvdiag.methods.arkvale import ArkVale
    from kvdiag.methods.infinigen import InfiniGen
    from kvdiag.methods.lrqk import LRQK

    shadow = {}
    if prompt_tokens is not None:
        chunk = get_method("shadowkv").chunk
        shadow["outlier_chunks"] = max(1, round(OUTLIER_SHARE * prompt_tokens / chunk))
    methods = {
        "shadowkv": get_method("shadowkv", **shadow), "shadowkv_10x": get_method("shadowkv", **shadow),
        "arkvale": ArkVale.study(), "lrqk": LRQK.study(family), "infinigen": InfiniGen.study(),
        "yakv": get_method("yakv"), "yakv_centered": get_method("yakv", center=True),
        "oracle": get_method("oracle"),
    }  # fmt: skip
    return [StudyMethod(role, m, STUDY_BUDGETS[role]) for role, m in methods.items()]


def roles_of(studied: list[StudyMethod]) -> dict[str, tuple[str, float]]:
    """role -> (method label, budget): how the report finds each configuration in the tables."""
    return {s.role: (s.label, s.budget) for s in studied}


# --- the pipeline -----------------------------------------------------------------------------------


def _html2tsv_task(config: ReproduceConfig, data_dir) -> str:
    from kvdiag.tasks import get_task

    if (
        config.html2tsv_real
        and get_task("html2tsv", data_dir=None if data_dir is None else str(data_dir)).data_available()
    ):
        return "html2tsv"
    return "html2tsv_synthetic"


def _stage_done(out: Path, name: str, stage_config: dict, previous: dict | None, artefact: str) -> bool:
    stages = (previous or {}).get("stages", {})
    record = stages.get(name, {})
    return (
        record.get("status") == "complete"
        and record.get("config") == stage_config
        and (out / name / artefact).exists()
    )


def run_reproduce(model: str, out, quick: bool = False, device: str | None = "cpu", data_dir=None,
                  n: int | None = None, config: ReproduceConfig | None = None, figures_dir=None,
                  progress: bool = True, echo=print, overwrite: bool = False) -> dict:  # fmt: skip
    """Run every stage into `out` (skipping finished ones), then write out/report.md.

    quick: `quick_config()` (CPU) instead of `full_config()`; config: an explicit configuration
    (overrides quick); n: samples per task (overrides the configuration's); data_dir: the folder
    holding the tasks' data (LongProc HTML→TSV, NeedleBench); figures_dir: also export the report and
    its PNGs there (`kvdiag.study.report.export_report`). echo: where the per-stage progress lines go.
    overwrite: start afresh instead of resuming a reproduce run in `out` (or replace a run of another
    kind there); the new run is staged beside `out` and swapped in when it has finished.
    Returns {"out", "report", "stages": {name: seconds or "skipped"}, "seconds"}.
    """
    call = dict(locals())
    from kvdiag.analysis.recall import check_budget, method_label
    from kvdiag.eval.harness import _context_length
    from kvdiag.models import resolve_device
    from kvdiag.runs import claim_run_dir, holds_run, replacing_run_dir, write_manifest
    from kvdiag.study.report import export_report, write_report

    start = time.perf_counter()
    custom = config is not None
    config = config or (quick_config() if quick else full_config())
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise KvdiagError(f"--n must be an integer ≥ 1, got {n!r}")
        config = dataclasses.replace(config, tasks=[dataclasses.replace(t, n=n) for t in config.tasks])
    for b in config.recall_sweep:
        check_budget(b)
    device = resolve_device(device)
    out = Path(out).expanduser()
    previous = claim_run_dir(out, "reproduce", overwrite=overwrite)
    if overwrite and holds_run(out):
        with replacing_run_dir(out) as staging:
            result = run_reproduce(**{**call, "out": staging, "overwrite": False})
        return {**result, "out": out, "report": out / Path(result["report"]).relative_to(staging)}
    _context_length(model)  # an unknown model name fails here, with did-you-mean help
    family = model_family(model)
    html_task = _html2tsv_task(config, data_dir)
    plans = []
    for plan in config.tasks:
        if plan.task == "html2tsv" and html_task == "html2tsv_synthetic":
            plan = dataclasses.replace(plan, task=html_task)
        elif plan.task == "html2tsv":
            plan = dataclasses.replace(plan, knobs={k: v for k, v in plan.knobs.items() if k != "n_items"})
        plans.append(plan)
    plans, skipped = fit_plans(model, plans, echo)
    top = {"model": model, "device": device, "family": family, "html2tsv_task": html_task,
           "data_dir": None if data_dir is None else str(data_dir), "quick": quick, **config.to_json()}  # fmt: skip
    top["tasks"] = [dataclasses.asdict(p) for p in plans]
    if skipped:
        top["skipped_tasks"] = skipped
    if previous is not None:
        differing = sorted(
            k for k in set(top) | set(previous["config"]) if top.get(k) != previous["config"].get(k)
        )
        if differing:
            raise KvdiagError(
                f"cannot resume into {out}: its reproduce configuration differs in {', '.join(differing)}; "
                "use the same options, a new --out, or --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = dict((previous or {}).get("stages", {}))
    timings: dict[str, Any] = {}

    # how run_reproduce was called, for `kvdiag rerun` (the configuration itself is `top`)
    call_args = {"quick": quick, "n": n, "custom_config": custom}

    def record(name: str, stage_config: dict, seconds: float | None) -> None:
        stages[name] = {"config": stage_config, "status": "complete", "seconds": seconds}
        write_manifest(out, "reproduce", top, {"stages": stages, "status": "running", "call": call_args})

    write_manifest(out, "reproduce", top, {"stages": stages, "status": "running", "call": call_args})
    stage_names = ["spectrum", "recall", *(f"eval_{p.task}" for p in plans)]
    total = len(stage_names)

    def stage(name: str, stage_config: dict, artefact: str, run) -> None:
        number = stage_names.index(name) + 1
        if _stage_done(out, name, stage_config, previous, artefact):
            echo(f"[{number}/{total}] {name}: already in {out / name}, skipped")
            timings[name] = "skipped"
            return
        echo(f"[{number}/{total}] {name}: running ...")
        tic = time.perf_counter()
        run()
        seconds = round(time.perf_counter() - tic, 1)
        timings[name] = seconds
        record(name, stage_config, seconds)
        echo(f"[{number}/{total}] {name}: done in {seconds:.0f} s -> {out / name}")

    text = _analysis_prompt(model, config.analysis_tokens, config.analysis_knobs)
    analysis = {"model": model, "device": device, "max_tokens": config.analysis_tokens,
                "prompt": "text2json sample 0 (seed 0)", "knobs": config.analysis_knobs}  # fmt: skip

    from kvdiag.analysis.spectrum import run_spectrum

    stage("spectrum", analysis, "manifest.json", lambda: run_spectrum(
        model, out / "spectrum", prompt=text, device=device, max_tokens=config.analysis_tokens,
        overwrite=True, progress=progress))  # fmt: skip

    from kvdiag.analysis.recall import run_recall

    n_layers = _n_layers(model)
    stride = config.recall_layer_stride
    layers = "all" if stride <= 1 else list(range(stride // 2, n_layers, stride))
    recall_methods = _unique(study_methods(family, config.analysis_tokens if config.scale_outliers else None))
    recall_budgets = sorted({*STUDY_BUDGETS.values(), *config.recall_sweep})
    recall_config = {**analysis, "layers": layers, "queries": config.recall_queries,
                     "methods": [method_label(m) for m in recall_methods], "budgets": recall_budgets}  # fmt: skip
    stage("recall", recall_config, "recall.parquet", lambda: run_recall(
        model, out / "recall", methods=recall_methods, budgets=recall_budgets, layers=layers, prompt=text,
        n_queries=config.recall_queries, device=device, max_tokens=config.analysis_tokens, overwrite=True,
        progress=progress))  # fmt: skip

    from kvdiag.eval.harness import run_eval

    roles = {}
    for plan in plans:
        studied = study_methods(family, plan.target_tokens if config.scale_outliers else None)
        roles[plan.task] = roles_of(studied)
        eval_config = {**dataclasses.asdict(plan), "model": model, "device": device, "fidelity": config.fidelity,
                       "methods": [f"{s.label}@{s.budget!r}" for s in studied]}  # fmt: skip
        stage(f"eval_{plan.task}", eval_config, "results.parquet", lambda plan=plan, studied=studied: run_eval(
            model, plan.task, out / f"eval_{plan.task}", methods=[(s.method, s.budget) for s in studied],
            budgets=[], task_knobs=plan.knobs, n=plan.n, target_tokens=plan.target_tokens,
            max_new_tokens=plan.max_new_tokens, data_dir=data_dir if _reads_data(plan.task) else None,
            device=device, fidelity=config.fidelity, progress=progress))  # fmt: skip

    echo("report: writing report.md ...")
    mode = "custom configuration" if custom else "quick (CPU-sized)" if quick else "full"
    info = {"model": model, "family": family, "quick": quick, "mode": mode, "device": device, "html2tsv_task": html_task,
            "config": top, "roles": roles, "tasks": [p.task for p in plans],
            "recall_roles": roles_of(study_methods(family, config.analysis_tokens if config.scale_outliers else None)),
            "outlier_chunks": {p.task: study_methods(family, p.target_tokens if config.scale_outliers else None)[0]
                               .method.outlier_chunks for p in plans}}  # fmt: skip
    report = write_report(out, info)
    seconds = round(time.perf_counter() - start, 1)
    write_manifest(out, "reproduce", top, {"stages": stages, "status": "complete", "seconds_last_run": seconds,
                                           "call": call_args})  # fmt: skip
    echo(f"report: {report}")
    if figures_dir is not None:
        exported = export_report(out, figures_dir)
        echo(f"exported report and {len(exported) - 1} figures to {figures_dir}")
    return {"out": out, "report": report, "stages": timings, "seconds": seconds}


def fit_plans(model: str, plans: list[TaskPlan], echo=print) -> tuple[list[TaskPlan], dict[str, str]]:
    """The plans whose samples this model can take, checked with its tokenizer before any stage runs.

    A task whose prompt without filler is longer than the plan's `target_tokens` in this tokenizer
    (the tiny models count bytes) gets that shortest prompt as its target, when it fits the context
    with the plan's new tokens; otherwise it is skipped. Both are said through `echo` and the skipped
    ones returned as {task: reason} (they go into the manifest and the report)."""
    from kvdiag.eval.harness import _context_length, encode
    from kvdiag.models import load_tokenizer
    from kvdiag.tasks import get_task
    from kvdiag.tasks.base import PromptTooLong

    tokenizer = load_tokenizer(model)
    chat = bool(getattr(tokenizer, "chat_template", None))
    context = _context_length(model)
    kept, skipped = [], {}
    for plan in plans:
        task = get_task(plan.task, **plan.knobs)
        try:
            samples = task.samples(plan.n, seed=0, tokenizer=tokenizer, target_tokens=plan.target_tokens)
        except PromptTooLong as err:
            echo(f"{plan.task}: its shortest prompt has {err.min_tokens} tokens in {model}'s tokenizer, more than "
                 f"the planned {plan.target_tokens}: using {err.min_tokens}")  # fmt: skip
            plan = dataclasses.replace(plan, target_tokens=err.min_tokens)
            samples = task.samples(plan.n, seed=0, tokenizer=tokenizer, target_tokens=plan.target_tokens)
        longest = max(encode(tokenizer, s, chat).shape[1] for s in samples)
        if context is not None and longest + plan.max_new_tokens > context:
            reason = (f"{longest} prompt tokens + {plan.max_new_tokens} new tokens exceed {model}'s context of "
                      f"{context}")  # fmt: skip
            echo(f"{plan.task}: skipped, {reason}")
            skipped[plan.task] = reason
            continue
        kept.append(plan)
    return kept, skipped


def _reads_data(task: str) -> bool:
    from kvdiag.tasks import TASKS

    return "data_dir" in TASKS[task].knobs()


def _unique(studied: list[StudyMethod]) -> list:
    """The distinct methods of the study's configurations (ShadowKV appears at two budgets)."""
    seen = {}
    for s in studied:
        seen.setdefault(s.label, s.method)
    return list(seen.values())


def _n_layers(model: str) -> int:
    from kvdiag.models import describe_model, known_models

    if model in known_models():
        return int(describe_model(model)["layers"])
    from transformers import AutoConfig

    from kvdiag.models.adapter import config_shapes

    return int(config_shapes(AutoConfig.from_pretrained(model))["layers"])


def _analysis_prompt(model: str, tokens: int, knobs: dict) -> str:
    """The raw text of Text2JSON sample 0 (seed 0) at about `tokens` tokens."""
    from kvdiag.models import load_tokenizer
    from kvdiag.tasks import get_task

    sample = get_task("text2json", **knobs).samples(
        1, seed=0, tokenizer=load_tokenizer(model), target_tokens=tokens
    )[0]
    return sample.prompt_text


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
