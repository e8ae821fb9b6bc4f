"""Triton kernels: landmark scores straight from 2-bit HIGGS codes (YAKV's per-token landmarks),
batched over prompts of different lengths, without dequantizing the landmarks to memory.

Storage (what the offload runtime keeps on the GPU; `kvdiag.quant.higgs` with a grid "EDEN{v}-{P}"):
a token's landmark is its post-RoPE key, all KV heads side by side as one row of C = H_kv·d
channels, zero-padded to a multiple of the Hadamard group g (a power of two), cut into
n_groups = ⌈C / g⌉ groups; each group x keeps s = ‖x‖₂ and the codes of its g / v sub-vectors:

    codes    [B, L_max, n_groups, g // v]  uint8   (P ≤ 256 grid points)
    scales   [B, L_max, n_groups]          fp16 (the quantizer's) or fp32
    grid     [P, v]                        fp32    e.g. EDEN4-256: v = 4, P = 256
    dequantized group = H_g(grid[codes].flatten() · s) / g,  H_g the unnormalised Walsh–Hadamard
    matrix (H_g H_g = g·I, symmetric)

Bytes per token at Llama-3.1-8B's 8 KV heads × d 128 with EDEN4-256, g = 128: 8 groups × 32 B of
codes = 256 B + 8 fp16 scales = 16 B, 272 B in all (bf16 landmarks: 2048 B).

Key identity: q·x̂ = Σ_groups (H_g q_grp)·grid[codes] · s / g, q_grp the query's part in that group
(zeros elsewhere; H_g symmetric). A PyTorch prologue builds, once per step:
- `transform_queries`: q_t [B, H, GPH, g] fp32 = H_g q_grp (one matmul with the cached H_g);
  GPH = max(1, d / g) groups per head; head h of KV head j covers channels [j·d, (j+1)·d), which
  start in group (j·d) // g at offset (j·d) % g; when d < g several heads share a group and q_t is
  H_g of the query placed at its head's offset. The rule's factors (1/g, and scale·log2 e for
  softmax_max) are folded in.
- `lookup_table`: LUT [B, H, T, P] fp32, T = GPH·g/v code columns per head, LUT[c, p] = the c-th
  v-dim sub-vector of q_t · grid[p] (product-quantization "asymmetric distance" tables; 32 KiB per
  head at EDEN4-256, d = g = 128).
A token's score is then Σ_c s_group(c) · LUT[c, code_c]: T lookups (32 at d = 128, v = 4) and adds
per token and table, no multiply per channel, the codes read as [BLOCK_N, T] uint8 tiles. One
kernel, `_higgs_lut_scores`, grid (tables, n_splits, B), each program one table (a query head for
softmax_max, a KV head's mean query for mean_query) over a contiguous split of the row; lookups
either through `tl.gather` on the table held in the program ("smem") or as gather loads (L1,
"global"):
- "softmax_max": tables = the H_q query heads (G programs read each KV head's codes, adjacent in the
  grid, so mostly from L2); each writes its head's logits (log2 units) to the fp32 workspace with
  per-split online-softmax statistics; pass 2 is `kvdiag.kernels.softmax_merge` (normalise per query
  head, max over the group). The workspace adds 2·G·4 B per token and KV head (at G = 4: 32 B
  against 34 B of codes + scale per KV head).
- "mean_query": tables = the group-mean queries (averaged before the transform: H_g is linear), one
  launch, raw dot product, no scale.

Tokens scored: positions [0, n_scored[b]); the rest of the row is -inf.

Measured on the H200 (`python -m kvdiag.bench.select_kernels`, 2026-12-01, CUDA-graph replay, the
prologue included; Llama-3.1-8B shape): B = 1, L = 128K: mean_query 105 µs, softmax_max 154 µs (the
HIGGS row bytes read at 339 / 231 GB/s, 0.08 / 0.06 of HBM; the dequantize-then-score reference
27.9 ms); B = 8, L = 32K: 91 / 281 µs; B = 8, L = 128K: 265 / 1026 µs. The kernels are bound by the
lookups (32 scattered 4-byte L1 reads per token and table: ~1 per clock per SM), not by HBM; "smem"
(`tl.gather`) was 1.8-3.6× slower than "global" in Triton 3.6. Open: packing the G heads' entries
of a softmax_max table into one lookup, and one fused launch for the prologue (~20 µs of the above).

Reference: `kvdiag.kernels.naive_select.naive_higgs_landmark_scores` (dequantize, then the rule).
"""

