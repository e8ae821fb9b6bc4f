"""Per-head context intensity: how many context tokens each layer × KV head needs, and budgets that follow it.

Decode-faithful, causal setting, exactly as in `kvdiag.analysis.recall`: N query positions (sorted)
split the trace at L0 = the first query position; tokens [0, L0) are the *context*, tokens L0..p
play the generated tail that every method attends anyway and are not counted.

Definitions, per layer, query head g and query position p:

- mass:  w_j = softmax_j(s_pj) over the context only, j < L0, with s = q·k·scaling (soft-capped as the
         model does): the exact attention weights of the context renormalised to sum to 1 (the tail's
         share is left out before normalising, so a query that reads mostly its tail still has a
         full unit of context mass to cover);
- need:  k_τ(g, p) = the smallest number of context tokens whose mass is ≥ τ: the length of the
         shortest prefix of the weights sorted in decreasing order with cumulative sum ≥ τ (computed
         in float64, with a 1e-9 tolerance against rounding); τ ∈ `TAUS` = 0.5, 0.9, 0.99. All mass on
         one token: k_τ = 1; uniform over L0 tokens: k_τ = ⌈τ·L0⌉;
- top set: T_τ(g, p) = the k_τ heaviest context tokens of head g (ties broken towards earlier
         positions);
- GQA:   a KV head serves its G query heads, so what it must hold is the group's union
         U_τ(h, p) = |T_τ(g_1, p) ∪ … ∪ T_τ(g_G, p)| (measure "union"); measure "head" is the mean
         over the group of the query heads' own k_τ. head ≤ union ≤ G · head;
- fraction: a need divided by L0 (comparable across prompt lengths);
- context_mass: the share of the query's exact attention over [0, p] that falls on the context
         (mean over the group): how much the renormalised need matters for that query.

Spread across queries: mean, std (ddof 0), min, median and max over the N query positions of one
sample (`summarize_needs`).

`allocate_budget` splits a layer's token budget across KV heads in proportion to a measured need
(what the `headwise` wrapper method uses); `HeadCalibration` is the need per layer × KV head that
`kvdiag heads` saves as `heads_calibration.json` (`save_calibration` / `load_calibration`). Those
live in `kvdiag.methods._head_budget` (a method reads them) and are re-exported here;
`calibration_from_table` makes a calibration from a need table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvdiag.analysis.recall import _skip_reason, resolve_positions
from kvdiag.attention import iter_logits
from kvdiag.errors import KvdiagError
from kvdiag.methods._head_budget import (  # noqa: F401  (re-exported: allocation and calibration file)
    CALIBRATION_FILE,
    CALIBRATION_FORMAT,
    CALIBRATION_VERSION,
    HeadCalibration,
    allocate_budget,
    calibration_file,
    load_calibration,
    save_calibration,
)

log = logging.getLogger(__name__)

TAUS = (0.5, 0.9, 0.99)
MEASURES = ("union", "head")
STATISTICS = ("mean", "std", "min", "median", "max")
DEFAULT_QUERIES = 64
COVER_TOLERANCE = 1e-9


def check_taus(taus: Sequence[float]) -> tuple[float, ...]:
    """Sorted distinct mass levels, each in (0, 1]; anything else is a KvdiagError."""
    taus = tuple(taus)
    if not taus:
        raise KvdiagError("no mass levels (tau) given; e.g. 0.5,0.9,0.99")
    for tau in taus:
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 < tau <= 1:
            raise KvdiagError(f"tau {tau!r} must be a number in (0, 1], e.g. 0.9 for 90 % of the mass")
    return tuple(sorted({float(t) for t in taus}))


# --- the need of one set of attention weights -------------------------------------------------------


def _cover(weights: torch.Tensor, taus: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(k [..., T] long, order [..., L0]) for non-negative weights [..., L0] (normalised here)."""
    w = weights.double()
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    ranked, order = torch.sort(w, dim=-1, descending=True, stable=True)
    cumulative = ranked.cumsum(dim=-1).contiguous()
    levels = torch.tensor(taus, dtype=torch.float64, device=w.device) - COVER_TOLERANCE
    levels = levels.expand(*cumulative.shape[:-1], len(taus)).contiguous()
    k = torch.searchsorted(cumulative, levels) + 1
    return k.clamp_max(w.shape[-1]), order


