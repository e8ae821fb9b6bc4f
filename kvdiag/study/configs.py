"""What `kvdiag reproduce` runs: a `ReproduceConfig` of `TaskPlan`s, the named configurations (`quick`
for a 2-core CPU, `gpu` for one H200), YAML files, command-line task-knob overrides, and the study's
method configurations at their budgets (`study_methods`).

    from kvdiag.study.configs import load_config, override_knobs
    config = load_config("gpu")                        # or "quick", or "my_study.yaml"
    config = override_knobs(config, ["text2json:n_entities=8"])

A YAML file holds the fields of `ReproduceConfig`; `base: gpu` (or quick) starts from a named
configuration, and each entry of `tasks` then takes the fields it leaves out from the base's plan of
the same task::

    base: gpu
    tasks:
      - {task: text2json, target_tokens: 12288, knobs: {n_entities: 8, n_distractors: 4}}
      - {task: multineedle}
      - {task: html2tsv}
      - {task: needle, n: 40}
    recall_queries: 32

The `html2tsv` plan is LongProc's real pages when the data is found (and `html2tsv_real`), else
`html2tsv_synthetic`; its knobs may be either task's, and each run keeps those of the task it uses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error

RECALL_SWEEP = (0.0078125, 0.015625, 0.03125, 0.0625, 0.125)
HTML_TASKS = ("html2tsv", "html2tsv_synthetic")

# study budgets: ShadowKV 2048 of 128K (and 10x), ArkVale, LRQK's active share, InfiniGen, YAKV/oracle
STUDY_BUDGETS = {"shadowkv": 0.015625, "shadowkv_10x": 0.15625, "arkvale": 0.0078125, "lrqk": 0.00258,
                 "infinigen": 0.2, "yakv": 0.03125, "yakv_centered": 0.03125, "oracle": 0.03125}  # fmt: skip
OUTLIER_SHARE = 48 * 8 / 131072  # ShadowKV's 384 outlier tokens of a 128K prompt (0.29 %)
ROLE_TITLES = {"shadowkv": "ShadowKV", "shadowkv_10x": "ShadowKV 10× budget", "arkvale": "ArkVale",
               "lrqk": "LRQK", "infinigen": "InfiniGen", "yakv": "YAKV",
               "yakv_centered": "YAKV, centred K/V (kvdiag addition)", "oracle": "oracle top-k"}  # fmt: skip


@dataclasses.dataclass
class TaskPlan:
    """One eval stage: a task, its knobs, how many samples, how long their prompts and answers."""

    task: str
    n: int
    target_tokens: int  # prompt length of generated tasks (LongProc's real pages have their own)
    max_new_tokens: int
    knobs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ReproduceConfig:
    """What `run_reproduce` runs (see `quick_config` / `gpu_config`)."""

    tasks: list[TaskPlan]
    analysis_tokens: int  # prompt length of the spectrum and recall stages (a Text2JSON sample)
    analysis_knobs: dict = dataclasses.field(default_factory=dict)  # its Text2JSON knobs
    recall_layer_stride: int = 1  # recall on layers stride//2, stride//2 + stride, ... (1: all)
    recall_queries: int = 64
    recall_sweep: tuple = RECALL_SWEEP
    scale_outliers: bool = False  # ShadowKV outlier chunks scaled to the study's share of the prompt
    fidelity: bool = True
    html2tsv_real: bool = True  # use LongProc's real pages when the data is found
    batch_size: int = 1  # samples decoded together per method × budget (the GPU config batches)
    shard_by: str = "samples"  # under torchrun: ranks share samples, or methods (ranks sharing a GPU)
    # a `kvdiag.study.calibrate.Calibration` as a dict: that task's knobs and answer cap are chosen by
    # exact attention on held-out samples (the `calibrate` stage) instead of taken from its plan
    calibration: dict | None = None
    name: str = "custom"  # how the report names it: quick, gpu, a YAML file's name, custom

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def quick_config() -> ReproduceConfig:
    """CPU-sized (see `kvdiag.study.reproduce`'s docstring for each choice)."""
    return ReproduceConfig(
        tasks=[
            TaskPlan("text2json", 2, 1200, 128, {"n_entities": 4, "n_distractors": 2}),
            TaskPlan("multineedle", 1, 1200, 88, {"depths": [0.0, 25.0, 50.0, 75.0, 100.0]}),
            TaskPlan("html2tsv", 1, 1200, 112, {"n_items": 4}),
            TaskPlan("needle", 2, 1200, 24),
        ],
        analysis_tokens=1200, recall_layer_stride=4, recall_queries=32, scale_outliers=True,
        html2tsv_real=False, name="quick",
    )  # fmt: skip


def gpu_config() -> ReproduceConfig:
    """One H200, qwen2.5-coder-0.5b, sized to finish in about 20 minutes of GPU time:

    - Text2JSON n = 50 at 8K-token prompts; its entity count and answer cap are calibrated first (the
      `calibrate` stage, `kvdiag.study.calibrate`): exact attention alone on 8 held-out samples
      (seed 1000) at 4, 8 and 12 entities, the hardest with an exact mean ≥ 50 is evaluated;
    - multi-needle (11 needles) and needle n = 20 at 16K-token prompts;
    - LongProc's real HTML→TSV pages (`--data-dir`) n = 20 among the 0.5k subset's pages of at most
      12K prompt tokens (the subset's pages reach 64K tokens, past the model's 32K context);
    - answer caps ~1.1-2× the longest gold answer (Text2JSON's per candidate);
    - the study's configurations at the study's budgets, ShadowKV's outlier chunks at the study's share
      of the prompt, teacher-forced fidelity on every cell, recall on every layer of an 8K prompt;
    - up to 50 samples decoded together; under torchrun the ranks share out method configurations
      (`shard_by="methods"`): the 0.5B model's eager decode is bound by the host, so three ranks on the
      one GPU (`torchrun --nproc-per-node 3`) decode about three times the steps per second."""
    text2json_candidates = [
        {"knobs": {"n_entities": 4, "n_distractors": 2}, "max_new_tokens": 192},
        {"knobs": {"n_entities": 8, "n_distractors": 4}, "max_new_tokens": 288},
        {"knobs": {"n_entities": 12, "n_distractors": 6}, "max_new_tokens": 384},
    ]
    return ReproduceConfig(
        tasks=[
            TaskPlan("text2json", 50, 8192, 288, {"n_entities": 8, "n_distractors": 4}),
            TaskPlan("needle", 20, 16384, 32),
            TaskPlan("multineedle", 20, 16384, 192),
            TaskPlan("html2tsv", 20, 16384, 800, {"max_prompt_tokens": 12288}),
        ],
        analysis_tokens=8192, recall_layer_stride=1, recall_queries=64, scale_outliers=True,
        fidelity=True, html2tsv_real=True, name="gpu", batch_size=50, shard_by="methods",
        calibration={"task": "text2json", "n": 8, "seed": 1000, "min_score": 50.0,
                     "candidates": text2json_candidates},
    )  # fmt: skip


CONFIGS = {"quick": quick_config, "gpu": gpu_config}


def _plan_knobs_valid(task: str, knobs: dict, where: str) -> None:
    from kvdiag.tasks import TASKS, get_task

    names = HTML_TASKS if task == "html2tsv" else (task,)
    allowed = {k for name in names for k in TASKS[name].knobs()}
    for knob in knobs:
        if knob not in allowed:
            raise unknown_name_error(f"knob of task {task!r} in {where}", knob, allowed)
    for name in names:
        get_task(name, **{k: v for k, v in knobs.items() if k in TASKS[name].knobs()})  # value checks


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KvdiagError(f"{what} must be an integer ≥ 1, got {value!r}")
    return value


def _plan(entry, base: dict[str, TaskPlan], where: str) -> TaskPlan:
    from kvdiag.tasks import TASKS

    if not isinstance(entry, dict) or "task" not in entry:
        raise KvdiagError(f"{where}: each entry of tasks is a mapping with a 'task', got {entry!r}")
    fields = {f.name for f in dataclasses.fields(TaskPlan)}
    for key in entry:
        if key not in fields:
            raise unknown_name_error(f"field of a task plan in {where}", key, fields)
    task = entry["task"]
    if task not in TASKS:
        raise unknown_name_error(f"task in {where}", task, TASKS)
    given = {**(dataclasses.asdict(base[task]) if task in base else {}), **entry}
    missing = sorted(fields - set(given) - {"knobs"})
    if missing:
        raise KvdiagError(
            f"{where}: task {task} lacks {', '.join(missing)} (and no base configuration has it)"
        )
    plan = TaskPlan(**{"knobs": {}, **given})
    for key in ("n", "target_tokens", "max_new_tokens"):
        _positive_int(getattr(plan, key), f"{where}: {task} {key}")
    if not isinstance(plan.knobs, dict):
        raise KvdiagError(f"{where}: the knobs of {task} are a mapping, got {plan.knobs!r}")
    _plan_knobs_valid(task, plan.knobs, where)
    return plan


def config_from_dict(data: dict, where: str = "the configuration") -> ReproduceConfig:
    """A `ReproduceConfig` from a mapping (a YAML file's content; see the module docstring)."""
    if not isinstance(data, dict):
        raise KvdiagError(f"{where} must be a mapping of ReproduceConfig fields, got {type(data).__name__}")
    data = dict(data)
    base_name = data.pop("base", None)
    if base_name is not None and base_name not in CONFIGS:
        raise unknown_name_error(f"base configuration in {where}", str(base_name), CONFIGS)
    base = CONFIGS[base_name]() if base_name else None
    fields = {f.name for f in dataclasses.fields(ReproduceConfig)}
    for key in data:
        if key not in fields:
            raise unknown_name_error(f"field in {where}", key, fields | {"base"})
    values = dataclasses.asdict(base) if base else {}
    values["name"] = where
    values.update(data)
    for required in ("tasks", "analysis_tokens"):
        if required not in values:
            raise KvdiagError(f"{where} lacks {required!r} (or a 'base: quick|gpu' to take it from)")
    plans = {p.task: p for p in base.tasks} if base else {}
    if not isinstance(values["tasks"], list) or not values["tasks"]:
        raise KvdiagError(f"{where}: tasks must be a non-empty list")
    values["tasks"] = [
        entry if isinstance(entry, TaskPlan) else _plan(entry, plans, where) for entry in values["tasks"]
    ]
    if "recall_sweep" in values:
        values["recall_sweep"] = tuple(values["recall_sweep"])
    if values.get("calibration") is not None:
        from kvdiag.study.calibrate import Calibration

        cal = Calibration.from_dict(values["calibration"], f"{where}: calibration")
        if cal.task not in {p.task for p in values["tasks"]}:
            raise KvdiagError(f"{where}: the calibrated task {cal.task} is not among the tasks")
        for i, cand in enumerate(cal.candidates):
            _plan_knobs_valid(cal.task, cand["knobs"], f"{where}: calibration candidate {i}")
    from kvdiag.eval.distributed import check_shard_by

    check_shard_by(values.get("shard_by", "samples"), f"{where}: shard_by")
    for key in ("analysis_tokens", "recall_layer_stride", "recall_queries"):
        if key in values:
            _positive_int(values[key], f"{where}: {key}")
    return ReproduceConfig(**values)


def load_config(spec: str | Path) -> ReproduceConfig:
    """A named configuration ("quick", "gpu") or a YAML file of one (see the module docstring)."""
    if isinstance(spec, str) and spec in CONFIGS:
        return CONFIGS[spec]()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise unknown_name_error("configuration (a name, or a YAML file that exists)", str(spec), CONFIGS)
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise KvdiagError(f"{path} is not valid YAML: {err}") from None
    return config_from_dict(data, where=str(path))


def override_knobs(config: ReproduceConfig, items: list[str]) -> ReproduceConfig:
    """Apply "task:knob=value" overrides (typed like the knob's default, as `kvdiag eval --task-knob`)
    to the plans of that task; "html2tsv_synthetic:..." applies to the html2tsv plan. A knob that the
    configuration's calibration would choose (e.g. text2json:n_entities in `gpu`) is set by hand
    instead: the calibration is dropped, and the plan's answer cap stays."""
    from kvdiag.eval.inputs import parse_task_knobs

    plans = [dataclasses.replace(p, knobs=dict(p.knobs)) for p in config.tasks]
    calibration = config.calibration
    for item in items:
        task, colon, knob = item.partition(":")
        task = task.strip()
        if not colon or "=" not in knob:
            raise KvdiagError(f"--task-knob {item!r} is not task:knob=value (e.g. text2json:n_entities=8)")
        plan_task = "html2tsv" if task in HTML_TASKS else task
        targets = [p for p in plans if p.task == plan_task]
        if not targets:
            raise unknown_name_error("task of this configuration", task, [p.task for p in plans])
        for plan in targets:
            plan.knobs.update(parse_task_knobs(task, [knob]))
        name = knob.partition("=")[0].strip()
        if (
            calibration
            and calibration["task"] == plan_task
            and any(name in c["knobs"] for c in calibration["candidates"])
        ):
            calibration = None
    return dataclasses.replace(config, tasks=plans, calibration=calibration)


# --- the study's configurations ---------------------------------------------------------------------


@dataclasses.dataclass
class StudyMethod:
    role: str  # key of STUDY_BUDGETS / ROLE_TITLES
    method: Any  # kvdiag Method
    budget: float

    @property
    def label(self) -> str:
        return self.method.label()


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


def unique_methods(studied: list[StudyMethod]) -> list:
    """The distinct methods of the study's configurations (ShadowKV appears at two budgets)."""
    seen = {}
    for s in studied:
        seen.setdefault(s.label, s.method)
    return list(seen.values())
