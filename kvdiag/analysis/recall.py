"""Recall and error decomposition: where does an offloading method lose what exact attention reads?

Decode-faithful, causal setting. A trace holds L prompt tokens; N query positions (by default the
last N = 64 prompt positions, or explicit ones such as a gold answer's under teacher forcing) split
the prompt at L0 = the first query position. Each method builds its index on the *context* [0, L0)
(a `LayerKV` sliced to L0 tokens: k_pre, k_post, v, cos, sin and q[:, :L0]); the query at position
p ≥ L0 attends to the method's selection over [0, L0) plus, exactly, the tokens L0..p (they play
the generated tokens, which every method always attends). The reference is full causal attention
over [0, p]. Budgets are fractions of L0 or token counts (`resolve_budget`).

Per method × budget × layer × KV head × query position (per-query-head values averaged over the
KV head's G query heads):

- recall:        |exact top-k ∩ attended| / k per query head, exact top-k of the context [0, L0) by
                 q·k·scaling, k = the budget in tokens;
- recall_gqa:    the same against the oracle's KV-head top-k (softmax per query head, max over the
                 group: `kvdiag.methods.oracle`), with a per-query-head method's masks united over
                 the group; the oracle scores 1 here by construction;
- attention_mass: share of the exact softmax mass over [0, p] on what the method attends
                 (selected ∪ always-kept ∪ the exact tail L0..p);
- err_total:     ‖o_method − o_exact‖ / ‖o_exact‖, o_method = softmax over (mask ∪ tail) of
                 q·k_method·scaling with the method's `keys()` / `values()` on the context;
- err_selection: the same with the method's mask but exact keys and values;
- err_key:       ‖o(oracle mask, method K/V) − o(oracle mask, exact K/V)‖ / ‖o_exact‖: what the
                 method's key (and value) representation costs on the ideal selection of the same
                 budget (0 for methods that attend exact keys and values);
- err_oracle:    ‖o(oracle mask, exact K/V) − o_exact‖ / ‖o_exact‖, the selection floor;
- attended_tokens / fetched_tokens: context tokens attended (mean over the group) and distinct
                 tokens read from host memory for the KV head at this step; fetched_bytes: the
                 method's `fetched_bytes` of this KV head's part of the selection at this step
                 (sum over kv_head = the layer's bytes per step);
- resident_bytes_per_token: the method's `resident_bytes` of the layer's index / L0 (whole layer,
                 all KV heads; the exact tail L0..p, resident for every method, is not in it).

Granularity: one row per query position (column `query_position`) unless that would exceed
`MAX_ROWS` rows; then rows are means over the query positions with their count in `n_queries`
(no `query_position` column). `DataFrame.attrs["recall"]` says which, with L, L0 and the budgets.

Sliding-window layers whose window hides part of [0, p] from some query are skipped (logged and
listed in attrs["recall"]["skipped_layers"]): offloading methods select over full-attention layers
only. A window longer than every query position is full attention and kept. Logit soft-capping is
applied as the model does. All computations are float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvdiag.attention import iter_logits
from kvdiag.errors import KvdiagError
from kvdiag.methods import Method, get_method, method_names, parse_method_spec
from kvdiag.methods.base import LayerKV, resolve_budget

log = logging.getLogger(__name__)

MAX_ROWS = 2_000_000
DEFAULT_BUDGETS = (0.015625, 0.03125, 0.0625)
DEFAULT_QUERIES = 64
NO_BUDGETS = "no budgets given; e.g. 0.015625,0.03125 (fractions of the context) or 2048 (tokens)"
METRICS = ("recall", "recall_gqa", "attention_mass", "err_total", "err_selection", "err_key", "err_oracle",
           "attended_tokens", "fetched_tokens", "fetched_bytes", "resident_bytes_per_token")  # fmt: skip


# --- inputs -----------------------------------------------------------------------------------------


def default_methods() -> list[str]:
    """Every registered method except `exact` (the reference itself)."""
    return [name for name in method_names() if name != "exact"]


def method_label(method: Method) -> str:
    """The method's name, or "name:knob=value,..." with the knobs that differ from its defaults."""
    return method.label()


