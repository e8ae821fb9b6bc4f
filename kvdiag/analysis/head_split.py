"""How much a head-wise split of a layer's budget can gain: attention mass kept by the oracle's
selection under an even split, a need-proportional split, and the best splits in hindsight.

Setting as in `kvdiag.analysis.heads` (decode-like queries at `positions`, context [0, L0),
L0 = positions[0], context weights renormalised to sum to 1 per query head). The oracle ranks the
context tokens of KV head h by max over its G query heads of their softmax weights (the GQA rule
of `kvdiag.methods.oracle`, ties to the lower index); the *mass curve* of KV head h at query i is

    M_h(a) = mean over the group's query heads g of Σ_{j in the oracle's top a of h} w_g,j,

a = 0..A. A split (a_1..a_H) of a layer total T = H·k (each a_h ≥ `min_per_head`) keeps the mass
mean_h M_h(a_h), per query. Compared, per layer and budget k (mean over queries):
- even: a_h = k (what every method does);
- proportional: `allocate_budget(need, T, min_per_head)` (what `headwise` does with its calibration);
  with `powers`, also need^p for each p ≠ 1 (column "proportional_p{p}", `headwise`'s power knob);
- best_static: the one split that maximises the mean over the queries (the best calibration in
  hindsight could not do better with a fixed split);
- best_per_step: the best split of each query on its own (an upper bound of any head-wise rule).
Best splits come from an exact max-plus dynamic program over the heads (`best_split`). Pure selection
analysis: no local window, exact keys; what a method's landmarks lose comes on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from kvdiag.attention import iter_logits
from kvdiag.errors import KvdiagError
from kvdiag.methods._head_budget import allocate_budget


def mass_curves(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scaling: float, max_tokens: int,
                softcap: float | None = None, chunk_size: int = 64) -> torch.Tensor:  # fmt: skip
    """M [H_kv, N, A + 1] float64 (A = min(max_tokens, L0)) of one layer: q [H_q, L, d] queries, k
    [H_kv, L, d] post-RoPE keys, positions [N] sorted (see the module docstring)."""
    n_kv, n_q = k.shape[0], q.shape[0]
    group, n_ctx = n_q // n_kv, int(positions[0])
    width = min(int(max_tokens), n_ctx)
    parts = []
    for _, logits in iter_logits(q, k, positions, scaling, None, softcap, chunk_size):
        w = torch.softmax(logits.double()[..., :n_ctx], dim=-1)  # [H_q, c, L0] context renormalised
        grouped = w.reshape(n_kv, group, w.shape[1], n_ctx)
        order = grouped.amax(dim=1).sort(dim=-1, descending=True, stable=True).indices[..., :width]
        picked = grouped.gather(-1, order[:, None].expand(-1, group, -1, -1))  # [H_kv, G, c, A]
        curve = picked.cumsum(dim=-1).mean(dim=1)
        parts.append(torch.cat([curve.new_zeros(*curve.shape[:-1], 1), curve], dim=-1))
    return torch.cat(parts, dim=1).cpu()


def best_split(curves: torch.Tensor, total: int, min_per_head: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The split of `total` over H heads with the largest Σ_h curves[h, ..., a_h], each a_h ≥
    min_per_head: exact max-plus dynamic program. curves [H, *batch, A + 1] (non-decreasing in a);
    returns (value [*batch] = the largest sum, split [*batch, H] long)."""
    n_heads, width = curves.shape[0], curves.shape[-1] - 1
    if not min_per_head * n_heads <= total <= width * n_heads:
        raise KvdiagError(
            f"total {total} cannot be split over {n_heads} heads with {min_per_head}..{width} each"
        )
    batch = curves.shape[1:-1]
    neg = torch.tensor(float("-inf"), dtype=curves.dtype)
    best = torch.full((*batch, total + 1), float("-inf"), dtype=curves.dtype)
    best[..., 0] = 0.0
    choices = []
    for h in range(n_heads):  # best[t]: the heads so far holding t tokens
        new = torch.full_like(best, float("-inf"))
        arg = torch.zeros(*batch, total + 1, dtype=torch.long)
        for a in range(min_per_head, min(width, total) + 1):
            shifted = torch.cat(
                [best.new_full((*batch, a), float("-inf")), best[..., : total + 1 - a]], dim=-1
            )
            candidate = torch.where(torch.isinf(shifted), neg, shifted + curves[h, ..., a : a + 1])
            better = candidate > new
            new, arg = torch.where(better, candidate, new), torch.where(better, a, arg)
        best = new
        choices.append(arg)
    split, t = [], torch.full(batch, total, dtype=torch.long)
    for h in reversed(range(n_heads)):
        a = choices[h].gather(-1, t[..., None])[..., 0]
        split.append(a)
        t = t - a
    return best[..., total], torch.stack(split[::-1], dim=-1)


def split_mass(curves: torch.Tensor, split: Sequence[int]) -> torch.Tensor:
    """[N] mean over heads of curves[h, :, split[h]] (curves [H, N, A + 1])."""
    index = torch.as_tensor(list(split), dtype=torch.long)
    return curves.gather(-1, index[:, None, None].expand(-1, curves.shape[1], 1))[..., 0].mean(dim=0)


def layer_head_split(curves: torch.Tensor, budget_tokens: int, need=None, min_per_head: int = 1,
                     powers: Sequence[float] = (1.0,)) -> dict:  # fmt: skip
    """Mass kept (mean over queries) by the splits of the module docstring, at k = budget_tokens per
    head, and the static splits themselves."""
    n_heads, width = curves.shape[0], curves.shape[-1] - 1
    k = min(int(budget_tokens), width)
    total = n_heads * k
    even = split_mass(curves, [k] * n_heads).mean()
    static_value, static = best_split(curves.mean(dim=1), total, min_per_head)
    per_step, _ = best_split(curves, total, min_per_head)
    row = {"budget_tokens": k, "even": float(even), "best_static": float(static_value) / n_heads,
           "best_per_step": float(per_step.mean()) / n_heads, "split_best_static": static.tolist()}  # fmt: skip
    for power in powers if need is not None else ():
        name = "proportional" if power == 1 else f"proportional_p{power:g}"
        split = allocate_budget(np.asarray(need, dtype=float) ** power, total, min_per_head, width)
        row[name] = float(split_mass(curves, split).mean())
        row[f"split_{name}"] = split.tolist()
    return row


def head_split_table(trace, positions, budgets_tokens: Sequence[int], needs: dict | None = None,
                     layers=None, min_per_head: int = 1, powers: Sequence[float] = (1.0,)) -> pd.DataFrame:  # fmt: skip
    """One row per layer × budget of a `Trace` (layers default: all full-attention ones): the mass
    kept by the even, proportional (with needs[layer] [H_kv], e.g. a calibration's), best static and
    best per-step splits (`layer_head_split`)."""
    from kvdiag.analysis.recall import _skip_reason

    positions = torch.as_tensor(positions).long()
    layers = [
        i for i in (trace.layers if layers is None else layers) if not _skip_reason(trace, i, positions)
    ]
    widest = max(budgets_tokens) * trace.k_post(layers[0]).shape[0]
    rows = []
    with torch.inference_mode():
        for layer in layers:
            meta = trace.layer_meta(layer)
            curves = mass_curves(trace.q(layer), trace.k_post(layer), positions, meta["scaling"], widest,
                                 meta.get("softcap"))  # fmt: skip
            for k in budgets_tokens:
                need = None if needs is None else np.asarray(needs[layer], dtype=float)
                rows.append({"layer": layer, **layer_head_split(curves, k, need, min_per_head, powers)})
    return pd.DataFrame(rows)
