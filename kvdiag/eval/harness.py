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
no new cell starts after it; the run is then "partial" and the same call continues it. Under torchrun
(`kvdiag.eval.distributed`) the ranks share the samples with pending cells, each appends to its own
predictions.rank{R}.jsonl, and rank 0 merges them and writes the rest: the same run directory.

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

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from kvdiag.errors import KvdiagError, unknown_name_error
from kvdiag.eval.generation import (  # noqa: F401  (re-exported: the harness's public names)
    END_OF_TURN_TOKENS,
    Cell,
    cell_fidelity,
    cell_row,
    decode_cells,
    encode,
    eos_token_ids,
    exact_bytes_per_token,
    generate_cell,
    prefill_prompt,
)
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
    finished_keys,
    merge_rank_files,
    rank_file,
    read_predictions,
    results_table,
    score_table,
)
from kvdiag.methods import Method
from kvdiag.methods.base import resolve_budget

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (0.03125, 0.0625)


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


def _plan(pending: list[Cell], batch_size: int) -> list[tuple[list, list[list[Cell]]]]:
    """The order a process runs its pending cells in: [(samples, batches)] with the samples in groups
    of batch_size (prefilled, then decoded together) and per group one batch per method label × budget
    (first-seen order), its cells in sample order. A single process writes predictions.jsonl in this
    order; the merge of a torchrun launch's rank files follows it too (`merge_rank_files`)."""
    samples = list({id(c.sample): c.sample for c in pending}.values())
    plan = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        ids = {s.id for s in group}
        batches: dict[tuple, list[Cell]] = {}
        for cell in pending:
            if cell.sample.id in ids:
                batches.setdefault((cell.label, repr(cell.budget)), []).append(cell)
        plan.append((group, list(batches.values())))
    return plan


def _scratch_cell(cell, net, tokenizer, task, prompts, device, max_new_tokens, eos, fid, exact_bytes) -> dict:
    """One cell with plain `generate` from scratch (shared_prefill=False): the reference path."""
    ids = prompts[cell.sample.id].to(device)
    tic = time.perf_counter()
    new_ids, stats = generate_cell(net, ids, cell.method, cell.budget, max_new_tokens, eos)
    return cell_row(cell, task, tokenizer, new_ids.cpu(), stats or {}, ids.shape[1], max_new_tokens, eos,
                    fid.get(cell.key), exact_bytes, time.perf_counter() - tic)  # fmt: skip


