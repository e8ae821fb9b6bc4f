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
"""