def resolve_methods(methods: Sequence[Method | str] | None) -> list[Method]:
    """Method objects from objects or CLI specs ("shadowkv:rank=320"); None = `default_methods()`."""
    chosen = [
        parse_method_spec(m) if isinstance(m, str) else m
        for m in (default_methods() if methods is None else methods)
    ]
    if not chosen:
        raise KvdiagError(f"no methods given; choose from {', '.join(method_names())}")
    for m in chosen:
        if not isinstance(m, Method):
            raise KvdiagError(f"{m!r} is not a kvdiag Method or a method spec")
    labels = [method_label(m) for m in chosen]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise KvdiagError(f"method {', '.join(twice)} is given twice")
    return chosen


def parse_budget(text: str) -> float | int:
    """CLI budget: "0.03125" or "3.125%" → fraction of the context, "2048" → tokens ("1.0" = all)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value: float | int = float(raw[:-1]) / 100
        elif any(c in raw for c in ".eE"):
            value = float(raw)
        else:
            value = int(raw)
    except ValueError:
        raise KvdiagError(
            f"budget {text!r} is not a number; use a fraction like 0.03125, 3.125% or tokens like 2048"
        ) from None
    check_budget(value)
    return value


def check_budget(budget: float | int) -> None:
    """Check the form of a budget before the context length is known."""
    resolve_budget(budget, 1 << 62)


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


def resolved_knobs(method: Method, layer: LayerKV) -> dict:
    """Values a method derives from its knobs for this layer (ShadowKV rank, LRQK rank, YAKV K/V format)."""
    out = {}
    channels = layer.n_kv_heads * layer.head_dim
    if hasattr(method, "resolved_rank"):
        out["rank"] = method.resolved_rank(channels, layer.n_tokens)
    if hasattr(method, "effective_rank"):
        out["rank"] = method.effective_rank(layer.head_dim)
    if hasattr(method, "resolved_kv_quant"):
        out["kv_quant"] = method.resolved_kv_quant()
    return out


# --- one layer --------------------------------------------------------------------------------------


def context_layer(layer: LayerKV, n_context: int) -> LayerKV:
    """The layer cut to its first n_context tokens (what a method builds its index on)."""
    return LayerKV(
        k_pre=layer.k_pre[:, :n_context], k_post=layer.k_post[:, :n_context], v=layer.v[:, :n_context],
        cos=layer.cos[:n_context], sin=layer.sin[:n_context], scaling=layer.scaling,
        q=None if layer.q is None else layer.q[:, :n_context], layer_idx=layer.layer_idx,
    )  # fmt: skip


def _attend(logits: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax over the True entries of mask: logits/mask [H_q, c, P], v [H_kv, P, d] -> [H_q, c, d]."""
    h_kv, length, d = v.shape
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    weights = weights.reshape(h_kv, -1, logits.shape[1], length)
    return torch.einsum("hgcl,hld->hgcd", weights, v).reshape(-1, logits.shape[1], d)


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def _by_kv(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[H_q, c] -> [H_kv, c], the mean over each KV head's query heads."""
    return x.float().reshape(n_kv, -1, x.shape[-1]).mean(dim=1)


def _fetched_bytes(method: Method, selection, n_kv: int) -> torch.Tensor:
    """[c, H_kv] the method's fetched_bytes of each KV head's part of the selection at each step."""
    n, n_sel, _ = selection.fetched.shape
    group = n_sel // n_kv
    out = torch.full((n, n_kv), float("nan"))
    extra = {"n_kv_heads": 1} if getattr(selection, "n_kv_heads", 0) else {}
    try:
        for step in range(n):
            for h in range(n_kv):
                part = slice(h * group, (h + 1) * group)
                sub = dataclasses.replace(selection, mask=selection.mask[step : step + 1, part],
                                          fetched=selection.fetched[step : step + 1, part], **extra)  # fmt: skip
                out[step, h] = method.fetched_bytes(sub)
    except (KvdiagError, TypeError, ValueError) as err:
        log.warning("%s: fetched bytes per KV head unavailable (%s)", method.name, err)
    return out


def layer_metrics(layer: LayerKV, methods: list[Method], budget_tokens: list[int], positions: torch.Tensor,
                  softcap: float | None = None, chunk_size: int = 64, on_progress=None) -> list[dict]:  # fmt: skip
    """Metric blocks of one layer: one dict per (method, budget), method-major, of arrays [H_kv, N].

    layer: the full prompt layer (q required); positions [N] sorted, L0 = positions[0].
    on_progress(x): called with x = the share of one method's work just done (sums to len(methods)).
    """
    progress = on_progress or (lambda _x: None)
    n_kv, _, d = layer.k_post.shape
    n_q = layer.q.shape[0]
    n_ctx, length = int(positions[0]), int(positions[-1]) + 1
    ctx = context_layer(layer, n_ctx)
    k_full, v_full = layer.k_post[:, :length].float(), layer.v[:, :length].float()
    q_full = layer.q.float()
    oracle = get_method("oracle")
    built = []
    for method in methods:
        index = method.build(ctx)
        keys = torch.cat([method.keys(index).float(), k_full[:, n_ctx:]], dim=1)  # [H_kv, P, d]
        values = torch.cat([method.values(index).float(), v_full[:, n_ctx:]], dim=1)
        built.append((method, index, keys, values))
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
        everything = torch.ones_like(exact_logits, dtype=torch.bool)
        exact_w = torch.softmax(exact_logits, dim=-1)
        o_exact = _attend(exact_logits, everything, v_full)
        ctx_scores = exact_logits[..., :n_ctx]  # [H_q, c, L0]; soft-capping keeps the order
        oracle_masks, exact_topk = [], []
        for k in budget_tokens:
            exact_topk.append(torch.zeros_like(ctx_scores, dtype=torch.bool).scatter_(
                -1, ctx_scores.topk(k, dim=-1).indices, True))  # fmt: skip
            gqa = oracle.select(ctx, q_step, k).mask.transpose(0, 1)  # [H_kv, c, L0]
            mask = torch.cat([gqa.repeat_interleave(n_q // n_kv, dim=0), tail], dim=-1)
            oracle_masks.append((gqa, mask, _attend(exact_logits, mask, v_full)))
        for i, (method, index, keys, values) in enumerate(built):
            ((_, m_logits),) = iter_logits(q_full, keys, pos, layer.scaling, None, softcap, chunk_size=c)
            for j, k in enumerate(budget_tokens):
                sel = method.select(index, q_step, k)
                chosen = sel.per_query(n_q).transpose(0, 1)  # [H_q, c, L0]
                mask = torch.cat([chosen, tail], dim=-1)
                gqa, o_mask, o_oracle = oracle_masks[j]
                o_method = _attend(m_logits, mask, values)
                united = chosen.reshape(n_kv, -1, c, n_ctx).any(dim=1)
                fetched = sel.fetched.transpose(0, 1)
                if fetched.shape[0] != n_kv:
                    fetched = fetched.reshape(n_kv, -1, c, n_ctx).any(dim=1)
                blocks[i, j].append({
                    "recall": _by_kv((chosen & exact_topk[j]).sum(-1) / k, n_kv),
                    "recall_gqa": (united & gqa).sum(-1).float() / k,
                    "attention_mass": _by_kv((exact_w * mask).sum(-1), n_kv),
                    "err_total": _by_kv(_rel(o_method, o_exact, o_exact), n_kv),
                    "err_selection": _by_kv(_rel(_attend(exact_logits, mask, v_full), o_exact, o_exact), n_kv),
                    "err_key": _by_kv(_rel(_attend(m_logits, o_mask, values), o_oracle, o_exact), n_kv),
                    "err_oracle": _by_kv(_rel(o_oracle, o_exact, o_exact), n_kv),
                    "attended_tokens": _by_kv(chosen.sum(-1), n_kv),
                    "fetched_tokens": fetched.sum(-1).float(),
                    "fetched_bytes": _fetched_bytes(method, sel, n_kv).T.to(k_full.device),
                })  # fmt: skip
            progress(0.5 / n_chunks)
    out = []
    for i, (method, index, _, _) in enumerate(built):
        for j, k in enumerate(budget_tokens):
            block = {name: torch.cat([b[name] for b in blocks[i, j]], dim=1).cpu().numpy()
                     for name in blocks[i, j][0]}  # fmt: skip
            block["resident_bytes_per_token"] = np.full(
                (n_kv, len(positions)), method.resident_bytes_at(index, k) / n_ctx
            )
            out.append(block)
    return out


# --- a whole trace ----------------------------------------------------------------------------------


def _skip_reason(trace, layer: int, positions: torch.Tensor) -> str | None:
    window = trace.layer_meta(layer).get("sliding_window")
    if window and int(positions[-1]) >= window:
        return f"sliding window of {window} tokens"
    return None


def recall_table(trace, methods: Sequence[Method | str], budgets, layers=None, query_positions=None,
                 progress: bool = True, n_queries: int = DEFAULT_QUERIES, per_position: bool | None = None,
                 device=None, chunk_size: int = 64) -> pd.DataFrame:  # fmt: skip
    """Recall, attention mass, output error decomposition and bytes of `methods` on a `Trace`.

    methods: Method objects or specs ("shadowkv:rank=320"); budgets: fractions of L0 or token counts;
    layers: captured layers to use (default all); query_positions: explicit positions (default the
    last `n_queries`); per_position: one row per query position (True), means over positions
    (False) or decide by `MAX_ROWS` (None). See the module docstring for the columns.
    """
    methods = resolve_methods(methods)
    labels = [method_label(m) for m in methods]
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
                                   chunk_size, on_progress=bar.update)  # fmt: skip
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
    table.attrs["recall"] = {
        "n_tokens": trace.n_tokens, "n_context": n_ctx, "n_queries": len(positions),
        "query_positions": positions.tolist(), "per_position": per_position,
        "layers": used, "skipped_layers": {str(i): r for i, r in skipped.items()},
        "budgets": [{"given": b, "tokens": t, "fraction": t / n_ctx} for b, t in zip(budgets, budget_tokens)],
        "methods": [{"label": lab, "name": m.name, "paper": m.paper, "knobs": m.knobs(),
                     "resolved": resolved_knobs(m, context_layer(trace.layer_kv(used[0]), n_ctx))}
                    for lab, m in zip(labels, methods)],
    }  # fmt: skip
    return table


# --- the `kvdiag recall` pipeline -------------------------------------------------------------------


def run_recall(model: str | None, out, methods: Sequence[Method | str] | None = None, budgets=DEFAULT_BUDGETS,
               layers="all", prompt: str | None = None, prompt_file=None, task: str | None = None,
               n_queries: int = DEFAULT_QUERIES, device: str | None = "cpu", dtype=None,
               max_tokens: int | None = None, chat: bool = False, save_trace: bool = False,
               figures: bool = True, *, encoding: str = "utf-8", trace=None, overwrite: bool = False,
               progress: bool = True) -> dict:  # fmt: skip
    """The `kvdiag recall` pipeline: load, capture, `recall_table`, recall.parquet, manifest, figures.

    model: a model spec (None: the default model, or the trace's with `trace`); trace: a directory
    saved with --save-trace to analyse instead of capturing (no model is loaded); overwrite: replace a
    run already in `out` (`kvdiag.runs.claim_run_dir`). Inputs (methods, budgets, queries, prompt
    source) are validated before the model loads, budgets against L0 right after tokenising; results
    are staged and appear in `out` only on success; the analysed text is kept as prompt.txt.
    Returns {"out", "table", "figures", "n_tokens", "n_context", "rows", "layers", "seconds"}.
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
            trace, methods, budgets, layers=chosen, n_queries=n_queries, device=device, progress=progress
        )
        info = table.attrs.pop("recall")
        write_table(table, stage / "recall.parquet")
        config = {
            "model": model, "layers": chosen, "device": device, "dtype": trace.meta["dtype"],
            "n_tokens": trace.n_tokens, "n_context": info["n_context"], "queries": n_queries,
            "query_positions": f"{info['query_positions'][0]}..{info['query_positions'][-1]}",
            "max_tokens": max_tokens, "chat": chat, "task": task, "prompt_source": source,
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
        if figures:
            from kvdiag.plots.recall import plot_recall_run

            plot_recall_run(stage)
    out = Path(out).expanduser()
    return {
        "out": out, "table": out / "recall.parquet",
        "figures": sorted((out / "figures").glob("*")) if figures else [],
        "n_tokens": trace.n_tokens, "n_context": info["n_context"], "rows": len(table), "layers": chosen,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
