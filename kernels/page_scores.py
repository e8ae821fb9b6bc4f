"""Triton kernel: page bound scores of one decode step (Quest, ArkVale), batched over prompts of
different lengths.

    q                 [B, H_q, d]           bf16 / fp16 / fp32, post-RoPE
    box_max, box_min  [B, H_kv, P_max, d]   bf16 (fp16 / fp32 accepted): per page and channel the
                                            upper / lower end of the page's key box (Quest: max / min
                                            of the keys; ArkVale: centre ± mean radius)
    n_pages           [B] int32             pages of each row; pages ≥ n_pages[b] score -inf
    reduce="none"  -> [B, H_q, P_max]   fp32, Quest: per query head Σ_d max(q_d·max_d, q_d·min_d),
                                        unscaled (an upper bound of q·k for every key in the box)
    reduce="mean"  -> [B, H_kv, P_max]  fp32, ArkVale: that bound averaged over the G query heads of
                                        each KV head (the study's selection group = one KV head)

Grid (H_kv, ⌈P_max / BLOCK_N⌉, B): each program reads its pages' two boxes once and scores them
for the G query heads of its KV head (fp32 multiply-adds on upcast inputs). Bytes per page and KV
head at d = 128: 512 B of bf16 boxes; 4·G B (Quest) or 4 B (ArkVale) of output.

Reference: `kvdiag.kernels.naive_select.naive_page_bound_scores`; the study's per-step rule is
`kvdiag.methods._scoring.box_upper_bound_scores`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvdiag.kernels.select_inputs import (
    check_block,
    check_group,
    check_lengths,
    check_out,
    check_same_device,
    check_tensor,
    require_kernel_device,
)

from kvdiag.errors import KvdiagError

__all__ = ["REDUCTIONS", "page_bound_scores"]

REDUCTIONS = ("none", "mean")


@triton.jit
def _page_bound_scores(
    q_ptr,  # [B, H_q, d]
    max_ptr,  # [B, H_kv, P_max, d]
    min_ptr,  # [B, H_kv, P_max, d]
    lengths_ptr,  # [B] int32
    out_ptr,  # [B, H_q, P_max] ("none") or [B, H_kv, P_max] ("mean") fp32
    max_pages,
    head_dim,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_nb,
    stride_nh,
    stride_nn,
    stride_nd,
    stride_ob,
    stride_oh,
    stride_on,
    GROUP: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + b), max_pages)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < length
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    tile_mask = mask_n[:, None] & mask_d[None, :]
    page_rows = offs_n[:, None].to(tl.int64)
    hi = tl.load(
        max_ptr + b * stride_xb + kv_head * stride_xh + page_rows * stride_xn + offs_d[None, :] * stride_xd,
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    lo = tl.load(
        min_ptr + b * stride_nb + kv_head * stride_nh + page_rows * stride_nn + offs_d[None, :] * stride_nd,
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    for g in tl.static_range(GROUP):
        q_head = kv_head * GROUP + g
        qv = tl.load(q_ptr + b * stride_qb + q_head * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
        qv = qv.to(tl.float32)[None, :]
        bound = tl.sum(tl.maximum(qv * hi, qv * lo), axis=1)  # [BLOCK_N]
        if MEAN:
            total += bound
        else:
            tl.store(
                out_ptr + b * stride_ob + q_head * stride_oh + offs_n * stride_on,
                tl.where(mask_n, bound, float("-inf")),
                mask=offs_n < max_pages,
            )
    if MEAN:
        tl.store(
            out_ptr + b * stride_ob + kv_head * stride_oh + offs_n * stride_on,
            tl.where(mask_n, total / GROUP, float("-inf")),
            mask=offs_n < max_pages,
        )


def page_bound_scores(
    q: torch.Tensor,
    box_max: torch.Tensor,
    box_min: torch.Tensor,
    n_pages: torch.Tensor,
    reduce: str = "none",
    *,
    out: torch.Tensor | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    validate: bool = True,
) -> torch.Tensor:
    """Page bound scores (see the module docstring): [B, H_q, P_max] for reduce="none" (Quest),
    [B, H_kv, P_max] for reduce="mean" (ArkVale). `validate=False` skips the host-side check of
    n_pages' values (for CUDA graph capture)."""
    check_tensor("q", q, "[B, H_q, d]", 3)
    check_tensor("box_max", box_max, "[B, H_kv, P_max, d]", 4)
    check_tensor("box_min", box_min, "[B, H_kv, P_max, d]", 4)
    if reduce not in REDUCTIONS:
        raise KvdiagError(f"reduce must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduce!r}")
    if box_max.shape != box_min.shape:
        raise KvdiagError(
            f"box_max {tuple(box_max.shape)} and box_min {tuple(box_min.shape)} differ in shape"
        )
    batch, n_q_heads, head_dim = q.shape
    box_batch, n_kv_heads, max_pages, box_dim = box_max.shape
    if box_batch != batch:
        raise KvdiagError(f"q has batch {batch} but the boxes have batch {box_batch}")
    if box_dim != head_dim or head_dim == 0:
        raise KvdiagError(f"head dims differ or are 0: q has d={head_dim}, the boxes have d={box_dim}")
    group = check_group(n_q_heads, n_kv_heads)
    device = check_same_device(q=q, box_max=box_max, box_min=box_min)
    check_lengths("n_pages", n_pages, batch, max_pages, device, validate=validate)
    require_kernel_device(q, "page-bound scoring")
    block_n = check_block("block_n", block_n, 16, 256)
    out = check_out(out, (batch, n_q_heads if reduce == "none" else n_kv_heads, max_pages), device)
    if batch and max_pages:
        _page_bound_scores[(n_kv_heads, triton.cdiv(max_pages, block_n), batch)](
            q, box_max, box_min, n_pages, out, max_pages, head_dim, *q.stride(), *box_max.stride(),
            *box_min.stride(), *out.stride(), GROUP=group, MEAN=reduce == "mean", BLOCK_N=block_n,
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=num_warps,
        )  # fmt: skip
    return out
