"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import check_int
from kvdiag.methods.base import (
    Built,
    BuiltBatch,
    DecodeState,
    LayerKV,
    Method,
    gather_tokens,
    offloaded_rows,
    resolve_budget,
)


@dataclass
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): the first `sinks` prompt tokens plus
    the most recent ones, `budget` tokens in all, the same for every query and head.

    Upstream (mit-han-lab/streaming-llm) evicts the rest during prefill-free streaming and
    re-indexes positions inside its cache; kvdiag keeps the model's own prompt positions (what the
    paper calls the "w/o re-computation" setting on a finished prompt) and only masks. When the
    budget is below `sinks`, only the first `budget` sink tokens are kept. What is kept is resident
    (the window is known once decode starts: `start` moves it into the decode state); the rest is
    evicted, never fetched — kvdiag holds it as `offloaded` only so that the dense view exists.
    """

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = (
        "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 (mit-han-lab/streaming-llm)"
    )

    sinks: int = 4

    def __post_init__(self) -> None:
        check_int(self.name, "sinks", self.sinks, 0)

    def build(self, layer: LayerKV) -> Built:
        return Built(
            resident={},
            offloaded={"k": layer.k_post, "v": layer.v},
            n_tokens=layer.n_tokens,
            n_kv_heads=layer.n_kv_heads,
            head_dim=layer.head_dim,
            scaling=layer.scaling,
        )

    def kept(self, n_tokens: int, budget: float | int) -> torch.Tensor:
        """[a] long ids: the sinks and the recent window for this budget."""
        total = resolve_budget(budget, n_tokens)
        n_sinks = min(self.sinks, total)
        recent = torch.arange(n_tokens - (total - n_sinks), n_tokens)
        return torch.cat([torch.arange(n_sinks), recent[recent >= n_sinks]])

    def start(self, built: Built, budget: float | int) -> DecodeState:
        state = super().start(built, budget)
        ids = self.kept(built.n_tokens, state.budget_tokens).expand(built.n_kv_heads, -1)
        state.extra["kept"] = ids
        if "k" in built.offloaded:  # the kept window stays on the GPU for the whole decode
            state.resident = {
                "k": gather_tokens(built.offloaded["k"], ids),
                "v": gather_tokens(built.offloaded["v"], ids),
            }
        return state

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        return {}

    def block_starts(self, built: Built) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)  # nothing is scored: the window is fixed

    def n_blocks_selected(self, built: Built, budget_tokens: int) -> int:
        return 0

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        return q.new_zeros(q.shape[0], q.shape[1], batch.rows[0].n_kv_heads, 0, dtype=torch.float32)

    def always_kept(self, built: Built, state: DecodeState) -> torch.Tensor:
        return state.extra["kept"]

    def entry_bytes(self, built: Built) -> float:
        return 0.0  # nothing is fetched: what is not kept is evicted

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return offloaded_rows(built, "k", ids, fetched), offloaded_rows(built, "v", ids, fetched)
