"""The benchmark harness: generate answers to a task's samples with exact attention and with each
offloading method × budget in the simulator, score them, and keep everything resumable.

    from kvdiag.eval.harness import run_eval, score_table
    run_eval("qwen2.5-coder-0.5b", "text2json", "runs/t2j",
             methods=["oracle", "shadowkv:rank=320", "shadowkv@15.625%", "yakv@0.03125"],
             budgets=[0.03125, 0.0625], n=3, target_tokens=1500, max_new_tokens=256,
             task_knobs={"n_entities": 4})
    score_table("runs/t2j")        # mean score ± stderr per method × budget

Methods are specs ("name" or "name:knob=value,..."), `Method` objects, or either paired with its own
budget: "spec@budget" (budget as in `kvdiag.analysis.recall.parse_budget`: "0.015625", "1.5625%", "2048") or
a (method, budget) tuple. A method with its own budget runs only at it; the others run at every value
of `budgets`. A *cell* is one (sample, method label, budget); the reference `exact` is one cell per
sample with budget 1.0. Decoding is pure greedy (`do_sample=False`, one beam, repetition penalties of
the model's generation config overridden to none), batch size 1, at most `max_new_tokens`; it stops at
the tokenizer's / generation config's EOS and, with a chat template, at the template's end-of-turn
token.

One exact prefill per sample is shared by all its cells (`prefill_prompt`): prompt[:-1] (L − 1 tokens)
is prefilled once and recorded (`kvdiag.capture`), and each cell generates from a deep copy of that
cache, feeding the whole prompt to `generate` so that the last prompt token is its first step. Under
the simulator (`simulate(..., prompt_trace=trace)`) that last prompt token is therefore a decode-step
query: the method's index covers the first L − 1 prompt tokens, the method already applies to the
query that produces the first generated token, and the last prompt token itself is attended exactly
(like a generated token). A budget fraction b means ceil(b·L) tokens of the L-token prompt (at most
L − 1, all the indexed ones). The exact cells take the same path without the simulator: the same
tokens as plain `model.generate` (tests/test_reproduce.py checks it).

Run directory (`kvdiag.eval.store`): predictions.jsonl (one line per finished cell with its prediction
and gold, appended at once, so an interrupted run loses nothing written; a re-run with the same `out`
skips the cells already there and may add samples, methods and budgets, while a real conflict, such as
another seed or a method whose knobs changed, is refused: `kvdiag.eval.resume`), results.parquet (the
tidy table of every cell of the run, columns `RESULT_COLUMNS`, plus `metric_*` for tasks with several
metrics), manifest.json (config, each method's knobs and budgets, each sample's prompt SHA-256,
versions, seed, one entry per invocation) and figures/ (see `kvdiag.plots.eval`). With a `deadline`
no new cell starts after it; the run is then "partial" and the same call continues it.

Fidelity (`kvdiag.eval.fidelity.teacher_forced_fidelity`) teacher-forces the gold answer, serialised as
the task expects it (`gold_answer_text`), once per sample for all its pending method cells (its own
exact prefill of the whole prompt): mean KL (exact ‖ method) in nats and top-1 agreement over the
answer tokens. The exact rows have KL 0 and agreement 1 by definition.

Bytes: resident_bytes_per_token is the GPU-resident index per indexed prompt token (L − 1 with the
shared prefill) and layer, mean over the simulated layers (exact: full bf16 K+V);
fetched_tokens_per_step is per decode step, layer and KV head, fetched_bytes_per_step per decode
step and layer (all KV heads), as `SimulationState.stats`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.eval.inputs import (  # noqa: F401  (re-exported: the harness's public names)
    MethodRun,
    parse_task_knobs,
    resolve_runs,
    split_method_budget,
)
from kvdiag.eval.resume import merge_manifest, previous_manifest, prompt_digest
from kvdiag.eval.store import (  # noqa: F401  (re-exported: the harness's public names)
    EXACT,
    PREDICTIONS,
    RESULT_COLUMNS,
    RESULTS,
    append_row,
    cell_key,
    check_out,
    read_predictions,
    results_table,
    score_table,
)
from kvdiag.methods import Method
from kvdiag.methods.base import resolve_budget

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (0.03125, 0.0625)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _context_length(model: str) -> int | None:
    """The model's context from its config, without loading weights (None where unknown)."""
    from kvdiag.models import describe_model, known_models
    from kvdiag.models.registry import _looks_like_path_or_hub_id

    if model in known_models():
        return describe_model(model).get("context_length")
    if not _looks_like_path_or_hub_id(model):
        raise unknown_name_error("model", model, known_models())
    if model.endswith(".gguf"):
        return None
    try:
        from transformers import AutoConfig

        from kvdiag.models.adapter import config_shapes

        return config_shapes(AutoConfig.from_pretrained(model))["context_length"]
    except (OSError, ValueError) as err:
        raise KvdiagError(
            f"could not read the config of model {model!r}: {str(err).splitlines()[0]}"
        ) from err


