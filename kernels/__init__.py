"""Triton kernels of kvdiag (import name `kvdiag.kernels`). Import-light on purpose: importing this
package imports neither triton nor torch; import the kernel modules where they are used.

- `kvdiag.kernels.landmark_scores`: `landmark_scores(q, landmarks, rule, scale)` and
  `landmark_topk(q, landmarks, k, rule, scale)`, one decode step's landmark scores per KV head
  (YAKV per-token landmarks, ShadowKV chunk landmarks), Triton.
- `kvdiag.kernels.naive`: the plain-PyTorch references the tests and benchmarks compare against.
"""