def tokens_to_cover(weights: torch.Tensor, taus: Sequence[float] = TAUS) -> torch.Tensor:
    """k_τ [..., T]: the fewest tokens whose share of the mass of weights [..., L0] is ≥ τ, per τ.

    weights are non-negative attention weights over L0 tokens (renormalised to sum to 1 here).
    """
    return _cover(weights, check_taus(taus))[0]


def group_needs(weights: torch.Tensor, n_kv_heads: int, taus: Sequence[float] = TAUS):
    """Per-query-head needs and the GQA group's union need.

    weights [H_q, c, L0] context attention weights of c queries (query heads grouped by KV head:
    query head g belongs to KV head g // G). Returns (per_head [H_q, c, T], union [H_kv, c, T]), long.
    """
    taus = check_taus(taus)
    n_q, c, n_ctx = weights.shape
    if n_kv_heads < 1 or n_q % n_kv_heads:
        raise KvdiagError(f"{n_q} query heads are not a multiple of {n_kv_heads} KV heads")
    k, order = _cover(weights, taus)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n_ctx, device=order.device).expand_as(order))
    union = torch.stack(
        [(rank < k[..., t : t + 1]).reshape(n_kv_heads, -1, c, n_ctx).any(dim=1).sum(dim=-1)
         for t in range(len(taus))], dim=-1,
    )  # fmt: skip
    return k, union


# --- one layer, a whole trace ------------------------------------------------------------------------


def layer_needs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scaling: float,
                softcap: float | None = None, taus: Sequence[float] = TAUS,
                chunk_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Needs of one full-attention layer at decode-like query positions.

    q [H_q, L, d] queries, k [H_kv, L, d] post-RoPE keys, positions [N] sorted (L0 = positions[0]).
    Returns (union [H_kv, N, T], head [H_kv, N, T], context_mass [H_kv, N]): the group's union need
    and the mean over the group of the query heads' own needs, in tokens, and the group's mean share
    of exact attention on the context.
    """
    taus = check_taus(taus)
    n_kv = k.shape[0]
    n_ctx = int(positions[0])
    unions, heads, masses = [], [], []
    for _, logits in iter_logits(q, k, positions, scaling, None, softcap, chunk_size):
        logits = logits.double()  # [H_q, c, L], −inf after each query's position
        weights = torch.softmax(logits[..., :n_ctx], dim=-1)  # context only, renormalised
        per_head, union = group_needs(weights, n_kv, taus)
        unions.append(union)
        heads.append(per_head.double().reshape(n_kv, -1, *per_head.shape[1:]).mean(dim=1))
        context = torch.softmax(logits, dim=-1)[..., :n_ctx].sum(dim=-1)  # [H_q, c]
        masses.append(context.reshape(n_kv, -1, context.shape[-1]).mean(dim=1))
    return tuple(torch.cat(x, dim=1).cpu().numpy() for x in (unions, heads, masses))


def head_needs(trace, query_positions=None, n_queries: int = DEFAULT_QUERIES, taus: Sequence[float] = TAUS,
               layers=None, device=None, chunk_size: int = 64, progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Per-query needs of every layer × KV head of a `Trace` (see the module docstring).

    query_positions: explicit positions (a gold answer's under teacher forcing), default the last
    `n_queries`; layers: captured layers to use (default all; sliding-window layers whose window
    hides part of the context are skipped, as in recall). One row per layer × kv_head × tau ×
    query_position with columns need_union, need_head (tokens), n_context (L0) and context_mass;
    `DataFrame.attrs["heads"]` holds L, L0, the positions and the skipped layers.
    """
    taus = check_taus(taus)
    positions = resolve_positions(trace.n_tokens, query_positions, n_queries)
    n_ctx = int(positions[0])
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
    frames = []
    with torch.inference_mode():
        for layer in tqdm(used, desc="heads", unit="layer", disable=not progress):
            meta = trace.layer_meta(layer)
            q, k = trace.q(layer).to(device), trace.k_post(layer).to(device)
            union, head, mass = layer_needs(q, k, positions, meta["scaling"], meta.get("softcap"), taus,
                                            chunk_size)  # fmt: skip
            n_kv, n_pos, n_tau = union.shape
            frames.append(pd.DataFrame({
                "layer": layer, "kv_head": np.repeat(np.arange(n_kv), n_pos * n_tau),
                "tau": np.tile(np.asarray(taus), n_kv * n_pos),
                "query_position": np.tile(np.repeat(positions.numpy(), n_tau), n_kv),
                "n_context": n_ctx, "need_union": union.reshape(-1), "need_head": head.reshape(-1),
                "context_mass": np.repeat(mass.reshape(-1), n_tau),
            }))  # fmt: skip
    table = pd.concat(frames, ignore_index=True)
    table.attrs["heads"] = {
        "n_tokens": trace.n_tokens, "n_context": n_ctx, "n_queries": len(positions),
        "query_positions": positions.tolist(), "layers": used, "taus": list(taus),
        "skipped_layers": {str(i): r for i, r in skipped.items()},
    }  # fmt: skip
    return table


