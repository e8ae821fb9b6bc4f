"""Quest: query-aware page selection by a per-channel max/min upper bound of q·k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import box_upper_bound_scores, check_int
from kvdiag.methods.base import (
    Built,
    BuiltBatch,
    DecodeState,
    LayerKV,
    Method,
    gather_tokens,
    offloaded_rows,
    per_step,
)


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
      accounts Quest as an offloading method to compare bytes: page digests (max and min, at the
      keys' dtype) are resident, the chosen pages' K and V are fetched (a page chosen by several
      query heads of one group is fetched once). Dense layers are resident in full and fetch nothing.
    - ties: top-k breaks equal page scores toward the lower page index.
    - the partial last page is summarised over its real tokens (upstream pads with the dtype's
      minimum, which gives the same max; its min digest does not exist upstream because the
      evaluation code uses the sign trick max(q·sign(q)·k), which is the same score).
    """

    name: ClassVar[str] = "quest"
    per_query_head: ClassVar[bool] = True
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

    @property
    def block_size(self) -> int:
        return self.page

    def build(self, layer: LayerKV) -> Built:
        n_kv, n_tokens, d = layer.k_post.shape
        dense = layer.layer_idx < self.dense_layers
        meta = dict(n_tokens=n_tokens, n_kv_heads=n_kv, head_dim=d, scaling=layer.scaling, dense=dense)
        if dense:
            return Built(resident={"k": layer.k_post, "v": layer.v}, offloaded={}, **meta)
        n_pages = -(-n_tokens // self.page)
        pad = n_pages * self.page - n_tokens
        k = layer.k_post.float()
        hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf"))
        lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf"))
        resident = {
            "page_max": hi.reshape(n_kv, n_pages, self.page, d).amax(dim=2).to(layer.dtype),
            "page_min": lo.reshape(n_kv, n_pages, self.page, d).amin(dim=2).to(layer.dtype),
        }
        return Built(resident=resident, offloaded={"k": layer.k_post, "v": layer.v}, **meta)

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        if built.dense:
            return {
                "page_max": torch.zeros(built.n_kv_heads, 0, built.head_dim),
                "page_min": torch.zeros(built.n_kv_heads, 0, built.head_dim),
            }
        return {"page_max": built.resident["page_max"], "page_min": built.resident["page_min"]}

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_q, P] page scores."""
        hi, lo = batch.inputs["page_max"].to(q.device), batch.inputs["page_min"].to(q.device)
        return box_upper_bound_scores(q, hi, lo, n_valid=batch.n_blocks)

    def kernel_scores(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """Page bounds per query head by `kvdiag.kernels.page_scores` (fp32)."""
        from kvdiag.kernels.page_scores import page_bound_scores

        hi, lo = batch.inputs["page_max"].to(q.device), batch.inputs["page_min"].to(q.device)
        n = batch.n_blocks.to(device=q.device, dtype=torch.int32)
        return per_step(lambda qs: page_bound_scores(qs, hi, lo, n, "none"), q)

    def block_starts(self, built: Built) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long) if built.dense else super().block_starts(built)

    def n_blocks_selected(self, built: Built, budget_tokens: int) -> int:
        n_pages = -(-built.n_tokens // self.page)
        return min(max(self.min_pages, budget_tokens // self.page), n_pages)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if built.dense:  # everything is resident
            return gather_tokens(built.resident["k"], ids).float(), gather_tokens(
                built.resident["v"], ids
            ).float()
        return offloaded_rows(built, "k", ids, fetched), offloaded_rows(built, "v", ids, fetched)
