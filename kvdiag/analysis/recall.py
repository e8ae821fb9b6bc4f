"""Recall and error decomposition: where does an offloading method lose what exact attention reads?

Decode-faithful, causal setting. A trace holds L prompt tokens; N query positions (by default the
last N = 64 prompt positions, or explicit ones such as a gold answer's under teacher forcing) split
the prompt at L0 = the first query position. Each method builds its index on the *context* [0, L0)
(a `LayerKV` sliced to L0 tokens: k_pre, k_post, v, cos, sin and q[:, :L0]); the query at position
p ≥ L0 attends to the method's selection over [0, L0) plus, exactly, the tokens L0..p (they play
the generated tokens, which every method always attends). The reference is full causal attention
over [0, p]. Budgets are fractions of L0 or token counts (`resolve_budget`).

Per method × budget × layer × KV head × query position (per-query-head values averaged over the
KV head's G query heads). The N query positions are consecutive decode steps of one decode state
per method × budget (so a method's GPU cache, e.g. ArkVale's pages, warms up over them). Every
comparison with the oracle uses the oracle at the *same number of attended context tokens* as the
method (a = the method's attended tokens, rounded, per KV head and step), never at the nominal
budget: a method whose always-kept tokens (local window, outliers, sinks) exceed its budget is
compared with an oracle that may read as many.

- recall:        |exact top-a ∩ attended| / a per query head, a = the head's attended context tokens,
                 exact top-a of the context [0, L0) by q·k·scaling;
- recall_gqa:    |attended (the group's union) ∩ oracle top-a| / a, against the oracle's KV-head
                 selection (softmax per query head, max over the group: `kvdiag.methods.oracle`);
                 the oracle scores 1 by construction;
- attention_mass: share of the exact softmax mass over [0, p] on what the method attends
                 (selected ∪ always-kept ∪ the exact tail L0..p);
- err_total:     ‖o_method − o_exact‖ / ‖o_exact‖, o_method = softmax over (mask ∪ tail) of
                 q·k_method·scaling with the keys / values the method's `materialize` gives;
- err_selection: the same with the method's mask but exact keys and values;
- err_key:       ‖o(oracle top-a, method K/V) − o(oracle top-a, exact K/V)‖ / ‖o_exact‖: what the
                 method's key (and value) representation costs on the ideal selection of the same
                 size (0 for methods that attend exact keys and values);
- err_oracle:    ‖o(oracle top-a, exact K/V) − o_exact‖ / ‖o_exact‖, the selection floor at that size;
- attended_tokens: context tokens attended (mean over the group); `budget_tokens` beside it is the
                 nominal budget (a run warns when a method attends > 2× its budget);
- fetched_tokens: (KV head, token) entries read from host memory at this step, after the method's
                 GPU cache (ArkVale's pages, LRQK's working set; none for the others);
                 fetched_tokens_cold: the same without any cache; fetched_bytes: fetched_tokens × the
                 bytes of one stored entry (sum over kv_head = the layer's bytes per step);
- reuse_prev:    share of this step's score-chosen tokens that the previous step chose too (what a
                 cache of recently fetched tokens could save);
- resident_bytes_per_token: the layer's resident bytes (index + decode state, as stored) / L0 (whole
                 layer, all KV heads; the exact tail L0..p, resident for every method, is not in it).

Granularity: one row per query position (column `query_position`) unless that would exceed
`MAX_ROWS` rows; then rows are means over the query positions with their count in `n_queries`
(no `query_position` column). `DataFrame.attrs["recall"]` says which, with L, L0 and the budgets.

Sliding-window layers whose window hides part of [0, p] from some query are skipped (logged and
listed in attrs["recall"]["skipped_layers"]): offloading methods select over full-attention layers
only. A window longer than every query position is full attention and kept. Logit soft-capping is
applied as the model does. All computations are float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvdiag.attention import attend, gqa_logits, iter_logits
from kvdiag.errors import KvdiagError
from kvdiag.methods import LayerKV, Method, get_method, resolve_budget
from kvdiag.methods.specs import NO_BUDGETS, check_budget, default_methods, parse_budget, resolve_methods  # noqa: F401

log = logging.getLogger(__name__)

MAX_ROWS = 2_000_000
DEFAULT_BUDGETS = (0.015625, 0.03125, 0.0625)
DEFAULT_QUERIES = 64
METRICS = ("recall", "recall_gqa", "attention_mass", "err_total", "err_selection", "err_key", "err_oracle",
           "attended_tokens", "fetched_tokens", "fetched_bytes", "resident_bytes_per_token")  # fmt: skip


# --- inputs -----------------------------------------------------------------------------------------


def resolve_positions(n_tokens: int, query_positions=None, n_queries: int = DEFAULT_QUERIES) -> torch.Tensor:
    """Sorted query positions [N] (default: the last n_queries of the prompt); the first one is L0 ≥ 1."""
    if query_positions is None:
        if not isinstance(n_queries, int) or n_queries < 1:
            raise KvdiagError(f"--queries {n_queries!r} must be an integer ≥ 1")
        if n_queries >= n_tokens:
            raise KvdiagError(
                f"the prompt has {n_tokens} tokens: --queries {n_queries} leaves no context; use ≤ {n_tokens - 1}"
            )
        return torch.arange(n_tokens - n_queries, n_tokens)
    pos = torch.as_tensor(query_positions).long().flatten().unique(sorted=True)
    if pos.numel() == 0:
        raise KvdiagError("no query positions given")
    if pos[0] < 1 or pos[-1] >= n_tokens:
        raise KvdiagError(f"query positions must lie in 1..{n_tokens - 1} (position 0 has no context)")
    return pos


# --- one layer --------------------------------------------------------------------------------------


def context_layer(layer: LayerKV, n_context: int) -> LayerKV:
    """The layer cut to its first n_context tokens (what a method builds its index on)."""
    return LayerKV(
        k_pre=layer.k_pre[:, :n_context], k_post=layer.k_post[:, :n_context], v=layer.v[:, :n_context],
        cos=layer.cos[:n_context], sin=layer.sin[:n_context], scaling=layer.scaling,
        q=None if layer.q is None else layer.q[:, :n_context], layer_idx=layer.layer_idx,
    )  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def _by_kv(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[H_q, c] -> [H_kv, c], the mean over each KV head's query heads."""
    return x.float().reshape(n_kv, -1, x.shape[-1]).mean(dim=1)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, 0 = the largest (ties to the lower index)."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )


