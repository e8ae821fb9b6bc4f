"""Triton kernels: landmark scores of one decode step, per KV head (YAKV and ShadowKV selection).

    q          [H_q, d]        bf16 / fp16 / fp32, the step's post-RoPE queries
    landmarks  [H_kv, N, d]    bf16 (fp16 / fp32 accepted): per-token (YAKV, N = L) or chunk
                               (ShadowKV, N = L/8) landmarks
    scores     [H_kv, N]       fp32; G = H_q / H_kv query heads per KV head (head h -> KV head h // G)

Rules, as `kvdiag.kernels.naive` (the plain-PyTorch reference beside this file) and
`kvdiag.methods._scoring`:
- "softmax_max": softmax over the N landmarks of q_h·l·scale per query head, max over the group.
  Two launches. Pass 1, grid (H_kv, ⌈N/BLOCK_N⌉): each program reads its BLOCK_N landmarks once,
  computes the G logits of every landmark (fp32, in log2 units: scale·log2 e folded in), writes them
  to a [H_q, N] fp32 workspace and writes the block's row max m and Σ 2^(x − m) per query head.
  Pass 2, grid (H_kv, ⌈N/BLOCK_N2⌉): each program merges its KV head's block statistics into the
  row max M and sum S (online-softmax merge), then writes max_g 2^(x_g − M_g) / S_g.
  Landmarks are read once; the workspace adds 2·G·4 + 4 bytes per landmark (36 B at G = 4 against
  256 B of a bf16 d = 128 landmark row, +14 %).
- "mean_query": one launch, grid (H_kv, ⌈N/BLOCK_N⌉): the group's mean query, dot with each landmark.

Dot products are fp32 multiply-adds on upcast inputs (not tensor cores), so results agree with
the fp32 reference to float32 round-off whatever the input dtype; at G ≤ 8 and d = 128 that is
≤ 8 FLOP per landmark byte, under the fp32 rate at HBM speed.

Top-k (`landmark_topk`) is torch.topk on the kernel's scores: a first version, not a fused kernel.

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (what the tests do); otherwise they need
CUDA tensors.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from kvdiag.kernels.naive import RULES, check_k, check_landmark_inputs

from kvdiag.errors import KvdiagError

__all__ = ["RULES", "default_block_n", "default_num_warps", "landmark_scores", "landmark_topk"]

LOG2E = math.log2(math.e)
BLOCK_N_PASS2 = 1024  # landmarks per program of the softmax pass 2 (pure streaming, no dot)
BLOCK_PARTIALS = 128  # block statistics merged per step in pass 2
POISON_WORKSPACE = False  # tests set this to fill the pass-1 workspace with NaN before each launch


@triton.jit
def _softmax_pass1(
    q_ptr,  # [H_q, d]
    lm_ptr,  # [H_kv, N, d]
    logits_ptr,  # [H_q, N] fp32 workspace, log2 units
    bmax_ptr,  # [H_q, n_blocks] fp32 block row max
    bsum_ptr,  # [H_q, n_blocks] fp32 block Σ 2^(x - max)
    n_landmarks,
    head_dim,
    n_blocks,
    stride_qh,
    stride_qd,
    stride_lh,
    stride_ln,
    stride_ld,
    qk_scale,  # scale · log2(e)
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_landmarks
    mask_d = offs_d < head_dim
    lm = tl.load(
        lm_ptr + kv_head * stride_lh + offs_n[:, None].to(tl.int64) * stride_ln + offs_d[None, :] * stride_ld,
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    for g in tl.static_range(GROUP):
        q_head = kv_head * GROUP + g
        qv = tl.load(q_ptr + q_head * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0).to(tl.float32)
        x = tl.sum(lm * qv[None, :], axis=1) * qk_scale  # [BLOCK_N]
        x = tl.where(mask_n, x, float("-inf"))
        tl.store(logits_ptr + q_head * n_landmarks + offs_n, x, mask=mask_n)
        m = tl.max(x, axis=0)
        tl.store(bmax_ptr + q_head * n_blocks + block, m)
        tl.store(bsum_ptr + q_head * n_blocks + block, tl.sum(tl.exp2(x - m), axis=0))


@triton.jit
def _softmax_pass2(
    logits_ptr,  # [H_q, N] fp32, log2 units
    bmax_ptr,  # [H_q, n_blocks]
    bsum_ptr,  # [H_q, n_blocks]
    out_ptr,  # [H_kv, N] fp32
    n_landmarks,
    n_blocks,
    stride_oh,
    stride_on,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    kv_head = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_g = tl.arange(0, GROUP_PAD)
    mask_g = offs_g < GROUP
    rows = kv_head * GROUP + offs_g  # query heads of this KV head
    # Merge the block statistics of all N landmarks into row max M and row sum S (2^x units).
    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    for start in range(0, n_blocks, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask = mask_g[:, None] & (offs_p < n_blocks)[None, :]
        offsets = rows[:, None] * n_blocks + offs_p[None, :]
        bmax = tl.load(bmax_ptr + offsets, mask=mask, other=float("-inf"))
        bsum = tl.load(bsum_ptr + offsets, mask=mask, other=0.0)
        new_max = tl.maximum(row_max, tl.max(bmax, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(
            bsum * tl.exp2(bmax - safe_max[:, None]), axis=1
        )
        row_max = new_max
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_landmarks
    x = tl.load(
        logits_ptr + rows[:, None] * n_landmarks + offs_n[None, :],
        mask=mask_g[:, None] & mask_n[None, :],
        other=float("-inf"),
    )  # [GROUP_PAD, BLOCK_N]
    safe_sum = tl.where(mask_g, row_sum, 1.0)  # padded rows: x = -inf, so their probs are 0
    probs = tl.exp2(x - safe_max[:, None]) / safe_sum[:, None]
    tl.store(out_ptr + kv_head * stride_oh + offs_n * stride_on, tl.max(probs, axis=0), mask=mask_n)


@triton.jit
def _mean_query_scores(
    q_ptr,  # [H_q, d]
    lm_ptr,  # [H_kv, N, d]
    out_ptr,  # [H_kv, N] fp32
    n_landmarks,
    head_dim,
    stride_qh,
    stride_qd,
    stride_lh,
    stride_ln,
    stride_ld,
    stride_oh,
    stride_on,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_landmarks
    mask_d = offs_d < head_dim
    q_group = tl.load(
        q_ptr + (kv_head * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=(offs_g < GROUP)[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [GROUP_PAD, BLOCK_D]
    q_mean = tl.sum(q_group, axis=0) / GROUP  # [BLOCK_D]
    lm = tl.load(
        lm_ptr + kv_head * stride_lh + offs_n[:, None].to(tl.int64) * stride_ln + offs_d[None, :] * stride_ld,
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
    tl.store(
        out_ptr + kv_head * stride_oh + offs_n * stride_on, tl.sum(lm * q_mean[None, :], axis=1), mask=mask_n
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_block_n(head_dim: int) -> int:
    """Landmarks per program of pass 1 / the mean-query kernel: a [BLOCK_N, BLOCK_D] fp32 tile of
    8192 values (64 rows at d = 128)."""
    return max(16, min(256, 8192 // triton.next_power_of_2(head_dim)))


def default_num_warps(rule: str) -> int:
    """Warps per program of pass 1 / the mean-query kernel: the best or within noise of the best
    of the H200 sweep (kvdiag/bench/NOTES.md, 2026-11-29)."""
    return 8 if rule == "mean_query" else 4


def _check_out(out: torch.Tensor | None, n_kv_heads: int, n_landmarks: int, device) -> torch.Tensor:
    if out is None:
        return torch.empty(n_kv_heads, n_landmarks, dtype=torch.float32, device=device)
    if out.shape != (n_kv_heads, n_landmarks) or out.dtype != torch.float32 or out.device != device:
        raise KvdiagError(
            f"out must be fp32 [{n_kv_heads}, {n_landmarks}] on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def landmark_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    rule: str = "softmax_max",
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """[H_kv, N] fp32 scores of every landmark under `rule` ("softmax_max" or "mean_query").

    q [H_q, d], landmarks [H_kv, N, d] (any strides); scale defaults to 1/√d for "softmax_max" and
    must be None for "mean_query" (raw dot product). `out`, if given, is written in place.
    `block_n` / `num_warps` tune pass 1 (and the mean-query kernel); block_n a power of two ≥ 16.
    """
    n_kv_heads, group, n_landmarks, head_dim, scale = check_landmark_inputs(q, landmarks, rule, scale)
    if q.device.type != "cuda" and not _interpreting():
        raise KvdiagError(
            f"the Triton landmark kernels need CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing kvdiag.kernels, or use kvdiag.kernels.naive"
        )
    block_n = default_block_n(head_dim) if block_n is None else block_n
    num_warps = default_num_warps(rule) if num_warps is None else num_warps
    if block_n < 16 or block_n & (block_n - 1):
        raise KvdiagError(f"block_n must be a power of two ≥ 16, got {block_n}")
    out = _check_out(out, n_kv_heads, n_landmarks, q.device)
    if n_landmarks == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    group_pad = triton.next_power_of_2(group)
    n_blocks = triton.cdiv(n_landmarks, block_n)
    if rule == "mean_query":
        _mean_query_scores[(n_kv_heads, n_blocks)](
            q, landmarks, out, n_landmarks, head_dim, *q.stride(), *landmarks.stride(), *out.stride(),
            GROUP=group, GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
        return out
    n_q_heads = n_kv_heads * group
    make = torch.full if POISON_WORKSPACE else torch.empty
    fill = (float("nan"),) if POISON_WORKSPACE else ()
    logits = make((n_q_heads, n_landmarks), *fill, dtype=torch.float32, device=q.device)
    block_max = make((n_q_heads, n_blocks), *fill, dtype=torch.float32, device=q.device)
    block_sum = make((n_q_heads, n_blocks), *fill, dtype=torch.float32, device=q.device)
    _softmax_pass1[(n_kv_heads, n_blocks)](
        q, landmarks, logits, block_max, block_sum, n_landmarks, head_dim, n_blocks,
        *q.stride(), *landmarks.stride(), float(scale) * LOG2E,
        GROUP=group, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    block_n2 = min(BLOCK_N_PASS2, max(16, triton.next_power_of_2(n_landmarks)))
    _softmax_pass2[(n_kv_heads, triton.cdiv(n_landmarks, block_n2))](
        logits, block_max, block_sum, out, n_landmarks, n_blocks, *out.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_N=block_n2, BLOCK_P=BLOCK_PARTIALS, num_warps=4,
    )  # fmt: skip
    return out


def landmark_topk(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    k: int,
    rule: str = "softmax_max",
    scale: float | None = None,
    **launch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [H_kv, k] fp32, indices [H_kv, k] int64): the k best landmarks per KV head.

    k is clamped to N (as the methods' top-k). First version: the Triton scores,
    then torch.topk (not fused; at N = 128K its cost is measured by `kvdiag.bench.landmark_kernel`).
    """
    scores = landmark_scores(q, landmarks, rule, scale, **launch)
    return tuple(scores.topk(check_k(k, scores.shape[-1]), dim=-1))
