"""The benchmark harness: generate answers to a task's samples with exact attention and with each
offloading method × budget in the simulator, score them, and keep everything resumable.

    from kvdiag.evaluate import run_eval, score_table
    run_eval("qwen2.5-coder-0.5b", "text2json", "runs/t2j", methods=["oracle", "shadowkv:rank=320"],
             budgets=[0.03125, 0.0625], n=3, target_tokens=1500, max_new_tokens=256,
             task_knobs={"n_entities": 4})
    score_table("runs/t2j")        # mean score ± stderr per method × budget

A *cell* is one (sample, method, budget); the reference `exact` (plain `model.generate`, no
simulator) is one cell per sample with budget 1.0. Decoding is pure greedy (`do_sample=False`, one
beam, repetition penalties of the model's generation config overridden to none), batch size 1, at
most `max_new_tokens`; it stops at the tokenizer's / generation config's EOS and, with a chat template,
at the template's end-of-turn token.

Run directory:
- predictions.jsonl: one line per finished cell, appended (flush + fsync) as soon as it finishes, so an
  interrupted run loses nothing written. A re-run with the same `out` skips the cells already there;
  a run whose config differs from `manifest.json`'s is refused, naming the differing keys;
- results.parquet: the tidy table rebuilt from predictions.jsonl at the end (columns `RESULT_COLUMNS`,
  plus `metric_*` for tasks with several metrics);
- manifest.json: config, each method's knobs, versions, seed; figures/ (see `kvdiag.eval_plots`).

Fidelity (`kvdiag.fidelity.teacher_forced_fidelity`) teacher-forces the gold answer, serialised as
the task expects it (`gold_answer_text`), once per sample for all its pending method cells: mean KL
(exact ‖ method) in nats and top-1 agreement over the answer tokens. The exact rows have KL 0 and
agreement 1 by definition.

Bytes: resident_bytes_per_token is the GPU-resident index per prompt token and layer (mean over the
simulated layers; exact: full bf16 K+V); fetched_tokens_per_step is per decode step, layer and KV
head, fetched_bytes_per_step per decode step and layer (all KV heads), as `SimulationState.stats`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.methods import Method
from kvdiag.methods.base import resolve_budget

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.parquet"
DEFAULT_BUDGETS = (0.03125, 0.0625)
EXACT = "exact"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
RESULT_COLUMNS = [
    "sample_id", "task", "method", "method_spec", "budget", "budget_tokens", "budget_fraction",
    "prompt_tokens", "n_facts", "score", "kl_mean", "top1_agree", "gold_logprob_exact",
    "gold_logprob_method", "answer_tokens", "resident_bytes_per_token", "fetched_tokens_per_step",
    "fetched_bytes_per_step", "decode_steps", "tokens_generated", "hit_cap", "wall_s",
]  # fmt: skip


# --- inputs -----------------------------------------------------------------------------------------


def parse_task_knobs(task: str, items: Sequence[str]) -> dict[str, Any]:
    """CLI "knob=value" strings -> typed knobs of `task` (the type of each knob's default; lists are
    comma-separated, e.g. "depths=0,50,100"; "none" for an optional value)."""
    from kvdiag.tasks import TASKS, get_task

    get_task(task)  # unknown task: did-you-mean error
    defaults = TASKS[task].knobs()
    knobs: dict[str, Any] = {}
    for item in items:
        knob, eq, text = item.partition("=")
        knob, text = knob.strip(), text.strip()
        if not eq:
            raise KvdiagError(f"--task-knob {item!r} is not knob=value")
        if knob not in defaults:
            raise unknown_name_error(f"knob of task {task!r}", knob, defaults)
        knobs[knob] = _typed(f"{task} knob {knob}", text, defaults[knob])
    return knobs


def _typed(what: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            kind = type(default[0]) if default else str
            return [kind(x.strip()) for x in text.strip("[]").split(",") if x.strip()]
    except ValueError:
        raise KvdiagError(f"{what}={text!r} is invalid; expected {type(default).__name__}") from None
    return None if default is None and text.lower() == "none" else text


def _resolve_methods(methods) -> list[Method]:
    """Method objects; `exact` (always run, as plain generation) is dropped, so [] or ["exact"] mean
    an exact-only run; None = every registered method but exact."""
    from kvdiag.recall import resolve_methods

    if methods is None:
        return resolve_methods(None)
    kept = [m for m in methods if not (m.strip() == EXACT if isinstance(m, str) else m.name == EXACT)]
    return resolve_methods(kept) if kept else []


def _check_out(out: Path) -> None:
    """`out` must be (or be creatable as) a writable directory; nothing is created here."""
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise KvdiagError(f"--out {out} is not a writable directory ({probe_dir} is a file)")
    try:
        probe = probe_dir / f".kvdiag-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise KvdiagError(f"--out {out} is not a writable directory ({err.strerror})") from err


def _context_length(model: str) -> int | None:
    """The model's context from its config, without loading weights (None where unknown)."""
    from kvdiag.models import _looks_like_path_or_hub_id, describe_model, known_models

    if model in known_models():
        return describe_model(model).get("context_length")
    if not _looks_like_path_or_hub_id(model):
        raise unknown_name_error("model", model, known_models())
    if model.endswith(".gguf"):
        return None
    try:
        from transformers import AutoConfig

        from kvdiag.adapter import config_shapes

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


