"""Triton kernels: landmark scores straight from 2-bit HIGGS codes (YAKV's per-token landmarks),
batched over prompts of different lengths, without dequantizing the landmarks to memory.

Storage (what the offload runtime keeps on the GPU; `kvdiag.quant.higgs` with a grid "EDEN{v}-{P}"):
a token's landmark is its post-RoPE key, all KV heads side by side as one row of C = H_kv·d
channels, zero-padded to a multiple of the Hadamard group g (a power of two), cut into
n_groups = ⌈C / g⌉ groups; each group x keeps s = ‖x‖₂ and the codes of its g / v sub-vectors:

    codes    [B, L_max, n_groups, g // v]  uint8   (P ≤ 256 grid points)
    scales   [B, L_max, n_groups]          fp16 (the quantizer's) or fp32
    grid     [P, v]                        fp32    e.g. EDEN4-256: v = 4, P = 256 (4 KiB, L1-resident)
    dequantized group = H_g(grid[codes].flatten() · s) / g,  H_g the unnormalised Walsh–Hadamard
    matrix (H_g H_g = g·I, symmetric)

Bytes per token at Llama-3.1-8B's 8 KV heads × d 128 with EDEN4-256, g = 128: 8 groups × 32 B of
codes = 256 B + 8 fp16 scales = 16 B, 272 B in all (bf16 landmarks: 2048 B).

Key identity: q·x̂ = Σ_groups (H_g q_grp)·grid[codes] · s / g, q_grp the query's part in that group
(zeros elsewhere; H_g symmetric). A PyTorch prologue (`transform_queries`) builds
`q_t [B, H, GPH, g]` fp32 once per step: GPH = max(1, d / g) groups per head; head h of KV head j
covers channels [j·d, (j+1)·d), which start in group (j·d) // g at offset (j·d) % g; when d < g
several heads share a group and q_t is H_g of the query placed at its head's offset. The rule's
factors (1/g, and scale·log2 e for softmax_max) are folded into q_t. The kernels then read each
token's codes once, look the grid points up in the tiny grid table ([BLOCK_N, CHUNK] fp32 tile),
and accumulate s · (grid values · q_t):

- "softmax_max" (pass 1, grid (H_kv, n_splits, B)): the G heads' logits as one `tl.dot` of the
  gathered tile with q_t's G columns (padded to ≥ 16; `precision` as in `batched_scores`), written
  to the fp32 workspace with per-split online-softmax statistics; pass 2 is
  `kvdiag.kernels.softmax_merge` (normalise per query head, max over the group). The codes are read
  once; the workspace adds 2·G·4 B per token and KV head (at G = 4: 32 B against 34 B of codes +
  scale per KV head, so the softmax rule moves ~2× the bytes of mean_query).
- "mean_query" (one launch, grid (H_kv, ⌈L_max / BLOCK_N⌉, B)): the group's mean query (averaged
  before the transform; H_g is linear), fp32 multiply-adds, no scale.

When d < g the group a KV head reads is shared with g/d - 1 other KV heads, so each group's codes are
read by g/d programs (adjacent in the launch grid, so mostly from L2). Tokens scored: positions
[0, n_scored[b]); the rest of the row is -inf.

Reference: `kvdiag.kernels.naive_select.naive_higgs_landmark_scores` (dequantize, then the rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
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
from kvdiag.quant.hadamard import is_power_of_two, walsh_hadamard

__all__ = ["higgs_landmark_scores", "transform_queries", "higgs_bytes_per_token"]

LOG2E = math.log2(math.e)
MAX_POINTS = 256  # uint8 codes
MAX_CHUNK = 128  # channels of a group handled per step (a [BLOCK_N, CHUNK] fp32 tile)
POISON_WORKSPACE = False  # tests set this to fill pass 1's workspace with NaN before each launch


@triton.jit
def _gather_grid(
    code_rows, mask_n, grid_ptr, first_code, stride_cc, n_points,
    BLOCK_N: tl.constexpr, CODES: tl.constexpr, V: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, CODES·V] fp32: grid[codes] of CODES consecutive sub-vectors from `first_code` on,
    flattened; code_rows [BLOCK_N] points at each token's codes of the group. Codes ≥ P are clamped
    (no out-of-bounds read; the quantizer never writes them)."""
    offs_c = first_code + tl.arange(0, CODES)
    codes = tl.load(code_rows[:, None] + offs_c[None, :] * stride_cc, mask=mask_n[:, None], other=0)
    codes = tl.minimum(codes.to(tl.int32), n_points - 1)  # [BLOCK_N, CODES]
    vals = tl.load(grid_ptr + codes[:, :, None] * V + tl.arange(0, V)[None, None, :])  # [BLOCK_N, CODES, V]
    return tl.reshape(vals, [BLOCK_N, CODES * V])


