"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import check_int, kv_bytes, make_selection, priced_fetched_bytes, take_tokens
from kvdiag.methods.base import LayerKV, Method, Selection, resolve_budget


@dataclass
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): the first `sinks` prompt tokens plus
    the most recent ones, `budget` tokens in all, the same for every query and head.

    Upstream (mit-han-lab/streaming-llm) evicts the rest during prefill-free streaming and
    re-indexes positions inside its cache; kvdiag keeps the model's own prompt positions (what the
    paper calls the "w/o re-computation" setting on a finished prompt) and only masks. When the
    budget is below `sinks`, only the first `budget` sink tokens are kept. Everything kept is
    resident (bf16 K and V); nothing is fetched.
    """

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = (
        "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 (mit-han-lab/streaming-llm)"
    )

    sinks: int = 4

    def __post_init__(self) -> None:
        check_int(self.name, "sinks", self.sinks, 0)

    def build(self, layer: LayerKV) -> LayerKV:
        return layer

    def kept(self, n_tokens: int, budget: float | int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[L] bool: the sinks and the recent window for this budget."""
        total = resolve_budget(budget, n_tokens)
        n_sinks = min(self.sinks, total)
        keep = torch.zeros(n_tokens, dtype=torch.bool, device=device)
        keep[:n_sinks] = True
        if total > n_sinks:
            keep[n_tokens - (total - n_sinks) :] = True
        return keep

    def select(self, index: LayerKV, q: torch.Tensor, budget: float | int) -> Selection:
        keep = self.kept(index.n_tokens, budget, q.device)
        always = keep.expand(index.n_kv_heads, -1)
        none = torch.zeros(q.shape[0], index.n_kv_heads, index.n_tokens, dtype=torch.bool, device=q.device)
        return make_selection(none, always, entry_bytes=0.0)

    def keys(self, index: LayerKV, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.k_post, ids)

    def values(self, index: LayerKV, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.v, ids)

    def resident_breakdown(self, index: LayerKV, budget: float | int | None = None) -> dict[str, int]:
        """bf16 K and V of the kept tokens (the whole prompt until a budget is known)."""
        n_kept = index.n_tokens if budget is None else int(self.kept(index.n_tokens, budget).sum())
        return {"kv": kv_bytes(n_kept, index.n_kv_heads, index.head_dim)}

    def resident_bytes(self, index: LayerKV, budget: float | int | None = None) -> int:
        return sum(self.resident_breakdown(index, budget).values())

    def fetched_bytes(self, selection: Selection) -> float:
        return priced_fetched_bytes(selection)
