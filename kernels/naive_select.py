"""Plain-PyTorch references of the batched selection kernels: slow, obviously correct, one batch row
(and one head) at a time. The tests compare the Triton kernels against these and the benchmark times
them as the baseline.

    q            [B, H_q, d]            post-RoPE queries; query head h belongs to KV head h // G
    lengths      [B] int32              valid positions per row; the rest scores -inf

- `naive_batched_landmark_scores`: bf16 landmarks [B, H_kv, N_max, d] -> [B, H_kv, N_max] fp32, rules
  of `kvdiag.kernels.naive` ("softmax_max", "mean_query") applied to each row's first n_b landmarks.
- `dequantize_higgs_landmarks` / `naive_higgs_landmark_scores`: HIGGS codes -> dequantized landmarks
  [B, H_kv, L_max, d] (lookup, × norm, inverse Walsh–Hadamard / g, as `kvdiag.quant.higgs`), then the
  rule above.
- `naive_page_bound_scores`: Quest / ArkVale box bound Σ_d max(q_d·max_d, q_d·min_d), per query head
  [B, H_q, P_max] or averaged over the group [B, H_kv, P_max].
- `naive_topk_ids` / `naive_topk_blocks`: the k best positions per row, ties toward the lower index,
  -inf and NaN never chosen, ids ascending, padded with -1.
"""

from __future__ import annotations

import torch
from kvdiag.kernels.naive import naive_landmark_scores

from kvdiag.quant.hadamard import walsh_hadamard

NEG_INF = float("-inf")


def naive_batched_landmark_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    n_landmarks: torch.Tensor,
    rule: str = "softmax_max",
    scale: float | None = None,
) -> torch.Tensor:
    """[B, H_kv, N_max] fp32: row b scored over its first n_landmarks[b] landmarks, -inf after."""
    batch, n_kv_heads, max_len, _ = landmarks.shape
    out = torch.full((batch, n_kv_heads, max_len), NEG_INF, dtype=torch.float32, device=q.device)
    for b, n in enumerate(n_landmarks.tolist()):
        out[b, :, :n] = naive_landmark_scores(q[b], landmarks[b, :, :n], rule, scale)
    return out


def dequantize_higgs_landmarks(
    codes: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor, n_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """HIGGS landmark rows -> [B, H_kv, L_max, d] fp32.

    codes [B, L_max, n_groups, g // v] (indices into grid [P, v]), scales [B, L_max, n_groups]:
    group = H_g(grid[codes].flatten() · s) / g; the row's first H_kv·d channels are the KV heads'
    keys side by side.
    """
    batch, max_len, n_groups, per_group = codes.shape
    group = per_group * grid.shape[1]
    y = grid.float()[codes.long()].reshape(batch, max_len, n_groups, group)  # [B, L, m, g]
    rows = walsh_hadamard(y * scales.float()[..., None], scale=1.0 / group).reshape(batch, max_len, -1)
    keys = rows[..., : n_kv_heads * head_dim].reshape(batch, max_len, n_kv_heads, head_dim)
    return keys.transpose(1, 2)  # [B, H_kv, L_max, d]


def naive_higgs_landmark_scores(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    n_scored: torch.Tensor,
    n_kv_heads: int,
    rule: str = "softmax_max",
    scale: float | None = None,
) -> torch.Tensor:
    """[B, H_kv, L_max] fp32: the landmarks dequantized, then scored as `naive_batched_landmark_scores`."""
    landmarks = dequantize_higgs_landmarks(codes, scales, grid, n_kv_heads, q.shape[-1])
    return naive_batched_landmark_scores(q, landmarks, n_scored, rule, scale)


def naive_page_bound_scores(
    q: torch.Tensor,
    box_max: torch.Tensor,
    box_min: torch.Tensor,
    n_pages: torch.Tensor,
    reduce: str = "none",
) -> torch.Tensor:
    """Σ_d max(q_d·max_d, q_d·min_d) per query head [B, H_q, P_max] ("none", Quest) or its mean over
    the G query heads of each KV head [B, H_kv, P_max] ("mean", ArkVale); -inf beyond n_pages[b]."""
    batch, n_q_heads, _ = q.shape
    n_kv_heads, max_pages = box_max.shape[1], box_max.shape[2]
    group = n_q_heads // n_kv_heads
    hi = box_max.float().repeat_interleave(group, dim=1)  # [B, H_q, P_max, d]
    lo = box_min.float().repeat_interleave(group, dim=1)
    qf = q.float()[:, :, None, :]  # [B, H_q, 1, d]
    scores = torch.maximum(qf * hi, qf * lo).sum(dim=-1)  # [B, H_q, P_max]
    if reduce == "mean":
        scores = scores.reshape(batch, n_kv_heads, group, max_pages).mean(dim=2)
    beyond = torch.arange(max_pages, device=q.device)[None, :] >= n_pages.to(q.device).long()[:, None]
    return scores.masked_fill(beyond[:, None, :], NEG_INF)


def naive_topk_ids(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, H, K_max] int32, K_max = max(k): per row the k[b] largest of scores[b, h, :valid[b]],
    ties toward the lower index (a stable descending sort), -inf and NaN never chosen (fewer than
    k[b] ids when fewer are eligible), ids ascending, padded with -1."""
    batch, n_heads, _ = scores.shape
    k_max = int(k.max()) if batch else 0
    out = torch.full((batch, n_heads, k_max), -1, dtype=torch.int32, device=scores.device)
    for b in range(batch):
        n, kb = int(valid[b]), int(k[b])
        for h in range(n_heads):
            row = scores[b, h, :n]
            eligible = (~row.isnan() & (row != NEG_INF)).nonzero().flatten()  # ascending ids
            order = torch.sort(row[eligible], descending=True, stable=True).indices
            chosen = eligible[order[:kb]].sort().values
            out[b, h, : chosen.numel()] = chosen.to(torch.int32)
    return out


def naive_topk_blocks(
    block_scores: torch.Tensor,
    k_blocks: torch.Tensor,
    n_blocks: torch.Tensor,
    block: int,
    n_tokens: torch.Tensor,
) -> torch.Tensor:
    """[B, H, K_max·block] int32 token ids of the k_blocks[b] best blocks (block j = tokens
    j·block .. j·block + block - 1, cut at n_tokens[b]), ascending, padded with -1: built from a
    token mask, independently of the block-id expansion the kernel path uses."""
    batch, n_heads, max_blocks = block_scores.shape
    block_ids = naive_topk_ids(block_scores, k_blocks, n_blocks)
    width = block_ids.shape[-1] * block
    out = torch.full((batch, n_heads, width), -1, dtype=torch.int32, device=block_scores.device)
    for b in range(batch):
        for h in range(n_heads):
            mask = torch.zeros(max_blocks * block, dtype=torch.bool)
            for j in block_ids[b, h].tolist():
                if j >= 0:
                    mask[j * block : (j + 1) * block] = True
            tokens = mask[: int(n_tokens[b])].nonzero().flatten()
            out[b, h, : tokens.numel()] = tokens.to(torch.int32)
    return out
