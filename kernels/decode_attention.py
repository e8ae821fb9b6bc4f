"""Sparse decode attention of the offload runtime: split-K (flash-decoding) Triton kernels.

One new query token per batch element, q [B, H_q, d] (bf16 / fp16 / fp32), attends per KV head over
the concatenation of up to three sources with one softmax across all of them (formats and the
reference: `kvdiag.kernels.naive_attend`):
    (a) resident  res_k, res_v [B, H_kv, R_max, d] + res_len [B]       exact K/V on the GPU (ShadowKV's
                  local window and outlier chunks)
    (b) selected  ids [B, H_kv, K] (−1 masked), sel_v [B, H_kv, K, d]   rows fetched from the host
                  (`kvdiag.kernels.gather`); keys either sel_k [B, H_kv, K, d] (bf16 / fp16 / fp32 /
                  fp8 e4m3, dequantized in registers; YAKV) or rebuilt here from the low-rank factor
                  (ShadowKV): u [B, L_max, r], sv [B, H_kv, r, d], RoPE tables cos, sin [L_max, d]
    (c) tail      tail_k, tail_v [B, H_kv, T_max, d] + tail_len [B]    the generated tokens
Output [B, H_q, d] in q's dtype. Logits (q·k)·scale, optional soft-cap cap·tanh(x / cap); softmax in
base 2 (log2 e folded into the scale), fp32 statistics and accumulators. A row with no valid key gets
zeros.

Split-K scheme. Kernel 1, grid (B·H_kv, S): program (b, h, s) holds the G query heads of KV head h as
a [G_pad, d] tile (G_pad = max(16, next power of two of G), the smallest tl.dot tile) and walks
BLOCK_N-token blocks of each source; split s takes blocks [s·n/S, (s+1)·n/S) of every source's n
blocks (per-batch lengths), so every split gets an equal share of each source. Per block: logits
x = q·kᵀ [G_pad, BLOCK_N] on the tensor cores, masked (length, id −1, id ≥ L_max) to −∞, an
online-softmax update of the running max m, sum l and acc [G_pad, d] (acc += p·v). It writes
acc / l and lse = m + log2 l per query head and split to an fp32 workspace ([B, H_q, S, d] and
[B, H_q, S]). Kernel 2, grid (B·H_q): merges the S partials, out = Σ 2^(lse_s − M) o_s / Σ 2^(lse_s − M)
(splits without tokens carry lse = −∞ and weigh 0). With S = 1 kernel 1 writes the output directly.
S is a launch parameter: `default_n_splits` fills one wave of two programs per SM (132 SMs on the
H200), at most one split per block; see the launch notes by `default_block_n`.

Precision. With fp32 q both dots are IEEE fp32 (no TF32), so the kernel matches the fp32 reference to
round-off. With bf16 / fp16 q the dot operands are rounded to q's dtype (keys, the softmax weights p,
values), as flash attention does; fp8 and bf16 keys are exact in bf16, fp32 and rebuilt keys are
rounded.

Rebuilt keys (ShadowKV). k = u[id]·sv[h] on the tensor cores in BLOCK_R-wide chunks of r (fp32
accumulation; exact products of bf16 factors). RoPE is applied without permuting k in registers:
q·(k·cos + rotate_half(k)·sin) = q·(k∘cos) + q̃·(k∘s̃), with q̃_i = q_(i+d/2 mod d) and
s̃_i = ±sin_(i+d/2 mod d) (+ for i < d/2), so the permutation moves to the query (once per program)
and to the column order of the sin load. Bytes per selected (token, KV head): u row 2r (320 B at
r = 160, re-read per KV head), cos and sin rows 2·d·itemsize (from L2 when heads share tokens), V.

Measured on the H200 (Llama-3.1-8B shape, `kvdiag.bench.attend_kernels`, CUDA-graph replays with
inputs rotated past L2, default launch, 2026-12-01), per layer and step at L = 32K / 128K: YAKV (fp8
K/V, k = 3.125 % + 64, 128 generated) 10 / 13 µs at B = 1 and 20 / 46 µs at B = 8; ShadowKV (r = 160,
416 resident, k = 1.5625 %) 17 / 18 µs and 30 / 72 µs; SDPA over all L tokens in bf16 40 / 126 µs
and 241 / 930 µs. By the bytes it must read that is 0.1–0.56 of HBM: B = 1 is latency-bound (10 MB).
The eager Python call costs 100–300 µs (Triton's launcher with ~70 arguments, plus the combine
launch): replay it in a CUDA graph, as the runtime does.

fp8 e4m3 is converted natively (`.to(tl.float32)`); the Triton interpreter (3.9) does too, except
that it decodes the NaN codes 0x7F / 0xFF as ±480 (the runtime's saturating cast never stores NaN).
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests); otherwise they need CUDA tensors.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from kvdiag.kernels.naive_attend import check_attention_inputs

from kvdiag.errors import KvdiagError

__all__ = ["default_block_n", "default_n_splits", "default_num_warps", "sparse_decode_attention"]

LOG2E = math.log2(math.e)
H200_SMS = 132
MAX_SPLITS = 64
SEL_NONE, SEL_DIRECT, SEL_LOWRANK = 0, 1, 2


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2·log2(e); saturates to ±1


@triton.jit
def _operand(x, ty: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to dtype ty, a dot operand; fp32 again under UPCAST (the interpreter workaround)."""
    x = x.to(ty)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _online_update(
    x, valid, v, m_i, l_i, acc, scale, softcap,
    OP_TY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One block: raw logits x [G_pad, BLOCK_N] fp32, valid [BLOCK_N], v [BLOCK_N, d] (the dot
    operand) -> new (m, l, acc)."""
    if HAS_SOFTCAP:
        x = softcap * _tanh(x * (scale / softcap)) * 1.4426950408889634
    else:
        x = x * (scale * 1.4426950408889634)
    x = tl.where(valid[None, :], x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(x - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(_operand(p, OP_TY, UPCAST), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_range(n_tokens, split, n_splits, BLOCK_N: tl.constexpr):
    n_blocks = tl.cdiv(n_tokens, BLOCK_N)
    return split * n_blocks // n_splits, (split + 1) * n_blocks // n_splits


@triton.jit
def _attend_dense_source(
    q, k_base, v_base, stride_kn, stride_vn, n_tokens, split, n_splits, m_i, l_i, acc, scale, softcap,
    OP_TY: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """A resident or tail source: this split's share of tokens [0, n_tokens) of the rows at k_base,
    v_base (one batch element and KV head) -> new (m, l, acc)."""
    offs_d = tl.arange(0, HEAD_DIM)
    start, end = _split_range(n_tokens, split, n_splits, BLOCK_N)
    for blk in range(start, end):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs_n < n_tokens
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        x = tl.dot(q, tl.trans(_operand(k, OP_TY, UPCAST)), input_precision=PRECISION)
        m_i, l_i, acc = _online_update(
            x,
            valid,
            _operand(v, OP_TY, UPCAST),
            m_i,
            l_i,
            acc,
            scale,
            softcap,
            OP_TY,
            HAS_SOFTCAP,
            PRECISION,
            UPCAST,
        )
    return m_i, l_i, acc


@triton.jit
def _sparse_decode_kernel(
    q_ptr, stride_qb, stride_qh,
    rk_ptr, rv_ptr, res_len_ptr, stride_rkb, stride_rkh, stride_rkn, stride_rvb, stride_rvh, stride_rvn,
    ids_ptr, stride_ib, stride_ih, stride_ik,
    sk_ptr, sv_ptr, stride_skb, stride_skh, stride_skn, stride_svb, stride_svh, stride_svn,
    u_ptr, stride_ub, stride_ul, stride_ur,
    f_ptr, stride_fb, stride_fh, stride_fr,  # the factor sv [B, H_kv, r, d]
    cos_ptr, sin_ptr, stride_cl, stride_sl,
    tk_ptr, tv_ptr, tail_len_ptr, stride_tkb, stride_tkh, stride_tkn, stride_tvb, stride_tvh, stride_tvn,
    out_ptr, stride_ob, stride_oh,  # [B, H_q, d] (SINGLE)
    part_o_ptr, part_lse_ptr,  # [B, H_q, S, d], [B, H_q, S] fp32, contiguous (not SINGLE)
    n_kv_heads, n_selected, n_positions, rank, n_splits, scale, softcap,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_RES: tl.constexpr, SEL_MODE: tl.constexpr, HAS_TAIL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SINGLE: tl.constexpr, PRECISION: tl.constexpr,
    FACTOR_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)
    h = (bh % n_kv_heads).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    q_rows = q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh
    q_in = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)  # [G_pad, d]
    op_ty = q_ptr.dtype.element_ty  # dot operands are rounded to q's dtype
    q = _operand(q_in, op_ty, UPCAST)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)

    if HAS_RES:
        m_i, l_i, acc = _attend_dense_source(
            q, rk_ptr + b * stride_rkb + h * stride_rkh, rv_ptr + b * stride_rvb + h * stride_rvh,
            stride_rkn, stride_rvn, tl.load(res_len_ptr + b), split, n_splits, m_i, l_i, acc, scale, softcap,
            op_ty, HEAD_DIM, BLOCK_N, HAS_SOFTCAP, PRECISION, UPCAST,
        )  # fmt: skip

    if SEL_MODE != 0:
        start, end = _split_range(n_selected, split, n_splits, BLOCK_N)
        ids_base = ids_ptr + b * stride_ib + h * stride_ih
        v_base = sv_ptr + b * stride_svb + h * stride_svh
        if SEL_MODE == 2:  # rebuilt keys: the permuted query and sin columns (module docstring)
            perm = (offs_d + HEAD_DIM // 2) % HEAD_DIM
            sin_sign = tl.where(offs_d < HEAD_DIM // 2, 1.0, -1.0)
            q_perm = _operand(tl.load(q_rows + perm[None, :], mask=g_mask[:, None], other=0.0), op_ty, UPCAST)
            u_base = u_ptr + b * stride_ub
            factor_ty = u_ptr.dtype.element_ty
            f_base = f_ptr + b * stride_fb + h * stride_fh
        for blk in range(start, end):
            offs_n = blk * BLOCK_N + offs_n0
            pos = tl.load(ids_base + offs_n * stride_ik, mask=offs_n < n_selected, other=-1).to(tl.int64)
            if SEL_MODE == 1:
                valid = pos >= 0
                k_ptrs = sk_ptr + b * stride_skb + h * stride_skh + offs_n[:, None] * stride_skn
                k = tl.load(k_ptrs + offs_d[None, :], mask=valid[:, None], other=0.0)
                x = tl.dot(q, tl.trans(_operand(k.to(tl.float32), op_ty, UPCAST)), input_precision=PRECISION)
            else:
                valid = (pos >= 0) & (pos < n_positions)
                k = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
                for r0 in range(0, rank, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    r_mask = offs_r < rank
                    u_rows = tl.load(
                        u_base + pos[:, None] * stride_ul + offs_r[None, :] * stride_ur,
                        mask=valid[:, None] & r_mask[None, :],
                        other=0.0,
                    )  # [BLOCK_N, BLOCK_R]
                    f = tl.load(
                        f_base + offs_r[:, None] * stride_fr + offs_d[None, :],
                        mask=r_mask[:, None],
                        other=0.0,
                    )
                    k = tl.dot(
                        _operand(u_rows, factor_ty, UPCAST),
                        _operand(f, factor_ty, UPCAST),
                        k,
                        input_precision=FACTOR_PRECISION,
                    )  # pre-RoPE [BLOCK_N, d]
                cos = tl.load(
                    cos_ptr + pos[:, None] * stride_cl + offs_d[None, :], mask=valid[:, None], other=0.0
                )
                sin = tl.load(
                    sin_ptr + pos[:, None] * stride_sl + perm[None, :], mask=valid[:, None], other=0.0
                )
                k_cos = _operand(k * cos.to(tl.float32), op_ty, UPCAST)
                k_sin = _operand(k * (sin.to(tl.float32) * sin_sign[None, :]), op_ty, UPCAST)
                x = tl.dot(q, tl.trans(k_cos), input_precision=PRECISION)
                x = tl.dot(q_perm, tl.trans(k_sin), x, input_precision=PRECISION)
            v = tl.load(
                v_base + offs_n[:, None] * stride_svn + offs_d[None, :], mask=valid[:, None], other=0.0
            )
            v = _operand(v.to(tl.float32), op_ty, UPCAST)
            m_i, l_i, acc = _online_update(
                x, valid, v, m_i, l_i, acc, scale, softcap, op_ty, HAS_SOFTCAP, PRECISION, UPCAST
            )

    if HAS_TAIL:
        m_i, l_i, acc = _attend_dense_source(
            q, tk_ptr + b * stride_tkb + h * stride_tkh, tv_ptr + b * stride_tvb + h * stride_tvh,
            stride_tkn, stride_tvn, tl.load(tail_len_ptr + b), split, n_splits, m_i, l_i, acc, scale, softcap,
            op_ty, HEAD_DIM, BLOCK_N, HAS_SOFTCAP, PRECISION, UPCAST,
        )  # fmt: skip

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # rows without a key: 0
    q_heads = h * GROUP + offs_g
    if SINGLE:
        out_rows = out_ptr + b * stride_ob + q_heads[:, None] * stride_oh
        tl.store(out_rows + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (b * (n_kv_heads * GROUP) + q_heads) * n_splits + split  # [G_pad] rows of the workspace
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _combine_kernel(
    part_o_ptr,  # [B, H_q, S, d] fp32
    part_lse_ptr,  # [B, H_q, S] fp32 (log2 units)
    out_ptr,  # [B, H_q, d]
    n_q_heads,
    n_splits,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    S_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b·H_q + query head
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < n_splits
    lse = tl.load(part_lse_ptr + row * n_splits + offs_s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty splits
    parts = tl.load(
        part_o_ptr + (row * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    total = tl.sum(weight, axis=0)
    o = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total > 0.0, total, 1.0)
    b = row // n_q_heads
    head = row % n_q_heads
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch defaults, from the H200 sweeps of `kvdiag.bench.attend_kernels` (Llama-3.1-8B shape, YAKV and
# ShadowKV, L = 32K / 128K, B = 1 / 8, CUDA-graph timing, 2026-12-01): 64-token blocks and 4 warps with
# ⌊2·SMs / (B·H_kv)⌋ splits (one wave at two programs per SM: 4 splits at B = 8, 33 at B = 1) were
# the best launch at 128K and at B = 8, and within 3 µs of it elsewhere; one more split than a wave
# holds cost up to 40 % (a second, partial wave).


def default_block_n(head_dim: int) -> int:
    """Tokens per block: 64 (32 at d = 256, whose tiles need twice the registers)."""
    return 64 if head_dim <= 128 else 32


def default_num_warps(block_n: int) -> int:
    return 4 if block_n <= 64 else 8


@functools.cache
def _sm_count() -> int:
    return (
        torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else H200_SMS
    )


def default_n_splits(
    batch: int, n_kv_heads: int, n_tokens: int, block_n: int, n_sms: int | None = None
) -> int:
    """Splits per (batch element, KV head): one wave of two programs per SM over n_sms (the current
    GPU's count, else the H200's 132), at most one split per block of `block_n` of the n_tokens, at
    most 64."""
    n_sms = _sm_count() if n_sms is None else n_sms
    wanted = 2 * n_sms // max(1, batch * n_kv_heads)
    return max(1, min(wanted, triton.cdiv(max(1, n_tokens), block_n), MAX_SPLITS))


def _require_contiguous_rows(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise KvdiagError(
                f"{name} must be contiguous along its last dim (stride 1), got strides {t.stride()}"
            )


def sparse_decode_attention(
    q: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    res_k: torch.Tensor | None = None,
    res_v: torch.Tensor | None = None,
    res_len: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    sel_k: torch.Tensor | None = None,
    sel_v: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    sv: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    tail_k: torch.Tensor | None = None,
    tail_v: torch.Tensor | None = None,
    tail_len: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    n_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """[B, H_q, d] output of one decode step (q's dtype) over the sources in the module docstring.

    Every source is optional (at least one is needed); lengths default to the full R_max / T_max.
    Selected keys: `sel_k`, or `u, sv, cos, sin` to rebuild them. `out` [B, H_q, d] is written in
    place. Launch: `n_splits` (split-K partitions per KV head; default `default_n_splits`), `block_n`
    (tokens per block, a power of two ≥ 16), `num_warps`. Length and id values are checked only for
    CPU tensors (no synchronisation); the kernel masks ids outside [0, L_max).
    """
    sources = dict(res_k=res_k, res_v=res_v, ids=ids, sel_k=sel_k, sel_v=sel_v, u=u, sv=sv, cos=cos, sin=sin,
                   tail_k=tail_k, tail_v=tail_v)  # fmt: skip
    shapes = check_attention_inputs(
        q, scale=scale, softcap=softcap, res_len=res_len, tail_len=tail_len, **sources
    )
    if q.device.type != "cuda" and not _interpreting():
        raise KvdiagError(
            f"the Triton attention kernels need CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing kvdiag.kernels, or use kvdiag.kernels.naive_attend"
        )
    d = shapes.head_dim
    if d < 16 or d > 256 or d & (d - 1):
        raise KvdiagError(
            f"the Triton attention kernel needs a head dim that is a power of two in 16..256, got {d}"
        )
    _require_contiguous_rows(q=q, out=out, **sources)
    batch, n_q_heads, n_kv = shapes.batch, shapes.n_q_heads, shapes.n_kv_heads
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
        raise KvdiagError(
            f"out must be {q.dtype} {list(q.shape)} on {q.device}, got {out.dtype} {list(out.shape)} on {out.device}"
        )
    if batch == 0 or n_q_heads == 0:
        return out
    block_n = default_block_n(d) if block_n is None else block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise KvdiagError(f"block_n must be a power of two ≥ 16, got {block_n}")
    n_tokens = shapes.n_resident + shapes.n_selected + shapes.n_tail
    n_splits = default_n_splits(batch, n_kv, n_tokens, block_n) if n_splits is None else n_splits
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or not 1 <= n_splits <= 1024:
        raise KvdiagError(f"n_splits must be an integer in 1..1024, got {n_splits!r}")
    num_warps = default_num_warps(block_n) if num_warps is None else num_warps
    if num_warps not in (1, 2, 4, 8, 16):
        raise KvdiagError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps!r}")

    dummy = q  # stands in for absent sources (never read: their constexpr flags are off)
    rk, rv = (res_k, res_v) if res_k is not None else (dummy[:, :, None], dummy[:, :, None])
    tk, tv = (tail_k, tail_v) if tail_k is not None else (dummy[:, :, None], dummy[:, :, None])
    sel_mode = {"none": SEL_NONE, "direct": SEL_DIRECT, "lowrank": SEL_LOWRANK}[shapes.key_mode]
    ids_t = ids if ids is not None else dummy
    sk = sel_k if sel_k is not None else dummy[:, :, None]
    sval = sel_v if sel_v is not None else dummy[:, :, None]
    lowrank = sel_mode == SEL_LOWRANK
    u_t, f_t = (u, sv) if lowrank else (dummy, dummy[:, :, None])
    cos_t, sin_t = (cos, sin) if lowrank else (dummy[0], dummy[0])
    single = n_splits == 1
    if single:
        part_o = part_lse = out
    else:
        part_o = torch.empty(batch, n_q_heads, n_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, n_q_heads, n_splits, dtype=torch.float32, device=q.device)
    upcast = _interpreting()  # Triton 3.9's interpreter multiplies bf16 dot operands as raw uint16
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # tf32: ignored for 16-bit
    factor_precision = "ieee" if (lowrank and u.dtype == torch.float32) or upcast else "tf32"
    _sparse_decode_kernel[(batch * n_kv, n_splits)](
        q, q.stride(0), q.stride(1),
        rk, rv, shapes.res_len if res_k is not None else dummy, *rk.stride()[:3], *rv.stride()[:3],
        ids_t, *(ids_t.stride()[:3] if ids is not None else (0, 0, 0)),
        sk, sval, *sk.stride()[:3], *sval.stride()[:3],
        u_t, *u_t.stride()[:3],
        f_t, *f_t.stride()[:3],
        cos_t, sin_t, cos_t.stride(0), sin_t.stride(0),
        tk, tv, shapes.tail_len if tail_k is not None else dummy, *tk.stride()[:3], *tv.stride()[:3],
        out, out.stride(0), out.stride(1),
        part_o, part_lse,
        n_kv, shapes.n_selected, shapes.n_positions, shapes.rank, n_splits, float(scale),
        float(softcap) if softcap is not None else 1.0,
        GROUP=shapes.group, G_PAD=max(16, triton.next_power_of_2(shapes.group)), HEAD_DIM=d, BLOCK_N=block_n,
        BLOCK_R=16 if shapes.rank <= 16 else 32, HAS_RES=res_k is not None, SEL_MODE=sel_mode,
        HAS_TAIL=tail_k is not None, HAS_SOFTCAP=softcap is not None, SINGLE=single, PRECISION=precision,
        FACTOR_PRECISION=factor_precision, UPCAST=upcast, num_warps=num_warps,
    )  # fmt: skip
    if not single:
        _combine_kernel[(batch * n_q_heads,)](
            part_o, part_lse, out, n_q_heads, n_splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, S_PAD=max(2, triton.next_power_of_2(n_splits)), num_warps=4,
        )  # fmt: skip
    return out