def generate_cell(model, input_ids, method: Method | None, budget, max_new_tokens: int, eos: list[int]):
    """Greedy generation for one cell: plain `generate` (method None) or inside the simulator.

    Returns (new token ids [T], simulator stats dict or None, the SimulationState or None).
    """
    import torch

    from kvdiag.simulate import simulate

    kwargs = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
        pad_token_id=eos[0] if eos else None,
    )  # fmt: skip
    with torch.inference_mode():
        if method is None:
            out = model.generate(input_ids, **kwargs)
            return out[0, input_ids.shape[1] :], None, None
        with simulate(model, method, budget) as sim:
            out = model.generate(input_ids, **kwargs)
        return out[0, input_ids.shape[1] :], sim.stats(), sim


def _resident_bytes_per_token(method: Method, sim) -> float:
    """Mean over simulated layers of the index's resident bytes per prompt token.

    Computed here rather than from `sim.stats()`: the simulator calls `resident_bytes(index)` without
    the budget, so StreamingLLM (whose resident set *is* its budget) reports the whole prompt.
    """
    takes_budget = "budget" in inspect.signature(method.resident_bytes).parameters
    sizes = [
        method.resident_bytes(index, budget=sim.budget_tokens)
        if takes_budget
        else method.resident_bytes(index)
        for index in sim.indices.values()
    ]
    return float(sum(sizes)) / len(sizes) / sim.prompt_len if sizes else float("nan")


def _fidelity(model, tokenizer, prompt_ids, answer: str, runs: list[tuple[Method, Any]]) -> list[dict]:
    """Per run: mean KL, top-1 agreement and gold log-probs over the teacher-forced answer."""
    from kvdiag.fidelity import teacher_forced_fidelity

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


# --- the run directory ------------------------------------------------------------------------------


def cell_key(sample_id: str, method: str, budget) -> tuple[str, str, str]:
    return (sample_id, method, repr(budget))


def read_predictions(run_dir: str | Path) -> list[dict]:
    """The finished cells of a run; a torn last line (a kill mid-write) is cut off the file."""
    path = Path(run_dir) / PREDICTIONS
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        log.warning("%s: dropping an unfinished last line", path)
        with open(path, "r+b") as f:
            f.truncate(len(good))
    rows = []
    for number, line in enumerate(good.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise KvdiagError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_resume(out: Path, config: dict) -> dict | None:
    """The existing manifest of `out` when it is a resumable eval run with this config, else an error."""
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        if (out / PREDICTIONS).exists():
            raise KvdiagError(f"{out} has {PREDICTIONS} but no manifest.json; use a new --out")
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("command") != "eval":
        raise KvdiagError(f"{out} holds a {manifest.get('command')!r} run, not an eval run; use a new --out")
    old = manifest.get("config", {})
    differing = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if differing:
        details = "; ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in differing)
        raise KvdiagError(
            f"cannot resume into {out}: its config differs in {', '.join(differing)} ({details}); "
            f"use the same options or a new --out"
        )
    return manifest


def results_table(rows: list[dict]) -> pd.DataFrame:
    """The tidy results table from prediction rows (prediction text left out)."""
    records = []
    for row in rows:
        record = {c: row.get(c) for c in RESULT_COLUMNS}
        record.update(
            {f"metric_{k}": v for k, v in (row.get("metrics") or {}).items() if len(row["metrics"]) > 1}
        )
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=None if records else RESULT_COLUMNS)
    if not table.empty:
        table["budget"] = table["budget"].astype(float)
        table["hit_cap"] = table["hit_cap"].astype(bool)
    return table


