"""Helpers the methods share: GQA score reductions, top-k masks, chunk layout, quantizer access,
byte accounting and knob validation. Function names here are stable: other method files import them.

Shapes as in `kvdiag.methods.base`: q [n, H_q, d] (n independent decode steps), keys/landmarks
[H_kv, C, d], G = H_q // H_kv and query head h belongs to KV head h // G.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from kvdiag.errors import KvdiagError
from kvdiag.methods.base import Selection

BF16_BYTES = 2  # bytes of one bf16 / fp16 value: the precision of resident exact K/V and factors
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- GQA score reductions -------------------------------------------------------------------------


def by_kv_head(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[n, H_q, d] -> [n, H_kv, G, d] (query head h -> KV head h // G)."""
    n, n_q_heads, d = q.shape
    if n_q_heads % n_kv_heads:
        raise KvdiagError(f"{n_q_heads} query heads do not split evenly over {n_kv_heads} KV heads")
    return q.reshape(n, n_kv_heads, n_q_heads // n_kv_heads, d)


def softmax_max_scores(q: torch.Tensor, landmarks: torch.Tensor, scale: float) -> torch.Tensor:
    """The GQA rule of ShadowKV and YAKV (and kvdiag's oracle): [n, H_kv, C] scores.

    Per query head, softmax over the C landmarks of q·l·scale; then the max over the G query heads of
    each KV head. Each of the n rows is one single-query decode step, so ShadowKV's "sum over the
    query positions of a step" is a sum over one term. q [n, H_q, d], landmarks [H_kv, C, d].
    """
    n_kv, n_landmarks, _ = landmarks.shape
    qg = by_kv_head(q.float(), n_kv)  # [n, H_kv, G, d]
    if n_landmarks == 0:
        return qg.new_zeros(qg.shape[0], n_kv, 0)
    logits = torch.einsum("nhgd,hcd->nhgc", qg, landmarks.float()) * scale  # [n, H_kv, G, C]
    return logits.softmax(dim=-1).amax(dim=2)


def mean_query_scores(q: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """The GPU-runtime rule: query averaged over the G heads of a KV head, raw dot product: [n, H_kv, C]."""
    qg = by_kv_head(q.float(), landmarks.shape[0])
    return torch.einsum("nhd,hcd->nhc", qg.mean(dim=2), landmarks.float())


def box_upper_bound_scores(q: torch.Tensor, box_max: torch.Tensor, box_min: torch.Tensor) -> torch.Tensor:
    """Quest's per-query-head page score Σ_d max(q_d·max_d, q_d·min_d): [n, H_q, P], unscaled.

    q [n, H_q, d]; box_max/box_min [H_kv, P, d] are repeated over the GQA group. The score is an upper
    bound of q·k for every key k inside the box [min, max].
    """
    n, n_q_heads, _ = q.shape
    group = n_q_heads // box_max.shape[0]
    hi = box_max.float().repeat_interleave(group, dim=0)  # [H_q, P, d]
    lo = box_min.float().repeat_interleave(group, dim=0)
    qf = q.float()[:, :, None, :]  # [n, H_q, 1, d]
    return torch.maximum(qf * hi, qf * lo).sum(dim=-1)


# --- masks ----------------------------------------------------------------------------------------


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores along the last dim (k clamped to 0..C)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = max(0, min(int(k), scores.shape[-1]))
    if k:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask


def chunks_to_tokens(
    slot_mask: torch.Tensor, slot_chunks: torch.Tensor, chunk: int, n_tokens: int
) -> torch.Tensor:
    """Spread a mask over landmark slots to the tokens of their chunks.

    slot_mask [n, H, C] bool over landmark slots; slot_chunks [H, C] long, the chunk id of each slot
    (chunk c covers tokens c·chunk .. c·chunk + chunk - 1). Returns [n, H, n_tokens] bool.
    """
    n, n_heads, n_slots = slot_mask.shape
    out = torch.zeros(n, n_heads, n_tokens, dtype=torch.bool, device=slot_mask.device)
    if n_slots == 0:
        return out
    offsets = torch.arange(chunk, device=slot_chunks.device)
    token_ids = (slot_chunks[:, :, None] * chunk + offsets).reshape(n_heads, n_slots * chunk)
    out.scatter_(-1, token_ids.expand(n, -1, -1), slot_mask.repeat_interleave(chunk, dim=-1))
    return out


# --- selections and bytes -------------------------------------------------------------------------


@dataclass
class PricedSelection(Selection):
    """A Selection that also knows what one fetched entry costs, so `fetched_bytes(selection)` works.

    entry_bytes: host bytes read per fetched (KV head, token) entry (K and/or V at their precision).
    n_kv_heads:  for per-query-head selections, the KV head count: the query heads of a group share
                 one KV row, so a token any of them selects is fetched once.
    """

    entry_bytes: float = 0.0
    n_kv_heads: int = 0


def make_selection(
    selected: torch.Tensor,
    always: torch.Tensor | None,
    entry_bytes: float,
    *,
    fetch_always: bool = False,
    per_query_head: bool = False,
    n_kv_heads: int = 0,
) -> PricedSelection:
    """mask = selected ∪ always-kept; fetched = selected minus the GPU-resident always-kept tokens.

    selected [n, H_sel, L] bool; always [H_sel, L] or [n, H_sel, L] bool (or None). With
    fetch_always the always-kept tokens are read from host memory too (nothing of them is resident).
    """
    if always is None:
        mask = selected.clone()
    else:
        mask = selected | always.expand_as(selected)
    fetched = mask.clone() if fetch_always or always is None else selected & ~always.expand_as(selected)
    return PricedSelection(
        mask=mask,
        fetched=fetched,
        per_query_head=per_query_head,
        entry_bytes=float(entry_bytes),
        n_kv_heads=n_kv_heads,
    )


def priced_fetched_bytes(selection: Selection) -> float:
    """Host bytes per decode step (mean over the n steps) of a `PricedSelection`."""
    if not isinstance(selection, PricedSelection):
        raise KvdiagError("fetched_bytes needs the Selection returned by the same method's select()")
    fetched = selection.fetched
    n, n_heads, n_tokens = fetched.shape
    if selection.per_query_head and selection.n_kv_heads:
        fetched = fetched.reshape(n, selection.n_kv_heads, n_heads // selection.n_kv_heads, n_tokens).any(
            dim=2
        )
    return float(fetched.sum().item()) / max(n, 1) * selection.entry_bytes


def take_tokens(x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """x [H, L, d] -> x itself, or [H, k, d] gathered at ids [H, k]."""
    if ids is None:
        return x
    ids = torch.as_tensor(ids, device=x.device, dtype=torch.long)
    return x.gather(1, ids[:, :, None].expand(-1, -1, x.shape[-1]))


def kv_bytes(n_tokens: int, n_kv_heads: int, head_dim: int, *, keys: bool = True, values: bool = True) -> int:
    """Bytes of exact bf16 K and/or V for n_tokens tokens of one layer."""
    return n_tokens * n_kv_heads * head_dim * BF16_BYTES * (int(keys) + int(values))


# --- quantizers -----------------------------------------------------------------------------------


def get_quantizer(spec: str) -> Any:
    """`kvdiag.quant.get_quantizer(spec)`: an object with .roundtrip(x), .bits_per_value, .bytes_per_row(n)."""
    from kvdiag.quant import get_quantizer as _get

    return _get(spec)


def roundtrip_rows(spec: str, x: torch.Tensor) -> torch.Tensor:
    """Quantize and dequantize per-head tensors the way the upstream code does: x [H, N, d] is laid out
    as N rows of H·d channels (all heads of a token in one row), round-tripped, and laid back."""
    n_heads, n_rows, d = x.shape
    if n_rows == 0:
        return x.float()
    rows = x.float().transpose(0, 1).reshape(n_rows, n_heads * d)
    out = get_quantizer(spec).roundtrip(rows).float()
    return out.reshape(n_rows, n_heads, d).transpose(0, 1).contiguous()


def row_bytes(spec: str, n_channels: int) -> float:
    """Bytes of one stored row of n_channels values (codes plus scales) in format `spec`."""
    return float(get_quantizer(spec).bytes_per_row(n_channels))


# --- ranks ----------------------------------------------------------------------------------------


def scaled_rank(rank: int, n_channels: int, reference_channels: int = 1024) -> int:
    """A rank given for `reference_channels` channels, scaled to n_channels: round(rank·C/ref), ≥ 1.

    >>> scaled_rank(160, 1024), scaled_rank(160, 512), scaled_rank(160, 192)
    (160, 80, 30)
    """
    return max(1, round(rank * n_channels / reference_channels))


# --- knob validation (used in each method's __post_init__) ----------------------------------------


def check_int(method: str, knob: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise a KvdiagError naming the value and the valid range unless value is an int in lo..hi."""
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    )
    if not ok:
        valid = f"an integer in {lo}..{hi}" if hi is not None else f"an integer ≥ {lo}"
        raise KvdiagError(f"{method}: {knob}={value!r} is invalid; use {valid}")


def check_float(method: str, knob: str, value: Any, lo: float, hi: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok or math.isnan(float(value)):
        raise KvdiagError(f"{method}: {knob}={value!r} is invalid; use a number in [{lo}, {hi}]")


def check_choice(method: str, knob: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise KvdiagError(
            f"{method}: {knob}={value!r} is invalid; use one of {', '.join(map(repr, choices))}"
        )


def check_quant_spec(method: str, knob: str, spec: Any) -> None:
    """Raise a KvdiagError unless `spec` names a quantizer of kvdiag.quant."""
    if not isinstance(spec, str) or not spec:
        raise KvdiagError(f"{method}: {knob}={spec!r} is invalid; use a quantizer spec such as 'bf16'")
    try:
        get_quantizer(spec)
    except KvdiagError as err:
        raise KvdiagError(f"{method}: {knob}={spec!r} is invalid: {err}") from err
