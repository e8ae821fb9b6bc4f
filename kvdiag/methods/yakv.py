"""YAKV, the study's proposal: one ~2-bit landmark per token, top-k per KV head, K/V offloaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvdiag.capture.rope import apply_rope
from kvdiag.errors import KvdiagError
from kvdiag.methods._scoring import (
    check_choice,
    check_int,
    check_quant_spec,
    kv_bytes,
    make_selection,
    mean_query_scores,
    priced_fetched_bytes,
    roundtrip_rows,
    row_bytes,
    softmax_max_scores,
    take_tokens,
    topk_mask,
)
from kvdiag.methods.base import LayerKV, Method, Selection, resolve_budget

SCORINGS = ("simulator", "runtime")
DEFAULT_KV_QUANT = {"simulator": "higgs:EDEN2-256:row", "runtime": "fp8_e4m3"}


def residual_landmarks(
    landmarks: torch.Tensor, meta_chunk: int, base_quant: str, residual_quant: str
) -> torch.Tensor:
    """Two-level landmark quantization of the study's fork: [H_kv, C, d] -> [H_kv, C, d].

    The landmarks are padded to a multiple of meta_chunk with copies of the last one, averaged over
    meta-chunks of meta_chunk tokens (the meta landmark, quantized with `base_quant`); each token's
    residual from its meta landmark is quantized with the coarser `residual_quant`; the landmark is
    meta + residual.
    """
    n_kv, n_landmarks, d = landmarks.shape
    if n_landmarks == 0:
        return landmarks.float()
    pad = -n_landmarks % meta_chunk
    padded = torch.cat([landmarks.float(), landmarks[:, -1:].float().expand(-1, pad, -1)], dim=1)
    n_meta = padded.shape[1] // meta_chunk
    meta = padded.reshape(n_kv, n_meta, meta_chunk, d).mean(dim=2)
    meta = roundtrip_rows(base_quant, meta).repeat_interleave(meta_chunk, dim=1)
    residual = roundtrip_rows(residual_quant, padded - meta)
    return (meta + residual)[:, :n_landmarks]


@dataclass
class YAKVIndex:
    """What YAKV keeps for one layer.

    keys/values: [H_kv, L, d] what attention sees (dequantized offloaded K/V; exact in the local
                 window of the simulator)
    landmarks:   [H_kv, C, d] quantized post-RoPE keys of the C = L - local scored tokens
    local:       [H_kv, L] bool, the last `local` prompt tokens (always attended)
    """

    keys: torch.Tensor
    values: torch.Tensor
    landmarks: torch.Tensor
    local: torch.Tensor
    n_tokens: int
    n_kv_heads: int
    head_dim: int


@dataclass
class YAKV(Method):
    """YAKV (arXiv 2604.08426, "KV Cache Offloading for Context-Intensive Tasks"; public release
    yandex-research/context-intensive-kv-offloading): per-token landmarks, no SVD.

    Every prompt token outside the local window is its own landmark (chunk 1): its post-RoPE key
    round-tripped through `landmark_quant` (HIGGS EDEN4-256, 2 bits per coordinate, ≈ the GPU bytes of
    bf16 chunk-8 landmarks). Decode picks the top `budget` tokens per KV head (the study uses 3.125 %
    of L; the budget is the caller's) plus the last `local` (64) tokens; no outliers, no sinks. The
    full K/V is offloaded at `kv_quant`; `keys()` / `values()` return what attention then sees.

    Two scoring variants exist upstream and both are exposed (`scoring`):
    - "simulator" (the accuracy simulator, the fork's `ShadowKVCache` with rank = -1, chunk 1, no
      outliers): softmax over the scored tokens of q·lm/√d per query head, max over the GQA group.
      K/V default to HIGGS EDEN2-256 (4 bits) with one Hadamard group per row of H_kv·d channels
      ("higgs:EDEN2-256:row", the study's run config); keys are quantized *before* RoPE and
      re-rotated, like upstream; the local window stays exact on the GPU.
    - "runtime" (the mini-sglang GPU runtime): the query is averaged over the group and tokens are
      ranked by the raw dot product; K/V default to fp8 e4m3 on post-RoPE keys; all K/V, the local
      window included, is read from pinned host memory, so only the landmarks are resident.
    `kv_quant="auto"` picks the variant's default; `resolved_kv_quant()` says which.

    Optional residual landmarks (`residual_meta_chunk` m > 0; 0 = off): the mean of m consecutive
    landmarks is quantized with `landmark_quant`, each token's residual with `residual_quant`
    (EDEN8-4096, 1.5 bits): see `residual_landmarks`.

    Deviations from the public code, and why:
    - budget: the fork turns a fraction into int(f·L) tokens (floor); kvdiag's `resolve_budget`
      rounds up. Scores are fp32 (upstream casts the softmax to bf16), so ties are rarer.
    - the runtime config class also has a prefix ("sink") budget and fraction-sized local windows;
      kvdiag follows the study's description (local 64 tokens, no sinks) for both variants.
    - the runtime's HIGGS-landmark scoring kernel is not reproduced; kvdiag scores dequantized
      landmarks with the group-mean query, which is what its bf16 kernel computes.
    - quantizers come from `kvdiag.quant`, applied to rows of H_kv·d channels as upstream; the
      Hadamard group is the spec's (landmarks: 128, the fork's default; K/V: the whole row).

    kvdiag addition, not upstream (off by default): `center=True` subtracts each KV head's mean
    pre-RoPE key (re-rotated to every position for post-RoPE keys and landmarks) and mean value
    before quantizing and adds them back after. Models with a k_proj bias (Qwen2.x) have keys with a
    large shared component; HIGGS' error scales with the row norm, so without centring 4-bit keys
    lose most of what varies between tokens (`kvdiag recall` on qwen2.5-coder-0.5b, 1.5K tokens,
    3.125 %: key loss 0.37 → 0.11, total output error 0.43 → 0.20). The means cost 2·H_kv·d bf16 values per layer.

    Bytes: resident = landmarks at their precision (plus meta landmarks when residual), and in the
    simulator the local window as bf16 K and V (plus the means with `center`). Fetched per step: K and V of each fetched
    (KV head, token) entry at `kv_quant`, i.e. 2 · bytes_per_row(H_kv·d) / H_kv.
    """

    name: ClassVar[str] = "yakv"
    paper: ClassVar[str] = (
        "Bocharnikov et al., KV Cache Offloading for Context-Intensive Tasks, arXiv 2604.08426, 2026 "
        "(yandex-research/context-intensive-kv-offloading)"
    )

    local: int = 64
    landmark_quant: str = "higgs:EDEN4-256"
    scoring: str = "simulator"
    kv_quant: str = "auto"
    residual_meta_chunk: int = 0
    residual_quant: str = "higgs:EDEN8-4096"
    center: bool = False

    def __post_init__(self) -> None:
        check_int(self.name, "local", self.local, 0)
        check_quant_spec(self.name, "landmark_quant", self.landmark_quant)
        check_choice(self.name, "scoring", self.scoring, SCORINGS)
        if self.kv_quant != "auto":
            check_quant_spec(self.name, "kv_quant", self.kv_quant)
        check_int(self.name, "residual_meta_chunk", self.residual_meta_chunk, 0)
        if not isinstance(self.center, bool):
            raise KvdiagError(f"{self.name}: center must be True or False, got {self.center!r}")
        if self.residual_meta_chunk:
            check_quant_spec(self.name, "residual_quant", self.residual_quant)

    def resolved_kv_quant(self) -> str:
        """The K/V storage format actually used ("auto" resolved by the scoring variant)."""
        return DEFAULT_KV_QUANT[self.scoring] if self.kv_quant == "auto" else self.kv_quant

    def quantize_landmarks(self, k_post: torch.Tensor) -> torch.Tensor:
        """[H_kv, C, d] post-RoPE keys -> landmarks at this method's precision."""
        if self.residual_meta_chunk:
            return residual_landmarks(
                k_post, self.residual_meta_chunk, self.landmark_quant, self.residual_quant
            )
        return roundtrip_rows(self.landmark_quant, k_post)

    def _means(self, layer: LayerKV):
        """(mean pre-RoPE key [H_kv, 1, d], its rotation to every position [H_kv, L, d], mean value
        [H_kv, 1, d]) with `center`, else zeros."""
        if not self.center:
            zero = torch.zeros((), device=layer.k_post.device)
            return zero, zero, zero
        mean_k = layer.k_pre.float().mean(dim=1, keepdim=True)
        mean_k_post = apply_rope(mean_k.expand(-1, layer.k_pre.shape[1], -1), layer.cos, layer.sin).float()
        return mean_k, mean_k_post, layer.v.float().mean(dim=1, keepdim=True)

    def build(self, layer: LayerKV) -> YAKVIndex:
        n_kv, n_tokens, d = layer.k_post.shape
        n_scored = max(0, n_tokens - self.local)
        kv_quant = self.resolved_kv_quant()
        mean_k, mean_k_post, mean_v = self._means(layer)
        if self.scoring == "simulator":
            pre = roundtrip_rows(kv_quant, layer.k_pre.float() - mean_k) + mean_k
            keys = apply_rope(pre, layer.cos, layer.sin).float()
        else:
            keys = roundtrip_rows(kv_quant, layer.k_post.float() - mean_k_post) + mean_k_post
        values = roundtrip_rows(kv_quant, layer.v.float() - mean_v) + mean_v
        local = torch.zeros(n_kv, n_tokens, dtype=torch.bool, device=layer.k_post.device)
        local[:, n_scored:] = True
        if self.scoring == "simulator":  # the local window is kept exact on the GPU
            keys[:, n_scored:] = layer.k_post[:, n_scored:].float()
            values[:, n_scored:] = layer.v[:, n_scored:].float()
        return YAKVIndex(
            keys=keys,
            values=values,
            landmarks=self._landmarks(layer.k_post[:, :n_scored], mean_k_post),
            local=local,
            n_tokens=n_tokens,
            n_kv_heads=n_kv,
            head_dim=d,
        )

    def _landmarks(self, k_post: torch.Tensor, mean_k_post: torch.Tensor) -> torch.Tensor:
        if not self.center:
            return self.quantize_landmarks(k_post)
        shift = mean_k_post[:, : k_post.shape[1]]
        return self.quantize_landmarks(k_post.float() - shift) + shift

    def scores(self, index: YAKVIndex, q: torch.Tensor) -> torch.Tensor:
        """[n, H_kv, C] scores of the scored (non-local) tokens."""
        if self.scoring == "simulator":
            return softmax_max_scores(q, index.landmarks, 1.0 / math.sqrt(index.head_dim))
        return mean_query_scores(q, index.landmarks)

    def select(self, index: YAKVIndex, q: torch.Tensor, budget: float | int) -> Selection:
        k = resolve_budget(budget, index.n_tokens)
        chosen = topk_mask(self.scores(index, q), k)  # [n, H_kv, C]
        pad = index.n_tokens - chosen.shape[-1]
        chosen = torch.nn.functional.pad(chosen, (0, pad), value=False)
        entry = 2 * row_bytes(self.resolved_kv_quant(), index.n_kv_heads * index.head_dim) / index.n_kv_heads
        return make_selection(chosen, index.local, entry_bytes=entry, fetch_always=self.scoring == "runtime")

    def keys(self, index: YAKVIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.keys, ids)

    def values(self, index: YAKVIndex, ids: torch.Tensor | None = None) -> torch.Tensor:
        return take_tokens(index.values, ids)

    def resident_breakdown(self, index: YAKVIndex) -> dict[str, int]:
        channels = index.n_kv_heads * index.head_dim
        n_landmarks = index.landmarks.shape[1]
        if self.residual_meta_chunk:
            n_meta = -(-n_landmarks // self.residual_meta_chunk)
            landmark_bytes = n_meta * row_bytes(self.landmark_quant, channels) + n_landmarks * row_bytes(
                self.residual_quant, channels
            )
        else:
            landmark_bytes = n_landmarks * row_bytes(self.landmark_quant, channels)
        out = {"landmarks": round(landmark_bytes)}
        if self.scoring == "simulator":
            out["local"] = kv_bytes(index.n_tokens - n_landmarks, index.n_kv_heads, index.head_dim)
        if self.center:
            out["means"] = kv_bytes(1, index.n_kv_heads, index.head_dim)
        return out

    def resident_bytes(self, index: YAKVIndex) -> int:
        return sum(self.resident_breakdown(index).values())

    def fetched_bytes(self, selection: Selection) -> float:
        return priced_fetched_bytes(selection)
