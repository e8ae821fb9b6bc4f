"""Oracle top-k: the best selection any landmark scheme could make at the same budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import (
    BF16_BYTES,
    kv_bytes,
    make_selection,
    priced_fetched_bytes,
    softmax_max_scores,
    take_tokens,
    topk_mask,
)
from kvdiag.methods.base import LayerKV, Method, Selection, resolve_budget


@dataclass
class Oracle(Method):
    """Exact q·k top-k per KV head, with the GQA rule of ShadowKV and YAKV (the selection upper bound).

    Score of prompt token j for KV head h: max over the G query heads of h of softmax_j(q·k_j ·
    scaling), with the model's own softmax scaling (1/√d for Llama and Qwen) and exact post-RoPE
    keys; the `budget` best tokens are attended, nothing else (no local window, no sinks). This is
    the "oracle" of arXiv 2604.08426 (claim 2), which the paper compares with landmark selection.

    Bytes: an oracle is not a runtime method; kvdiag charges it the full bf16 keys as resident
    (scoring needs them) and the bf16 values of the selected tokens as fetched.
    """

    name: ClassVar[str] = "oracle"
    paper: ClassVar[str] = (
        "oracle top-k baseline of arXiv 2604.08426 (yandex-research/context-intensive-kv-offloading)"
    )

    def build(self, layer: LayerKV) -> LayerKV:
        return layer

    def scores(self, index: LayerKV, q: torch.Tensor) -> torch.Tensor:
        """[n, H_kv, L] selection scores of every prompt token."""
        return softmax_max_scores(q, index.k_post, index.scaling)

    def select(self, index: LayerKV, q: torch.Tensor, budget: float | int) -> Selection:
        k = resolve_budget(budget, index.n_tokens)
        chosen = topk_mask(self.scores(index, q), k)
        return make_selection(chosen, None, entry_bytes=index.head_dim * BF16_BYTES)

    def keys(self, index: LayerKV, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.k_post, ids)

    def values(self, index: LayerKV, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.v, ids)

    def resident_breakdown(self, index: LayerKV) -> dict[str, int]:
        return {"keys": kv_bytes(index.n_tokens, index.n_kv_heads, index.head_dim, values=False)}

    def resident_bytes(self, index: LayerKV) -> int:
        return sum(self.resident_breakdown(index).values())

    def fetched_bytes(self, selection: Selection) -> float:
        return priced_fetched_bytes(selection)
