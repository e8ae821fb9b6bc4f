"""Plain-PyTorch references of the landmark-scoring kernels (`kvdiag.kernels.landmark_scores`).

Obviously correct and slow on purpose: the tests compare the Triton kernels against these, and the
benchmark times them as the baseline. One decode step, one layer:

    q          [H_q, d]        the step's queries (bf16 / fp16 / fp32), post-RoPE
    landmarks  [H_kv, N, d]    one landmark per token (YAKV) or per 8-token chunk (ShadowKV)
    scores     [H_kv, N]       fp32, per KV head; query head h belongs to KV head h // G, G = H_q / H_kv

Rules (`RULES`), the same as `kvdiag.methods._scoring` for one decode step:
- "softmax_max" (ShadowKV, YAKV's simulator): per query head, softmax over the N landmarks of
  q·l·scale (scale = 1/√d unless given), then the max over the G query heads of each KV head.
- "mean_query" (YAKV's GPU runtime): the query averaged over the G heads of a KV head, raw dot
  product with every landmark (no scale, no softmax).
"""

from __future__ import annotations

import math

import torch

from kvdiag.errors import KvdiagError

RULES = ("softmax_max", "mean_query")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_landmark_inputs(
    q: torch.Tensor, landmarks: torch.Tensor, rule: str, scale: float | None
) -> tuple[int, int, int, int, float | None]:
    """Validate one step's inputs; return (H_kv, G, N, d, scale) with the default scale filled in.

    Raises KvdiagError naming the bad value and what would be valid.
    """
    check_rule(rule, scale, 1)  # rule first: its error is the most useful one
    for name, t, ndim, shape in (("q", q, 2, "[H_q, d]"), ("landmarks", landmarks, 3, "[H_kv, N, d]")):
        if not isinstance(t, torch.Tensor):
            raise KvdiagError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
        if t.dim() != ndim:
            raise KvdiagError(f"{name} must be {shape} ({ndim} dims), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise KvdiagError(f"{name} must be bf16, fp16 or fp32, got {t.dtype}")
    n_q_heads, d = q.shape
    n_kv_heads, n_landmarks, d_landmarks = landmarks.shape
    if d != d_landmarks:
        raise KvdiagError(f"head dims differ: q has d={d}, landmarks have d={d_landmarks}")
    if d == 0:
        raise KvdiagError("head dim d must be ≥ 1, got 0")
    if n_kv_heads == 0 or n_q_heads == 0 or n_q_heads % n_kv_heads:
        raise KvdiagError(
            f"{n_q_heads} query heads do not split evenly over {n_kv_heads} KV heads "
            "(H_q must be a positive multiple of H_kv)"
        )
    if q.device != landmarks.device:
        raise KvdiagError(f"q is on {q.device} but landmarks are on {landmarks.device}")
    return n_kv_heads, n_q_heads // n_kv_heads, n_landmarks, d, check_rule(rule, scale, d)


def check_rule(rule: str, scale: float | None, head_dim: int) -> float | None:
    """The rule's scale: 1/√d by default for "softmax_max"; None (raw dot) for "mean_query"."""
    if rule not in RULES:
        raise KvdiagError(f"unknown landmark scoring rule {rule!r}; use one of {', '.join(RULES)}")
    if rule == "mean_query":
        if scale is not None:
            raise KvdiagError("rule 'mean_query' ranks by the raw dot product: pass scale=None")
        return None
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        raise KvdiagError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def naive_landmark_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    rule: str = "softmax_max",
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[H_kv, N] scores of every landmark under `rule` (see the module docstring), computed and
    returned in `compute_dtype` (fp32, as the kernels; float64 for a higher-precision check)."""
    n_kv_heads, group, _, d, scale = check_landmark_inputs(q, landmarks, rule, scale)
    q_groups = q.to(compute_dtype).reshape(n_kv_heads, group, d)  # [H_kv, G, d]
    keys = landmarks.to(compute_dtype)  # [H_kv, N, d]
    if rule == "mean_query":
        q_mean = q_groups.mean(dim=1)  # [H_kv, d]
        return torch.bmm(keys, q_mean[:, :, None]).squeeze(-1)  # [H_kv, N]
    logits = torch.bmm(q_groups, keys.transpose(1, 2)) * scale  # [H_kv, G, N]
    return torch.softmax(logits, dim=-1).amax(dim=1)  # [H_kv, N]


def check_k(k: int, n_landmarks: int) -> int:
    """k clamped to N (as `kvdiag.methods._scoring.topk_mask`); negative or non-int k is an error."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise KvdiagError(f"top-k needs an integer k ≥ 0, got {k!r}")
    return min(k, n_landmarks)


def naive_landmark_topk(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    k: int,
    rule: str = "softmax_max",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [H_kv, k] fp32, indices [H_kv, k] int64) of the k best landmarks per KV head."""
    scores = naive_landmark_scores(q, landmarks, rule, scale)
    return tuple(scores.topk(check_k(k, scores.shape[-1]), dim=-1))
