"""The second half of every batched "softmax_max" scoring kernel (bf16 landmarks, HIGGS codes).

"softmax_max" needs each query head's softmax normaliser over the whole row before the max over the
G heads of a KV head can be taken, so scoring is two launches:

1. pass 1 (in `batched_scores` / `higgs_scores`), grid (H_kv, n_splits, B): each program loops over a
   contiguous split of its row's landmarks, writes the G logits of every landmark (fp32, log2 units:
   scale·log2 e folded into the query) to a workspace `logits [B, H_q, L_max]`, and keeps a running
   max and Σ 2^(x − max) per query head (`online_softmax_update`), written once per split to
   `split_max, split_sum [B, H_q, n_splits]`. Splits are sized so that the whole grid is a few
   programs per SM: at 128K tokens, B = 1, H_kv = 8 that is ~64 splits, so pass 2 merges 64 pairs
   per head, not one per 64-token block.
2. `launch_softmax_merge` (this module), grid (H_kv, ⌈L_max / BLOCK⌉, B): merges the split statistics
   of its G heads into the row max M and sum S, reads the G logits of each landmark and writes
   max_g 2^(x_g − M_g) / S_g; positions at or beyond the row's length get -inf.

Bytes per landmark added by the workspace: 2·H_q·4 / H_kv per KV head (write + read of G fp32
logits) + 4 for the output; split statistics are negligible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_MERGE = 1024  # landmarks per program of the merge (pure streaming, no dot)
BLOCK_SPLITS = 64  # split statistics merged per step


@triton.jit
def online_softmax_update(x, run_max, run_sum):
    """Fold a tile of logits x [BLOCK_N, GROUP_PAD] (log2 units, -inf where masked) into the running
    per-head max and Σ 2^(x − max), both [GROUP_PAD]."""
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp2(run_max - safe_max) + tl.sum(tl.exp2(x - safe_max[None, :]), axis=0)
    return new_max, run_sum


@triton.jit
def _softmax_merge(
    logits_ptr,  # [B, H_q, L_max] fp32, log2 units (written below each row's length only)
    split_max_ptr,  # [B, H_q, n_splits] fp32
    split_sum_ptr,  # [B, H_q, n_splits] fp32
    lengths_ptr,  # [B] int32
    out_ptr,  # [B, H_kv, L_max] fp32
    max_len,
    n_q_heads,
    n_splits,
    stride_ob,
    stride_oh,
    stride_on,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(lengths_ptr + b), max_len)
    offs_g = tl.arange(0, GROUP_PAD)
    mask_g = offs_g < GROUP
    rows = b * n_q_heads + kv_head * GROUP + offs_g  # [GROUP_PAD] rows of the workspace
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < length
    out_ptrs = out_ptr + b * stride_ob + kv_head * stride_oh + offs_n * stride_on
    if block * BLOCK_N >= length:  # nothing valid here: only the -inf padding
        tl.store(out_ptrs, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=offs_n < max_len)
        return
    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    for start in range(0, n_splits, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        mask = mask_g[:, None] & (offs_s < n_splits)[None, :]
        offsets = rows[:, None] * n_splits + offs_s[None, :]
        smax = tl.load(split_max_ptr + offsets, mask=mask, other=float("-inf"))
        ssum = tl.load(split_sum_ptr + offsets, mask=mask, other=0.0)
        new_max = tl.maximum(row_max, tl.max(smax, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe) + tl.sum(ssum * tl.exp2(smax - safe[:, None]), axis=1)
        row_max = new_max
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    x = tl.load(
        logits_ptr + rows[:, None] * max_len + offs_n[None, :],
        mask=mask_g[:, None] & valid[None, :],
        other=float("-inf"),
    )  # [GROUP_PAD, BLOCK_N]
    probs = tl.max(tl.exp2(x - safe_max[:, None]) / safe_sum[:, None], axis=0)
    tl.store(out_ptrs, tl.where(valid, probs, float("-inf")), mask=offs_n < max_len)


def softmax_workspace(batch: int, n_q_heads: int, max_len: int, n_splits: int, device, poison: bool = False):
    """(logits [B, H_q, L_max], split_max, split_sum [B, H_q, n_splits]) fp32; NaN-filled if `poison`
    (the tests' check that nothing unwritten is read)."""
    make = torch.full if poison else torch.empty
    fill = (float("nan"),) if poison else ()
    logits = make((batch, n_q_heads, max_len), *fill, dtype=torch.float32, device=device)
    split_max = make((batch, n_q_heads, n_splits), *fill, dtype=torch.float32, device=device)
    split_sum = make((batch, n_q_heads, n_splits), *fill, dtype=torch.float32, device=device)
    return logits, split_max, split_sum


def launch_softmax_merge(logits, split_max, split_sum, lengths, out, group: int) -> torch.Tensor:
    """Pass 2: out [B, H_kv, L_max] = max over each KV head's G query heads of the normalised
    softmax, from pass 1's workspace (see the module docstring)."""
    batch, n_q_heads, max_len = logits.shape
    n_kv_heads = n_q_heads // group
    n_splits = split_max.shape[-1]
    block_n = min(BLOCK_MERGE, max(16, triton.next_power_of_2(max_len)))
    grid = (n_kv_heads, triton.cdiv(max_len, block_n), batch)
    _softmax_merge[grid](
        logits, split_max, split_sum, lengths, out, max_len, n_q_heads, n_splits, *out.stride(),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_N=block_n, BLOCK_S=BLOCK_SPLITS,
        num_warps=4,
    )  # fmt: skip
    return out
