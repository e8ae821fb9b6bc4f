"""Attention math, written once: GQA logits, masked softmax attention, and exact attention for
chosen query positions without materialising all L×L scores of all heads.

`gqa_logits` + `attend` (= `masked_attention`) are the one masked GQA attention every consumer uses:
exact attention here, recall's error decomposition (`kvdiag.analysis.recall`), the simulator's decode
(`kvdiag.offload.simulate`) and the runtime's reference.

Queries are processed in chunks of `chunk_size` positions, so peak memory is
H_q · chunk_size · L floats, not H_q · L · L. GQA is handled by grouping query heads
([H_kv, G, n, d] against [H_kv, L, d]) rather than repeating keys.

Masking follows the model: query at position p sees keys at positions ≤ p, and, on sliding-window
layers, only the last `sliding_window` of them (p − window < j ≤ p, as transformers does).
Scores are (q·k)·scaling, optionally soft-capped (Gemma-2 style: cap·tanh(s / cap)).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvdiag.errors import KvdiagError

DEFAULT_CHUNK = 256


def _check(q: torch.Tensor, k: torch.Tensor, query_positions: torch.Tensor, chunk_size: int) -> None:
    if q.shape[0] % k.shape[0]:
        raise KvdiagError(f"{q.shape[0]} query heads are not a multiple of {k.shape[0]} KV heads")
    if q.shape[-1] != k.shape[-1]:
        raise KvdiagError(f"query head_dim {q.shape[-1]} differs from key head_dim {k.shape[-1]}")
    if query_positions.numel() == 0:
        raise KvdiagError("no query positions given")
    last = min(k.shape[1], q.shape[1]) - 1
    if query_positions.min() < 0 or query_positions.max() > last:
        raise KvdiagError(
            f"query positions must lie in 0..{last} (queries: {q.shape[1]}, keys: {k.shape[1]})"
        )
    if chunk_size < 1:
        raise KvdiagError(f"chunk_size {chunk_size} must be ≥ 1")


def gqa_logits(
    q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention logits of queries q [..., H_q, n, d] against keys k [..., H_kv, P, d] (same leading
    dims, e.g. a batch): [..., H_q, n, P] float32, (q·k)·scaling, soft-capped (cap·tanh(x / cap))
    when `softcap` is set. Query head h reads KV head h // G (heads grouped, keys never repeated)."""
    *lead, h_kv, length, d = k.shape
    n_q = q.shape[-3]
    qg = q.float().reshape(*lead, h_kv, n_q // h_kv, q.shape[-2], d)
    logits = torch.einsum("...hgcd,...hld->...hgcl", qg, k.float()).reshape(*lead, n_q, q.shape[-2], length)
    logits = logits * scaling
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def attend(logits: torch.Tensor, mask: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys, then the weighted values: logits [..., H_q, n, P], mask
    broadcastable to it (bool, True = attended; None = all), v [..., H_kv, P, d] -> [..., H_q, n, d]
    float32."""
    *lead, h_kv, length, d = v.shape
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    n_q, n = logits.shape[-3], logits.shape[-2]
    weights = torch.softmax(logits, dim=-1).reshape(*lead, h_kv, n_q // h_kv, n, length)
    return torch.einsum("...hgcl,...hld->...hgcd", weights, v.float()).reshape(*lead, n_q, n, d)


def masked_attention(q, k, v, mask, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Masked GQA attention: q [..., H_q, n, d], k/v [..., H_kv, P, d], mask broadcastable to
    [..., H_q, n, P] -> [..., H_q, n, d] float32."""
    return attend(gqa_logits(q, k, scaling, softcap), mask, v)


def _masked_logits(
    q_chunk: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """[H_q, c, d] queries at `positions` [c] against k [H_kv, L, d] -> causally masked logits [H_q, c, L]."""
    logits = gqa_logits(q_chunk, k, scaling, softcap)
    length = k.shape[-2]
    key_pos = torch.arange(length, device=k.device)
    allowed = key_pos[None, :] <= positions[:, None]
    if sliding_window:
        allowed &= key_pos[None, :] > positions[:, None] - sliding_window
    return logits.masked_fill(~allowed, float("-inf"))


def iter_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (slice into query_positions, masked logits [H_q, c, L]) chunk by chunk.

    q: [H_q, Lq, d] queries indexed by position (Lq ≥ max position + 1, usually the prompt's q);
    k: [H_kv, L, d] post-RoPE keys.
    """
    query_positions = torch.as_tensor(query_positions, device=k.device).long()
    _check(q, k, query_positions, chunk_size)
    for start in range(0, query_positions.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        pos = query_positions[part]
        yield part, _masked_logits(q[:, pos], k, pos, scaling, sliding_window, softcap)


def attention_weights(
    q, k, query_positions, scaling, sliding_window=None, softcap=None, chunk_size=DEFAULT_CHUNK
):
    """Softmax attention weights [H_q, n, L] (float32) of the n chosen query positions."""
    parts = [torch.softmax(lg, dim=-1) for _, lg in iter_logits(q, k, query_positions, scaling,
                                                               sliding_window, softcap, chunk_size)]  # fmt: skip
    return torch.cat(parts, dim=1)


def topk_tokens(
    q, k, query_positions, top_k: int, scaling, sliding_window=None, softcap=None, chunk_size=DEFAULT_CHUNK
) -> torch.Tensor:
    """Indices [H_q, n, top_k] of the keys with the largest exact scores, per query head and position.

    Masked keys score −inf and rank last: ask for at most as many as the earliest query can see.
    """
    if top_k < 1 or top_k > k.shape[1]:
        raise KvdiagError(f"top_k {top_k} is outside 1..{k.shape[1]}")
    parts = [lg.topk(top_k, dim=-1).indices for _, lg in iter_logits(q, k, query_positions, scaling,
                                                                    sliding_window, softcap, chunk_size)]  # fmt: skip
    return torch.cat(parts, dim=1)


def attention_output(
    q, k, v, query_positions, scaling, sliding_window=None, softcap=None, chunk_size=DEFAULT_CHUNK
) -> torch.Tensor:
    """Exact attention output [H_q, n, d] (float32) at the chosen positions; v: [H_kv, L, d]."""
    outs = [attend(logits, None, v) for _, logits in iter_logits(q, k, query_positions, scaling,
                                                                sliding_window, softcap, chunk_size)]  # fmt: skip
    return torch.cat(outs, dim=1)


def trace_attention_output(trace, layer: int, query_positions=None, chunk_size: int = DEFAULT_CHUNK):
    """Exact attention output [H_q, n, d] of a captured layer (all prompt positions by default)."""
    info = trace.layer_meta(layer)
    if query_positions is None:
        query_positions = torch.arange(trace.n_tokens)
    return attention_output(
        trace.q(layer), trace.k_post(layer), trace.v(layer), query_positions, info["scaling"],
        info["sliding_window"], info["softcap"], chunk_size,
    )  # fmt: skip
