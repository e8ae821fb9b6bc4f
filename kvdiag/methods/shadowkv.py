"""ShadowKV: low-rank pre-RoPE keys on the GPU, chunk-mean landmarks, values offloaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import (
    BF16_BYTES,
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_quant_spec,
    chunks_to_tokens,
    kv_bytes,
    make_selection,
    priced_fetched_bytes,
    roundtrip_rows,
    row_bytes,
    scaled_rank,
    softmax_max_scores,
    take_tokens,
    topk_mask,
)
from kvdiag.methods.base import LayerKV, Method, Selection, resolve_budget


@dataclass
class ShadowKVIndex:
    """What ShadowKV keeps for one layer after prefill.

    keys:           [H_kv, L, d] keys attention sees: exact post-RoPE for local and outlier tokens,
                    U[pos]·SV[head] re-rotated at pos elsewhere (or `key_quant` keys when rank = 0)
    values:         [H_kv, L, d] exact values
    landmarks:      [H_kv, C, d] chunk means of post-RoPE keys, outliers removed, at landmark precision
    landmark_chunks:[H_kv, C] chunk id of each landmark slot
    outlier_chunks: [H_kv, n_outliers] chunk ids kept exact on the GPU
    always:         [H_kv, L] bool, local window ∪ outlier tokens (resident, always attended)
    u:              [L, r] left singular vectors (None when rank = 0)
    sv:             [H_kv, r, d] S_r·V_rᵀ split per head (None when rank = 0)
    """

    keys: torch.Tensor
    values: torch.Tensor
    landmarks: torch.Tensor
    landmark_chunks: torch.Tensor
    outlier_chunks: torch.Tensor
    always: torch.Tensor
    u: torch.Tensor | None
    sv: torch.Tensor | None
    rank: int
    n_local: int
    n_tokens: int
    n_kv_heads: int
    head_dim: int


@dataclass
class ShadowKV(Method):
    """ShadowKV (Sun et al., ICML 2025, arXiv 2410.21465; ByteDance-Seed/ShadowKV), as run by arXiv
    2604.08426 (its fork in yandex-research/context-intensive-kv-offloading, `ShadowKVCache`).

    Prefill, per layer: SVD of the pre-RoPE keys [L, H_kv·d] (all KV heads side by side, fp32); keep
    U[:, :r] and S_r·V_rᵀ split per head, stored at `factor_dtype` (bf16 upstream). The prompt is cut
    into n_chunks = L // chunk - local // chunk chunks; the remaining tail (local window plus the
    L mod chunk alignment tokens) stays exact on the GPU. Landmarks are the means of the post-RoPE keys
    of each chunk per KV head. Outliers: the `outlier_chunks` chunks with the lowest minimum cosine
    similarity between the chunk mean and its keys, kept exact on the GPU and removed from the
    landmarks. Decode: score = softmax over landmarks of q·l/√d per query head, max over the G query
    heads; top budget // chunk chunks per KV head; their keys rebuilt as U[pos]·SV[head] and
    re-rotated at their positions (`kvdiag.capture.rope.apply_rope`), values fetched exact.

    Rank rule: `rank` is given for `rank_channels` (1024) KV channels and scales with the layer's
    H_kv·d: r = round(rank · H_kv·d / rank_channels), e.g. 160 → 80 at 512 channels, 30 at 192 (see
    `resolved_rank`). rank = 0 disables the SVD: keys are then pre-RoPE keys round-tripped through
    `key_quant` and re-rotated (upstream rank = -1 with keys_fp8 / keys_nvfp4 / keys_higgs).

    Deviations from the public code, and why:
    - scale: ByteDance's code divides by √128 (hard-coded); the study's fork and kvdiag use √d. Equal
      for d = 128.
    - numerics: scores are kept in fp32 (upstream casts the softmax to bf16 before summing and taking
      the max): fewer ties, otherwise the same ranking.
    - small prompts: upstream asserts enough chunks; kvdiag clamps the outlier count and the selected
      chunk count to the chunks available, so any L works.
    - chunk = 1: upstream then takes the *first* `outlier_chunks` tokens as "outliers" (cosine
      similarity is meaningless for one key); kvdiag does the same.
    - landmark precision: `landmark_quant` round-trips the landmarks through `kvdiag.quant` laid out as
      rows of H_kv·d channels, like the study's fork (which lays out landmark *slots*, not chunks, per
      row); bf16 is the ShadowKV default, the fork's HIGGS grids are e.g. "higgs:EDEN4-256".
    - budget: upstream requires budget to be a multiple of chunk; kvdiag selects budget // chunk chunks.
    - generated tokens are always attended by the caller (as upstream, which keeps them on the GPU).

    Bytes (GPU-resident per layer): U at bf16 (2·r bytes per token: 320 B at r = 160), SV, landmarks
    at their precision (256 B per token at 8×128 channels in bf16 with chunk 8), outlier and local
    tokens as exact bf16 K and V. The landmark → chunk index (int64) is not counted. Fetched per step:
    bf16 values of the selected tokens (keys are rebuilt on the GPU).
    """

    name: ClassVar[str] = "shadowkv"
    paper: ClassVar[str] = (
        "Sun et al., ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference, "
        "ICML 2025 (ByteDance-Seed/ShadowKV)"
    )

    rank: int = 160
    rank_channels: int = 1024
    chunk: int = 8
    outlier_chunks: int = 48
    local: int = 32
    landmark_quant: str = "bf16"
    factor_dtype: str = "bf16"
    key_quant: str = "bf16"

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank, 0)
        check_int(self.name, "rank_channels", self.rank_channels, 1)
        check_int(self.name, "chunk", self.chunk, 1, 4096)
        check_int(self.name, "outlier_chunks", self.outlier_chunks, 0)
        check_int(self.name, "local", self.local, 0)
        if self.local % self.chunk:
            raise KvdiagError(
                f"{self.name}: local={self.local} is invalid; use a multiple of chunk={self.chunk} "
                f"(e.g. {self.chunk * max(1, round(self.local / self.chunk))})"
            )
        check_quant_spec(self.name, "landmark_quant", self.landmark_quant)
        check_choice(self.name, "factor_dtype", self.factor_dtype, FLOAT_DTYPES)
        check_quant_spec(self.name, "key_quant", self.key_quant)

    def resolved_rank(self, n_channels: int, n_tokens: int | None = None) -> int:
        """The SVD rank used for a layer of n_channels = H_kv·d (0 = no SVD)."""
        if self.rank == 0:
            return 0
        rank = scaled_rank(self.rank, n_channels, self.rank_channels)
        limit = n_channels if n_tokens is None else min(n_channels, n_tokens)
        if rank > limit:
            raise KvdiagError(
                f"{self.name}: rank {self.rank} (scaled to {rank} for {n_channels} channels) exceeds "
                f"min(L, H_kv·d) = {limit}; use rank ≤ {limit * self.rank_channels // n_channels}"
            )
        return rank

    # --- prefill ----------------------------------------------------------------------------------

    def build(self, layer: LayerKV) -> ShadowKVIndex:
        n_kv, n_tokens, d = layer.k_post.shape
        k_post = layer.k_post.float()
        chunk = self.chunk
        n_chunks = max(0, n_tokens // chunk - self.local // chunk)
        n_local = n_tokens - n_chunks * chunk  # local window + alignment tail, exact and resident

        # low-rank factor of the pre-RoPE keys, all heads side by side
        rank = self.resolved_rank(n_kv * d, n_tokens)
        u = sv = None
        if rank:
            flat = layer.k_pre.float().transpose(0, 1).reshape(n_tokens, n_kv * d)  # [L, H_kv·d]
            u_full, s, vh = torch.linalg.svd(flat, full_matrices=False)
            dtype = FLOAT_DTYPES[self.factor_dtype]
            u = u_full[:, :rank].to(dtype)  # [L, r]
            sv = (s[:rank, None] * vh[:rank]).reshape(rank, n_kv, d).transpose(0, 1).to(dtype)  # [H_kv, r, d]
            rebuilt_pre = torch.einsum("lr,hrd->hld", u.float(), sv.float())
        else:
            rebuilt_pre = roundtrip_rows(self.key_quant, layer.k_pre)
        keys = apply_rope(rebuilt_pre, layer.cos, layer.sin).float()

        # landmarks and outliers over the context chunks
        ctx = k_post[:, : n_chunks * chunk].reshape(n_kv, n_chunks, chunk, d)
        means = ctx.mean(dim=2)  # [H_kv, n_chunks, d]
        n_out = min(self.outlier_chunks, n_chunks)
        if chunk > 1:
            min_cos = torch.nn.functional.cosine_similarity(means[:, :, None, :], ctx, dim=-1).amin(dim=-1)
            outliers = min_cos.topk(n_out, dim=-1, largest=False).indices  # [H_kv, n_out]
        else:
            outliers = torch.arange(n_out, device=k_post.device).expand(n_kv, -1)
        is_outlier = torch.zeros(n_kv, n_chunks, dtype=torch.bool, device=k_post.device)
        is_outlier.scatter_(1, outliers, True)
        all_chunks = torch.arange(n_chunks, device=k_post.device).expand(n_kv, -1)
        landmark_chunks = all_chunks[~is_outlier].reshape(n_kv, n_chunks - n_out)
        landmarks = means.gather(1, landmark_chunks[:, :, None].expand(-1, -1, d))
        landmarks = roundtrip_rows(self.landmark_quant, landmarks)

        always = torch.zeros(n_kv, n_tokens, dtype=torch.bool, device=k_post.device)
        always[:, n_tokens - n_local :] = True
        always |= chunks_to_tokens(
            torch.ones(1, n_kv, n_out, dtype=torch.bool, device=k_post.device), outliers, chunk, n_tokens
        )[0]
        keys = torch.where(always[:, :, None], k_post, keys)

        return ShadowKVIndex(
            keys=keys,
            values=layer.v,
            landmarks=landmarks,
            landmark_chunks=landmark_chunks,
            outlier_chunks=outliers,
            always=always,
            u=u,
            sv=sv,
            rank=rank,
            n_local=n_local,
            n_tokens=n_tokens,
            n_kv_heads=n_kv,
            head_dim=d,
        )

    # --- decode -----------------------------------------------------------------------------------

    def scores(self, index: ShadowKVIndex, q: torch.Tensor) -> torch.Tensor:
        """[n, H_kv, C] landmark scores (slot order of `index.landmark_chunks`)."""
        return softmax_max_scores(q, index.landmarks, 1.0 / math.sqrt(index.head_dim))

    def select(self, index: ShadowKVIndex, q: torch.Tensor, budget: float | int) -> Selection:
        n_select = resolve_budget(budget, index.n_tokens) // self.chunk
        chosen_slots = topk_mask(self.scores(index, q), n_select)
        chosen = chunks_to_tokens(chosen_slots, index.landmark_chunks, self.chunk, index.n_tokens)
        return make_selection(chosen, index.always, entry_bytes=index.head_dim * BF16_BYTES)

    def keys(self, index: ShadowKVIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.keys, ids)

    def values(self, index: ShadowKVIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.values, ids)

    # --- bytes ------------------------------------------------------------------------------------

    def resident_breakdown(self, index: ShadowKVIndex) -> dict[str, int]:
        n_kv, d, n_tokens = index.n_kv_heads, index.head_dim, index.n_tokens
        factor_bytes = FLOAT_DTYPES[self.factor_dtype].itemsize
        out = {
            "u_factor": n_tokens * index.rank * factor_bytes,
            "sv_factor": n_kv * index.rank * d * factor_bytes,
            "landmarks": round(index.landmarks.shape[1] * row_bytes(self.landmark_quant, n_kv * d)),
            "outliers": kv_bytes(index.outlier_chunks.shape[1] * self.chunk, n_kv, d),
            "local": kv_bytes(index.n_local, n_kv, d),
        }
        if index.rank == 0:  # keys_on_device upstream: the quantized pre-RoPE keys stay on the GPU
            out["keys"] = round(n_tokens * row_bytes(self.key_quant, n_kv * d))
        return out

    def resident_bytes(self, index: ShadowKVIndex) -> int:
        return sum(self.resident_breakdown(index).values())

    def fetched_bytes(self, selection: Selection) -> float:
        return priced_fetched_bytes(selection)