@triton.jit
def _higgs_softmax_pass1(
    qt_ptr,  # [B, H_q, GPH, GSIZE] fp32, contiguous, scale·log2(e)/g folded in
    codes_ptr,  # [B, L_max, n_groups, GSIZE // V] uint8
    scales_ptr,  # [B, L_max, n_groups]
    grid_ptr,  # [P, V] fp32, contiguous
    lengths_ptr,  # [B] int32
    logits_ptr,  # [B, H_q, L_max] fp32 workspace, log2 units
    split_max_ptr,  # [B, H_q, n_splits]
    split_sum_ptr,  # [B, H_q, n_splits]
    max_len,
    head_dim,
    n_q_heads,
    n_splits,
    split_len,
    n_points,
    stride_cb,
    stride_cl,
    stride_cg,
    stride_cc,
    stride_sb,
    stride_sl,
    stride_sg,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # ≥ 16: the dot's N
    GPH: tl.constexpr,  # groups per head
    GSIZE: tl.constexpr,  # Hadamard group g
    CHUNK: tl.constexpr,  # channels per step, divides GSIZE
    V: tl.constexpr,  # grid dimension
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    offs_g = tl.arange(0, GROUP_PAD)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    rows = b * n_q_heads + heads  # [GROUP_PAD]
    offs_k = tl.arange(0, CHUNK)
    first_group = (kv_head * head_dim) // GSIZE
    ONE_STEP: tl.constexpr = GPH * GSIZE == CHUNK
    if ONE_STEP:  # the common case (d = g = 128): q_t loaded once per program
        q_once = tl.load(qt_ptr + rows[None, :] * GSIZE + offs_k[:, None], mask=mask_g[None, :], other=0.0)
    run_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([GROUP_PAD], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        x = tl.zeros([BLOCK_N, GROUP_PAD], tl.float32)
        for i in range(GPH):
            group = first_group + i
            s = tl.load(
                scales_ptr + b * stride_sb + offs_n * stride_sl + group * stride_sg, mask=mask_n, other=0.0
            )
            code_rows = codes_ptr + b * stride_cb + offs_n.to(tl.int64) * stride_cl + group * stride_cg
            for c0 in tl.static_range(0, GSIZE, CHUNK):
                vals = _gather_grid(
                    code_rows, mask_n, grid_ptr, c0 // V, stride_cc, n_points, BLOCK_N, CHUNK // V, V
                )
                if ONE_STEP:
                    q_chunk = q_once
                else:
                    q_chunk = tl.load(
                        qt_ptr + (rows[None, :] * GPH + i) * GSIZE + c0 + offs_k[:, None],
                        mask=mask_g[None, :],
                        other=0.0,
                    )  # [CHUNK, GROUP_PAD]
                x += s.to(tl.float32)[:, None] * tl.dot(vals, q_chunk, input_precision=PRECISION)
        x = tl.where(mask_n[:, None], x, float("-inf"))
        tl.store(
            logits_ptr + rows[None, :] * max_len + offs_n[:, None], x, mask=mask_n[:, None] & mask_g[None, :]
        )
        run_max, run_sum = online_softmax_update(x, run_max, run_sum)
    tl.store(split_max_ptr + rows * n_splits + split, run_max, mask=mask_g)
    tl.store(split_sum_ptr + rows * n_splits + split, run_sum, mask=mask_g)


@triton.jit
def _higgs_mean_query(
    qt_ptr,  # [B, H_kv, GPH, GSIZE] fp32: transformed group-mean queries, 1/g folded in
    codes_ptr,
    scales_ptr,
    grid_ptr,
    lengths_ptr,
    out_ptr,  # [B, H_kv, L_max] fp32
    max_len,
    head_dim,
    n_kv_heads,
    n_points,
    stride_cb,
    stride_cl,
    stride_cg,
    stride_cc,
    stride_sb,
    stride_sl,
    stride_sg,
    stride_ob,
    stride_oh,
    stride_on,
    GPH: tl.constexpr,
    GSIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    V: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < length
    offs_k = tl.arange(0, CHUNK)
    first_group = (kv_head * head_dim) // GSIZE
    row = b * n_kv_heads + kv_head
    x = tl.zeros([BLOCK_N], tl.float32)
    if block * BLOCK_N < length:
        for i in range(GPH):
            group = first_group + i
            s = tl.load(
                scales_ptr + b * stride_sb + offs_n * stride_sl + group * stride_sg, mask=mask_n, other=0.0
            )
            code_rows = codes_ptr + b * stride_cb + offs_n.to(tl.int64) * stride_cl + group * stride_cg
            for c0 in tl.static_range(0, GSIZE, CHUNK):
                vals = _gather_grid(
                    code_rows, mask_n, grid_ptr, c0 // V, stride_cc, n_points, BLOCK_N, CHUNK // V, V
                )
                q_chunk = tl.load(qt_ptr + (row * GPH + i) * GSIZE + c0 + offs_k)  # [CHUNK]
                x += s.to(tl.float32) * tl.sum(vals * q_chunk[None, :], axis=1)
    scores = tl.where(mask_n, x, float("-inf"))
    tl.store(
        out_ptr + b * stride_ob + kv_head * stride_oh + offs_n * stride_on, scores, mask=offs_n < max_len
    )


def transform_queries(q: torch.Tensor, n_kv_heads: int, group_size: int, factor: float) -> torch.Tensor:
    """q [B, H, d] (H heads spread evenly over n_kv_heads KV heads) -> q_t [B, H, GPH, g] fp32.

    q_t[b, h, i] = factor · H_g q_grp, q_grp the query placed at its KV head's channels inside the
    i-th group that KV head spans (see the module docstring); GPH = max(1, d // g).
    """
    batch, n_heads, head_dim = q.shape
    q = q.float() * factor
    if head_dim >= group_size:
        return walsh_hadamard(q.reshape(batch, n_heads, head_dim // group_size, group_size))
    slots = group_size // head_dim
    kv_of_head = torch.arange(n_heads, device=q.device) // (n_heads // n_kv_heads)
    slot = (kv_of_head * head_dim % group_size) // head_dim  # which d-wide slot of its group
    placed = F.one_hot(slot, slots).to(q.dtype)[None, :, :, None] * q[:, :, None, :]  # [B, H, slots, d]
    return walsh_hadamard(placed.reshape(batch, n_heads, 1, group_size))


def higgs_bytes_per_token(
    n_kv_heads: int, head_dim: int, group_size: int, grid_dim: int, scale_bytes: int
) -> int:
    """GPU bytes of one token's landmark row: codes (one byte per sub-vector) + one scale per group."""
    n_groups = -(-n_kv_heads * head_dim // group_size)
    return n_groups * (group_size // grid_dim + scale_bytes)


def _check_inputs(q, codes, scales, grid, n_scored, n_kv_heads, validate):
    check_tensor("q", q, "[B, H_q, d]", 3)
    check_tensor("codes", codes, "[B, L_max, n_groups, g // v] uint8", 4, (torch.uint8,))
    check_tensor("scales", scales, "[B, L_max, n_groups]", 3)
    check_tensor("grid", grid, "[P, v]", 2)
    batch, n_q_heads, head_dim = q.shape
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1:
        raise KvdiagError(f"n_kv_heads must be a positive integer, got {n_kv_heads!r}")
    group = check_group(n_q_heads, n_kv_heads)
    if not is_power_of_two(head_dim):
        raise KvdiagError(f"head dim d must be a power of two (16, 32, ..., 256), got {head_dim}")
    n_points, grid_dim = grid.shape
    if not 1 <= n_points <= MAX_POINTS:
        raise KvdiagError(f"grid must have 1..{MAX_POINTS} points (uint8 codes), got {n_points}")
    group_size = codes.shape[-1] * grid_dim
    if not is_power_of_two(grid_dim) or not is_power_of_two(group_size) or not 16 <= group_size <= 1024:
        raise KvdiagError(
            f"codes of {codes.shape[-1]} sub-vectors of the {grid_dim}-dim grid make a Hadamard group of "
            f"{group_size}; it must be a power of two in 16..1024 and v must be a power of two"
        )
    n_groups = -(-n_kv_heads * head_dim // group_size)
    if codes.shape[:3] != (batch, codes.shape[1], n_groups) or codes.shape[0] != batch:
        raise KvdiagError(
            f"codes must be [B={batch}, L_max, n_groups={n_groups}, {group_size // grid_dim}] for "
            f"{n_kv_heads} KV heads × d {head_dim} in groups of {group_size}, got {tuple(codes.shape)}"
        )
    if tuple(scales.shape) != tuple(codes.shape[:3]):
        raise KvdiagError(
            f"scales must be [B, L_max, n_groups] = {tuple(codes.shape[:3])}, got {tuple(scales.shape)}"
        )
    device = check_same_device(q=q, codes=codes, scales=scales, grid=grid)
    check_lengths("n_scored", n_scored, batch, codes.shape[1], device, validate=validate)
    return batch, n_q_heads, group, head_dim, group_size, device


def higgs_landmark_scores(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: torch.Tensor,
    n_scored: torch.Tensor,
    n_kv_heads: int,
    rule: str = "softmax_max",
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    precision: str = "tf32x3",
    tiles_per_split: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """[B, H_kv, L_max] fp32 scores of every token's HIGGS landmark (see the module docstring).

    q [B, H_q, d] post-RoPE (H_q a multiple of n_kv_heads); codes / scales / grid as the module
    docstring; n_scored [B] int32 tokens scored per row. `rule` and `scale` as
    `kvdiag.kernels.naive`. Launch knobs as `batched_landmark_scores`; `validate=False` skips the
    host-side check of n_scored's values (for CUDA graph capture).
    """
    batch, n_q_heads, group, head_dim, group_size, device = _check_inputs(
        q, codes, scales, grid, n_scored, n_kv_heads, validate
    )
    scale = check_rule(rule, scale, head_dim)
    require_kernel_device(q, "HIGGS landmark-scoring")
    block_n = check_block("block_n", block_n, 16, 256)
    precision = check_precision(precision)
    max_len = codes.shape[1]
    out = check_out(out, (batch, n_kv_heads, max_len), device)
    if not batch or not max_len:
        return out
    grid = grid.float().contiguous()
    grid_dim = grid.shape[1]
    chunk = min(group_size, MAX_CHUNK)
    gph = max(1, head_dim // group_size)
    common = dict(GPH=gph, GSIZE=group_size, CHUNK=chunk, V=grid_dim, BLOCK_N=block_n, num_warps=num_warps)
    n_tiles = triton.cdiv(max_len, block_n)
    if rule == "mean_query":
        q_mean = q.float().reshape(batch, n_kv_heads, group, head_dim).mean(dim=2)
        q_t = transform_queries(q_mean, n_kv_heads, group_size, 1.0 / group_size).contiguous()
        _higgs_mean_query[(n_kv_heads, n_tiles, batch)](
            q_t, codes, scales, grid, n_scored, out, max_len, head_dim, n_kv_heads, grid.shape[0],
            *codes.stride(), *scales.stride(), *out.stride(), **common,
        )  # fmt: skip
        return out
    q_t = transform_queries(q, n_kv_heads, group_size, scale * LOG2E / group_size).contiguous()
    tiles, n_splits = plan_splits(n_tiles, batch * n_kv_heads, device, tiles_per_split)
    logits, split_max, split_sum = softmax_workspace(
        batch, n_q_heads, max_len, n_splits, device, POISON_WORKSPACE
    )
    _higgs_softmax_pass1[(n_kv_heads, n_splits, batch)](
        q_t, codes, scales, grid, n_scored, logits, split_max, split_sum, max_len, head_dim, n_q_heads,
        n_splits, tiles * block_n, grid.shape[0], *codes.stride(), *scales.stride(),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), PRECISION=precision, **common,
    )  # fmt: skip
    launch_softmax_merge(logits, split_max, split_sum, n_scored, out, group)
    return out
