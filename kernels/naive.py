"""Plain-PyTorch references of the landmark-scoring kernels (`kvdiag.kernels.landmark_scores`).

Obviously correct and slow on purpose: the tests compare the Triton kernels against these, and the
benchmark times them as the baseline. One decode step, one layer:

    q          [H_q, d]        the step's queries (bf16 / fp16 / fp32), post-RoPE
    landmarks  [H_kv, N, d]    one landmark per token (YAKV) or per 8-token chunk (ShadowKV)
    scores     [H_kv, N]       fp32, per KV head; query head h belongs to KV head h // G, G = H_q / H_kv

Rules (`RULES`), as `softmax_max_scores` / `mean_query_scores` below compute them for n decode
steps (the one PyTorch reference of each rule, which the methods use too):
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


def _by_kv_head(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[..., H_q, d] -> [..., H_kv, G, d] (query head h -> KV head h // G)."""
    n_q_heads, d = q.shape[-2:]
    if n_q_heads % n_kv_heads:
        raise KvdiagError(f"{n_q_heads} query heads do not split evenly over {n_kv_heads} KV heads")
    return q.reshape(*q.shape[:-2], n_kv_heads, n_q_heads // n_kv_heads, d)


def _batched(q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Bring q [n, H_q, d] / keys [H_kv, N, d] (one row) or q [B, n, H_q, d] / keys [B, H_kv, N, d]
    (a batch of rows) to the batched form; the flag says whether the input was batched."""
    if keys.dim() == 3:
        return q[None], keys[None], False
    return q, keys, True


def valid_blocks(n_valid: torch.Tensor | None, n_blocks: int, batch: int, device) -> torch.Tensor:
    """[B, 1, 1, N] bool: block j of row b is real (j < n_valid[b]); all real when n_valid is None."""
    if n_valid is None:
        return torch.ones(batch, 1, 1, n_blocks, dtype=torch.bool, device=device)
    return (torch.arange(n_blocks, device=device) < n_valid.to(device)[:, None])[:, None, None, :]


def softmax_max_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    scale: float,
    numerics: str = "fp32",
    dtype: torch.dtype = torch.float32,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GQA rule of ShadowKV and YAKV (and kvdiag's oracle): per query head, softmax over the N
    landmarks of q·l·scale; then the max over the G query heads of each KV head.

    One row: q [n, H_q, d] (n independent single-query decode steps), landmarks [H_kv, N, d] ->
    [n, H_kv, N]. A batch of rows: q [B, n, H_q, d], landmarks [B, H_kv, N, d] (padded) with
    n_valid [B] real landmarks per row -> [B, n, H_kv, N], padding excluded from the softmax and
    scored -inf.
    numerics "fp32": everything in `dtype` (float32; float64 for high-precision checks). "bf16":
    upstream's arithmetic on a bf16 model (the study's `get_retrieval_position_ids`): bf16 logits (a
    bf16 matmul, fp32 accumulation) divided by 1/scale (= √d) in bf16, softmax computed in fp32 and rounded
    to bf16, the max taken in bf16.
    """
    if numerics not in ("fp32", "bf16"):
        raise KvdiagError(f"numerics {numerics!r} is unknown; use 'fp32' or 'bf16'")
    q, landmarks, batched = _batched(q, landmarks)
    b, n_kv, n_landmarks, _ = landmarks.shape
    work = torch.bfloat16 if numerics == "bf16" else dtype
    qg = _by_kv_head(q.to(work), n_kv)  # [B, n, H_kv, G, d]
    if n_landmarks == 0:
        out = qg.new_zeros(b, qg.shape[1], n_kv, 0, dtype=torch.float32)
        return out if batched else out[0]
    logits = torch.einsum("bnhgd,bhcd->bnhgc", qg, landmarks.to(work))  # [B, n, H_kv, G, N]
    # upstream divides by √d (in bf16); a multiplication by 1/√d can round differently there
    logits = logits / (1.0 / scale) if numerics == "bf16" else logits * scale
    valid = valid_blocks(n_valid, n_landmarks, b, logits.device)[..., None, :]  # [B, 1, 1, 1, N]
    logits = logits.masked_fill(~valid, float("-inf"))
    if numerics == "bf16":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(torch.bfloat16)
    else:
        probs = logits.softmax(dim=-1)
    out = probs.amax(dim=3).to(torch.float32 if numerics == "bf16" else dtype)
    out = out.masked_fill(~valid[..., 0, :], float("-inf"))
    return out if batched else out[0]


def mean_query_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GPU-runtime rule: the G queries of a KV head averaged, raw dot product with every
    landmark. Shapes as `softmax_max_scores` (padding scored -inf)."""
    q, landmarks, batched = _batched(q, landmarks)
    qg = _by_kv_head(q.to(dtype), landmarks.shape[1])  # [B, n, H_kv, G, d]
    out = torch.einsum("bnhd,bhcd->bnhc", qg.mean(dim=3), landmarks.to(dtype))
    out = out.masked_fill(~valid_blocks(n_valid, out.shape[-1], out.shape[0], out.device), float("-inf"))
    return out if batched else out[0]


def box_upper_bound_scores(
    q: torch.Tensor, box_max: torch.Tensor, box_min: torch.Tensor, n_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Quest's per-query-head page score Σ_d max(q_d·max_d, q_d·min_d), unscaled (ArkVale averages it
    over a group). One row: q [n, H_q, d], boxes [H_kv, P, d] (repeated over the GQA group) ->
    [n, H_q, P]; a batch: q [B, n, H_q, d], boxes [B, H_kv, P, d], n_valid [B] -> [B, n, H_q, P],
    padding -inf. The score is an upper bound of q·k for every key k inside the box [min, max]."""
    q, box_max, batched = _batched(q, box_max)
    box_min = box_min if box_min.dim() == 4 else box_min[None]
    n_q_heads = q.shape[-2]
    group = n_q_heads // box_max.shape[1]
    hi = box_max.float().repeat_interleave(group, dim=1)[:, None]  # [B, 1, H_q, P, d]
    lo = box_min.float().repeat_interleave(group, dim=1)[:, None]
    qf = q.float()[..., None, :]  # [B, n, H_q, 1, d]
    out = torch.maximum(qf * hi, qf * lo).sum(dim=-1)  # [B, n, H_q, P]
    out = out.masked_fill(~valid_blocks(n_valid, out.shape[-1], out.shape[0], out.device), float("-inf"))
    return out if batched else out[0]


def naive_landmark_scores(
    q: torch.Tensor,
    landmarks: torch.Tensor,
    rule: str = "softmax_max",
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[H_kv, N] scores of one decode step's q [H_q, d] under `rule` (see the module docstring),
    computed and returned in `compute_dtype` (fp32, as the kernels; float64 for a higher-precision
    check). The same rules as `softmax_max_scores` / `mean_query_scores`, for one step."""
    _, _, _, _, scale = check_landmark_inputs(q, landmarks, rule, scale)
    if rule == "mean_query":
        return mean_query_scores(q[None], landmarks, dtype=compute_dtype)[0]
    return softmax_max_scores(q[None], landmarks, scale, dtype=compute_dtype)[0]


def check_k(k: int, n_landmarks: int) -> int:
    """k clamped to N (as the methods' top-k); negative or non-int k is an error."""
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
