"""The `kvdiag heads` pipeline: per-head context intensity of a task (and of the needle task) or a prompt.

    from kvdiag.eval.heads import run_heads
    run_heads("smollm2-135m", "runs/heads", task="text2json", n=2, target_tokens=1500)

Queries (the definitions are in `kvdiag.analysis.heads`):
- `task`: each of `n` samples (seed `seed`, prompts of ~`target_tokens`) under teacher forcing: the
  prompt (`kvdiag.eval.harness.encode`, the chat template by default when the tokenizer has one) is
  followed by the gold answer as the task asks for it (`Task.answer_text`, no special tokens); the
  query positions are the answer tokens' positions, so L0 = the prompt's length and the answer plays
  the generated tail. Unless `needle_baseline=False` (or the task is `needle` itself) the same is
  measured on `n` samples of the `needle` task at the same `target_tokens`: the low-intensity
  control, so the table compares a task with it;
- a prompt (`prompt` / `prompt_file`, or the built-in sample text): its last `n_queries` positions.

Run directory: heads.parquet (`summarize_needs` rows with `task` and `sample` columns: "prompt" and
the prompt's source in prompt mode), heads_calibration.json (the need of the measured task or prompt,
not of the needle baseline, at `calibration_tau`: what `headwise` allocates by) and manifest.json.
Figures are drawn from heads.parquet by `kvdiag.plots.heads.plot_heads_run` (the CLI does it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from kvdiag.analysis.heads import (
    CALIBRATION_FILE,
    DEFAULT_QUERIES,
    TAUS,
    calibration_from_table,
    check_taus,
    head_needs,
    save_calibration,
    summarize_needs,
)
from kvdiag.analysis.recall import resolve_positions
from kvdiag.errors import KvdiagError
from kvdiag.eval.generation import encode
from kvdiag.tasks import get_task

log = logging.getLogger(__name__)

NEEDLE = "needle"
PROMPT = "prompt"
TABLE = "heads.parquet"
KEYS = ("task", "sample", "layer", "kv_head", "tau")


@dataclasses.dataclass
class HeadsInput:
    """One prompt to measure: input_ids [1, L] and its decode-like query positions [N]."""

    task: str
    sample: str
    input_ids: torch.Tensor
    positions: torch.Tensor
    answer_tokens: int | None = None


def teacher_forced(tokenizer, task_name: str, sample, chat: bool) -> HeadsInput:
    """A task sample's prompt followed by its gold answer's tokens; the queries are the answer's positions."""
    prompt = encode(tokenizer, sample, chat)
    answer = tokenizer(
        get_task(task_name).answer_text(sample), add_special_tokens=False, return_tensors="pt"
    ).input_ids
    if answer.shape[1] == 0:
        raise KvdiagError(f"sample {sample.id}: the gold answer tokenizes to zero tokens")
    n_prompt = prompt.shape[1]
    return HeadsInput(task_name, sample.id, torch.cat([prompt, answer], dim=1),
                      torch.arange(n_prompt, n_prompt + answer.shape[1]), int(answer.shape[1]))  # fmt: skip


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KvdiagError(f"{name} {value!r} must be an integer ≥ 1")
    return value


def _task_inputs(
    tokenizer, tasks: dict, n: int, seed: int, target_tokens: int, chat: bool
) -> list[HeadsInput]:
    inputs = []
    for name, task in tasks.items():
        for sample in task.samples(n, seed=seed, tokenizer=tokenizer, target_tokens=target_tokens):
            inputs.append(teacher_forced(tokenizer, name, sample, chat))
    return inputs


