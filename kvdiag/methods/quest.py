"""Quest: query-aware page selection by a per-channel max/min upper bound of q·k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import (
    BF16_BYTES,
    box_upper_bound_scores,
    check_int,
    kv_bytes,
    make_selection,
    priced_fetched_bytes,
    take_tokens,
    topk_mask,
)
from kvdiag.methods.base import LayerKV, Method, Selection, resolve_budget


@dataclass
class QuestIndex:
    """Quest's page digests for one layer.

    page_max / page_min: [H_kv, P, d] per page and channel max / min of the post-RoPE keys
                         (the last page may be partial: only its real tokens count)
    dense:               True for the first `dense_layers` layers (full attention, no digests)
    """

    layer: LayerKV
    page_max: torch.Tensor
    page_min: torch.Tensor
    dense: bool

    @property
    def n_pages(self) -> int:
        return self.page_max.shape[1]


@dataclass
class Quest(Method):
    """Quest (Tang et al., ICML 2024, arXiv 2406.10774; mit-han-lab/Quest): pages of `page` tokens,
    each summarised by the per-channel max and min of its post-RoPE keys.

    Decode, per *query* head (the digests of a KV head are repeated over its GQA group, so the
    selection is per query head: `Selection.per_query_head`): page score Σ_d max(q_d·max_d,
    q_d·min_d), unscaled, an upper bound of q·k for every key of the page; the top
    max(3, budget // page) pages are attended (so at least 3 pages even when the budget is smaller).
    The first `dense_layers` layers (by `LayerKV.layer_idx`) attend everything.

    Deviations from the public code, and why:
    - upstream's evaluation path scores every cached token, generated ones included, and masks them
      causally; kvdiag only selects among prompt tokens (generated tokens are always attended by the
      caller), as every kvdiag method does. There is no local window, as upstream.
    - upstream keeps the whole KV cache on the GPU and reads the chosen pages from HBM; kvdiag
      accounts Quest as an offloading method to compare bytes: page digests (bf16 max and min) are
      resident, the chosen pages' bf16 K and V are fetched (a page chosen by several query heads of
      one group is fetched once). Dense layers are resident in full and fetch nothing.
    - the partial last page is summarised over its real tokens (upstream pads with the dtype's
      minimum, which gives the same max; its min digest does not exist upstream because the
      evaluation code uses the sign trick max(q·sign(q)·k), which is the same score).
    """

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = (
        "Tang et al., Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference, ICML 2024 "
        "(mit-han-lab/Quest)"
    )

    page: int = 16
    min_pages: int = 3
    dense_layers: int = 2

    def __post_init__(self) -> None:
        check_int(self.name, "page", self.page, 1, 4096)
        check_int(self.name, "min_pages", self.min_pages, 0)
        check_int(self.name, "dense_layers", self.dense_layers, 0)

    def build(self, layer: LayerKV) -> QuestIndex:
        n_kv, n_tokens, d = layer.k_post.shape
        n_pages = -(-n_tokens // self.page)
        pad = n_pages * self.page - n_tokens
        k = layer.k_post.float()
        hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf"))
        lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf"))
        page_max = hi.reshape(n_kv, n_pages, self.page, d).amax(dim=2)
        page_min = lo.reshape(n_kv, n_pages, self.page, d).amin(dim=2)
        return QuestIndex(layer, page_max, page_min, dense=layer.layer_idx < self.dense_layers)

    def scores(self, index: QuestIndex, q: torch.Tensor) -> torch.Tensor:
        """[n, H_q, P] page scores."""
        return box_upper_bound_scores(q, index.page_max, index.page_min)

    def n_pages_selected(self, budget: float | int, n_tokens: int) -> int:
        n_pages = -(-n_tokens // self.page)
        return min(max(self.min_pages, resolve_budget(budget, n_tokens) // self.page), n_pages)

    def select(self, index: QuestIndex, q: torch.Tensor, budget: float | int) -> Selection:
        layer = index.layer
        n, n_q_heads, _ = q.shape
        n_tokens, d = layer.n_tokens, layer.head_dim
        if index.dense:
            everything = torch.ones(n_q_heads, n_tokens, dtype=torch.bool, device=q.device)
            none = torch.zeros(n, n_q_heads, n_tokens, dtype=torch.bool, device=q.device)
            return make_selection(none, everything, 0.0, per_query_head=True, n_kv_heads=layer.n_kv_heads)
        pages = topk_mask(self.scores(index, q), self.n_pages_selected(budget, n_tokens))  # [n, H_q, P]
        chosen = pages.repeat_interleave(self.page, dim=-1)[..., :n_tokens]
        return make_selection(
            chosen, None, 2 * d * BF16_BYTES, per_query_head=True, n_kv_heads=layer.n_kv_heads
        )

    def keys(self, index: QuestIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.layer.k_post, ids)

    def values(self, index: QuestIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.layer.v, ids)

    def resident_breakdown(self, index: QuestIndex) -> dict[str, int]:
        layer = index.layer
        if index.dense:
            return {"kv": kv_bytes(layer.n_tokens, layer.n_kv_heads, layer.head_dim)}
        return {"page_digests": 2 * index.n_pages * layer.n_kv_heads * layer.head_dim * BF16_BYTES}

    def resident_bytes(self, index: QuestIndex) -> int:
        return sum(self.resident_breakdown(index).values())

    def fetched_bytes(self, selection: Selection) -> float:
        return priced_fetched_bytes(selection)