def score_table(run_dir_or_table) -> pd.DataFrame:
    """Mean score ± standard error (std / √n, NaN for n = 1) per method × budget, exact first, with the
    mean budget fraction, bytes, fidelity, runaway rate and generated tokens."""
    table = run_dir_or_table
    if not isinstance(table, pd.DataFrame):
        path = Path(run_dir_or_table) / RESULTS
        if not path.exists():
            raise KvdiagError(f"{Path(run_dir_or_table)} is not a finished eval run (missing {RESULTS})")
        table = pd.read_parquet(path)
    grouped = table.groupby(["method", "budget"], sort=False)
    summary = grouped.agg(
        n=("score", "size"), score_mean=("score", "mean"), score_std=("score", "std"),
        budget_tokens=("budget_tokens", "mean"), budget_fraction=("budget_fraction", "mean"),
        resident_bytes_per_token=("resident_bytes_per_token", "mean"),
        fetched_bytes_per_step=("fetched_bytes_per_step", "mean"), kl_mean=("kl_mean", "mean"),
        top1_agree=("top1_agree", "mean"), hit_cap_rate=("hit_cap", "mean"),
        tokens_generated=("tokens_generated", "mean"), wall_s=("wall_s", "mean"),
    ).reset_index()  # fmt: skip
    summary.insert(4, "score_stderr", summary.pop("score_std") / summary["n"].pow(0.5))
    order = {m: i for i, m in enumerate(dict.fromkeys([EXACT, *table.method]))}
    summary["_o"] = summary.method.map(order)
    return summary.sort_values(["_o", "budget_fraction"]).drop(columns="_o").reset_index(drop=True)


# --- the pipeline -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One generation: a sample under `method` (None = exact, plain generate) at `budget`."""

    sample: Any
    method: Method | None
    label: str
    spec: str
    budget: float | int

    @property
    def key(self) -> tuple[str, str, str]:
        return cell_key(self.sample.id, self.label, self.budget)


def _exact_bytes_per_token(model) -> float:
    """Full bf16 K and V per token and layer (what exact attention keeps resident)."""
    from kvdiag.adapter import config_shapes
    from kvdiag.methods._scoring import kv_bytes

    shapes = config_shapes(model.config)
    return float(kv_bytes(1, shapes["kv_heads"], shapes["head_dim"]))


