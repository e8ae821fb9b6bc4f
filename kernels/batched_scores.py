"""Triton kernels: batched landmark scores of one decode step (ShadowKV chunk means, or any landmarks
kept in bf16), prompts of different lengths in one launch.

    q            [B, H_q, d]            bf16 / fp16 / fp32, post-RoPE
    landmarks    [B, H_kv, N_max, d]    bf16 (fp16 / fp32 accepted), any strides
    n_landmarks  [B] int32              landmarks of each row; positions ≥ n_landmarks[b] score -inf
    scores       [B, H_kv, N_max]       fp32; query head h belongs to KV head h // G

Rules (`kvdiag.kernels.naive`, reference `kvdiag.kernels.naive_select.naive_batched_landmark_scores`):
- "softmax_max": per query head the softmax over the row's valid landmarks of q·l·scale (scale 1/√d
  unless given), then the max over the G heads. Pass 1, grid (H_kv, n_splits, B), loops over a split
  of the row; each tile's G logits are one `tl.dot` of the [BLOCK_N, d] landmark tile with the
  group's queries padded to ≥ 16 columns (fp32 operands; `precision` "ieee" = exact fp32 FMA,
  "tf32x3" = three tf32 tensor-core products, ≈ fp32, the default; "tf32" = one, ~1e-3 relative).
  Pass 2 is `kvdiag.kernels.softmax_merge`.
- "mean_query": one launch, grid (H_kv, ⌈N_max / BLOCK_N⌉, B): the group's mean query dotted with
  every landmark (fp32 multiply-adds, as `landmark_scores`).

Bytes per landmark and KV head at d = 128: 256 B of bf16 landmark; softmax_max adds 2·G·4 B of
workspace + 4 B of output (+16 % at G = 4), mean_query 4 B of output. A row's padding beyond its
length is never read.

Single-row inputs (q [H_q, d], landmarks [H_kv, N, d], no lengths) are scored as B = 1 and return
[H_kv, N], the contract of `kvdiag.kernels.landmark_scores.landmark_scores`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from kvdiag.kernels.landmark_scores import default_block_n
from kvdiag.kernels.naive import check_rule
from kvdiag.kernels.select_inputs import (
    check_block,
    check_group,
    check_lengths,
    check_out,
    check_precision,
    check_same_device,
    check_tensor,
    plan_splits,
    require_kernel_device,
)
from kvdiag.kernels.softmax_merge import launch_softmax_merge, online_softmax_update, softmax_workspace

from kvdiag.errors import KvdiagError

__all__ = ["batched_landmark_scores"]

LOG2E = math.log2(math.e)
POISON_WORKSPACE = False  # tests set this to fill pass 1's workspace with NaN before each launch


@triton.jit
def _softmax_pass1(
    q_ptr,  # [B, H_q, d]
    lm_ptr,  # [B, H_kv, N_max, d]
    lengths_ptr,  # [B] int32
    logits_ptr,  # [B, H_q, N_max] fp32 workspace, log2 units
    split_max_ptr,  # [B, H_q, n_splits]
    split_sum_ptr,  # [B, H_q, n_splits]
    max_len,
    head_dim,
    n_q_heads,
    n_splits,
    split_len,  # landmarks per split (a multiple of BLOCK_N)
    stride_qb,
    stride_qh,
    stride_qd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_ld,
    qk_scale,  # scale · log2(e)
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # ≥ 16: the dot's N
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    offs_g = tl.arange(0, GROUP_PAD)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q_t = tl.load(
        q_ptr + b * stride_qb + heads[None, :] * stride_qh + offs_d[:, None] * stride_qd,
        mask=mask_d[:, None] & mask_g[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_D, GROUP_PAD]: the group's queries as columns
    q_t = q_t * qk_scale
    rows = b * n_q_heads + heads  # [GROUP_PAD] workspace rows
    lm_base = lm_ptr + b * stride_lb + kv_head.to(tl.int64) * stride_lh
    run_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([GROUP_PAD], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        lm = tl.load(
            lm_base + offs_n[:, None].to(tl.int64) * stride_ln + offs_d[None, :] * stride_ld,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        x = tl.dot(lm, q_t, input_precision=PRECISION)  # [BLOCK_N, GROUP_PAD]
        x = tl.where(mask_n[:, None], x, float("-inf"))
        tl.store(
            logits_ptr + rows[None, :] * max_len + offs_n[:, None], x, mask=mask_n[:, None] & mask_g[None, :]
        )
        run_max, run_sum = online_softmax_update(x, run_max, run_sum)
    tl.store(split_max_ptr + rows * n_splits + split, run_max, mask=mask_g)
    tl.store(split_sum_ptr + rows * n_splits + split, run_sum, mask=mask_g)


@triton.jit
def _mean_query_scores(
    q_ptr,  # [B, H_q, d]
    lm_ptr,  # [B, H_kv, N_max, d]
    lengths_ptr,  # [B] int32
    out_ptr,  # [B, H_kv, N_max] fp32
    max_len,
    head_dim,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_ld,
    stride_ob,
    stride_oh,
    stride_on,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < length
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    q_group = tl.load(
        q_ptr + b * stride_qb + (kv_head * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=(offs_g < GROUP)[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [GROUP_PAD, BLOCK_D]
    q_mean = tl.sum(q_group, axis=0) / GROUP  # [BLOCK_D]
    lm = tl.load(
        lm_ptr
        + b * stride_lb
        + kv_head.to(tl.int64) * stride_lh
        + offs_n[:, None].to(tl.int64) * stride_ln
        + offs_d[None, :] * stride_ld,
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    scores = tl.where(mask_n, tl.sum(lm * q_mean[None, :], axis=1), float("-inf"))
    tl.store(
        out_ptr + b * stride_ob + kv_head * stride_oh + offs_n * stride_on, scores, mask=offs_n < max_len
    )


def _check_inputs(q, landmarks, n_landmarks, validate):
    check_tensor("q", q, "[B, H_q, d]", 3)
    check_tensor("landmarks", landmarks, "[B, H_kv, N_max, d]", 4)
    batch, n_q_heads, head_dim = q.shape
    lm_batch, n_kv_heads, max_len, lm_dim = landmarks.shape
    if lm_batch != batch:
        raise KvdiagError(f"q has batch {batch} but landmarks have batch {lm_batch}")
    if lm_dim != head_dim:
        raise KvdiagError(f"head dims differ: q has d={head_dim}, landmarks have d={lm_dim}")
    if head_dim == 0:
        raise KvdiagError("head dim d must be ≥ 1, got 0")
    device = check_same_device(q=q, landmarks=landmarks)
    group = check_group(n_q_heads, n_kv_heads)
    check_lengths("n_landmarks", n_landmarks, batch, max_len, device, validate=validate)
    return batch, n_q_heads, n_kv_heads, group, max_len, head_dim, device


def batched_landmark_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    n_landmarks: torch.Tensor | None = None,
    rule: str = "softmax_max",
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    precision: str = "tf32x3",
    tiles_per_split: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """[B, H_kv, N_max] fp32 scores of every landmark under `rule` (see the module docstring).

    q [B, H_q, d], landmarks [B, H_kv, N_max, d], n_landmarks [B] int32 (None: all N_max valid).
    `out`, if given, is written in place. Launch knobs: `block_n` (landmarks per tile, a power of two
    16..1024), `num_warps`, `precision` of the softmax pass-1 dot, `tiles_per_split` (tiles one
    pass-1 program loops over; default: enough splits for a few programs per SM). `validate=False`
    skips the host-side check of n_landmarks' values (kernels clamp them to N_max), e.g. under CUDA
    graph capture.
    """
    single = n_landmarks is None and isinstance(q, torch.Tensor) and q.dim() == 2
    if single:  # one row, the contract of landmark_scores: q [H_q, d], landmarks [H_kv, N, d]
        check_tensor("landmarks", landmarks, "[H_kv, N, d] (with q [H_q, d] and no n_landmarks)", 3)
        q, landmarks, out = q[None], landmarks[None], None if out is None else out[None]
    if n_landmarks is None and isinstance(landmarks, torch.Tensor) and landmarks.dim() == 4:
        n_landmarks = torch.full(
            (landmarks.shape[0],), landmarks.shape[2], dtype=torch.int32, device=q.device
        )
    batch, n_q_heads, n_kv_heads, group, max_len, head_dim, device = _check_inputs(
        q, landmarks, n_landmarks, validate
    )
    scale = check_rule(rule, scale, head_dim)
    require_kernel_device(q, "landmark-scoring")
    block_n = check_block("block_n", default_block_n(head_dim) if block_n is None else block_n)
    num_warps = (8 if rule == "mean_query" else 4) if num_warps is None else num_warps
    precision = check_precision(precision)
    out = check_out(out, (batch, n_kv_heads, max_len), device)
    if batch and max_len:
        _launch(
            q, landmarks, n_landmarks, rule, scale, out, group, block_n, num_warps, precision, tiles_per_split
        )
    return out[0] if single else out


def _launch(
    q, landmarks, n_landmarks, rule, scale, out, group, block_n, num_warps, precision, tiles_per_split
):
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, max_len = landmarks.shape[1], landmarks.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    n_tiles = triton.cdiv(max_len, block_n)
    if rule == "mean_query":
        _mean_query_scores[(n_kv_heads, n_tiles, batch)](
            q, landmarks, n_landmarks, out, max_len, head_dim, *q.stride(), *landmarks.stride(), *out.stride(),
            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps,
        )  # fmt: skip
        return
    tiles, n_splits = plan_splits(n_tiles, batch * n_kv_heads, q.device, tiles_per_split)
    logits, split_max, split_sum = softmax_workspace(
        batch, n_q_heads, max_len, n_splits, q.device, POISON_WORKSPACE
    )
    _softmax_pass1[(n_kv_heads, n_splits, batch)](
        q, landmarks, n_landmarks, logits, split_max, split_sum, max_len, head_dim, n_q_heads, n_splits,
        tiles * block_n, *q.stride(), *landmarks.stride(), float(scale) * LOG2E,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    launch_softmax_merge(logits, split_max, split_sum, n_landmarks, out, group)
