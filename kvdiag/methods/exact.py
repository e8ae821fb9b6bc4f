"""Full attention: every prompt token, exact keys and values, all resident on the GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods.base import Built, BuiltBatch, DecodeState, LayerKV, Method, gather_tokens


@dataclass
class Exact(Method):
    """Exact attention over the whole prompt (the reference every method is measured against).

    Resident: the layer's K and V as they are (the model's dtype); nothing is offloaded or fetched.
    Every layer is "dense": the always-kept set is every token, and the budget is ignored.
    """

    name: ClassVar[str] = "exact"
    paper: ClassVar[str] = "full attention (Vaswani et al., 2017); kvdiag baseline"

    def build(self, layer: LayerKV) -> Built:
        return Built(
            resident={"k": layer.k_post, "v": layer.v},
            offloaded={},
            n_tokens=layer.n_tokens,
            n_kv_heads=layer.n_kv_heads,
            head_dim=layer.head_dim,
            scaling=layer.scaling,
            dense=True,
        )

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        return {}

    def block_starts(self, built: Built) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)  # nothing is scored: every token is kept

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        return q.new_zeros(q.shape[0], q.shape[1], batch.rows[0].n_kv_heads, 0, dtype=torch.float32)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gather_tokens(built.resident["k"], ids).float(), gather_tokens(
            built.resident["v"], ids
        ).float()