def summarize_needs(per_query: pd.DataFrame, by: Sequence[str] = ("layer", "kv_head", "tau")) -> pd.DataFrame:
    """Spread across query positions of `head_needs` rows: one row per `by` group and measure.

    Columns: *by, measure ("union" / "head"), n_context, n_queries, context_mass_mean (mean over the
    queries), tokens_{mean,std,min,median,max} and fraction_{...} (the same divided by L0); std has
    ddof 0. Extra key columns (task, sample) belong in `by`.
    """
    by = list(by)
    frames = []
    for measure in MEASURES:
        grouped = per_query.groupby(by, sort=True)
        column = grouped[f"need_{measure}"]
        stats = pd.DataFrame({
            "mean": column.mean(), "std": column.std(ddof=0), "min": column.min(),
            "median": column.median(), "max": column.max(),
        })  # fmt: skip
        stats = stats.astype(float)
        n_ctx = grouped["n_context"].first()
        if (grouped["n_context"].nunique() > 1).any():
            raise KvdiagError("a group of need rows mixes context lengths; add the sample to `by`")
        frame = pd.DataFrame({"measure": measure, "n_context": n_ctx, "n_queries": grouped.size(),
                              "context_mass_mean": grouped["context_mass"].mean()})  # fmt: skip
        frame = frame.join(stats.add_prefix("tokens_"))
        frame = frame.join(stats.div(n_ctx, axis=0).add_prefix("fraction_"))
        frames.append(frame.reset_index())
    return pd.concat(frames, ignore_index=True).sort_values([*by, "measure"], ignore_index=True)


# --- calibration from a need table ------------------------------------------------------------------


def calibration_from_table(summary: pd.DataFrame, model: str, source: dict | None = None, tau: float = 0.9,
                           statistic: str = "median", measure: str = "union") -> HeadCalibration:  # fmt: skip
    """A `HeadCalibration` from `summarize_needs` rows (of one task): fraction_{statistic} of `measure`
    at `tau`, averaged over the samples (rows of the same layer × KV head)."""
    if statistic not in STATISTICS:
        raise KvdiagError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    if measure not in MEASURES:
        raise KvdiagError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    rows = summary[(summary.measure == measure) & np.isclose(summary.tau, tau)]
    if rows.empty:
        raise KvdiagError(f"no {measure} rows at tau {tau}; measured: {sorted(summary.tau.unique())}")
    grid = rows.groupby(["layer", "kv_head"])[f"fraction_{statistic}"].mean().unstack("kv_head")
    if grid.isna().any().any():
        raise KvdiagError("the need table does not cover every KV head of every layer")
    need = {int(layer): [float(x) for x in values] for layer, values in grid.iterrows()}
    return HeadCalibration(model=model, tau=float(tau), need=need, source=dict(source or {}),
                           statistic=statistic, measure=measure)  # fmt: skip
