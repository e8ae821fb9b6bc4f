"""ArkVale: page digests as boxes around the page centre, recallable eviction (NeurIPS 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.errors import KvdiagError
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
class ArkVale(Method):
    """ArkVale (Chen et al., "ArkVale: Efficient Generative LLM Inference with Recallable Key-Value
    Eviction", NeurIPS 2024; code github.com/pku-liang/ArkVale, the study's fork
    github.com/AndreyBocharnikov/ArkVale).

    Prefill: the post-RoPE keys are cut into pages of `page_size` tokens. Every page but the last
    gets a digest per KV head and channel: centre c = (max + min) / 2, radius ρ = mean_t |k_t − c|,
    stored as the box [c − ρ, c + ρ] (upstream `InferState._summarize_keys`; ρ is a mean deviation,
    so the box does not contain every key and the score below is *not* an upper bound of q·k).
    Decode: per query head the Quest-style box score Σ_d max(q_d·(c+ρ)_d, q_d·(c−ρ)_d) (unscaled),
    averaged over the query heads of a selection group (`group_size` KV heads and their G query
    heads each; upstream's `estimate_scores(..., n_groups)`); the top ceil(budget / page_size)
    pages per group are recalled. The first `n_sink_pages` and the last `n_win_pages` pages (the
    last one partial and digest-less) are always kept on the GPU and do not count against the
    budget: the study's wrapper sets page_topks = ceil(budget·L / page_size) + sinks + window − 1,
    and upstream's `InferState` turns that back into exactly ceil(budget·L / page_size) pages
    chosen by score.

    Knobs and defaults are upstream's (`enable_arkvale` / `InferState`): page_size 32, 2 sink
    pages, 2 window pages, one selection group of all KV heads (group_size=0), no dense layers. The study
    (arXiv 2604.08426, `run_config.py` of the fork) runs page_size=16, n_sink_pages=2,
    n_win_pages=5, group_size=1 (one selection per KV head), n_unlimited_layers=0 and a budget of
    0.78125 % of L: `ArkVale.study()`.

    Resident: the page digests (box_max, box_min at the keys' dtype) and the exact K/V of the sink
    and window pages; offloaded: every token's K and V. Decode state (`start`): upstream's GPU page
    cache, which keeps the pages recalled at earlier steps and recalls only misses, is modelled as a
    cache of `ceil(budget / page_size)` pages' tokens per KV head (the pages of the previous steps,
    least recently used leave first), so `fetched` counts the misses only; the pages chosen by the
    last prompt query at prefill are not pre-loaded (the first step is cold).

    Deviations from the public code, and why:
    - The window is the last `n_win_pages` pages of the prompt as prefill leaves them; when L is a
      multiple of page_size, upstream's first decode token opens a new page and one prompt page
      slides out of the window.
    - Prefill eviction upstream uses max(2, n_sink_pages) sinks; here the knob is used as given.
    - Upstream asserts n_win_pages ≥ 2; 1 is accepted here (the digest-less last page is kept).
    - A budget fraction becomes ceil(budget·L) tokens (`resolve_budget`), then
      ceil(tokens / page_size) pages; the study's wrapper floors budget·L before the page ceil.
    - The CUDA source of upstream's `estimate_scores` was not available to check; the corner form
      and the mean over the group's query heads follow the paper and reference/METHODS.md.
    - Scores are computed in float32 from digests stored in the keys' dtype (upstream: fp16 CUDA
      kernel); bytes are accounted at bf16/fp16 (2 bytes).
    """

    name: ClassVar[str] = "arkvale"
    paper: ClassVar[str] = (
        "Chen et al., ArkVale: Efficient Generative LLM Inference with Recallable Key-Value Eviction, "
        "NeurIPS 2024; github.com/pku-liang/ArkVale"
    )

    page_size: int = 32  # tokens per page (study: 16)
    n_sink_pages: int = 2  # first pages always kept
    n_win_pages: int = 2  # last pages always kept, the last (digest-less) one included (study: 5)
    group_size: int = 0  # KV heads sharing one selection; 0 = all KV heads (study: 1)
    dense_layers: int = 0  # upstream n_unlimited_layers: first layers with full attention

    def __post_init__(self) -> None:
        check_int(self.name, "page_size", self.page_size, 1)
        check_int(self.name, "n_sink_pages", self.n_sink_pages, 0)
        check_int(self.name, "n_win_pages", self.n_win_pages, 1)
        check_int(self.name, "dense_layers", self.dense_layers, 0)
        check_int(self.name, "group_size", self.group_size, 0)

    @classmethod
    def study(cls) -> ArkVale:
        """The configuration of arXiv 2604.08426 (use with a budget of 0.0078125 of L)."""
        return cls(page_size=16, n_sink_pages=2, n_win_pages=5, group_size=1, dense_layers=0)

    @property
    def block_size(self) -> int:
        return self.page_size

    # --- prefill ----------------------------------------------------------------------------------

    def build(self, layer: LayerKV) -> Built:
        n_kv, n_tokens, d = layer.k_post.shape
        self._group(n_kv)  # validate the group against this layer's KV heads early
        n_pages = math.ceil(n_tokens / self.page_size)
        first, last = self.n_sink_pages, n_pages - self.n_win_pages  # candidate pages: first .. last - 1
        dense = layer.layer_idx < self.dense_layers or last <= first
        meta = dict(n_tokens=n_tokens, n_kv_heads=n_kv, head_dim=d, scaling=layer.scaling, dense=dense,
                    info={"n_pages": n_pages, "first_page": first, "last_page": max(last, first)})  # fmt: skip
        if dense:
            return Built(resident={"k": layer.k_post, "v": layer.v}, offloaded={}, **meta)
        n_digest = n_pages - 1  # every page but the last (partial, still filling) one, as upstream
        pages = layer.k_post[:, : n_digest * self.page_size].float()
        pages = pages.reshape(n_kv, n_digest, self.page_size, d)  # [H_kv, P - 1, page, d]
        centre = (pages.amax(dim=2) + pages.amin(dim=2)) / 2  # [H_kv, P - 1, d]
        radius = (pages - centre[:, :, None, :]).abs().mean(dim=2)
        kept = self._kept_ids(n_tokens, n_pages).to(layer.k_post.device)
        resident = {
            "box_max": (centre + radius).to(layer.dtype),
            "box_min": (centre - radius).to(layer.dtype),
            "kept_k": layer.k_post[:, kept],
            "kept_v": layer.v[:, kept],
        }
        return Built(resident=resident, offloaded={"k": layer.k_post, "v": layer.v}, **meta)

    # --- decode -----------------------------------------------------------------------------------

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        if built.dense:
            empty = torch.zeros(built.n_kv_heads, 0, built.head_dim)
            return {"box_max": empty, "box_min": empty}
        first, last = built.info["first_page"], built.info["last_page"]  # the candidate pages
        return {
            "box_max": built.resident["box_max"][:, first:last],
            "box_min": built.resident["box_min"][:, first:last],
        }

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_kv, candidates] box scores averaged over each selection group, repeated to its heads."""
        n_kv, d = batch.rows[0].n_kv_heads, batch.rows[0].head_dim
        if q.ndim != 4 or q.shape[-1] != d or q.shape[2] % n_kv:
            raise KvdiagError(
                f"arkvale: queries of shape {tuple(q.shape[1:])} do not fit {n_kv} KV heads of dim {d}; "
                f"expected [n, H_q, {d}] with H_q a multiple of {n_kv}"
            )
        b, n, n_q = q.shape[0], q.shape[1], q.shape[2]
        group = self._group(n_kv)
        hi, lo = batch.inputs["box_max"].to(q.device), batch.inputs["box_min"].to(q.device)
        scores = box_upper_bound_scores(q, hi, lo, n_valid=batch.n_blocks)  # [B, n, H_q, P]
        scores = scores.reshape(b, n, n_kv // group, group * (n_q // n_kv), -1).mean(dim=3)
        return scores.repeat_interleave(group, dim=2)

    def kernel_scores(
        self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]
    ) -> torch.Tensor | None:
        """Box bounds averaged over each KV head's query heads by `kvdiag.kernels.page_scores`
        (selection groups of one KV head, the study's configuration; None for wider groups)."""
        if self._group(batch.rows[0].n_kv_heads) != 1:
            return None
        from kvdiag.kernels.page_scores import page_bound_scores

        hi, lo = batch.inputs["box_max"].to(q.device), batch.inputs["box_min"].to(q.device)
        n = batch.n_blocks.to(device=q.device, dtype=torch.int32)
        return per_step(lambda qs: page_bound_scores(qs, hi, lo, n, "mean"), q)

    def block_starts(self, built: Built) -> torch.Tensor:
        first, last = built.info["first_page"], built.info["last_page"]
        if built.dense:
            return torch.zeros(0, dtype=torch.long)
        return torch.arange(first, last) * self.page_size

    def n_blocks_selected(self, built: Built, budget_tokens: int) -> int:
        return math.ceil(budget_tokens / self.page_size)

    def always_kept(self, built: Built, state: DecodeState) -> torch.Tensor:
        if built.dense:
            return super().always_kept(built, state)
        return self._kept_ids(built.n_tokens, built.info["n_pages"]).expand(built.n_kv_heads, -1)

    def start(self, built: Built, budget: float | int) -> DecodeState:
        state = super().start(built, budget)
        if not built.dense:  # upstream's GPU page cache: the pages of the previous steps
            state.cache_tokens = self.n_blocks_selected(built, state.budget_tokens) * self.page_size
        return state

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if built.dense:  # everything is resident
            return gather_tokens(built.resident["k"], ids).float(), gather_tokens(
                built.resident["v"], ids
            ).float()
        return offloaded_rows(built, "k", ids, fetched), offloaded_rows(built, "v", ids, fetched)

    def _group(self, n_kv: int) -> int:
        group = self.group_size or n_kv
        if n_kv % group:
            raise KvdiagError(
                f"arkvale: group_size={self.group_size} does not divide the {n_kv} KV heads; "
                f"use a divisor of {n_kv} or 0 (all heads)"
            )
        return group

    def _kept_ids(self, n_tokens: int, n_pages: int) -> torch.Tensor:
        """[a] long: tokens of the sink pages and of the window pages."""
        pos = torch.arange(n_tokens)
        sink_end = self.n_sink_pages * self.page_size
        window_start = max(n_pages - self.n_win_pages, 0) * self.page_size
        return pos[(pos < sink_end) | (pos >= window_start)]