def _previous(ids: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """[c, H, k] chosen ids -> [c, H, k] the previous step's chosen ids (the first step's from `last`)."""
    prev = torch.roll(ids, 1, dims=0)
    if last is None:
        prev[0] = -2  # no previous step: nothing in common
    else:
        prev[0] = last
    return prev


def _reuse(ids: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[c, H] share of each step's chosen ids that the previous step chose too (NaN when none chosen)."""
    valid = ids >= 0
    common = (ids[..., :, None] == prev[..., None, :]).any(-1) & valid
    return common.sum(-1).float() / valid.sum(-1).float()


def layer_metrics(layer: LayerKV, methods: list[Method], budget_tokens: list[int], positions: torch.Tensor,
                  softcap: float | None = None, chunk_size: int = 64, on_progress=None,
                  cache_tokens: int | None = None) -> list[dict]:  # fmt: skip
    """Metric blocks of one layer: one dict per (method, budget), method-major, of arrays [H_kv, N].

    layer: the full prompt layer (q required); positions [N] sorted, L0 = positions[0]. The N
    queries are consecutive decode steps of one decode state per (method, budget), in order.
    on_progress(x): called with x = the share of one method's work just done (sums to len(methods)).
    cache_tokens: a GPU cache of recently fetched tokens of this size per KV head for every method
    (None: each method's own, e.g. ArkVale's pages; 0: none).
    """
    progress = on_progress or (lambda _x: None)
    n_kv, _, d = layer.k_post.shape
    n_q = layer.q.shape[0]
    group = n_q // n_kv
    n_ctx, length = int(positions[0]), int(positions[-1]) + 1
    ctx = context_layer(layer, n_ctx)
    k_full, v_full = layer.k_post[:, :length].float(), layer.v[:, :length].float()
    q_full = layer.q.float()
    oracle = get_method("oracle")
    oracle_built = oracle.build(ctx)
    runs = []
    for method in methods:
        built = method.build(ctx)
        k_seen, v_seen = method.dense_view(built)
        keys = torch.cat([k_seen, k_full[:, n_ctx:]], dim=1)  # [H_kv, P, d]
        values = torch.cat([v_seen, v_full[:, n_ctx:]], dim=1)
        states = [method.start(built, k) for k in budget_tokens]
        if cache_tokens is not None:
            for state in states:
                state.cache_tokens = cache_tokens
        cold = [method.start(built, k) for k in budget_tokens]
        for state in cold:
            state.cache_tokens = 0
        runs.append({"method": method, "built": built, "keys": keys, "values": values, "states": states,
                     "cold": cold, "last": [None] * len(budget_tokens)})  # fmt: skip
        progress(0.5)
    n_chunks = -(-len(positions) // chunk_size)
    blocks = {(i, j): [] for i in range(len(methods)) for j in range(len(budget_tokens))}
    for part, exact_logits in iter_logits(
        q_full, k_full, positions, layer.scaling, None, softcap, chunk_size
    ):
        pos = positions[part].to(k_full.device)
        q_step = q_full[:, pos].transpose(0, 1)  # [c, H_q, d] decode queries
        c = pos.numel()
        tail = torch.ones(n_q, c, length - n_ctx, dtype=torch.bool, device=k_full.device)
        exact_w = torch.softmax(exact_logits, dim=-1)
        o_exact = attend(exact_logits, None, v_full)
        exact_rank = _ranks(exact_logits[..., :n_ctx])  # [H_q, c, L0] per query head
        oracle_rank = _ranks(oracle.score(oracle_built, q_step)).transpose(0, 1)  # [H_kv, c, L0]
        for i, run in enumerate(runs):
            method = run["method"]
            m_logits = gqa_logits(q_step.transpose(0, 1), run["keys"], layer.scaling, softcap)  # [H_q, c, P]
            m_logits = _causal_tail(m_logits, pos, n_ctx)
            for j, _k in enumerate(budget_tokens):
                sel = method.select(run["built"], q_step, run["states"][j])
                cold = method.select(run["built"], q_step, run["cold"][j])
                chosen = sel.per_query(n_q).transpose(0, 1)  # [H_q, c, L0]
                mask = torch.cat([chosen, tail], dim=-1)
                united = chosen.reshape(n_kv, group, c, n_ctx).any(dim=1)  # [H_kv, c, L0]
                attended_q = chosen.sum(-1)  # [H_q, c]
                attended = _by_kv(attended_q, n_kv).round().long()  # [H_kv, c] oracle at equal size
                o_match = oracle_rank < attended[..., None]  # [H_kv, c, L0]
                o_mask = torch.cat([o_match.repeat_interleave(group, dim=0), tail], dim=-1)
                o_oracle = attend(exact_logits, o_mask, v_full)
                exact_top = exact_rank < attended_q[..., None]  # exact top-a per query head
                prev = _previous(sel.ids, run["last"][j])
                run["last"][j] = sel.ids[-1]
                blocks[i, j].append({
                    "recall": _by_kv((chosen & exact_top).sum(-1) / attended_q.clamp_min(1), n_kv),
                    "recall_gqa": (united & o_match).sum(-1).float() / attended.clamp_min(1),
                    "attention_mass": _by_kv((exact_w * mask).sum(-1), n_kv),
                    "err_total": _by_kv(_rel(attend(m_logits, mask, run["values"]), o_exact, o_exact), n_kv),
                    "err_selection": _by_kv(_rel(attend(exact_logits, mask, v_full), o_exact, o_exact), n_kv),
                    "err_key": _by_kv(_rel(attend(m_logits, o_mask, run["values"]), o_oracle, o_exact), n_kv),
                    "err_oracle": _by_kv(_rel(o_oracle, o_exact, o_exact), n_kv),
                    "attended_tokens": _by_kv(attended_q, n_kv),
                    "fetched_tokens": sel.fetched_entries().T,
                    "fetched_tokens_cold": cold.fetched_entries().T,
                    "fetched_bytes": sel.fetched_entries().T * sel.entry_bytes,
                    "reuse_prev": _by_kv(_reuse(sel.ids, prev).T, n_kv) if method.per_query_head
                    else _reuse(sel.ids, prev).T,
                })  # fmt: skip
            progress(0.5 / n_chunks)
    out = []
    for i, run in enumerate(runs):
        for j, _k in enumerate(budget_tokens):
            block = {name: torch.cat([b[name] for b in blocks[i, j]], dim=1).cpu().numpy()
                     for name in blocks[i, j][0]}  # fmt: skip
            resident = run["method"].resident_bytes(run["built"], run["states"][j])
            block["resident_bytes_per_token"] = np.full((n_kv, len(positions)), resident / n_ctx)
            out.append(block)
    return out


def _causal_tail(logits: torch.Tensor, positions: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Hide the tail tokens after each query's own position (the prompt part is the method's)."""
    key_pos = torch.arange(logits.shape[-1], device=logits.device)
    future = (key_pos[None, :] > positions[:, None]) & (key_pos[None, :] >= n_ctx)  # [c, P]
    return logits.masked_fill(future[None], float("-inf"))


# --- a whole trace ----------------------------------------------------------------------------------


def _skip_reason(trace, layer: int, positions: torch.Tensor) -> str | None:
    window = trace.layer_meta(layer).get("sliding_window")
    if window and int(positions[-1]) >= window:
        return f"sliding window of {window} tokens"
    return None


def recall_table(trace, methods: Sequence[Method | str], budgets, layers=None, query_positions=None,
                 progress: bool = True, n_queries: int = DEFAULT_QUERIES, per_position: bool | None = None,
                 device=None, chunk_size: int = 64, cache_tokens: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Recall, attention mass, output error decomposition and bytes of `methods` on a `Trace`.

    methods: Method objects or specs ("shadowkv:rank=320"); budgets: fractions of L0 or token counts;
    layers: captured layers to use (default all); query_positions: explicit positions (default the
    last `n_queries`); per_position: one row per query position (True), means over positions
    (False) or decide by `MAX_ROWS` (None); cache_tokens: a GPU cache of recently fetched tokens per KV
    head for every method (None: each method's own; see `layer_metrics`). See the module docstring
    for the columns.
    """
    methods = resolve_methods(methods)
    labels = [m.label() for m in methods]
    budgets = list(budgets)
    if not budgets:
        raise KvdiagError(NO_BUDGETS)
    positions = resolve_positions(trace.n_tokens, query_positions, n_queries)
    n_ctx = int(positions[0])
    budget_tokens = [resolve_budget(b, n_ctx) for b in budgets]
    layers = trace.layers if layers is None else list(layers)
    missing = [i for i in layers if i not in trace.layers]
    if missing:
        raise KvdiagError(f"layers {missing} were not captured; captured: {trace.layers}")
    skipped = {i: r for i in layers if (r := _skip_reason(trace, i, positions))}
    for i, reason in skipped.items():
        log.info("layer %d skipped: %s", i, reason)
    used = [i for i in layers if i not in skipped]
    if not used:
        raise KvdiagError(
            f"every chosen layer is a sliding-window layer ({skipped}); choose full-attention layers"
        )
    n_kv = trace.k_post(used[0]).shape[0]
    n_rows = len(methods) * len(budgets) * len(used) * n_kv * len(positions)
    if per_position is None:
        per_position = n_rows <= MAX_ROWS

    frames = []
    bar = tqdm(total=len(used) * len(methods), desc="recall", unit="method·layer", disable=not progress)
    with torch.inference_mode(), bar:
        for layer_idx in used:
            bar.set_postfix(layer=layer_idx)
            layer = trace.layer_kv(layer_idx, device=device)
            blocks = layer_metrics(layer, methods, budget_tokens, positions, trace.layer_meta(layer_idx).get("softcap"),
                                   chunk_size, on_progress=bar.update, cache_tokens=cache_tokens)  # fmt: skip
            heads = layer.n_kv_heads
            for n, block in enumerate(blocks):
                i, j = divmod(n, len(budgets))
                if per_position:
                    cols = {"query_position": np.tile(positions.numpy(), heads)}
                    cols |= {k: v.reshape(-1) for k, v in block.items()}
                else:
                    cols = {"n_queries": len(positions)} | {k: v.mean(axis=1) for k, v in block.items()}
                frames.append(pd.DataFrame({
                    "method": labels[i], "method_name": methods[i].name, "budget": float(budgets[j]),
                    "budget_tokens": budget_tokens[j], "budget_fraction": budget_tokens[j] / n_ctx,
                    "layer": layer_idx,
                    "kv_head": np.repeat(np.arange(heads), len(positions) if per_position else 1), **cols,
                }))  # fmt: skip
    table = pd.concat(frames, ignore_index=True)
    warn_over_budget(table)
    table.attrs["recall"] = {
        "n_tokens": trace.n_tokens, "n_context": n_ctx, "n_queries": len(positions),
        "query_positions": positions.tolist(), "per_position": per_position,
        "layers": used, "skipped_layers": {str(i): r for i, r in skipped.items()},
        "budgets": [{"given": b, "tokens": t, "fraction": t / n_ctx} for b, t in zip(budgets, budget_tokens)],
        "methods": [{"label": lab, "name": m.name, "paper": m.paper, "knobs": m.knobs(),
                     "resolved": m.resolved(context_layer(trace.layer_kv(used[0]), n_ctx))}
                    for lab, m in zip(labels, methods)],
    }  # fmt: skip
    return table


def warn_over_budget(table: pd.DataFrame, factor: float = 2.0, column: str = "attended_tokens") -> list[str]:
    """Log (and return) the method × budget cells that attend more than `factor` × their budget: their
    always-kept tokens (local windows, outliers, sinks) dominate, so compare them with the oracle at
    the same attended tokens (err_oracle, recall_gqa here) or plot against attended tokens / bytes.
    One line per method and budget as given (prompts of different lengths have different token
    budgets; the line gives the means)."""
    keys = ["method", "budget"] if "budget" in table.columns else ["method", "budget_tokens"]
    means = table.groupby(keys, sort=False)[[column, "budget_tokens"]].mean()
    lines = []
    for (method, _), row in means.iterrows():
        attended, budget = row[column], row["budget_tokens"]
        if attended > factor * budget:
            lines.append(
                f"{method} at {budget:.0f} tokens attends {attended:.0f} tokens on average (> {factor:g}×)"
            )
            log.warning("%s: its always-kept tokens dominate the budget", lines[-1])
    return lines


# --- the `kvdiag recall` pipeline -------------------------------------------------------------------


def run_recall(model: str | None, out, methods: Sequence[Method | str] | None = None, budgets=DEFAULT_BUDGETS,
               layers="all", prompt: str | None = None, prompt_file=None, task: str | None = None,
               n_queries: int = DEFAULT_QUERIES, device: str | None = "cpu", dtype=None,
               max_tokens: int | None = None, chat: bool = False, save_trace: bool = False,
               cache_tokens: int | None = None, *, encoding: str = "utf-8", trace=None,
               overwrite: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """The `kvdiag recall` pipeline: load, capture, `recall_table`, recall.parquet, manifest (figures:
    `kvdiag.plots.plot_run(out)`, as the command does).

    model: a model spec (None: the default model, or the trace's with `trace`); trace: a directory
    saved with --save-trace to analyse instead of capturing (no model is loaded); cache_tokens: see
    `recall_table`; overwrite: replace a run already in `out` (`kvdiag.runs.claim_run_dir`). Inputs
    (methods, budgets, queries, prompt source) are validated before the model loads, budgets against
    L0 right after tokenising; results are staged and appear in `out` only on success; the analysed
    text is kept as prompt.txt.
    Returns {"out", "table", "n_tokens", "n_context", "rows", "layers", "seconds"}.
    """
    import time

    from kvdiag.capture import capture_prompt, resolve_layers
    from kvdiag.capture.trace import load_saved_trace
    from kvdiag.capture.trace import trace_dir as trace_dir_of
    from kvdiag.models import DEFAULT_MODEL, load_model, resolve_device
    from kvdiag.models.adapter import config_shapes
    from kvdiag.models.prompts import builtin_prompt, read_prompt, tokenize_prompt
    from kvdiag.runs import atomic_write_bytes, staged_run_dir, write_manifest, write_table

    start = time.perf_counter()
    methods = resolve_methods(methods)
    budgets = list(budgets)
    if not budgets:
        raise KvdiagError(NO_BUDGETS)
    for b in budgets:
        check_budget(b)
    if not isinstance(n_queries, int) or n_queries < 1:
        raise KvdiagError(f"--queries {n_queries!r} must be an integer ≥ 1")
    if trace is not None:
        given = [name for name, value in (("--text", prompt), ("--prompt-file", prompt_file), ("--task", task),
                 ("--max-tokens", max_tokens), ("--chat", chat or None)) if value is not None]  # fmt: skip
        if given:
            raise KvdiagError(
                f"--trace analyses a saved capture; {', '.join(given)} cannot change it: drop them"
            )
        source = f"trace {trace}"
    elif task is not None:
        if prompt is not None or prompt_file is not None:
            raise KvdiagError("give --task or a prompt (--text / --prompt-file), not both")
        from kvdiag.tasks import get_task

        get_task(task)  # unknown names fail before the model loads
        source = f"task {task} (sample 0, seed 0)"
    else:
        text = read_prompt(prompt_file, prompt, encoding)
        source = str(prompt_file) if prompt_file else ("--text" if prompt else "built-in sample")
    device = resolve_device(device)
    with staged_run_dir(out, "recall", overwrite=overwrite) as stage:
        if trace is not None:
            trace_dir = trace
            trace, model, chosen = load_saved_trace(trace_dir, model, layers, device)
            n_ctx = int(resolve_positions(trace.n_tokens, None, n_queries)[0])
            for b in budgets:
                resolve_budget(b, n_ctx)
        else:
            model = model or DEFAULT_MODEL
            net, tokenizer = load_model(model, device=device, dtype=dtype)
            if task is not None:
                samples = get_task(task).samples(
                    1, seed=0, tokenizer=tokenizer, target_tokens=max_tokens or 2048
                )
                text = samples[0].prompt_text
            elif text is None:
                text = builtin_prompt(tokenizer, net, chat)
            chosen = resolve_layers(layers, config_shapes(net.config)["layers"])
            input_ids = tokenize_prompt(tokenizer, text, model=net, chat=chat, max_tokens=max_tokens)
            n_ctx = int(resolve_positions(input_ids.shape[1], None, n_queries)[0])
            for b in budgets:
                resolve_budget(b, n_ctx)  # a budget above L0 fails before the capture
            trace = capture_prompt(net, tokenizer, text, input_ids=input_ids, layers=chosen)
            atomic_write_bytes(stage / "prompt.txt", text.encode("utf-8"))
            if save_trace:
                trace.save(stage / "trace")
        table = recall_table(
            trace,
            methods,
            budgets,
            layers=chosen,
            n_queries=n_queries,
            device=device,
            progress=progress,
            cache_tokens=cache_tokens,
        )
        info = table.attrs.pop("recall")
        write_table(table, stage / "recall.parquet")
        config = {
            "model": model, "layers": chosen, "device": device, "dtype": trace.meta["dtype"],
            "n_tokens": trace.n_tokens, "n_context": info["n_context"], "queries": n_queries,
            "query_positions": f"{info['query_positions'][0]}..{info['query_positions'][-1]}",
            "max_tokens": max_tokens, "chat": chat, "task": task, "prompt_source": source, "cache_tokens": cache_tokens,
            "prompt_sha256": trace.meta.get("prompt_sha256"), "budgets": info["budgets"],
            "methods": info["methods"],
        }  # fmt: skip
        extra = {
            "shapes": trace.meta["shapes"], "layers_used": info["layers"], "skipped_layers": info["skipped_layers"],
            "granularity": "per query position" if info["per_position"] else
                           "mean over query positions (column n_queries)",
            "rows": len(table), "seconds": round(time.perf_counter() - start, 1), "trace_saved": save_trace,
        }  # fmt: skip
        if source.startswith("trace "):
            extra["trace"] = str(trace_dir_of(trace_dir).expanduser().absolute())
        write_manifest(stage, "recall", config, extra)
    out = Path(out).expanduser()
    return {
        "out": out, "table": out / "recall.parquet",
        "n_tokens": trace.n_tokens, "n_context": info["n_context"], "rows": len(table), "layers": chosen,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
