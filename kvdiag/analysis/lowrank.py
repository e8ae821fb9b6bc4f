"""Low-rank damage: what a rank-r SVD of pre-RoPE keys (ShadowKV's key compression) does to attention.

For one layer: factor the joint pre-RoPE key matrix [L, H_kv·d] by SVD (float64 on CPU), rebuild
keys at rank r, re-apply the model's RoPE at their positions, and compare attention of the last
`n_queries` prompt positions against exact attention with the captured post-RoPE keys:
- logit_rel_error   ‖s_r − s‖ / ‖s‖ over the keys each query sees (s = q·k·scaling),
- topk_recall       |top-k(s_r) ∩ top-k(s)| / k with k = 1.5625 % of L (ShadowKV's 2048 of 128K),
- output_rel_error  ‖o_r − o‖ / ‖o‖ with o = softmax(s)·V (values exact, as in ShadowKV).
Rows are per (layer, kv_head, rank), averaged over the KV head's query heads and the queries.

Rank rule for models that are not 1024 channels wide: ShadowKV's rank 160 of 1024 channels
(15.625 %) scales with the channel count C = H_kv·d: r = max(1, round(160 · C / 1024)).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from tqdm.auto import tqdm

from kvdiag.attention import iter_logits
from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError

SHADOWKV_RANK, SHADOWKV_CHANNELS = 160, 1024
TOPK_FRACTION = 2048 / 131072  # 1.5625 %


def shadowkv_rank(channels: int) -> int:
    """ShadowKV's default rank scaled to `channels` = H_kv·d (160 at 1024), by the method's own rule."""
    from kvdiag.methods.shadowkv import ShadowKV

    return ShadowKV().resolved_rank(channels)


def default_ranks(channels: int) -> list[int]:
    """Powers of two below the channel count, ShadowKV's scaled rank, and full rank."""
    ranks = {2**i for i in range(int(math.log2(channels)) + 1)} | {shadowkv_rank(channels), channels}
    return sorted(r for r in ranks if r <= channels)


def rebuild_keys(k_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ranks: list[int]):
    """Yield (rank, post-RoPE keys [H_kv, L, d] rebuilt from a rank-r SVD of the joint pre-RoPE keys).

    The best rank-r approximation U_r·S_r·V_rᵀ equals M·V_r·V_rᵀ (Eckart–Young), so only the right
    singular vectors are needed: the eigenvectors of the small Gram matrix MᵀM [C, C] (float64).
    """
    h_kv, length, d = k_pre.shape
    matrix = k_pre.transpose(0, 1).reshape(length, h_kv * d).double()
    _, vectors = torch.linalg.eigh(matrix.T @ matrix)
    vectors = vectors.flip(-1)  # descending eigenvalues = descending singular values
    for r in ranks:
        low = (matrix @ vectors[:, :r]) @ vectors[:, :r].T
        yield r, apply_rope(low.reshape(length, h_kv, d).transpose(0, 1).float(), cos, sin)


def _damage_rows(q, k_exact, v, candidates, positions, info, top_k):
    """Metrics [H_q, n] per candidate key set against exact attention."""
    scaling, window, softcap = info["scaling"], info["sliding_window"], info["softcap"]
    ((_, exact),) = iter_logits(q, k_exact, positions, scaling, window, softcap, chunk_size=positions.numel())
    visible = torch.isfinite(exact)
    exact_w = torch.softmax(exact, dim=-1)
    h_q, h_kv = q.shape[0], v.shape[0]
    group = h_q // h_kv
    vg = v.float()

    def output(weights):
        w = weights.reshape(h_kv, group, -1, weights.shape[-1])
        return torch.einsum("hgcl,hld->hgcd", w, vg).reshape(h_q, -1, vg.shape[-1])

    exact_o = output(exact_w)
    exact_top = torch.zeros_like(visible).scatter_(-1, exact.topk(top_k, dim=-1).indices, True)
    for rank, keys in candidates:
        ((_, approx),) = iter_logits(
            q, keys, positions, scaling, window, softcap, chunk_size=positions.numel()
        )
        diff = torch.where(visible, approx - exact, 0.0)
        logit_err = diff.norm(dim=-1) / torch.where(visible, exact, 0.0).norm(dim=-1).clamp_min(1e-30)
        approx_top = torch.zeros_like(visible).scatter_(-1, approx.topk(top_k, dim=-1).indices, True)
        recall = (approx_top & exact_top).sum(-1).float() / top_k
        approx_o = output(torch.softmax(approx, dim=-1))
        out_err = (approx_o - exact_o).norm(dim=-1) / exact_o.norm(dim=-1).clamp_min(1e-30)
        yield rank, logit_err, recall, out_err


def lowrank_damage(
    trace, layers=None, ranks=None, n_queries: int = 64, progress: bool = True
) -> pd.DataFrame:
    """Low-rank damage table for the captured layers (see module docstring)."""
    layers = trace.layers if layers is None else layers
    length = trace.n_tokens
    if n_queries < 1:
        raise KvdiagError(f"--queries {n_queries} must be ≥ 1")
    n = min(n_queries, length)
    positions = torch.arange(length - n, length)
    top_k = max(1, math.ceil(TOPK_FRACTION * length))
    rows = []
    for layer in tqdm(layers, desc="low-rank damage", unit="layer", disable=not progress):
        k_pre, k_post = trace.k_pre(layer), trace.k_post(layer)
        h_kv, _, d = k_pre.shape
        channels = h_kv * d
        layer_ranks = default_ranks(channels) if ranks is None else sorted({min(r, channels) for r in ranks})
        cos, sin = trace.rope(layer)
        info = trace.layer_meta(layer)
        q = trace.q(layer).float()
        candidates = rebuild_keys(k_pre, cos, sin, layer_ranks)
        group = q.shape[0] // h_kv
        for rank, logit_err, recall, out_err in _damage_rows(
            q, k_post.float(), trace.v(layer), candidates, positions, info, top_k
        ):
            for h in range(h_kv):
                heads = slice(h * group, (h + 1) * group)
                rows.append({
                    "layer": layer, "kv_head": h, "rank": rank, "rank_fraction": rank / channels,
                    "is_shadowkv_rank": rank == shadowkv_rank(channels), "channels": channels,
                    "top_k": top_k, "n_queries": n,
                    "logit_rel_error": logit_err[heads].mean().item(),
                    "topk_recall": recall[heads].mean().item(),
                    "output_rel_error": out_err[heads].mean().item(),
                })  # fmt: skip
    return pd.DataFrame(rows)