def _run_cell(cell: Cell, net, tokenizer, task, input_ids, max_new_tokens: int, eos: list[int], fid: dict | None,
              exact_bytes: float) -> dict:  # fmt: skip
    """Generate, score and account one cell: the predictions.jsonl row."""
    tic = time.perf_counter()
    new_ids, stats, sim = generate_cell(net, input_ids, cell.method, cell.budget, max_new_tokens, eos)
    wall = time.perf_counter() - tic
    prediction = tokenizer.decode(new_ids, skip_special_tokens=True)
    metrics = task.metrics(prediction, cell.sample)
    length, n_new = input_ids.shape[1], len(new_ids)
    budget_tokens = length if cell.method is None else sim.budget_tokens
    row = {
        "sample_id": cell.sample.id, "task": task.name, "method": cell.label, "method_spec": cell.spec,
        "budget": cell.budget, "budget_tokens": budget_tokens, "budget_fraction": budget_tokens / length,
        "prompt_tokens": length, "n_facts": cell.sample.meta.get("n_facts"), "prediction": prediction,
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


def run_eval(model: str, task: str, out, methods: Sequence[Method | str] | None = None,
             budgets: Sequence[float | int] = DEFAULT_BUDGETS, task_knobs: dict | None = None, n: int = 4,
             target_tokens: int = 2048, max_new_tokens: int = 256, seed: int = 0, chat: bool | None = None,
             data_dir=None, device: str | None = "cpu", dtype=None, fidelity: bool = True,
             figures: bool = True, progress: bool = True) -> dict:  # fmt: skip
    """The `kvdiag eval` pipeline (see the module docstring); resumes into an existing `out`.

    methods: specs ("shadowkv:rank=320") or Method objects, default every method but exact; budgets:
    fractions of the prompt in (0, 1] or token counts; task_knobs: the task's knobs (typed values);
    data_dir: sets the task's `data_dir` knob; chat: None = the chat template when the tokenizer has
    one. Every input is validated before the model loads and before anything is written.
    Returns {"out", "predictions", "table", "figures", "cells", "new_cells", "seconds", "scores"}.
    """
    from tqdm.auto import tqdm

    from kvdiag.models import load_model, load_tokenizer, resolve_device
    from kvdiag.recall import check_budget, method_label
    from kvdiag.runs import write_manifest, write_table
    from kvdiag.tasks import get_task

    start = time.perf_counter()
    knobs = dict(task_knobs or {})
    if data_dir is not None and "data_dir" in get_task(task, **knobs).knobs():
        knobs["data_dir"] = str(data_dir)
    elif data_dir is not None:
        log.warning("task %s reads no data; data_dir %s is ignored", task, data_dir)
    task_obj = get_task(task, **knobs)
    method_objs = _resolve_methods(methods)
    labels = [method_label(m) for m in method_objs]
    given = [m for m in methods or labels if (m.strip() if isinstance(m, str) else m.name) != EXACT]
    specs = [m.strip() if isinstance(m, str) else lab for m, lab in zip(given, labels)]
    budgets = list(budgets)
    if not budgets:
        raise KvdiagError("no budgets given; e.g. 0.03125,0.0625 (fractions of the prompt) or 2048 (tokens)")
    for b in budgets:
        check_budget(b)
    if len({repr(b) for b in budgets}) != len(budgets):
        raise KvdiagError(f"a budget is given twice in {budgets}")
    for name, value in (("n", n), ("--max-new-tokens", max_new_tokens), ("--target-tokens", target_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvdiagError(f"{name} must be an integer ≥ 1, got {value!r}")
    device = resolve_device(device)
    out = Path(out).expanduser()
    _check_out(out)
    context = _context_length(model)
    if context is not None and target_tokens > context:
        raise KvdiagError(
            f"--target-tokens {target_tokens} is more than {model}'s context of {context} tokens"
        )
    _check_data(task, knobs)
    config = {
        "model": model, "task": task, "task_knobs": dataclasses.asdict(task_obj), "methods": labels,
        "budgets": budgets, "n": n, "seed": seed, "target_tokens": target_tokens,
        "max_new_tokens": max_new_tokens, "chat": chat, "device": device,
        "dtype": None if dtype is None else str(dtype), "fidelity": fidelity,
    }  # fmt: skip
    config = json.loads(json.dumps(config, default=str))
    previous = _check_resume(out, config) if out.exists() else None

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
        for b in budgets:
            try:
                resolve_budget(b, length)
            except KvdiagError as err:
                raise KvdiagError(f"sample {s.id} ({length} prompt tokens): {err}") from None

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
        "methods": [{"label": lab, "spec": spec, "name": m.name, "paper": m.paper, "knobs": m.knobs()}
                    for lab, spec, m in zip(labels, specs, method_objs)],
        "samples": [{"id": s.id, "prompt_tokens": int(prompts[s.id].shape[1]), **s.meta} for s in samples],
    }  # fmt: skip
    if previous is None:
        write_manifest(out, "eval", config, {**extra, "status": "running"})

    cells = [c for s in samples for c in [Cell(s, None, EXACT, EXACT, 1.0)] + [
        Cell(s, m, lab, spec, b) for m, lab, spec in zip(method_objs, labels, specs) for b in budgets]]  # fmt: skip
    done = {cell_key(r["sample_id"], r["method"], r["budget"]) for r in read_predictions(out)}
    pending = [c for c in cells if c.key not in done]
    log.info("%d cells, %d already in %s", len(cells), len(cells) - len(pending), out / PREDICTIONS)
    bar = tqdm(
        total=len(cells), initial=len(cells) - len(pending), desc="eval", unit="cell", disable=not progress
    )
    exact_bytes, fid_sample, fid = _exact_bytes_per_token(net), None, {}
    for cell in pending:
        ids = prompts[cell.sample.id].to(device)
        if fidelity and cell.method is not None and fid_sample is not cell.sample:
            todo = [c for c in pending if c.sample is cell.sample and c.method is not None]
            answer = gold_answer_text(task, cell.sample)
            results = _fidelity(net, tokenizer, ids, answer, [(c.method, c.budget) for c in todo])
            fid_sample, fid = cell.sample, {c.key: r for c, r in zip(todo, results)}
        bar.set_postfix_str(f"{cell.sample.id} {cell.label} {cell.budget}")
        row = _run_cell(
            cell, net, tokenizer, task_obj, ids, max_new_tokens, eos, fid.get(cell.key), exact_bytes
        )
        _append(out / PREDICTIONS, row)
        bar.update()
    bar.close()

    wanted = {c.key for c in cells}
    rows = [r for r in read_predictions(out) if cell_key(r["sample_id"], r["method"], r["budget"]) in wanted]
    table = results_table(rows)
    write_table(table, out / RESULTS)
    seconds = round(time.perf_counter() - start, 1)
    write_manifest(out, "eval", config, {**extra, "status": "complete", "cells": len(cells),
                                         "new_cells": len(pending), "seconds_last_run": seconds})  # fmt: skip
    drawn = []
    if figures:
        from kvdiag.eval_plots import plot_eval_run

        drawn = plot_eval_run(out)
    return {
        "out": out, "predictions": out / PREDICTIONS, "table": out / RESULTS, "figures": drawn,
        "cells": len(cells), "new_cells": len(pending), "seconds": time.perf_counter() - start,
        "scores": score_table(table),
    }  # fmt: skip
