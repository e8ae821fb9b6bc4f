"""The task plans of a reproduction as they will run on a model: which HTML→TSV task (LongProc's
real pages or the synthetic ones), each plan's knobs for that task, whether each task's samples fit
the model's tokenizer and context (`fit_plans`), which stages a call selects, and the analysis prompt.
Used by `kvdiag.study.reproduce`."""

from __future__ import annotations

import dataclasses

from kvdiag.errors import unknown_name_error
from kvdiag.study.configs import HTML_TASKS, ReproduceConfig, TaskPlan


def html2tsv_task(config: ReproduceConfig, data_dir) -> str:
    from kvdiag.tasks import get_task

    if (
        config.html2tsv_real
        and get_task("html2tsv", data_dir=None if data_dir is None else str(data_dir)).data_available()
    ):
        return "html2tsv"
    return "html2tsv_synthetic"


def adapt_plan(plan: TaskPlan, html_task: str) -> TaskPlan:
    """The html2tsv plan runs as `html_task` (real or synthetic) with that task's knobs only."""
    if plan.task != "html2tsv":
        return plan
    from kvdiag.tasks import TASKS

    own = TASKS[html_task].knobs()
    return dataclasses.replace(plan, task=html_task, knobs={k: v for k, v in plan.knobs.items() if k in own})


def select_stages(stage_names: list[str], wanted) -> set[str]:
    """The stages to run: all (None), or those named in `wanted` ("spectrum", "recall", a task name such
    as "text2json" or "eval_text2json"; "html2tsv" is the HTML→TSV stage, real or synthetic)."""
    if wanted is None:
        return set(stage_names)
    chosen = set()
    for item in wanted:
        name = item.strip().removeprefix("eval_")
        if name in HTML_TASKS:
            name = "html2tsv"
        found = [s for s in stage_names if s.removeprefix("eval_").replace("_synthetic", "") == name]
        if not found:
            raise unknown_name_error("stage", item.strip(), [s.removeprefix("eval_") for s in stage_names])
        chosen.update(found)
    return chosen


def fit_plans(
    model: str, plans: list[TaskPlan], echo=print, data_dir=None
) -> tuple[list[TaskPlan], dict[str, str]]:
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
        data = {"data_dir": str(data_dir)} if data_dir is not None and reads_data(plan.task) else {}
        task = get_task(plan.task, **plan.knobs, **data)
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


def reads_data(task: str) -> bool:
    from kvdiag.tasks import TASKS

    return "data_dir" in TASKS[task].knobs()


def model_layers(model: str) -> int:
    from kvdiag.models import describe_model, known_models

    if model in known_models():
        return int(describe_model(model)["layers"])
    from transformers import AutoConfig

    from kvdiag.models.adapter import config_shapes

    return int(config_shapes(AutoConfig.from_pretrained(model))["layers"])


def analysis_prompt(model: str, tokens: int, knobs: dict) -> str:
    """The raw text of Text2JSON sample 0 (seed 0) at about `tokens` tokens."""
    from kvdiag.models import load_tokenizer
    from kvdiag.tasks import get_task

    sample = get_task("text2json", **knobs).samples(
        1, seed=0, tokenizer=load_tokenizer(model), target_tokens=tokens
    )[0]
    return sample.prompt_text