def run_eval(model: str, task: str, out, methods: Sequence[Method | str | tuple] | None = None,
             budgets: Sequence[float | int] = DEFAULT_BUDGETS, task_knobs: dict | None = None, n: int = 4,
             target_tokens: int = 2048, max_new_tokens: int = 256, seed: int = 0, chat: bool | None = None,
             data_dir=None, device: str | None = "cpu", dtype=None, fidelity: bool = True,
             progress: bool = True, shared_prefill: bool = True,
             deadline: float | None = None, batch_size: int = 1, idle_ranks_ok: bool = False,
             overwrite: bool = False, shard_by: str = "samples") -> dict:  # fmt: skip
    """The `kvdiag eval` pipeline (see the module docstring); resumes into an existing `out`.

    methods: specs ("shadowkv:rank=320", "yakv@3.125%"), Method objects or (method, budget) pairs,
    default every method but exact; budgets: fractions of the prompt in (0, 1] or token counts, for the
    methods without their own; task_knobs: the task's knobs (typed values); data_dir: sets the task's
    `data_dir` knob; chat: None = the chat template when the tokenizer has one; shared_prefill: False
    prefills every cell on its own (plain `generate`, slower; the same tokens); deadline: a
    `time.monotonic()` value after which no new cell starts (the run is then partial); batch_size: how
    many samples are decoded together per method × budget (the same tokens as one at a time);
    idle_ranks_ok: under torchrun, let ranks without a pending sample wait instead of refusing the
    world size (`kvdiag.eval.distributed.shard_cells`); shard_by: how torchrun ranks share the cells,
    "samples" or "methods" (configurations; for ranks sharing a GPU); overwrite: replace the run in `out` instead
    of resuming it (the new run is staged beside it and swapped in when it has finished;
    `kvdiag.runs.replacing_run_dir`; not under torchrun). Every input is validated before the model
    loads and before anything is written. Figures: `kvdiag.plots.plot_run(out)` (the command draws
    them once a run is complete).
    Returns {"out", "predictions", "table", "cells", "new_cells", "seconds", "scores",
    "complete"} (cells and new_cells count this call's cells; under torchrun every rank gets rank 0's
    answer, new_cells summed over the ranks).
    """
    call = dict(locals())
    from tqdm.auto import tqdm

    from kvdiag.eval.distributed import (
        barrier,
        check_shard_by,
        from_main,
        gather,
        rank_device,
        ranks,
        shard_cells,
    )
    from kvdiag.models import load_model, load_tokenizer, resolve_device
    from kvdiag.runs import claim_run_dir, replaces_run, replacing_run_dir, write_manifest, write_table
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
    for name, value in (
        ("n", n),
        ("--max-new-tokens", max_new_tokens),
        ("--target-tokens", target_tokens),
        ("--batch-size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvdiagError(f"{name} must be an integer ≥ 1, got {value!r}")
    check_shard_by(shard_by)
    device = resolve_device(device)
    me = ranks(device)  # under torchrun: the process group (see kvdiag.eval.distributed)
    run_device = rank_device(device, me)
    out = Path(out).expanduser()
    claim_run_dir(out, "eval", overwrite=overwrite)
    if replaces_run(out, overwrite, me.distributed):
        with replacing_run_dir(out) as staging:
            result = run_eval(**{**call, "out": staging, "overwrite": False})
        moved = {
            k: out / Path(v).relative_to(staging)
            for k, v in result.items()
            if k in ("out", "predictions", "table")
        }
        return {**result, **moved}
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
    if me.distributed:  # the run directory is the same either way; the invocation says how it ran
        merged["invocations"][-1]["torchrun_ranks"] = me.world

    cells = [c for s in samples for c in [Cell(s, None, EXACT, EXACT, 1.0)] + [
        Cell(s, r.method, r.label, r.spec, b) for r in runs for b in r.budgets]]  # fmt: skip
    order = [c.key for _, batches in _plan(cells, batch_size) for batch in batches for c in batch]
    done = finished_keys(out)  # predictions.jsonl and any rank's file (a torn last line is cut off here)
    pending = [c for c in cells if c.key not in done]
    created = not out.exists()
    mine_pending = shard_cells(pending, me, shard_by, idle_ranks_ok)
    barrier(me, f"after reading {out}")  # every rank has read what is done before any rank writes
    log.info("%d cells, %d already in %s", len(cells), len(cells) - len(pending), out)

    out.mkdir(parents=True, exist_ok=True)
    try:
        net, tokenizer = load_model(model, device=run_device, dtype=dtype)
    except BaseException:
        if me.main and created and not any(out.iterdir()):
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
    if me.main:
        write_manifest(out, "eval", merged["config"], {**extra, "status": "running"})
    if not me.distributed:  # rows a killed torchrun launch left in rank files join predictions.jsonl
        merge_rank_files(out, order)
    written = rank_file(out, me.rank) if me.distributed else out / PREDICTIONS

    bar = tqdm(
        total=len(cells) - len(pending) + len(mine_pending), initial=len(cells) - len(pending),
        desc=f"eval {task}" + (f" rank {me.rank}/{me.world}" if me.distributed else ""), unit="cell",
        disable=not progress,
    )  # fmt: skip
    exact_bytes, ran, stopped = exact_bytes_per_token(net), 0, False
    for group, batches in _plan(mine_pending, batch_size):
        if stopped:
            break
        prefills, fid = {}, {}
        for sample in group:
            ids = prompts[sample.id].to(run_device)
            todo = [c for batch in batches for c in batch if c.sample is sample and c.method is not None]
            if fidelity and todo:
                bar.set_postfix_str(f"{sample.id} fidelity")
                results = cell_fidelity(
                    net, tokenizer, ids, task_obj.answer_text(sample), [(c.method, c.budget) for c in todo]
                )
                fid.update({c.key: r for c, r in zip(todo, results)})
            bar.set_postfix_str(f"{sample.id} prefill")
            prefills[sample.id] = prefill_prompt(net, ids)
        for batch in batches:
            if deadline is not None and time.monotonic() >= deadline:
                stopped = True
                log.info("deadline reached: %d cells left for the next run", len(mine_pending) - ran)
                break
            bar.set_postfix_str(f"{len(batch)} × {batch[0].label} {batch[0].budget}")
            if shared_prefill:
                rows = decode_cells(batch, net, tokenizer, task_obj, prompts, prefills, max_new_tokens, eos, fid,
                                    exact_bytes)  # fmt: skip
            else:
                rows = [_scratch_cell(c, net, tokenizer, task_obj, prompts, run_device, max_new_tokens, eos, fid,
                                      exact_bytes) for c in batch]  # fmt: skip
            for row in rows:
                append_row(written, row)
            ran += len(rows)
            bar.update(len(rows))
        prefills = None
    bar.close()

    if me.distributed:  # wait for every rank's cells, then rank 0 alone writes the run directory
        reports = gather(me, (ran, stopped), "after the eval cells")
        ran, stopped = sum(n for n, _ in reports), any(s for _, s in reports)
    result = None
    if me.main:
        merge_rank_files(out, order)
        table = results_table(read_predictions(out))  # every cell of the run, this call's and earlier ones
        write_table(table, out / RESULTS)
        from kvdiag.analysis.recall import warn_over_budget

        warn_over_budget(table[table.method != EXACT].dropna(subset=["attended_tokens_per_step"]),
                         column="attended_tokens_per_step")  # fmt: skip
        seconds = round(time.perf_counter() - start, 1)
        write_manifest(out, "eval", merged["config"], {**extra, "status": "partial" if stopped else "complete",
                                                       "cells": len(table), "new_cells": ran, "seconds_last_run": seconds})  # fmt: skip
        result = {
            "out": out, "predictions": out / PREDICTIONS, "table": out / RESULTS,
            "cells": len(cells), "new_cells": ran, "seconds": time.perf_counter() - start,
            "scores": score_table(table), "complete": not stopped,
        }  # fmt: skip
    return from_main(me, result, f"while rank 0 writes {out}")