def run_heads(model: str, out, *, task: str | None = None, n: int = 2, prompt: str | None = None,
              prompt_file=None, n_queries: int = DEFAULT_QUERIES, taus: Sequence[float] = TAUS,
              layers="all", target_tokens: int = 2048, seed: int = 0, task_knobs: dict | None = None,
              chat: bool | None = None, needle_baseline: bool = True, data_dir=None, device: str | None = "cpu",
              dtype=None, max_tokens: int | None = None, calibration_tau: float = 0.9,
              progress: bool = True, overwrite: bool = False) -> dict:  # fmt: skip
    """Measure, summarise and save (see the module docstring). Every input is checked before the model
    loads; results are staged and appear in `out` only on success; an `out` holding a run is refused
    unless `overwrite` (`kvdiag.runs.claim_run_dir`).

    chat: None = the chat template for task samples when the tokenizer has one, raw text for a prompt.
    Returns {"out", "table", "calibration", "summary", "per_query", "inputs", "seconds"}.
    """
    from kvdiag.capture import capture_prompt, resolve_layers
    from kvdiag.models import load_model, load_tokenizer, resolve_device
    from kvdiag.models.adapter import config_shapes
    from kvdiag.models.prompts import context_length, read_prompt, tokenize_prompt
    from kvdiag.runs import claim_run_dir, staged_run_dir, write_manifest, write_table
    from kvdiag.tasks import get_task

    start = time.perf_counter()
    taus = check_taus(taus)
    if not any(abs(t - calibration_tau) < 1e-12 for t in taus):
        raise KvdiagError(f"calibration tau {calibration_tau} is not among the measured taus {list(taus)}")
    tasks: dict = {}
    if task is not None:
        if prompt is not None or prompt_file is not None:
            raise KvdiagError("give --task or a prompt (--text / --prompt-file), not both")
        _positive_int("--n", n)
        _positive_int("--target-tokens", target_tokens)
        knobs = dict(task_knobs or {})
        if data_dir is not None and "data_dir" in get_task(task).knobs():
            knobs["data_dir"] = str(data_dir)
        tasks[task] = get_task(task, **knobs)
        if needle_baseline and task != NEEDLE:
            tasks[NEEDLE] = get_task(NEEDLE, **({"data_dir": str(data_dir)} if data_dir is not None else {}))
        source = {"task": task, "n": n, "seed": seed, "target_tokens": target_tokens}
    else:
        _positive_int("--queries", n_queries)
        if task_knobs:
            raise KvdiagError("--task-knob needs --task")
        text = read_prompt(prompt_file, prompt)
        source = {PROMPT: str(prompt_file) if prompt_file else ("--text" if prompt else "built-in sample")}
    device = resolve_device(device)
    claim_run_dir(out, "heads", overwrite=overwrite)

    tokenizer = load_tokenizer(model)
    if task is not None:  # samples need only the tokenizer: length errors come before the model loads
        use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if use_chat and not getattr(tokenizer, "chat_template", None):
            raise KvdiagError("--chat given but this tokenizer has no chat template")
        inputs = _task_inputs(tokenizer, tasks, n, seed, target_tokens, use_chat)
        source["sample_ids"] = [x.sample for x in inputs if x.task == task]
    else:
        use_chat = bool(chat)
        ids = tokenize_prompt(tokenizer, text, chat=use_chat, max_tokens=max_tokens)
        inputs = [HeadsInput(PROMPT, source[PROMPT], ids, resolve_positions(ids.shape[1], None, n_queries))]
        source["prompt_sha256"] = hashlib.sha256(text.encode()).hexdigest()

    with staged_run_dir(out, "heads", overwrite=overwrite) as stage:
        net, tokenizer = load_model(model, device=device, dtype=dtype)
        chosen = resolve_layers(layers, config_shapes(net.config)["layers"])
        limit = context_length(net)
        for x in inputs:
            if limit is not None and x.input_ids.shape[1] > limit:
                raise KvdiagError(f"{x.sample}: {x.input_ids.shape[1]} tokens exceed {model}'s context of "
                                  f"{limit}; lower --target-tokens or --max-tokens")  # fmt: skip
        frames, samples = [], []
        for x in tqdm(inputs, desc="heads", unit="sample", disable=not progress):
            trace = capture_prompt(net, tokenizer, None, input_ids=x.input_ids, layers=chosen)
            needs = head_needs(trace, x.positions, taus=taus, device=device, progress=False)
            info = needs.attrs.pop("heads")
            frames.append(needs.assign(task=x.task, sample=x.sample))
            samples.append({"task": x.task, "sample": x.sample, "n_tokens": info["n_tokens"],
                            "n_context": info["n_context"], "n_queries": info["n_queries"],
                            "answer_tokens": x.answer_tokens, "layers": info["layers"],
                            "skipped_layers": info["skipped_layers"]})  # fmt: skip
            del trace
        per_query = pd.concat(frames, ignore_index=True)
        order = {name: i for i, name in enumerate(dict.fromkeys(per_query.task))}  # the task, then needle
        summary = summarize_needs(per_query, by=KEYS)
        summary = summary.sort_values("task", key=lambda t: t.map(order), kind="stable", ignore_index=True)
        write_table(summary, stage / TABLE)
        measured = task if task is not None else PROMPT
        calibration = calibration_from_table(
            summary[summary.task == measured], model, source, calibration_tau
        )
        save_calibration(calibration, stage / CALIBRATION_FILE)
        config = {
            "model": model, "task": task, "task_knobs": {k: dataclasses.asdict(t) for k, t in tasks.items()},
            "n": n if task else None, "seed": seed if task else None,
            "target_tokens": target_tokens if task else None, "needle_baseline": NEEDLE in tasks and task != NEEDLE,
            "queries": "gold answer (teacher forcing)" if task else n_queries, "prompt_source": source.get(PROMPT),
            "max_tokens": max_tokens, "chat": use_chat, "taus": list(taus), "layers": chosen, "device": device,
            "dtype": None if dtype is None else str(dtype), "calibration_tau": calibration_tau,
        }  # fmt: skip
        extra = {"samples": samples, "calibration": CALIBRATION_FILE, "calibration_source": source,
                 "shapes": config_shapes(net.config), "rows": len(summary),
                 "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        write_manifest(stage, "heads", config, extra)
    out = Path(out).expanduser()
    return {
        "out": out, "table": out / TABLE, "calibration": out / CALIBRATION_FILE, "summary": summary,
        "per_query": per_query, "inputs": samples, "seconds": time.perf_counter() - start,
    }  # fmt: skip