def _check_data(task_name: str, knobs: dict) -> None:
    """A data directory given explicitly must hold the task's data (with a hint when its parent does):
    the needle tasks would otherwise fall back to their built-in haystack without a word."""
    from kvdiag.tasks import get_task

    data_dir = knobs.get("data_dir")
    if data_dir is None or get_task(task_name, **knobs).data_available():
        return
    parent = Path(data_dir).expanduser().resolve().parent
    hint = ""
    if get_task(task_name, **{**knobs, "data_dir": str(parent)}).data_available():
        hint = f"; it is under {parent}: pass that (the folder that contains the task's own folder)"
    raise KvdiagError(f"no data for task {task_name!r} in data directory {data_dir}{hint}")


# --- gold answers, tokens, generation ---------------------------------------------------------------


def _filled_format(record: dict) -> str:
    """A needle's answer in its question's requested format ("... was________." with the keyword)."""
    match = re.search(r"format '(.*)'", record["question"])
    if match and "________" in match.group(1):
        return " ".join(match.group(1).replace("________", " " + record["keyword"]).split())
    return record["needle"]


def gold_answer_text(task_name: str, sample) -> str:
    """The gold answer as the task's prompt asks for it (what fidelity teacher-forces).

    text2json: `json.dumps(gold)`; needle / multineedle: each needle's answer sentence in the
    question's requested format with the keyword filled in, one per line, in depth order; html2tsv and
    html2tsv_synthetic: the gold TSV in a ```tsv block; other tasks: the gold string, or its JSON.
    """
    gold = sample.gold
    if task_name == "text2json":
        return json.dumps(gold)
    if task_name in ("needle", "multineedle"):
        return "\n".join(_filled_format(g) for g in gold)
    if task_name.startswith("html2tsv"):
        return f"```tsv\n{gold.strip()}\n```"
    return gold if isinstance(gold, str) else json.dumps(gold)


