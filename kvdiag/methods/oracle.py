"""Oracle top-k: the best selection any landmark scheme could make at the same budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.methods._scoring import softmax_max_scores
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
class Oracle(Method):
    """Exact q·k top-k per KV head, with the GQA rule of ShadowKV and YAKV (the selection upper bound).

    Score of prompt token j for KV head h: max over the G query heads of h of softmax_j(q·k_j ·
    scaling), with the model's own softmax scaling (1/√d for Llama and Qwen) and exact post-RoPE
    keys; the `budget` best tokens are attended, nothing else (no local window, no sinks). This is
    the "oracle" of arXiv 2604.08426 (claim 2), which the paper compares with landmark selection.

    Storage: an oracle is not a runtime method; it keeps the exact keys resident (scoring needs
    them) and fetches the values of the selected tokens. Scores are fp32 whatever the layer dtype.
    """

    name: ClassVar[str] = "oracle"
    paper: ClassVar[str] = (
        "oracle top-k baseline of arXiv 2604.08426 (yandex-research/context-intensive-kv-offloading)"
    )

    def build(self, layer: LayerKV) -> Built:
        return Built(
            resident={"k": layer.k_post},
            offloaded={"v": layer.v},
            n_tokens=layer.n_tokens,
            n_kv_heads=layer.n_kv_heads,
            head_dim=layer.head_dim,
            scaling=layer.scaling,
        )

    def score_inputs(self, built: Built) -> dict[str, torch.Tensor]:
        return {"k": built.resident["k"]}

    def score_batch(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """[B, n, H_kv, L] selection scores of every prompt token."""
        k = batch.inputs["k"].to(q.device)
        return softmax_max_scores(q, k, batch.rows[0].scaling, n_valid=batch.n_blocks)

    def kernel_scores(self, batch: BuiltBatch, q: torch.Tensor, states: list[DecodeState]) -> torch.Tensor:
        """The same rule by `kvdiag.kernels.batched_scores` over the exact keys (fp32)."""
        from kvdiag.kernels.batched_scores import batched_landmark_scores

        k = batch.inputs["k"].to(q.device)
        n = batch.n_blocks.to(device=q.device, dtype=torch.int32)
        scale = batch.rows[0].scaling
        return per_step(lambda qs: batched_landmark_scores(qs, k, n, "softmax_max", scale), q)

    def materialize(
        self, built: Built, ids: torch.Tensor, fetched: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gather_tokens(built.resident["k"], ids).float(), offloaded_rows(built, "v", ids, fetched)