from __future__ import annotations

import functools
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
    check_same_device,
    check_tensor,
    plan_splits,
    require_kernel_device,
)
from kvdiag.kernels.softmax_merge import launch_softmax_merge, softmax_workspace

from kvdiag.errors import KvdiagError
from kvdiag.quant.hadamard import is_power_of_two, walsh_hadamard

__all__ = ["higgs_landmark_scores", "transform_queries", "higgs_bytes_per_token"]

LOG2E = math.log2(math.e)
MAX_POINTS = 256  # uint8 codes
MAX_TABLE_VALUES = 8192  # a lookup table step of [P_pad, STEP] fp32 values (32 KiB)
GATHERS = ("smem", "global")
POISON_WORKSPACE = False  # tests set this to fill pass 1's workspace with NaN before each launch


@triton.jit
def _higgs_lut_scores(
    lut_ptr,  # [B, H_t, TOTAL, P_PAD] fp32: per table (query head, or KV head's mean query) and code column
    codes_ptr,  # [B, L_max, n_groups, GSIZE // V] uint8
    scales_ptr,  # [B, L_max, n_groups]
    lengths_ptr,  # [B] int32
    dst_ptr,  # softmax: logits [B, H_q, L_max] (log2 units); mean: scores [B, H_kv, L_max]
    split_max_ptr,  # softmax: [B, H_q, n_splits]
    split_sum_ptr,  # softmax: [B, H_q, n_splits]
    max_len,
    head_dim,
    n_tables,  # H_t: tables per batch row (H_q for softmax_max, H_kv for mean_query)
    tables_per_kv,  # G for softmax_max, 1 for mean_query
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
    stride_db,
    stride_dh,
    stride_dn,
    GSIZE: tl.constexpr,  # Hadamard group g
    V: tl.constexpr,  # grid dimension
    TOTAL: tl.constexpr,  # code columns a head spans: GPH · g / v
    STEP: tl.constexpr,  # code columns per step (divides TOTAL)
    P_PAD: tl.constexpr,  # grid points padded to a power of two
    BLOCK_N: tl.constexpr,
    SMEM: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    table = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kv_head = table // tables_per_kv
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    first_group = (kv_head * head_dim) // GSIZE
    CODES_PER_GROUP: tl.constexpr = GSIZE // V
    ONE_GROUP: tl.constexpr = TOTAL <= CODES_PER_GROUP  # the head lies in one group: one scale per token
    table_base = lut_ptr + (b * n_tables + table) * (TOTAL * P_PAD)
    offs_j = tl.arange(0, STEP)
    offs_p = tl.arange(0, P_PAD)
    if SMEM and STEP == TOTAL:  # the head's whole table [P_PAD, TOTAL] stays in the program
        table_once = tl.load(table_base + offs_j[None, :] * P_PAD + offs_p[:, None])
    start = split * split_len
    if SOFTMAX:
        stop = tl.minimum(start + split_len, length)
        run_max = tl.full([], float("-inf"), tl.float32)
        run_sum = tl.zeros([], tl.float32)
    else:
        stop = tl.minimum(start + split_len, max_len)  # mean_query also writes the -inf padding
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        x = tl.zeros([BLOCK_N], tl.float32)
        if n0 < length:
            token_codes = codes_ptr + b * stride_cb + offs_n.to(tl.int64)[:, None] * stride_cl
            token_scales = scales_ptr + b * stride_sb + offs_n.to(tl.int64) * stride_sl
            for j0 in tl.static_range(0, TOTAL, STEP):
                cols = j0 + offs_j
                groups = first_group + cols // CODES_PER_GROUP
                codes = tl.load(
                    token_codes + groups[None, :] * stride_cg + (cols % CODES_PER_GROUP)[None, :] * stride_cc,
                    mask=mask_n[:, None],
                    other=0,
                )
                codes = tl.minimum(codes.to(tl.int32), n_points - 1)  # [BLOCK_N, STEP]; ≥ P never stored
                if SMEM:
                    if STEP == TOTAL:
                        looked_up = tl.gather(table_once, codes, 0)
                    else:
                        looked_up = tl.gather(
                            tl.load(table_base + cols[None, :] * P_PAD + offs_p[:, None]), codes, 0
                        )
                else:
                    looked_up = tl.load(table_base + cols[None, :] * P_PAD + codes)
                if ONE_GROUP:
                    s = tl.load(token_scales + first_group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
                    x += s * tl.sum(looked_up, axis=1)
                else:
                    s = tl.load(
                        token_scales[:, None] + groups[None, :] * stride_sg, mask=mask_n[:, None], other=0.0
                    )
                    x += tl.sum(looked_up * s.to(tl.float32), axis=1)
        x = tl.where(mask_n, x, float("-inf"))
        if SOFTMAX:
            tl.store(dst_ptr + b * stride_db + table * stride_dh + offs_n * stride_dn, x, mask=mask_n)
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp2(run_max - safe_max) + tl.sum(tl.exp2(x - safe_max), axis=0)
            run_max = new_max
        else:
            tl.store(
                dst_ptr + b * stride_db + kv_head * stride_dh + offs_n * stride_dn, x, mask=offs_n < max_len
            )
    if SOFTMAX:
        stat = (b * n_tables + table) * n_splits + split
        tl.store(split_max_ptr + stat, run_max)
        tl.store(split_sum_ptr + stat, run_sum)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(group_size: int, device: torch.device) -> torch.Tensor:
    """H_g [g, g] fp32 on `device` (symmetric, H_g H_g = g·I), cached: one matmul applies it."""
    return walsh_hadamard(torch.eye(group_size, device=device))


def transform_queries(q: torch.Tensor, n_kv_heads: int, group_size: int, factor: float) -> torch.Tensor:
    """q [B, H, d] (H heads spread evenly over n_kv_heads KV heads) -> q_t [B, H, GPH, g] fp32.

    q_t[b, h, i] = factor · H_g q_grp, q_grp the query placed at its KV head's channels inside the
    i-th group that KV head spans (see the module docstring); GPH = max(1, d // g).
    """
    batch, n_heads, head_dim = q.shape
    hadamard = hadamard_matrix(group_size, q.device)
    q = q.float()
    if head_dim >= group_size:
        grouped = q.reshape(batch, n_heads, head_dim // group_size, group_size)
    else:
        slots = group_size // head_dim
        kv_of_head = torch.arange(n_heads, device=q.device) // (n_heads // n_kv_heads)
        slot = (kv_of_head * head_dim % group_size) // head_dim  # which d-wide slot of its group
        placed = F.one_hot(slot, slots).to(q.dtype)[None, :, :, None] * q[:, :, None, :]  # [B, H, slots, d]
        grouped = placed.reshape(batch, n_heads, 1, group_size)
    return (grouped @ hadamard) * factor  # H_g symmetric: (H_g x)ᵀ = xᵀ H_g


def lookup_table(q_t: torch.Tensor, grid: torch.Tensor, padded_points: int) -> torch.Tensor:
    """q_t [B, H, GPH, g] -> [B, H, GPH·g / v, P_pad] fp32: the dot of every v-dim sub-vector of q_t
    with every grid point (points beyond P are 0), so a token's score is a sum of GPH·g/v lookups
    (each times its group's scale)."""
    batch, n_heads, gph, group_size = q_t.shape
    n_points, grid_dim = grid.shape
    grid = F.pad(grid, (0, 0, 0, padded_points - n_points)) if padded_points > n_points else grid
    sub = q_t.reshape(batch, n_heads, gph * group_size // grid_dim, grid_dim)
    return (sub @ grid.T).contiguous()  # [B, H, GPH·g/v, P_pad]


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
    block_n: int = 256,
    num_warps: int | None = None,
    gather: str = "global",
    programs_per_sm: int = 4,
    tiles_per_split: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """[B, H_kv, L_max] fp32 scores of every token's HIGGS landmark (see the module docstring).

    q [B, H_q, d] post-RoPE (H_q a multiple of n_kv_heads); codes / scales / grid as the module
    docstring; n_scored [B] int32 tokens scored per row. `rule` and `scale` as
    `kvdiag.kernels.naive`. Launch knobs: `block_n` (tokens per tile), `num_warps` (default 8 for
    mean_query, 4 for softmax_max), `gather` ("global": gather loads through L1, the faster on the
    H200; "smem": `tl.gather` on the table held in the program), `programs_per_sm` (splits sized for
    this many programs per SM; 1 keeps one table per SM's L1), `tiles_per_split` (overrides that).
    Defaults: the best or within 5 % of the best of the H200 sweep (kvdiag/bench/select_kernels.py).
    `validate=False` skips the host-side check of n_scored's values (for CUDA graph capture).
    """
    batch, n_q_heads, group, head_dim, group_size, device = _check_inputs(
        q, codes, scales, grid, n_scored, n_kv_heads, validate
    )
    scale = check_rule(rule, scale, head_dim)
    require_kernel_device(q, "HIGGS landmark-scoring")
    block_n = check_block("block_n", block_n, 16, 512)
    num_warps = (8 if rule == "mean_query" else 4) if num_warps is None else num_warps
    if gather not in GATHERS:
        raise KvdiagError(f"gather must be one of {', '.join(map(repr, GATHERS))}; got {gather!r}")
    max_len = codes.shape[1]
    out = check_out(out, (batch, n_kv_heads, max_len), device)
    if not batch or not max_len:
        return out
    grid = grid.float().contiguous()
    n_points, grid_dim = grid.shape
    p_pad = max(16, triton.next_power_of_2(n_points))
    total = max(1, head_dim // group_size) * group_size // grid_dim  # code columns per head
    step = min(total, max(16, MAX_TABLE_VALUES // p_pad))
    softmax = rule == "softmax_max"
    if softmax:
        q_t = transform_queries(q, n_kv_heads, group_size, scale * LOG2E / group_size)  # [B, H_q, GPH, g]
    else:
        q_mean = q.float().reshape(batch, n_kv_heads, group, head_dim).mean(dim=2)
        q_t = transform_queries(q_mean, n_kv_heads, group_size, 1.0 / group_size)  # [B, H_kv, GPH, g]
    lut = lookup_table(q_t, grid, p_pad)
    n_tables = lut.shape[1]
    tiles, n_splits = plan_splits(
        triton.cdiv(max_len, block_n), batch * n_tables, device, tiles_per_split, programs_per_sm
    )
    if softmax:
        dst, split_max, split_sum = softmax_workspace(
            batch, n_q_heads, max_len, n_splits, device, POISON_WORKSPACE
        )
    else:
        dst, split_max, split_sum = out, out, out  # no statistics for mean_query
    _higgs_lut_scores[(n_tables, n_splits, batch)](
        lut, codes, scales, n_scored, dst, split_max, split_sum, max_len, head_dim, n_tables,
        group if softmax else 1, n_splits, tiles * block_n, n_points, *codes.stride(), *scales.stride(),
        *dst.stride(), GSIZE=group_size, V=grid_dim, TOTAL=total, STEP=step, P_PAD=p_pad, BLOCK_N=block_n,
        SMEM=gather == "smem", SOFTMAX=softmax, num_warps=num_warps,
    )  # fmt: skip
    if softmax:
        launch_softmax_merge(dst, split_max, split_sum, n_scored, out, group)
    return out
