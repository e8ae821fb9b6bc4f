"""Full attention: every prompt token, exact keys and values, all resident on the GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import kv_bytes, make_selection, priced_fetched_bytes, take_tokens
from kvdiag.methods.base import LayerKV, Method, Selection


@dataclass
class Exact(Method):
    """Exact attention over the whole prompt (the reference every method is measured against).

    Nothing is offloaded: resident bytes are the full bf16 K and V of the layer, fetched bytes 0.
    The budget passed to `select` is ignored.
    """

    name: ClassVar[str] = "exact"
    paper: ClassVar[str] = "full attention (Vaswani et al., 2017); kvdiag baseline"

    def build(self, layer: LayerKV) -> LayerKV:
        return layer

    def select(self, index: LayerKV, q: torch.Tensor, budget: float | int | None = None) -> Selection:
        n, shape = q.shape[0], (index.n_kv_heads, index.n_tokens)
        everything = torch.ones(shape, dtype=torch.bool, device=q.device)
        none = torch.zeros(n, *shape, dtype=torch.bool, device=q.device)
        return make_selection(none, everything, entry_bytes=0.0)

    def keys(self, index: LayerKV, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.k_post, ids)

    def values(self, index: LayerKV, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.v, ids)

    def resident_breakdown(self, index: LayerKV) -> dict[str, int]:
        return {"kv": kv_bytes(index.n_tokens, index.n_kv_heads, index.head_dim)}

    def resident_bytes(self, index: LayerKV) -> int:
        return sum(self.resident_breakdown(index).values())

    def fetched_bytes(self, selection: Selection) -> float:
        return priced_fetched_bytes(selection)
