"""Triton kernels of kvdiag (import name `kvdiag.kernels`). Import-light on purpose: importing this
package imports neither triton nor torch; import the kernel modules where they are used.

- `kvdiag.kernels.landmark_scores`: `landmark_scores(q, landmarks, rule, scale)` and
  `landmark_topk(q, landmarks, k, rule, scale)`, one decode step's landmark scores per KV head
  (YAKV per-token landmarks, ShadowKV chunk landmarks), Triton.
- `kvdiag.kernels.gather`: `gather_rows(src, ids)`, the selected K/V rows from pinned host memory
  to the GPU (zero-copy over UVA, one launch for a (K, V) pair), Triton; `cuda_view_of_pinned`.
- `kvdiag.kernels.decode_attention`: `sparse_decode_attention(q, ...)`, one decode step over resident,
  fetched (direct, fp8, or rebuilt low-rank + RoPE keys) and generated K/V, split-K, Triton.
- `kvdiag.kernels.naive`: the plain-PyTorch references the tests and benchmarks compare against.
- `kvdiag.kernels.naive_attend`: the references of the gather and the sparse decode attention.

Selection side of the offload runtime (batched: q [B, H_q, d], per-row lengths [B] int32):
- `kvdiag.kernels.higgs_scores`: `higgs_landmark_scores(q, codes, scales, grid, n_scored, n_kv_heads,
  rule)`, YAKV's per-token landmarks scored straight from their 2-bit HIGGS codes.
- `kvdiag.kernels.batched_scores`: `batched_landmark_scores(q, landmarks, n_landmarks, rule)`, bf16
  landmarks (ShadowKV chunk means), both rules.
- `kvdiag.kernels.page_scores`: `page_bound_scores(q, box_max, box_min, n_pages, reduce)`, Quest
  (per query head) and ArkVale (group mean) page bounds.
- `kvdiag.kernels.topk`: `topk_ids(scores, k, valid)` (radix select, ids ascending, -1 padded) and
  `topk_blocks` / `expand_block_ids` for block scores.
- `kvdiag.kernels.softmax_merge`, `kvdiag.kernels.select_inputs`: the shared softmax_max pass 2 and
  input checks; `kvdiag.kernels.naive_select`: the selection kernels' plain-PyTorch references.
"""
