"""Generating the cells of an evaluation: prompts, end-of-sequence tokens, batched greedy decoding of
a group of samples under one method × budget, scoring and the predictions.jsonl row of each cell,
and teacher-forced fidelity.

A *cell* is one (sample, method label, budget); the reference `exact` is one cell per sample with
budget 1.0. Cells of one method × budget are decoded together, a batch of samples at a time
(`decode_cells`, through `kvdiag.offload.decode.greedy_decode`): one exact prefill per sample
(prompt[:-1], `prefill_prompt`) is shared by every cell of that sample, and the last prompt token
is the first decode step, so under the simulator the method's index covers the first L − 1 prompt
tokens and already applies to the query that produces the first generated token. A budget fraction
b means ceil(b·L) tokens of the L-token prompt (at most L − 1, all the indexed ones).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from kvdiag.eval.store import cell_key
from kvdiag.methods import Method
from kvdiag.methods.base import resolve_budget
from kvdiag.offload.decode import SharedPrefill, greedy_decode, prefill_prompt  # noqa: F401  (re-exported)

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


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


def exact_bytes_per_token(model) -> float:
    """K and V per token and layer at the model's dtype (what exact attention keeps resident)."""
    from kvdiag.models.adapter import config_shapes

    shapes = config_shapes(model.config)
    return float(2 * shapes["kv_heads"] * shapes["head_dim"] * next(model.parameters()).element_size())


def decode_cells(cells: list[Cell], net, tokenizer, task, prompts: dict, prefills: dict, max_new_tokens: int,
                 eos: list[int], fid: dict, exact_bytes: float) -> list[dict]:  # fmt: skip
    """Decode cells of one method × budget (one per sample) as one batch; their predictions.jsonl rows."""
    method, budget = cells[0].method, cells[0].budget
    lengths = [prompts[c.sample.id].shape[1] for c in cells]
    row_budgets = None
    if method is not None:  # ceil(b·L) of the L-token prompt, at most the L − 1 indexed tokens
        row_budgets = [min(resolve_budget(budget, n), n - 1) for n in lengths]
    tic = time.perf_counter()
    result = greedy_decode(net, [prefills[c.sample.id] for c in cells], max_new_tokens, eos, method=method,
                           budget=row_budgets)  # fmt: skip
    wall = (time.perf_counter() - tic) / len(cells)
    rows = []
    for cell, new_ids, stats, length in zip(cells, result.tokens, result.stats, lengths):
        rows.append(cell_row(cell, task, tokenizer, new_ids, stats, length, max_new_tokens, eos,
                             fid.get(cell.key), exact_bytes, wall))  # fmt: skip
    return rows


def cell_row(cell: Cell, task, tokenizer, new_ids, stats: dict, length: int, max_new_tokens: int, eos: list[int],
             fid: dict | None, exact_bytes: float, wall: float) -> dict:  # fmt: skip
    """Score and account one generated cell: its predictions.jsonl row."""
    prediction = tokenizer.decode(new_ids, skip_special_tokens=True)
    metrics = task.metrics(prediction, cell.sample)
    n_new = len(new_ids)
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
                   fetched_bytes_per_step=0.0, decode_steps=max(n_new - 1, 0),
                   attended_tokens_per_step=float(length - 1))  # fmt: skip
    else:
        row.update(fid or no_fidelity())
        row.update(resident_bytes_per_token=stats.get("resident_bytes_per_token_layer", math.nan),
                   fetched_tokens_per_step=stats.get("fetched_tokens_per_step_layer", math.nan),
                   fetched_bytes_per_step=stats.get("fetched_bytes_per_step_layer", math.nan),
                   decode_steps=stats.get("decode_steps", 0),
                   attended_tokens_per_step=stats.get("attended_tokens_per_step_layer", math.nan))  # fmt: skip
    return row


def generate_cell(model, input_ids, method: Method | None, budget, max_new_tokens: int, eos: list[int]):
    """One cell from scratch with plain `model.generate` (no shared prefill), exact or inside the
    simulator: the same tokens as `decode_cells` (the reference its tests compare with).
    Returns (new token ids [T], simulator stats dict or None)."""
    import torch

    from kvdiag.offload.simulate import simulate

    kwargs = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
        num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
        pad_token_id=eos[0] if eos else None,
    )  # fmt: skip
    with torch.inference_mode():
        if method is None:
            return model.generate(input_ids, **kwargs)[0, input_ids.shape[1] :], None
        with simulate(model, method, budget) as sim:
            out = model.generate(input_ids, **kwargs)
        return out[0, input_ids.shape[1] :], sim.stats()


def cell_fidelity(model, tokenizer, prompt_ids, answer: str, runs: list[tuple[Method, Any]]) -> list[dict]:
    """Per run: mean KL, top-1 agreement and gold log-probs over the teacher-forced answer."""
    from kvdiag.eval.fidelity import teacher_forced_fidelity

    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    if answer_ids.shape[1] < 2 or not runs:
        return [no_fidelity(answer_ids.shape[1]) for _ in runs]
    frame = teacher_forced_fidelity(model, prompt_ids, answer_ids, runs)
    per_run = answer_ids.shape[1] - 1
    # rows come in `runs` order, per_run each (labels alone are ambiguous for one method at two budgets)
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


def no_fidelity(answer_tokens=None) -> dict:
    nan = float("nan")
    return {"kl_mean": nan, "top1_agree": nan, "gold_logprob_exact": nan, "gold_logprob_method": nan,
            "answer_tokens": answer_tokens}  # fmt: skip