def encode(tokenizer, sample, chat: bool):
    """input_ids [1, L] of a sample: its messages through the chat template, or the raw prompt text."""
    if chat:
        return tokenizer.apply_chat_template(
            sample.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(sample.prompt_text, add_special_tokens=True, return_tensors="pt").input_ids


def eos_token_ids(model, tokenizer, chat: bool) -> list[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update([value] if isinstance(value, int) else (value or []))
    if chat:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


@dataclasses.dataclass
class SharedPrefill:
    """One exact prefill of prompt[:-1] shared by all cells of a sample (see the module docstring)."""

    trace: Any  # kvdiag.capture.trace.Trace of the L - 1 prefilled tokens, every layer
    cache: Any  # the transformers cache after them; each cell continues from a deep copy

    @property
    def n_tokens(self) -> int:
        return self.trace.n_tokens


def prefill_prompt(model, input_ids) -> SharedPrefill:
    """Prefill input_ids[:, :-1] [1, L - 1] once, exactly, recording every layer."""
    import torch

    from kvdiag.capture import capture
    from kvdiag.models import adapter

    if input_ids.shape[1] < 2:
        raise KvdiagError("a shared prefill needs a prompt of at least 2 tokens")
    with torch.inference_mode(), capture(model, "all") as rec:
        out = model(input_ids=input_ids[:, :-1], use_cache=True)
    return SharedPrefill(rec.trace(with_versions=False), adapter.model_forward_cache(out))


def generate_cell(model, input_ids, method: Method | None, budget, max_new_tokens: int, eos: list[int],
                  prefill: SharedPrefill | None = None):  # fmt: skip
    """Greedy generation for one cell: exact (method None) or inside the simulator; from a copy of
    `prefill` (input_ids[:, :-1] already in its cache) or, without it, from scratch.

    Returns (new token ids [T], simulator stats dict or None, the SimulationState or None).
    """
    import torch

    from kvdiag.models import adapter
    from kvdiag.offload.simulate import simulate

    kwargs = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
        pad_token_id=eos[0] if eos else None,
    )  # fmt: skip
    trace = None
    if prefill is not None:
        kwargs.update(adapter.with_cache(model, copy.deepcopy(prefill.cache)))
        trace = prefill.trace
        if method is not None:  # ceil(b·L) of the L-token prompt, at most the L - 1 indexed tokens
            budget = min(resolve_budget(budget, input_ids.shape[1]), prefill.n_tokens)
    with torch.inference_mode():
        if method is None:
            out = model.generate(input_ids, **kwargs)
            return out[0, input_ids.shape[1] :], None, None
        with simulate(model, method, budget, prompt_trace=trace) as sim:
            out = model.generate(input_ids, **kwargs)
        return out[0, input_ids.shape[1] :], sim.stats(), sim


def _resident_bytes_per_token(method: Method, sim) -> float:
    """Mean over simulated layers of the resident bytes (index + decode state, as stored) per prompt token."""
    return sim.resident_bytes_per_token()[0]


def _fidelity(model, tokenizer, prompt_ids, answer: str, runs: list[tuple[Method, Any]]) -> list[dict]:
    """Per run: mean KL, top-1 agreement and gold log-probs over the teacher-forced answer."""
    from kvdiag.eval.fidelity import teacher_forced_fidelity

    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    if answer_ids.shape[1] < 2 or not runs:
        return [_no_fidelity(answer_ids.shape[1]) for _ in runs]
    frame = teacher_forced_fidelity(model, prompt_ids, answer_ids, runs)
    per_run = answer_ids.shape[1] - 1
    # rows come in `runs` order, per_run each (the frame labels rows by method.name only, which is
    # ambiguous for two variants of one method)
    return [
        {
            "kl_mean": float(part.kl.mean()),
            "top1_agree": float(part.top1_agree.mean()),
            "gold_logprob_exact": float(part.gold_logprob_exact.mean()),
            "gold_logprob_method": float(part.gold_logprob_method.mean()),
            "answer_tokens": per_run + 1,
        }  # fmt: skip
        for part in (frame.iloc[i * per_run : (i + 1) * per_run] for i in range(len(runs)))
    ]


def _no_fidelity(answer_tokens=None) -> dict:
    nan = float("nan")
    return {"kl_mean": nan, "top1_agree": nan, "gold_logprob_exact": nan, "gold_logprob_method": nan,
            "answer_tokens": answer_tokens}  # fmt: skip


# --- the pipeline -----------------------------------------------------------------------------------


def _provenance(method: Method) -> dict:
    """{"provenance": ...} for a method that reads files (a headwise calibration), else {}."""
    found = method.provenance()
    return {"provenance": found} if found else {}


def _warn_calibrated_on(runs, sample_ids: list[str]) -> list[str]:
    """Log (and return) the methods whose calibration was measured on some of the evaluated samples."""
    lines = []
    for run in runs:
        source = run.method.provenance().get("calibration", {}).get("source", {})
        shared = sorted(set(source.get("sample_ids") or []) & set(sample_ids))
        if shared:
            lines.append(f"{run.label} was calibrated on evaluated samples {', '.join(shared)}")
            log.warning("%s: calibrate on other samples (e.g. `kvdiag heads --seed 100`)", lines[-1])
    return lines


@dataclasses.dataclass
class Cell:
    """One generation: a sample under `method` (None = exact) at `budget`."""

    sample: Any
    method: Method | None
    label: str
    spec: str
    budget: float | int

    @property
    def key(self) -> tuple[str, str, str]:
        return cell_key(self.sample.id, self.label, self.budget)


def _exact_bytes_per_token(model) -> float:
    """K and V per token and layer at the model's dtype (what exact attention keeps resident)."""
    from kvdiag.models.adapter import config_shapes

    shapes = config_shapes(model.config)
    return float(2 * shapes["kv_heads"] * shapes["head_dim"] * next(model.parameters()).element_size())


def _run_cell(cell: Cell, net, tokenizer, task, input_ids, max_new_tokens: int, eos: list[int], fid: dict | None,
              exact_bytes: float, prefill: SharedPrefill | None = None) -> dict:  # fmt: skip
    """Generate, score and account one cell: the predictions.jsonl row."""
    tic = time.perf_counter()
    new_ids, stats, sim = generate_cell(
        net, input_ids, cell.method, cell.budget, max_new_tokens, eos, prefill=prefill
    )
    wall = time.perf_counter() - tic
    prediction = tokenizer.decode(new_ids, skip_special_tokens=True)
    metrics = task.metrics(prediction, cell.sample)
    length, n_new = input_ids.shape[1], len(new_ids)
    budget_tokens = length if cell.method is None else resolve_budget(cell.budget, length)
    row = {
        "sample_id": cell.sample.id, "task": task.name, "method": cell.label, "method_spec": cell.spec,
        "budget": cell.budget, "budget_tokens": budget_tokens, "budget_fraction": budget_tokens / length,
        "prompt_tokens": length, "n_facts": cell.sample.meta.get("n_facts"), "prediction": prediction,
        "gold": cell.sample.gold,
        "score": float(metrics[task.metric] if task.metric in metrics else task.score(prediction, cell.sample)),
        "metrics": metrics, "tokens_generated": n_new,
        "hit_cap": bool(n_new >= max_new_tokens and int(new_ids[-1]) not in eos), "wall_s": round(wall, 4),
    }  # fmt: skip
    if cell.method is None:
        row.update(kl_mean=0.0, top1_agree=1.0, gold_logprob_exact=None, gold_logprob_method=None,
                   answer_tokens=None, resident_bytes_per_token=exact_bytes, fetched_tokens_per_step=0.0,
                   fetched_bytes_per_step=0.0, decode_steps=max(n_new - 1, 0))  # fmt: skip
    else:
        row.update(fid or _no_fidelity())
        row.update(resident_bytes_per_token=_resident_bytes_per_token(cell.method, sim),
                   fetched_tokens_per_step=stats.get("fetched_tokens_per_step_layer", math.nan),
                   fetched_bytes_per_step=stats.get("fetched_bytes_per_step_layer", math.nan),
                   decode_steps=stats.get("decode_steps", 0))  # fmt: skip
    return row


def run_eval(model: str, task: str, out, methods: Sequence[Method | str | tuple] | None = None,
             budgets: Sequence[float | int] = DEFAULT_BUDGETS, task_knobs: dict | None = None, n: int = 4,
             target_tokens: int = 2048, max_new_tokens: int = 256, seed: int = 0, chat: bool | None = None,
             data_dir=None, device: str | None = "cpu", dtype=None, fidelity: bool = True,
             figures: bool = True, progress: bool = True, shared_prefill: bool = True,
             deadline: float | None = None) -> dict:  # fmt: skip
    """The `kvdiag eval` pipeline (see the module docstring); resumes into an existing `out`.

    methods: specs ("shadowkv:rank=320", "yakv@3.125%"), Method objects or (method, budget) pairs,
    default every method but exact; budgets: fractions of the prompt in (0, 1] or token counts, for the
    methods without their own; task_knobs: the task's knobs (typed values); data_dir: sets the task's
    `data_dir` knob; chat: None = the chat template when the tokenizer has one; shared_prefill: False
    prefills every cell on its own (plain `generate`, slower; the same tokens); deadline: a
    `time.monotonic()` value after which no new cell starts (the run is then partial). Every input is
    validated before the model loads and before anything is written.
    Returns {"out", "predictions", "table", "figures", "cells", "new_cells", "seconds", "scores",
    "complete"} (cells and new_cells count this call's cells).
    """
    from tqdm.auto import tqdm

    from kvdiag.models import load_model, load_tokenizer, resolve_device
    from kvdiag.runs import write_manifest, write_table
    from kvdiag.tasks import get_task

    start = time.perf_counter()
    knobs = dict(task_knobs or {})
    if data_dir is not None and "data_dir" in get_task(task, **knobs).knobs():
        knobs["data_dir"] = str(data_dir)
    elif data_dir is not None:
        log.warning("task %s reads no data; data_dir %s is ignored", task, data_dir)
    task_obj = get_task(task, **knobs)
    budgets = list(budgets)
    if len({repr(b) for b in budgets}) != len(budgets):
        raise KvdiagError(f"a budget is given twice in {budgets}")
    runs = resolve_runs(methods, budgets)
    for name, value in (("n", n), ("--max-new-tokens", max_new_tokens), ("--target-tokens", target_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvdiagError(f"{name} must be an integer ≥ 1, got {value!r}")
    device = resolve_device(device)
    out = Path(out).expanduser()
    check_out(out)
    context = _context_length(model)
    if context is not None and target_tokens > context:
        raise KvdiagError(
            f"--target-tokens {target_tokens} is more than {model}'s context of {context} tokens"
        )
    _check_data(task, knobs)
    config = {
        "model": model, "task": task, "task_knobs": dataclasses.asdict(task_obj),
        "methods": [name for r in runs for name in r.config()], "budgets": budgets, "n": n, "seed": seed,
        "target_tokens": target_tokens, "max_new_tokens": max_new_tokens, "chat": chat, "device": device,
        "dtype": None if dtype is None else str(dtype), "fidelity": fidelity,
    }  # fmt: skip
    config = json.loads(json.dumps(config, default=str))
    previous = previous_manifest(out, config) if out.exists() else None

    # samples and prompt lengths need only the tokenizer: checked before the model loads or a file is written
    tokenizer = load_tokenizer(model)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise KvdiagError("--chat given but this tokenizer has no chat template")
    samples = task_obj.samples(n, seed=seed, tokenizer=tokenizer, target_tokens=target_tokens)
    prompts = {s.id: encode(tokenizer, s, use_chat) for s in samples}
    for s in samples:
        length = prompts[s.id].shape[1]
        if context is not None and length + max_new_tokens > context:
            raise KvdiagError(
                f"sample {s.id}: {length} prompt tokens + {max_new_tokens} new tokens exceed {model}'s "
                f"context of {context}; lower --target-tokens or --max-new-tokens"
            )
        for b in {repr(b): b for r in runs for b in r.budgets}.values():
            try:
                resolve_budget(b, length)
            except KvdiagError as err:
                raise KvdiagError(f"sample {s.id} ({length} prompt tokens): {err}") from None

    _warn_calibrated_on(runs, [s.id for s in samples])
    merged = merge_manifest(out, previous, config, [
        {"label": r.label, "spec": r.spec, "name": r.method.name, "paper": r.method.paper, "knobs": r.method.knobs(),
         "budgets": r.budgets, "own_budgets": r.pinned, **_provenance(r.method)} for r in runs], [
        {"id": s.id, "prompt_tokens": int(prompts[s.id].shape[1]), "prompt_sha256": prompt_digest(prompts[s.id]),
         **s.meta} for s in samples])  # fmt: skip

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        net, tokenizer = load_model(model, device=device, dtype=dtype)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    eos = eos_token_ids(net, tokenizer, use_chat)
    extra = {
        "metric": task_obj.metric, "chat_used": use_chat, "eos_token_ids": eos,
        "data_found": task_obj.data_available(), "data_dir_env": os.environ.get("KVDIAG_DATA_DIR"),
        "first_created": (previous or {}).get("first_created") or (previous or {}).get("created"),
        "methods": merged["methods"], "samples": merged["samples"], "invocations": merged["invocations"],
        "shared_prefill": shared_prefill,
    }  # fmt: skip
    write_manifest(out, "eval", merged["config"], {**extra, "status": "running"})

    cells = [c for s in samples for c in [Cell(s, None, EXACT, EXACT, 1.0)] + [
        Cell(s, r.method, r.label, r.spec, b) for r in runs for b in r.budgets]]  # fmt: skip
    done = {cell_key(r["sample_id"], r["method"], r["budget"]) for r in read_predictions(out)}
    pending = [c for c in cells if c.key not in done]
    log.info("%d cells, %d already in %s", len(cells), len(cells) - len(pending), out / PREDICTIONS)
    bar = tqdm(
        total=len(cells), initial=len(cells) - len(pending), desc=f"eval {task}", unit="cell",
        disable=not progress,
    )  # fmt: skip
    exact_bytes, sample_now, fid, prefill = _exact_bytes_per_token(net), None, {}, None
    ran, stopped = 0, False
    for cell in pending:
        if deadline is not None and time.monotonic() >= deadline:
            stopped = True
            log.info("deadline reached: %d cells left for the next run", len(pending) - ran)
            break
        ids = prompts[cell.sample.id].to(device)
        if sample_now is not cell.sample:  # a new sample: its fidelity and its shared prefill
            sample_now, fid, prefill = cell.sample, {}, None
            todo = [c for c in pending if c.sample is cell.sample and c.method is not None]
            if fidelity and todo:
                bar.set_postfix_str(f"{cell.sample.id} fidelity")
                answer = gold_answer_text(task, cell.sample)
                results = _fidelity(net, tokenizer, ids, answer, [(c.method, c.budget) for c in todo])
                fid = {c.key: r for c, r in zip(todo, results)}
            if shared_prefill and todo and ids.shape[1] >= 2:
                bar.set_postfix_str(f"{cell.sample.id} prefill")
                prefill = prefill_prompt(net, ids)
        bar.set_postfix_str(f"{cell.sample.id} {cell.label} {cell.budget}")
        row = _run_cell(cell, net, tokenizer, task_obj, ids, max_new_tokens, eos, fid.get(cell.key), exact_bytes,
                        prefill)  # fmt: skip
        append_row(out / PREDICTIONS, row)
        ran += 1
        bar.update()
    bar.close()
    prefill = None

    table = results_table(read_predictions(out))  # every cell of the run, this call's and earlier ones
    write_table(table, out / RESULTS)
    seconds = round(time.perf_counter() - start, 1)
    write_manifest(out, "eval", merged["config"], {**extra, "status": "partial" if stopped else "complete",
                                                   "cells": len(table), "new_cells": ran, "seconds_last_run": seconds})  # fmt: skip
    drawn = []
    if figures and not stopped:
        from kvdiag.plots.eval import plot_eval_run

        drawn = plot_eval_run(out)
    return {
        "out": out, "predictions": out / PREDICTIONS, "table": out / RESULTS, "figures": drawn,
        "cells": len(cells), "new_cells": ran, "seconds": time.perf_counter() - start,
        "scores": score_table(table), "complete": not stopped,
    }  # fmt: skip
